"""SGLang's served classes of the architectures rntp exports, each subclassed (same name, so the HF folder's
`architectures` picks it) with a load_weights that also takes the deltas of codec.py.

Every full tensor that reaches load_weights (the start from --model-path, a disk, distributed or tensor update) is
also kept as a host copy, the base; a delta's parts (any order, any bucket or file of one update) are written into
the base of their tensor, and the whole tensor goes on to SGLang's own load_weights, so fused and TP-split
parameters load as from a full push. Costs one host copy of the model's weights per server process.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
from sglang.srt.models.llama import LlamaForCausalLM
from sglang.srt.models.qwen2 import Qwen2ForCausalLM
from sglang.srt.models.qwen3 import Qwen3ForCausalLM
from sglang.srt.models.qwen3_moe import Qwen3MoeForCausalLM

from rntp_delta_models import codec


class DeltaLoading:
    """Mixin before an SGLang model class: load_weights resolves deltas against host copies of the last full
    tensors; get_weights_by_name answers codec.MARKER, so the trainer can tell it is served."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        return super().load_weights(self._full_tensors(weights))

    def _full_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) of each full entry (its copy kept as the base) and of each completed delta (its base
        with the delta applied)."""
        base = self.__dict__.setdefault("_delta_base", {})
        pending = self.__dict__.setdefault("_delta_pending", {})
        for name, tensor in weights:
            target, part = codec.split(name)
            if part is None:
                base[name] = tensor.detach().to("cpu", copy=True).contiguous()
                pending.pop(name, None)  # parts left by a push that failed part-way (the next push is whole)
                yield name, tensor
                continue
            parts = pending.setdefault(target, {})
            parts[part] = tensor
            if codec.complete(parts):
                del pending[target]
                if target not in base:
                    raise KeyError(f"a delta for {target}, which this server never received in full: the trainer "
                                   "sends full weights to a server it has not pushed to")
                yield target, codec.apply(base[target], parts)

    def get_weights_by_name(self, name: str, truncate_size: int = 100, tp_size: int = 1) -> Optional[list]:
        if name == codec.MARKER:
            return [float(codec.FORMAT)]
        return super().get_weights_by_name(name, truncate_size, tp_size)


def served(parent: type) -> type:
    """parent's subclass of the same name with DeltaLoading first."""
    return type(parent.__name__, (DeltaLoading, parent), {"__module__": __name__, "__qualname__": parent.__name__})


EntryClass = [served(c) for c in (LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM)]
