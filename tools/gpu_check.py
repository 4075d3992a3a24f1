"""The GPU acceptance script: one command on one lent GPU (at most ~8 minutes on an H200), or small on the CPU.

    tools/fetch_gpu_wheels.sh                         # here, with network: wheels/gpu/ (git-ignored; travels)
    python tools/gpu_check.py [--out gpu_check.json]  # on the GPU machine; installs wheels/gpu when needed
    python tools/gpu_check.py --cpu                   # the same code paths on the CPU, tiny sizes (CI)

Every check goes through the product's own entry points, on the device the product picks (CUDA when present):
- demo: `rntp train` of recipes/configs/demo_pretrain.yaml (300 steps; --cpu: 12), then demo_rl.yaml from its
  checkpoint (10 RL steps with the in-process engine; --cpu: 2): the pretraining loss falls, RL losses are finite.
- side models: demo_rl.yaml as the production recipes run RL: entropy-selected sites, the frozen reference's KL
  term, the info-gain reward with its EMA baseline (3 steps; --cpu: 2): losses and KL finite.
- resume: the pretraining run restarted from its halfway checkpoint repeats the second half's losses (exact on the
  CPU; on a GPU within 1e-3 relative, since CUDA's embedding backward sums with atomics).
- export: `rntp convert to-hf` of the pretrained checkpoint, loaded by transformers on the same device: max
  |logit difference| against the Megatron model in float32.
- loss hook: a step of the RNTP loss hook against a plain next-token step, same ~1B bf16 model and tokens (--cpu:
  the tiny card): step-time ratio and, on a GPU, memory of each (torch.cuda.memory_allocated: held before a step,
  when the forward returns, and the peak) beside the peak that `rntp plan`'s memory plan predicts.
- MFU: the ~1B model's bf16 plain training step timed with CUDA events: tokens/s and MFU = 6 N tokens/s / peak.
- RL step: tools/bench_rl_step.py, the RL step with its scoring passes on shared-context rows vs one rollout a row
  (GPU: 4 groups of G = 8 after 2,048-token prompts, thoughts of 32-1,024 tokens, a bf16 8-layer model; --cpu: its
  --smoke size): tokens/s of each (the rollouts' distinct tokens over the step's wall time) and their ratio.
Each check runs on even when an earlier one failed (its error is recorded). Writes one JSON (--out) and prints a
table; exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WHEELS = ROOT / "wheels" / "gpu"
SITE = ROOT / "build" / "gpu_site"  # where they are installed (git-ignored): the machine's Python stays as it is
# import name -> wheel (tools/fetch_gpu_wheels.sh): what the lent GPU image lacks
WHEEL_MODULES = {"megatron.core": "megatron-core", "rapidfuzz": "rapidfuzz", "psutil": "psutil", "yaml": "pyyaml"}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}  # dense bf16 FLOP/s
ONE_B = {"card": "tiny", "num_layers": 16, "hidden_size": 2048, "ffn_hidden_size": 5632, "num_attention_heads": 16,
         "num_query_groups": 8, "vocab_size": 32000, "max_position_embeddings": 4096, "params_dtype": "bfloat16"}
SIZES = {  # per mode: demo steps, resume point, RL steps, loss-hook card and shapes, timed steps
    "gpu": {"pretrain": 300, "rl": 10, "side": 3, "rl_batch": [], "card": ONE_B, "batch": 4, "seq": 2048, "policy": 512,
            "steps": 5, "rl_step": ["--groups", "4", "--G", "8", "--context", "2048", "--thought-max", "1024",
                                    "--layers", "8", "--hidden", "1024", "--vocab", "32000", "--micro-batch", "2",
                                    "--bf16"]},
    "cpu": {"pretrain": 12, "rl": 2, "side": 2, "rl_batch": ["schedule.global_batch_size=16", "schedule.micro_batch_size=16"],
            "card": {"card": "tiny", "params_dtype": "bfloat16"}, "batch": 2, "seq": 64, "policy": 16, "steps": 2,
            "rl_step": ["--smoke"]},
}


def ensure_wheels() -> list[str]:
    """The modules this Python lacks, pip-installed offline from wheels/gpu into build/gpu_site (put first on
    sys.path and PYTHONPATH, so spawned checkpoint writers see them too); the wheel names installed."""
    sys.path.insert(0, str(SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), str(ROOT), os.environ.get("PYTHONPATH")]))
    missing = [wheel for module, wheel in WHEEL_MODULES.items() if not _importable(module)]
    if not missing:
        return []
    if not WHEELS.is_dir():
        raise SystemExit(f"missing {missing} and no {WHEELS}: run tools/fetch_gpu_wheels.sh and carry wheels/gpu")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links",
                    str(WHEELS), "--target", str(SITE), *missing], check=True)
    importlib.invalidate_caches()
    still = [module for module in WHEEL_MODULES if not _importable(module)]
    if still:
        raise SystemExit(f"{still} do not import after installing {missing} from {WHEELS}")
    return missing


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


class Report:
    """Rows (check, quantity, value, ok) and the facts of the run; one JSON and one table."""

    def __init__(self, mode: str, out: Path):
        import torch

        self.out = out  # rewritten after every check: a run stopped at its time limit still leaves what it measured
        self.rows: list[dict[str, Any]] = []
        self.facts: dict[str, Any] = {"mode": mode, "python": platform.python_version(), "torch": torch.__version__,
                                      "device": torch.cuda.get_device_name() if mode == "gpu" else "cpu",
                                      "commit": _commit()}

    def add(self, check: str, name: str, value: Any, ok: bool = True, **extra: Any) -> None:
        self.rows.append({"check": check, "name": name, "value": value, "ok": bool(ok), **extra})

    def run(self, check: str, fn: Callable[[], None]) -> None:
        """fn() adds its rows; an exception becomes a failed row with its message (the next check still runs)."""
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            self.add(check, "error", f"{type(e).__name__}: {e}"[:500], ok=False,
                     traceback=traceback.format_exc()[-4000:])
        finally:
            from rntp_megatron.runtime import destroy_distributed

            destroy_distributed()
        self.add(check, "wall s", round(time.monotonic() - t0, 1))
        self.write()
        print(f"[gpu_check] {check} done in {time.monotonic() - t0:.1f} s", flush=True)

    def ok(self) -> bool:
        return all(r["ok"] for r in self.rows)

    def write(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps({**self.facts, "ok": self.ok(), "rows": self.rows}, indent=2))

    def table(self) -> str:
        width = max(len(f"{r['check']}: {r['name']}") for r in self.rows)
        lines = [f"{k}: {v}" for k, v in self.facts.items()]
        for r in self.rows:
            value = f"{r['value']:.4g}" if isinstance(r["value"], float) else str(r["value"])
            lines.append(f"{r['check'] + ': ' + r['name']:<{width}}  {value:>14}  {'ok' if r['ok'] else 'FAIL'}")
        return "\n".join(lines)


def _commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _rntp(*argv: str) -> None:
    """`rntp argv` in this process; an error when it does not exit 0."""
    from rntp_megatron.cli import main

    code = main(list(argv))
    if code != 0:
        raise RuntimeError(f"rntp {' '.join(argv[:3])} ... exited {code}")


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    from rntp_megatron.metrics import read_metrics

    return {int(r["step"]): float(r[key]) for r in read_metrics(run_dir / "metrics.jsonl") if key in r}


def _set(run_dir: Path, *extra: str) -> list[str]:
    args = [f"logging.dir={run_dir}", f"checkpoint.dir={run_dir / 'checkpoints'}", "logging.plot=false", *extra]
    return [a for item in args for a in ("--set", item)]


def check_demo(report: Report, work: Path, size: dict) -> None:
    """Pretrain (demo_pretrain.yaml, checkpoints at the half and the end) then RL (demo_rl.yaml) from it."""
    configs = ROOT / "recipes" / "configs"
    steps = size["pretrain"]
    _rntp("train", "--config", str(configs / "demo_pretrain.yaml"),
          *_set(work / "pretrain", f"schedule.train_steps={steps}", f"checkpoint.save_interval={steps // 2}",
                "checkpoint.keep_last=2", f"logging.log_interval={max(steps // 5, 1)}"))
    loss = _losses(work / "pretrain")
    head, tail = statistics.mean(loss[s] for s in range(3)), statistics.mean(loss[s] for s in range(steps - 3, steps))
    report.add("demo", f"pretrain loss, first 3 -> last 3 of {steps} steps", f"{head:.3f} -> {tail:.3f}",
               ok=tail < head and math.isfinite(tail))
    _rntp("train", "--config", str(configs / "demo_rl.yaml"),
          *_set(work / "rl", f"schedule.train_steps={size['rl']}", "checkpoint.save_interval=0",
                f"checkpoint.load={work / 'pretrain' / 'checkpoints' / f'iter_{steps:07d}'}", *size["rl_batch"]))
    from rntp_megatron.metrics import read_metrics

    records = read_metrics(work / "rl" / "metrics.jsonl")
    rewards = [r["reward"] for r in records]
    report.add("demo", f"RL steps with finite loss (of {size['rl']})",
               sum(math.isfinite(r["loss"]) for r in records), ok=len(records) == size["rl"]
               and all(math.isfinite(r["loss"]) for r in records))
    report.add("demo", "RL mean reward, first -> last step", f"{rewards[0]:.3f} -> {rewards[-1]:.3f}")


def check_side_models(report: Report, work: Path, size: dict) -> None:
    """RL as the production recipes run it: entropy-selected sites scored by the frozen reference, its KL term,
    the info-gain reward with the EMA baseline (demo_rl.yaml from the demo's pretrained checkpoint)."""
    steps = size["side"]
    _rntp("train", "--config", str(ROOT / "recipes" / "configs" / "demo_rl.yaml"),
          *_set(work / "side", f"schedule.train_steps={steps}", "checkpoint.save_interval=0",
                f"checkpoint.load={work / 'pretrain' / 'checkpoints'}", "data.site_selection=entropy", "data.entropy_threshold=0.5", "rl.kl_coef=0.1",
                "reward.name=info_gain", "reward.baseline=ema", *size["rl_batch"]))
    from rntp_megatron.metrics import read_metrics

    records = read_metrics(work / "side" / "metrics.jsonl")
    finite = [r for r in records if math.isfinite(r["loss"]) and math.isfinite(r.get("kl", float("nan")))]
    report.add("side models", f"RL steps with finite loss and KL (of {steps})", len(finite),
               ok=len(records) == steps and len(finite) == steps)


def check_resume(report: Report, work: Path, size: dict, on_gpu: bool) -> None:
    """The pretraining run restarted from its halfway checkpoint: the second half's losses again."""
    steps, half = size["pretrain"], size["pretrain"] // 2
    resumed = work / "resumed"
    shutil.copytree(work / "pretrain" / "checkpoints" / f"iter_{half:07d}",
                    resumed / "checkpoints" / f"iter_{half:07d}")
    (resumed / "checkpoints" / "latest").write_text(f"iter_{half:07d}")
    _rntp("train", "--config", str(ROOT / "recipes" / "configs" / "demo_pretrain.yaml"),
          *_set(resumed, f"schedule.train_steps={steps}", "checkpoint.save_interval=0"))
    first, again = _losses(work / "pretrain"), _losses(resumed)
    diff = max(abs(first[s] - again[s]) / abs(first[s]) for s in range(half, steps))
    report.add("resume", f"max rel. loss diff, steps {half}..{steps - 1}", diff,
               ok=sorted(again) == list(range(half, steps)) and diff <= (1e-3 if on_gpu else 0.0))


def check_export(report: Report, work: Path, on_gpu: bool) -> None:
    """`rntp convert to-hf` of the pretrained model; transformers' logits against Megatron's on the device."""
    import torch
    import transformers

    from rntp_megatron.checkpoint import latest_checkpoint, load_checkpoint
    from rntp_megatron.config import load_config
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, device, init_distributed

    ckpt, out = latest_checkpoint(work / "pretrain" / "checkpoints"), work / "hf"
    _rntp("convert", "to-hf", "--checkpoint", str(ckpt), "--out", str(out))
    cfg = load_config(ROOT / "recipes" / "configs" / "demo_pretrain.yaml")
    init_distributed(cfg.parallel, cfg.seed)
    try:
        model = build_model(cfg.model, cfg.parallel).eval()
        load_checkpoint(ckpt, [model], None)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
        tokens, positions = tokens.to(device()), torch.arange(64, device=device()).expand_as(tokens)
        with torch.no_grad():
            ours = model(tokens, positions, None)[..., :cfg.model.vocab_size]
    finally:
        destroy_distributed()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                           attn_implementation="eager").to(tokens.device).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
    diff = (theirs.float() - ours.float()).abs().max().item()
    report.add("export", "max |HF - Megatron| logit (float32)", diff, ok=diff <= (1e-3 if on_gpu else 1e-4))


