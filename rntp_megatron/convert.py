"""`rntp convert`: Megatron dist checkpoints <-> Hugging Face folders, through the one mapping (model/hf_mapping)
and the same weight stream that feeds SGLang (weights/export).

    rntp convert to-hf   --checkpoint runs/x/checkpoints --out hf/x [--config run.yaml] [--tokenizer DIR] [--fp8]
    rntp convert from-hf --hf /models/Qwen3-8B --out ckpt/qwen3-8b-init [--tp 2 --pp 1]

to-hf reads a checkpoint saved at any TP/PP layout (dist_checkpointing reshards on load) and writes config.json,
safetensors shards with their index, the tokenizer and generation_config.json; with --fp8 the decoder's linear
weights are blockwise FP8 (128x128 e4m3 + float32 weight_scale_inv) and config.json carries the
quantization_config that SGLang (`--quantization fp8`) and transformers (FineGrainedFP8) read. from-hf builds the
Megatron model of a llama / qwen2 / qwen3 HF folder and saves it as step 0 of a checkpoint directory (model only,
no optimizer) that a run starts from with `checkpoint.load`. Either runs in one process, or under torchrun with
WORLD_SIZE = TP * PP to spread a large model. Outputs appear whole or not at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from rntp_megatron.config import ConfigError, RunConfig, build_config, load_config

GENERATION_DEFAULTS = {"do_sample": True}


class ConvertError(RuntimeError):
    """Bad conversion input (missing checkpoint, unknown model, output in the way); the message says which."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True)
    to_hf = sub.add_parser("to-hf", help="Megatron dist checkpoint -> Hugging Face folder")
    to_hf.add_argument("--checkpoint", required=True,
                       help="a checkpoints folder (its `latest` is taken), its `latest` file, or one iter_* folder")
    to_hf.add_argument("--out", required=True, help="Hugging Face folder to write")
    to_hf.add_argument("--config", default=None, help="the run's YAML (when the checkpoint does not record its model)")
    to_hf.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    to_hf.add_argument("--tokenizer", default=None,
                       help="tokenizer folder to ship (default: the run's data.tokenizer; byte vocab is generated)")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                       help="tensor dtype in the HF folder (default: the model's)")
    to_hf.add_argument("--fp8", action="store_true",
                       help="blockwise FP8 linear weights (+ weight_scale_inv), quantization_config in config.json")
    to_hf.add_argument("--overwrite", action="store_true")
    from_hf = sub.add_parser("from-hf", help="Hugging Face folder -> Megatron dist checkpoint (step 0)")
    from_hf.add_argument("--hf", required=True, help="Hugging Face folder (config.json + safetensors)")
    from_hf.add_argument("--out", required=True, help="checkpoint directory to create (gets iter_0000000 + latest)")
    for p in (to_hf, from_hf):
        p.add_argument("--tp", type=int, default=None, help="tensor parallel size (default: the world size / PP)")
        p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    from_hf.add_argument("--overwrite", action="store_true")


def _recorded_model(ckpt: Path) -> Optional[dict[str, Any]]:
    """The model section a checkpoint's trainer state records, if any."""
    state_file = ckpt / "trainer_state" / "global.json"
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    return state.get("model") or (state.get("config") or {}).get("model")


