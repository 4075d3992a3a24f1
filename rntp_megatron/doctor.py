"""`rntp doctor [--config RUN.yaml] [--set ...]`: do this node, this environment and this config fit together?

One table, a line per check: OK, WARN or FAIL, what was found, and for WARN and FAIL the fix. Exits 1 on any
FAIL. Checks: Python, torch, CUDA, NCCL, the GPUs, Transformer Engine and the FP8 recipes the GPU supports,
megatron-core, the SGLang interpreter (and with --start-sglang a real server start), the Slurm/torchrun rank
layout, checkpoint.dir / logging.dir writable, checkpoint.load, W&B, the tokenizer, each data source (one record
read, skips counted), the model's vocabulary against the tokenizer's, and the memory plan (memory_plan.py)
against the device's memory (host RAM shared by the node's ranks on a CPU).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from rntp_megatron.config import RunConfig, SGLangConfig

OK, WARN, FAIL = "OK", "WARN", "FAIL"
MEGATRON_SERIES = "0.19"
# FP8 recipes by the GPU's compute capability (Transformer Engine's rules): per-tensor scaling from Ada/Hopper
# (8.9), 1x128 block scaling on Hopper (9.0) and later, MXFP8 on Blackwell (10.0).
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


def fp8_recipes(capability: tuple[int, int]) -> list[str]:
    """The model.fp8 recipes a GPU of this compute capability runs."""
    return [r for r, need in FP8_MIN_CAPABILITY.items() if capability >= need]


def _local_world(env: Mapping[str, str]) -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per node, else 1."""
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    return int(per_node) if per_node.isdigit() else 1


def world_size(env: Mapping[str, str]) -> int:
    """The job's ranks: torchrun's WORLD_SIZE, else Slurm's SLURM_NTASKS, else 1."""
    return int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)


# ---------------------------------------------------------------------------------------------------
# The environment


def check_python() -> Check:
    """Python >= 3.11 (the project's floor)."""
    ok = sys.version_info >= (3, 11)
    return Check("python", OK if ok else FAIL, platform.python_version() + f" ({sys.executable})",
                 "" if ok else "use Python >= 3.11 (tools/setup_venv.sh with PYTHON=python3.11)")