def check_loss_hook_and_mfu(report: Report, size: dict, on_gpu: bool) -> None:
    """Plain next-token vs RNTP loss-hook train steps on one model and the same tokens; MFU of the plain one."""
    import torch

    from rntp_megatron.config import build_config
    from rntp_megatron.lm_loss import lm_batch, lm_forward_step
    from rntp_megatron.memory_plan import memory_plan
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.optimizer import build_optimizer, wrap_ddp
    from rntp_megatron.rl.batch import RLBatch, with_global_counts
    from rntp_megatron.rl.loss import RNTPLoss
    from rntp_megatron.runtime import device, init_distributed
    from rntp_megatron.step import train_step

    cfg = build_config({"model": size["card"], "schedule": {"lr": 1e-5, "clip_grad": 1.0},
                        "rl": {"tis_cap": 2.0}})  # KL needs a reference checkpoint (validation): left out
    init_distributed(cfg.parallel, cfg.seed)
    ddp = wrap_ddp(build_model(cfg.model, cfg.parallel), cfg.parallel)
    optimizer = build_optimizer([ddp], cfg.schedule, cfg.parallel)
    n_params = sum(p.numel() for p in ddp.module.parameters())
    b, s, vocab = size["batch"], size["seq"], cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)  # host data, moved to the model's device once, as the trainer does
    rows = torch.randint(0, vocab, (b, s + 1), generator=g)
    policy = torch.zeros(b, s)
    policy[:, s - size["policy"]:] = 1  # the thought + answer at the end of each row; the rest is context
    old = -10.0 + 0.1 * torch.randn(b, s, generator=g)
    rl = with_global_counts(RLBatch(
        tokens=rows[:, :-1], position_ids=torch.arange(s).expand(b, -1).contiguous(), labels=rows[:, 1:],
        thought_mask=policy, answer_mask=torch.zeros_like(policy), ntp_mask=1 - policy, old_logprobs=old,
        rollout_logprobs=old + 0.05, ref_logprobs=old - 0.05, advantages=torch.randn(b, generator=g),
        rewards=torch.rand(b, generator=g)).to(device()), cfg.rl.train_on)
    variants = {"plain next-token": (lm_forward_step, [lm_batch(rows.to(device()))]),
                "RNTP loss hook": (RNTPLoss(cfg.rl, temperature=0.7).forward_step, rl.microbatches(b))}
    objectives = {"plain next-token": "ntp", "RNTP loss hook": cfg.rl.objective}
    after_forward: list[int] = []  # bytes allocated when the model's forward returns: held + saved activations
    if on_gpu:
        ddp.module.register_forward_hook(lambda *_: after_forward.append(torch.cuda.memory_allocated()))
    seconds: dict[str, float] = {}
    for name, (forward_step, microbatches) in variants.items():
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(size["steps"] + 1):  # the first one warms up (and creates Adam's state)
            if i == 1 and on_gpu:
                held = torch.cuda.memory_allocated()
            metrics, took = _timed(lambda: train_step([ddp], optimizer, forward_step, microbatches, s, b), on_gpu)
            if i:
                times.append(took)
        seconds[name] = statistics.median(times)
        loss = metrics.get("loss", metrics.get("lm loss", float("nan")))
        report.add("loss hook", f"{name}: step s (median of {size['steps']})", seconds[name],
                   ok=math.isfinite(loss), loss=loss)
        plan = memory_plan(replace(cfg, rl=replace(cfg.rl, objective=objectives[name]), schedule=replace(
            cfg.schedule, seq_length=s, micro_batch_size=b, global_batch_size=b)), 1, fused_attention=False)
        report.add("memory", f"{name}: planned peak GiB (rntp plan)", plan.peak / 2**30)
        if on_gpu:
            peak = torch.cuda.max_memory_allocated()
            report.add("memory", f"{name}: measured held GiB (model, grads, Adam)", held / 2**30)
            report.add("memory", f"{name}: measured after forward GiB", after_forward[-1] / 2**30)
            report.add("memory", f"{name}: measured peak GiB", peak / 2**30)
            report.add("memory", f"{name}: planned / measured peak", plan.peak / peak)
    report.add("loss hook", "RNTP / plain step time", seconds["RNTP loss hook"] / seconds["plain next-token"])
    tokens_per_s = b * s / seconds["plain next-token"]
    report.add("mfu", f"plain step tokens/s ({n_params / 1e6:,.0f}M params, {b}x{s})", tokens_per_s)
    if on_gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        mfu = 6 * n_params * tokens_per_s / peak if peak else float("nan")
        report.add("mfu", f"MFU, 6N (bf16 peak {peak / 1e12:.0f} TFLOP/s)" if peak else f"MFU ({name}: peak unknown)",
                   mfu)