def _layout(cfg_data: dict[str, Any], tp: Optional[int], pp: int) -> dict[str, Any]:
    """cfg_data with the conversion's layout: TP x PP, TP defaulting to the world size / PP; no SP, CP or EP."""
    tp = tp or max(int(os.environ.get("WORLD_SIZE", "1")) // pp, 1)
    return {**cfg_data, "parallel": {**cfg_data.get("parallel", {}), "tensor_model_parallel_size": tp,
                                     "pipeline_model_parallel_size": pp, "sequence_parallel": False,
                                     "context_parallel_size": 1, "expert_model_parallel_size": 1}}


def _check_world(cfg: RunConfig) -> None:
    """The process count must be TP x PP (checked after the layout was checked against the model)."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp * pp != world:
        raise ConfigError(f"parallel: conversion at TP={tp} x PP={pp} needs {tp * pp} processes, this is {world} "
                          f"(fix: run it under torchrun --nproc_per_node={tp * pp}, or pass --tp/--pp)")


def _init(cfg: RunConfig) -> None:
    from rntp_megatron.runtime import init_distributed

    init_distributed(cfg.parallel, cfg.seed)


def _token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad token ids of a tokenizer folder (those it defines)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _stage_tokenizer(cfg: RunConfig, tokenizer: Optional[str], staging: Path) -> tuple[Path, dict[str, int]]:
    """A folder with the tokenizer files and generation_config.json to ship, and the special token ids."""
    from rntp_megatron.model.hf_byte_tokenizer import write_byte_tokenizer

    source = tokenizer or cfg.data.tokenizer.path
    if source is None and cfg.data.tokenizer.kind == "byte":
        write_byte_tokenizer(staging)
    elif source is None:
        raise ConvertError(f"data.tokenizer.kind={cfg.data.tokenizer.kind!r} has no path: pass --tokenizer DIR")
    else:
        from rntp_megatron.weights.hf_checkpoint import TOKENIZER_FILES

        files = [f for f in TOKENIZER_FILES if (Path(source) / f).exists() and f != "generation_config.json"]
        if not files:
            raise ConvertError(f"tokenizer folder {source} holds none of {TOKENIZER_FILES}")
        for f in files:
            shutil.copy2(Path(source) / f, staging / f)
    ids = _token_ids(staging)
    generation = {**GENERATION_DEFAULTS, **ids, "temperature": cfg.rollout.temperature, "top_p": cfg.rollout.top_p}
    if cfg.rollout.top_k > 0:
        generation["top_k"] = cfg.rollout.top_k
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return staging, ids


def to_hf(args: argparse.Namespace) -> Path:
    """Megatron checkpoint (any layout) -> HF folder; returns the folder (on every rank)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.api import CheckpointException

    from rntp_megatron.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
    from rntp_megatron.model import hf_mapping
    from rntp_megatron.model.provider import DTYPES, build_model
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.weights.export import stream_hf_weights
    from rntp_megatron.weights.fp8 import QUANTIZATION_CONFIG, fp8_buckets
    from rntp_megatron.weights.hf_checkpoint import save_hf_checkpoint

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ConvertError(f"{out} exists; pass --overwrite to replace it")
    try:
        ckpt = resolve_checkpoint(args.checkpoint, "--checkpoint")
    except CheckpointError as e:
        raise ConvertError(str(e)) from e
    data: dict[str, Any] = {}
    if args.config:
        data = dataclasses.asdict(load_config(args.config))
    recorded = _recorded_model(ckpt)
    if recorded and not args.config:
        data["model"] = recorded
    elif not args.config and not any(o.startswith("model.") for o in args.overrides):
        raise ConvertError(f"{ckpt} does not record its model: pass the run's --config (or --set model.card=...)")
    cfg = build_config(_layout(data, args.tp, args.pp), args.overrides)
    _check_world(cfg)
    hf_mapping.hf_config(cfg.model)  # an unmappable architecture fails here, before any loading
    _init(cfg)
    try:
        model = build_model(cfg.model, cfg.parallel).eval()
        try:
            load_checkpoint(ckpt, [model], None)
        except CheckpointException as e:  # a BaseException: load_checkpoint's `except Exception` lets it through
            raise ConvertError(f"cannot load {ckpt}: a shard is unreadable or corrupt ({e})") from e
        dtype = DTYPES[args.dtype] if args.dtype else None
        stream = stream_hf_weights(model, cfg.model, bucket_bytes=cfg.rollout.weight_bucket_mb << 20, dtype=dtype)
        if dist.get_rank() == 0:
            with tempfile.TemporaryDirectory() as staging:
                tokenizer_dir, ids = _stage_tokenizer(cfg, args.tokenizer, Path(staging))
                # an FP8 folder's torch_dtype is that of its unquantized tensors (norms, embeddings)
                save_hf_checkpoint(fp8_buckets(stream) if args.fp8 else stream, out, cfg.model,
                                   tokenizer_dir=tokenizer_dir, overwrite=args.overwrite,
                                   torch_dtype=args.dtype or (cfg.model.params_dtype if args.fp8 else None),
                                   quantization_config=QUANTIZATION_CONFIG if args.fp8 else None, **ids)
        else:
            for _ in stream:  # every rank takes part in the gathers
                pass
        dist.barrier()
    finally:
        destroy_distributed()
    return out


def from_hf(args: argparse.Namespace) -> Path:
    """HF folder (llama / qwen2 / qwen3) -> Megatron checkpoint directory with step 0; returns its iter dir."""
    import torch.distributed as dist

    from rntp_megatron.checkpoint import save_checkpoint
    from rntp_megatron.model import hf_mapping
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.weights.hf_checkpoint import SafetensorsFolder, load_hf_weights

    source, out = Path(args.hf), Path(args.out)
    if not (source / "config.json").exists():
        raise ConvertError(f"{source} is not a Hugging Face model folder (no config.json)")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ConvertError(f"{out} exists and is not empty; pass --overwrite to replace it")
    try:
        fields = hf_mapping.model_fields_from_hf(json.loads((source / "config.json").read_text()))
    except KeyError as e:
        raise ConvertError(f"{source}/config.json lacks {e}") from e
    cfg = build_config(_layout({"model": fields}, args.tp, args.pp))
    _check_world(cfg)
    weights = SafetensorsFolder(source)
    _init(cfg)
    try:
        model = build_model(cfg.model, cfg.parallel).eval()
        load_hf_weights(model, weights, cfg.model)
        if dist.get_rank() == 0 and out.exists():
            shutil.rmtree(out)
        dist.barrier()
        saved = save_checkpoint(out, 0, [model], None, trainer_state={"step": 0, "model": fields,
                                                                      "source": str(source)},
                                rank_state={}, keep_last=1)
    finally:
        destroy_distributed()
    return saved


def run(args: argparse.Namespace) -> int:
    """`rntp convert to-hf | from-hf`."""
    done = to_hf(args) if args.direction == "to-hf" else from_hf(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"rntp convert {args.direction}: wrote {done}")
    return 0