def check_torch() -> list[Check]:
    """torch, its CUDA build and devices, NCCL."""
    import torch

    checks = [Check("torch", OK, f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    if not torch.cuda.is_available():
        fix = ("on a GPU node: nvidia-smi must list the GPUs, CUDA_VISIBLE_DEVICES must not hide them, and torch "
               "must be a CUDA build (a CPU wheel says 'CUDA build none')")
        checks.append(Check("cuda", WARN, "no CUDA device: runs on the CPU with gloo", fix))
        checks.append(Check("nccl", WARN, "no CUDA: gloo is the backend", fix))
        return checks
    n = torch.cuda.device_count()
    kinds = sorted({f"{torch.cuda.get_device_name(i)} (sm {'.'.join(map(str, torch.cuda.get_device_capability(i)))}, "
                    f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)" for i in range(n)})
    checks.append(Check("cuda", OK, f"{n} GPU(s): {', '.join(kinds)}; CUDA runtime {torch.version.cuda}"))
    try:
        version = torch.cuda.nccl.version()
        checks.append(Check("nccl", OK, ".".join(map(str, version)) if isinstance(version, tuple) else str(version)))
    except Exception as e:  # a torch build without NCCL
        checks.append(Check("nccl", FAIL, f"unavailable ({e})", "install a CUDA torch wheel built with NCCL"))
    return checks


def check_transformer_engine(fp8: Optional[str], impl: str) -> Check:
    """TE importable (a guarded import: it needs a GPU and its driver) and the FP8 recipes this GPU runs."""
    import torch

    from rntp_megatron.model.spec import transformer_engine_available

    needed = fp8 is not None or impl == "transformer_engine"
    if not transformer_engine_available():
        if needed:
            return Check("transformer_engine", FAIL, f"does not import; the config needs it (model.fp8={fp8!r}, "
                         f"model.transformer_impl={impl!r})",
                         "on a GPU node: pip install -e '.[gpu]'; on a CPU: model.fp8: null and "
                         "model.transformer_impl: auto")
        if torch.cuda.is_available():
            return Check("transformer_engine", WARN, "does not import: megatron's local layers run (slower, no FP8)",
                         "pip install -e '.[gpu]' (transformer-engine[pytorch])")
        return Check("transformer_engine", OK, "not imported (no GPU): megatron's local layers run")
    import transformer_engine

    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    recipes = fp8_recipes(capability)
    detail = f"{transformer_engine.__version__}; FP8 recipes on sm {capability[0]}.{capability[1]}: {recipes or 'none'}"
    if fp8 is not None and fp8 not in recipes:
        return Check("transformer_engine", FAIL, detail + f"; model.fp8={fp8!r} is not among them",
                     f"model.fp8: {recipes[-1] if recipes else 'null'}")
    return Check("transformer_engine", OK, detail)


def check_megatron() -> Check:
    """megatron-core imports and is of the series the CPU layer was checked against."""
    try:
        import megatron.core
    except Exception as e:
        return Check("megatron-core", FAIL, f"does not import ({e})",
                     f"pip install --ignore-requires-python 'megatron-core>={MEGATRON_SERIES},<0.20' "
                     "(tools/setup_venv.sh)")
    version = megatron.core.__version__
    if not version.startswith(MEGATRON_SERIES):
        return Check("megatron-core", WARN, f"{version}: the CPU layer and tests target {MEGATRON_SERIES}.x",
                     f"pip install --ignore-requires-python 'megatron-core>={MEGATRON_SERIES},<0.20'")
    return Check("megatron-core", OK, version)


def check_sglang(cfg: RunConfig, start: bool) -> list[Check]:
    """The interpreter of rollout.sglang.python and its sglang version; an attached server's health; with
    `start`, a real server from a random tiny model (about 40 s on a CPU)."""
    sg, needed = cfg.rollout.sglang, cfg.rollout.engine == "sglang" and cfg.rl.objective != "ntp"
    urls = [u for u in [sg.url, *sg.urls] if u]
    if urls:
        return [check_sglang_urls(urls, sg.api_key)]
    missing = WARN if not needed else FAIL
    python = Path(sg.python)
    if not python.exists():
        return [Check("sglang", missing, f"rollout.sglang.python {sg.python!r} does not exist"
                      + ("" if needed else " (this config does not start a server)"),
                      "tools/install_sglang.sh sglang-venv, or rollout.sglang.python: the server venv's python")]
    try:
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('sglang'))"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [Check("sglang", missing, f"{sg.python} does not run ({e})", "reinstall: tools/install_sglang.sh")]
    if out.returncode:
        return [Check("sglang", missing, f"{sg.python} has no sglang ({out.stderr.strip().splitlines()[-1:]})",
                      "tools/install_sglang.sh sglang-venv")]
    checks = [Check("sglang", OK, f"sglang {out.stdout.strip()} in {sg.python}")]
    if start:
        checks.append(start_sglang(sg))
    return checks


def check_sglang_urls(urls: list[str], api_key: Optional[str]) -> Check:
    """Every attached server of the fleet (rollout.sglang.url and urls) answers /health."""
    from rntp_megatron.rollout.sglang.client import HTTPClient

    silent = []
    for url in urls:
        try:
            HTTPClient(url, api_key).call("/health", timeout=10)
        except Exception as e:  # any failure to answer is this check's finding
            silent.append(f"{url} ({e})")
    if silent:
        return Check("sglang", FAIL, f"{len(silent)} of {len(urls)} server(s) do not answer /health: "
                     + "; ".join(silent), "start them, or fix rollout.sglang.url / urls (and rollout.sglang.api_key)")
    return Check("sglang", OK, f"{len(urls)} server(s) answer /health: {', '.join(urls)}")


def start_sglang(sg: SGLangConfig) -> Check:
    """Start a real server from a random tiny_qwen2 model, wait for /health, generate 4 tokens, stop it."""
    import secrets
    import socket

    import torch
    import transformers

    from rntp_megatron.config import build_config
    from rntp_megatron.model import hf_mapping
    from rntp_megatron.model.hf_byte_tokenizer import write_byte_tokenizer
    from rntp_megatron.rollout.sglang.client import HTTPClient
    from rntp_megatron.rollout.sglang.process import ServerProcess

    card = build_config({"model": {"card": "tiny_qwen2", "transformer_impl": "local"}}).model
    with tempfile.TemporaryDirectory(prefix="rntp-doctor-sglang-") as tmp:
        folder = Path(tmp) / "model"
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**hf_mapping.hf_config(card, torch_dtype="float32")))
        hf.save_pretrained(folder, safe_serialization=True)
        write_byte_tokenizer(folder)
        with socket.socket() as s:
            s.bind((sg.host, 0))
            port = s.getsockname()[1]
        key = secrets.token_hex(8)
        server = ServerProcess(sg.python, str(folder), sg, Path(tmp) / "server", port, key, "float32", 0)
        try:
            t0 = time.monotonic()
            client = HTTPClient(server.url, key)
            server.wait_healthy(client, sg.startup_timeout_s)
            reply = client.call("/generate", {"input_ids": [72, 105],
                                              "sampling_params": {"max_new_tokens": 4, "temperature": 0}})
            took = time.monotonic() - t0
            return Check("sglang server", OK, f"started, healthy and generated {len(reply['output_ids'])} tokens "
                         f"in {took:.0f} s")
        except Exception as e:
            tail = " | ".join(server.log_tail(3).splitlines())  # the log goes with the temporary folder
            return Check("sglang server", FAIL, f"did not start: {str(e).splitlines()[0]}; log: {tail}",
                         "on a CPU the server needs tools/install_sglang.sh's stand-in sgl-kernel; on a GPU "
                         "rollout.sglang.extra_args may need a smaller --mem-fraction-static")
        finally:
            server.stop()