def check_rl_step(report: Report, work: Path, size: dict, on_gpu: bool) -> None:
    """tools/bench_rl_step.py at this size: tokens/s of shared-context rows and of one rollout a row (the same
    distinct tokens, the shared layout's fed tokens, over each step's wall time) and the speed-up."""
    out = work / "bench_rl_step.json"
    subprocess.run([sys.executable, str(ROOT / "tools" / "bench_rl_step.py"), *size["rl_step"], "--json", str(out)],
                   check=True)
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    tokens = rows["shared"]["fed_tokens"]
    for name, r in rows.items():
        report.add("rl step", f"{name} tokens/s ({tokens} distinct tokens)", tokens / r["step_s"])
    speedup = rows["per-row"]["step_s"] / rows["shared"]["step_s"]
    report.add("rl step", "shared / per-row speed", speedup, ok=speedup > 1 or not on_gpu)  # smoke sizes: noise


def _timed(fn: Callable[[], Any], on_gpu: bool) -> tuple[Any, float]:
    """fn()'s result and its seconds: CUDA events around it on a GPU, the wall clock on the CPU."""
    import torch

    if not on_gpu:
        t0 = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    end.synchronize()
    return result, start.elapsed_time(end) / 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU at tiny sizes (what CI runs)")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report")
    parser.add_argument("--work", default=None, help="folder for runs and checkpoints (default: a temporary one)")
    args = parser.parse_args()
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch loads: the product picks CUDA whenever it sees it
    installed = ensure_wheels()
    import tempfile

    import torch

    on_gpu = not args.cpu
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --cpu")
    size = SIZES["gpu" if on_gpu else "cpu"]
    report = Report("gpu" if on_gpu else "cpu", Path(args.out))
    report.facts["wheels_installed"] = installed
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check.") as tmp:
        work = Path(args.work or tmp)
        report.run("demo", lambda: check_demo(report, work, size))
        report.run("side models", lambda: check_side_models(report, work, size))
        report.run("resume", lambda: check_resume(report, work, size, on_gpu))
        report.run("export", lambda: check_export(report, work, on_gpu))
        report.run("loss hook", lambda: check_loss_hook_and_mfu(report, size, on_gpu))
        report.run("rl step", lambda: check_rl_step(report, work, size, on_gpu))
    report.facts["wall_s"] = round(time.monotonic() - t0, 1)
    report.write()
    print(report.table(), flush=True)
    print(f"wrote {args.out}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
