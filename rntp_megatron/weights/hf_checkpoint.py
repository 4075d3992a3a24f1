"""Hugging Face checkpoint folders: write (safetensors shards + index + config.json + tokenizer) atomically,
read lazily, and load into a sharded Megatron model; names and layouts come from model/hf_mapping."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional

import torch
from megatron.core import parallel_state
from safetensors import safe_open
from safetensors.torch import save_file

from rntp_megatron.config import ModelConfig
from rntp_megatron.model import hf_mapping
from rntp_megatron.model.provider import padded_vocab_size
from rntp_megatron.weights.buckets import NamedTensors, nbytes
from rntp_megatron.weights.export import global_named_parameters

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def save_hf_checkpoint(buckets: Iterable[NamedTensors], out_dir: str | Path, cfg: ModelConfig,
                       tokenizer_dir: Optional[str | Path] = None, torch_dtype: Optional[str] = None,
                       overwrite: bool = False, **token_ids: int) -> Path:
    """Write one safetensors shard per bucket, the index, config.json (+ tokenizer files) into out_dir atomically."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weight_map: dict[str, str] = {}
        total = 0
        dtypes = set()
        shards = []
        for i, bucket in enumerate(buckets):
            shard = f"part-{i:05d}.safetensors"
            save_file({n: t.contiguous() for n, t in bucket}, str(tmp / shard), metadata={"format": "pt"})
            shards.append(shard)
            for n, t in bucket:
                weight_map[n] = shard
                total += nbytes(t)
                dtypes.add(str(t.dtype).replace("torch.", ""))
        if not shards:
            raise ValueError("save_hf_checkpoint: the weight stream was empty (call it on global rank 0)")
        final = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        renamed = dict(zip(shards, final))
        for old, new in renamed.items():
            os.replace(tmp / old, tmp / new)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": {n: renamed[s] for n, s in weight_map.items()}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        dtype = torch_dtype or (dtypes.pop() if len(dtypes) == 1 else cfg.params_dtype)
        config = hf_mapping.hf_config(cfg, torch_dtype=dtype, **token_ids)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if tokenizer_dir is not None:
            copied = [f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).exists()]
            if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
                raise FileNotFoundError(f"{tokenizer_dir} holds no tokenizer.json or tokenizer.model")
            for f in copied:
                shutil.copy2(Path(tokenizer_dir) / f, tmp / f)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class SafetensorsFolder(Mapping[str, torch.Tensor]):
    """The tensors of an HF checkpoint folder by name, each read from its shard when asked for."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {self.folder}")
            self.files = {}
            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    self.files.update({k: f.name for k in st.keys()})

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.folder / self.files[name]), framework="pt") as st:
            return st.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def load_hf_weights(model: torch.nn.Module, hf: Mapping[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Copy HF tensors into this rank's Megatron stage: each parameter gets its TP shard of the mapped tensor."""
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    vocab = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by, tp_size)
    with torch.no_grad():
        for name, param in global_named_parameters(model):
            full = hf_mapping.from_hf(name, hf, cfg, vocab)
            shard = hf_mapping.split_tp_shard(name, full, tp_size, tp_rank)
            if shard.shape != param.shape:
                raise hf_mapping.MappingError(f"{name}: HF weights give a shard of shape {tuple(shard.shape)}, "
                                              f"the model's parameter is {tuple(param.shape)} (TP={tp_size})")
            param.copy_(shard)