def check_layout(cfg: RunConfig, env: Mapping[str, str]) -> Check:
    """The rank layout that torchrun's or Slurm's variables imply for the config's TP/PP/CP, and the batch."""
    import torch

    from rntp_megatron.config import ConfigError, validate

    p = cfg.parallel
    world = world_size(env)
    source = ("torchrun" if "WORLD_SIZE" in env else f"Slurm job {env['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in env
              else "one process (no torchrun or Slurm variables)")
    nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1"
    try:
        validate(cfg, world_size=world)
    except ConfigError as e:
        why, _, fix = str(e).partition("; fix: ")
        return Check("rank layout", FAIL, f"{source}: {world} rank(s): {why}", fix)
    dp = world // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size)
    detail = (f"{source}: {world} rank(s) on {nodes} node(s) = TP {p.tensor_model_parallel_size} x PP "
              f"{p.pipeline_model_parallel_size} x CP {p.context_parallel_size} x DP {dp}")
    local = _local_world(env)
    # --gpus-per-task=1 / --gpu-bind: each task sees one GPU of its own (CUDA_VISIBLE_DEVICES of one entry)
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    bound = torch.cuda.is_available() and torch.cuda.device_count() == 1 and visible != "" and "," not in visible
    if bound:
        return Check("rank layout", OK, detail + f"; one GPU bound to each task (CUDA_VISIBLE_DEVICES="
                     f"{visible})")
    if torch.cuda.is_available() and local > torch.cuda.device_count():
        return Check("rank layout", FAIL, detail + f"; {local} ranks per node but {torch.cuda.device_count()} GPUs",
                     f"--ntasks-per-node={torch.cuda.device_count()} (one rank a GPU), or --gpus-per-node={local}")
    return Check("rank layout", OK, detail)


# ---------------------------------------------------------------------------------------------------
# The config's paths, tokenizer, data and memory


