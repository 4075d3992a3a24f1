"""Megatron-Core's import-time notices, said once and plainly.

Without Transformer Engine and Apex, megatron-core warns at import from each module that falls back to torch
(optimizer, clip_grads, fsdp, norms, layer specs: eight warnings a process, repeated by every rank), logs that
GPTModel is deprecated (HybridModel lacks the output_processor the RNTP loss hook needs, so GPTModel is chosen
on purpose) and warns about experimental or deprecated defaults we do not use. `quiet_megatron_notices`
silences exactly those; `missing_kernels_notice` is the one line that replaces them, printed once by rank 0.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Optional

# (warning message regex, why it is safe to drop)
MEGATRON_WARNINGS = (
    (r"(Transformer Engine and )?Apex (is|are) not installed", "said once by missing_kernels_notice"),
    (r"Transformer Engine and Apex are not installed", "said once by missing_kernels_notice"),
    (r"full scope is deprecated", "a megatron default (cuda graphs), not a setting of ours"),
    (r"MimoModelConfig is experimental", "a module megatron imports, unused here"),
)
GPT_DEPRECATION = "GPTModel IS DEPRECATED"


class _DropGPTDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return GPT_DEPRECATION not in record.getMessage()


def quiet_megatron_notices() -> None:
    """Drop the notices listed in MEGATRON_WARNINGS and the GPTModel deprecation log line (idempotent)."""
    for pattern, _ in MEGATRON_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    logger = logging.getLogger("megatron.core.models.gpt.gpt_model")
    if not any(isinstance(f, _DropGPTDeprecation) for f in logger.filters):
        logger.addFilter(_DropGPTDeprecation())


def missing_kernels_notice(on_gpu: bool) -> Optional[str]:
    """One line naming the fused-kernel packages that are absent and what that costs; None when all are present."""
    missing = [name for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    cost = ("torch fallbacks for the optimizer, norms and multi-tensor ops (slower steps; no FP8 without Transformer "
            "Engine)" if on_gpu else "torch fallbacks, as expected on a CPU")
    return f"megatron-core: {' and '.join(missing)} not installed: {cost}"