def _writable(folder: Path) -> Optional[str]:
    """None when a file can be created in `folder` (made if missing, removed again if it was), else why not."""
    made = [d for d in [folder, *folder.parents] if not d.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".rntp-doctor-"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    finally:
        for d in made:  # children first: `made` runs from the folder up
            try:
                d.rmdir()
            except OSError:
                pass
    return None


def check_paths(cfg: RunConfig) -> list[Check]:
    """logging.dir and checkpoint.dir writable, the checkpoint a restart resumes from, checkpoint.load."""
    checks = []
    ckpt_dir = cfg.checkpoint.dir or str(Path(cfg.logging.dir) / "checkpoints")
    for field, folder in (("logging.dir", cfg.logging.dir), ("checkpoint.dir", ckpt_dir)):
        why = _writable(Path(folder))
        checks.append(Check(field, OK, f"{folder} writable") if why is None else
                      Check(field, FAIL, f"{folder} is not writable ({why})",
                            f"{field}: a folder on a shared filesystem every node can write (e.g. $SCRATCH/run)"))
    from rntp_megatron.checkpoint import CheckpointError, checkpoint_step, latest_checkpoint, resolve_checkpoint

    try:
        latest = latest_checkpoint(ckpt_dir)
        if latest is not None:
            checks.append(Check("resume", OK, f"the run resumes from {latest} (step {checkpoint_step(latest)})"))
    except CheckpointError as e:
        checks.append(Check("resume", FAIL, str(e), f"point {ckpt_dir}/latest at a complete iter_* folder, or "
                            "start a new run in another checkpoint.dir"))
    if cfg.checkpoint.load:
        try:
            found = resolve_checkpoint(cfg.checkpoint.load, "checkpoint.load")
            checks.append(Check("checkpoint.load", OK, f"{found} (step {checkpoint_step(found)})"))
        except CheckpointError as e:
            why, _, fix = str(e).partition("; fix: ")
            checks.append(Check("checkpoint.load", FAIL, why, fix or "checkpoint.load: a complete checkpoint"))
    return checks


def check_wandb(cfg: RunConfig) -> list[Check]:
    """logging.wandb: the package imports (an optional extra); online mode needs a login on the node."""
    w = cfg.logging.wandb
    if w is None:
        return []
    try:
        import wandb
    except ImportError:
        return [Check("wandb", FAIL, "logging.wandb is set but the wandb package does not import",
                      "pip install -e '.[wandb]', or logging.wandb: null")]
    detail = f"wandb {wandb.__version__}, project {w.project!r}, mode {w.mode}"
    if w.mode == "online":
        return [Check("wandb", WARN, detail + ": needs the network and a login from every node that logs (rank 0)",
                      "wandb login (or WANDB_API_KEY) on the node, or logging.wandb.mode: offline and wandb sync")]
    return [Check("wandb", OK, detail)]


def check_tokenizer(cfg: RunConfig) -> tuple[list[Check], Optional[object]]:
    """The tokenizer loads, its tags are single tokens, and model.vocab_size holds it."""
    from rntp_megatron.config import ConfigError
    from rntp_megatron.data.tokenizer import check_model_vocab, tokenizer_for

    try:
        tok = tokenizer_for(cfg.data)
    except Exception as e:
        return [Check("tokenizer", FAIL, f"data.tokenizer {cfg.data.tokenizer.kind!r} does not load: {e}",
                      "data.tokenizer.path: a local folder with tokenizer.json (or data.tokenizer.kind: byte)")], None
    d = cfg.data
    tags = {t: tok.encode(t) for t in (d.think_open, d.think_close, d.answer_open, d.answer_close)}
    checks = [Check("tokenizer", OK, f"{d.tokenizer.kind}: {tok.vocab_size} ids with the tags, eos {tok.eos_id}, "
                    f"pad {tok.pad_id}")]
    split = [t for t, ids in tags.items() if len(ids) != 1]
    if split:
        checks.append(Check("tags", FAIL, f"{split} are not single tokens",
                            "use the tokenizer the data path builds (data/tokenizer.tokenizer_for adds them)"))
    try:
        check_model_vocab(cfg, tok.vocab_size)
        checks.append(Check("vocabulary", OK, f"model.vocab_size {cfg.model.vocab_size} holds {tok.vocab_size} ids "
                            f"(tags {sorted(i[0] for i in tags.values())})"))
    except ConfigError as e:
        why, _, fix = str(e).partition("; fix: ")
        checks.append(Check("vocabulary", FAIL, why, fix))
    return checks, tok


def check_sources(cfg: RunConfig, tokenizer: Optional[object] = None) -> list[Check]:
    """Each data source: open it as DP rank 0 of 1, read until its first usable record, count what was skipped;
    a Megatron dataset's recorded vocabulary against the tokenizer's."""
    from rntp_megatron.data.sources import SkipCounts, check_megatron_vocab, open_source, source_name

    checks = []
    for i, src in enumerate(cfg.data.sources):
        name = f"data.sources[{i}]"
        skips = SkipCounts()
        t0 = time.monotonic()
        try:
            if src.kind == "megatron" and tokenizer is not None:
                check_megatron_vocab(src, tokenizer.vocab_size)
            source = open_source(src, cfg.data.max_document_bytes, skips, cfg.data.shard_bytes)
            # sources yield usable records only; an endless one (synthetic) from its first unit
            docs = source.documents() if source.num_units is not None else (d for d, _ in source.read(0, {}))
            first = next(iter(docs), None)
        except Exception as e:
            fix = ("rntp prepare-data again with this run's data.tokenizer" if "tokenized with" in str(e) else
                   f"{name}.path: an existing {src.kind} file, folder or glob readable from this node")
            checks.append(Check(name, FAIL, f"{source_name(src)}: {e}", fix))
            continue
        skipped = sum(skips.values())
        took = time.monotonic() - t0
        if first is None:
            checks.append(Check(name, FAIL, f"{source_name(src)}: no usable record (skipped: {skips.report()})",
                                f"{name}.text_field: the field that holds the text, or clean the input"))
        elif skipped:
            checks.append(Check(name, WARN, f"{source_name(src)}: first record {first.doc_id!r} after {skipped} "
                                f"skipped ({skips.report()}), {took:.1f} s",
                                "the skipped records are counted and left out at train time; fix or drop them"))
        else:
            size = len(first.text) if first.text is not None else len(first.token_ids)
            unit = "chars" if first.text is not None else "tokens"
            checks.append(Check(name, OK, f"{source_name(src)}: first record {first.doc_id!r} ({size} {unit}), "
                                f"no skips, {took:.1f} s"))
    return checks


def check_memory(cfg: RunConfig, env: Mapping[str, str]) -> Check:
    """The memory plan's peak per rank against the GPU's memory, or, on a CPU, the node's ranks against RAM."""
    import psutil
    import torch

    from rntp_megatron.memory_plan import GiB, device_memory_bytes, memory_plan
    from rntp_megatron.model.spec import use_transformer_engine

    world = world_size(env)
    try:
        fused = use_transformer_engine(cfg.model)
    except RuntimeError:  # FP8 without TE: reported by the transformer_engine check
        fused = False
    plan = memory_plan(cfg, world, fused_attention=fused)
    device = device_memory_bytes()
    if device is not None:
        need, have, where = plan.peak, device, f"GPU {torch.cuda.get_device_name()}"
    else:
        ranks = _local_world(env)
        need, have, where = plan.peak * ranks, psutil.virtual_memory().total, f"host RAM for {ranks} rank(s)"
    detail = f"plan {need / GiB:.2f} GiB of {have / GiB:.1f} GiB {where} (rntp plan --config ... for the terms)"
    fix = ("parallel.use_distributed_optimizer: true, a larger parallel.tensor_model_parallel_size or "
           "pipeline_model_parallel_size, or a smaller schedule.micro_batch_size")
    if need > 0.95 * have:
        return Check("memory", FAIL, detail, fix)
    if need > 0.85 * have:
        return Check("memory", WARN, detail + " (little headroom)", fix)
    return Check("memory", OK, detail)


# ---------------------------------------------------------------------------------------------------


def run_checks(config: Optional[str], overrides: list[str], env: Optional[Mapping[str, str]] = None,
               start_sglang: bool = False) -> list[Check]:
    """Every check, in table order; a config that does not load is one FAIL and the config checks are skipped."""
    from rntp_megatron.config import ConfigError, load_config

    env = os.environ if env is None else env
    checks = [check_python(), *check_torch(), check_megatron()]
    try:
        cfg = load_config(config, overrides)
    except (ConfigError, OSError) as e:
        why, _, fix = str(e).partition("; fix: ")
        return checks + [Check("config", FAIL, why, fix or "--config: an existing YAML file")]
    checks.append(Check("config", OK, f"{config or 'defaults'} {' '.join(overrides)}".strip()))
    tokenizer_checks, tokenizer = check_tokenizer(cfg)
    steps: list[Callable[[], list[Check] | Check]] = [
        lambda: check_transformer_engine(cfg.model.fp8, cfg.model.transformer_impl),
        lambda: check_sglang(cfg, start_sglang),
        lambda: check_layout(cfg, env),
        lambda: check_paths(cfg),
        lambda: check_wandb(cfg),
        lambda: tokenizer_checks,
        lambda: check_sources(cfg, tokenizer),
        lambda: check_memory(cfg, env),
    ]
    for step in steps:
        result = step()
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def format_table(checks: list[Check]) -> str:
    """One line a check: name, status, what was found, and `fix: ...` for WARN and FAIL."""
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        fix = f"  fix: {c.fix}" if c.status != OK and c.fix else ""
        lines.append(f"{c.name:<{width}}  {c.status:<4}  {c.detail}{fix}")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    lines.append(f"{fails} FAIL, {warns} WARN, {len(checks) - fails - warns} OK")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="the run's YAML config (defaults when omitted)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, as for rntp train")
    parser.add_argument("--start-sglang", action="store_true",
                        help="also start a real SGLang server from rollout.sglang.python (about 40 s on a CPU)")


def run(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)  # megatron's "TE/Apex not installed": a row says it
    checks = run_checks(args.config, args.overrides, start_sglang=args.start_sglang)
    print(format_table(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
