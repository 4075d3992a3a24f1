"""Inventory of CUDA-only call sites in the megatron-core modules this project runs on CPU.

tests/test_cpu_compat.py compares it with the inventory recorded when cpu_compat.REDIRECTS was last checked
(tests/data/megatron_cuda_calls.json): when megatron-core changes under us, the diff names the files to re-read.
"""

from __future__ import annotations

import re
from pathlib import Path

# The parts of megatron-core that the trainer imports and runs.
USED = ("models/gpt", "models/common", "transformer", "tensor_parallel", "pipeline_parallel", "distributed",
        "optimizer", "dist_checkpointing", "inference", "parallel_state.py", "utils.py")
SKIP = ("distributed/fsdp", "transformer/moe", "inference/contexts/dynamic", "inference/engines")
CUDA_CALL = re.compile(r"torch\.cuda\.\w+|device\s*=\s*['\"]cuda|\.cuda\(\)")


def cuda_call_inventory() -> dict[str, int]:
    """{path relative to megatron/core: number of lines with a CUDA-only call} over the USED modules."""
    import megatron.core

    root = Path(megatron.core.__file__).parent
    counts: dict[str, int] = {}
    for part in USED:
        path = root / part
        for file in sorted([path] if path.is_file() else path.rglob("*.py")):
            rel = file.relative_to(root).as_posix()
            if rel.startswith(SKIP):
                continue
            n = sum(1 for line in file.read_text(errors="replace").splitlines() if CUDA_CALL.search(line))
            if n:
                counts[rel] = n
    return counts


if __name__ == "__main__":  # python -m rntp_megatron.runtime.cuda_inventory > tests/data/megatron_cuda_calls.json
    import json
    import sys

    import megatron.core

    json.dump({"megatron_core": megatron.core.__version__.split("+")[0], "calls": cuda_call_inventory()}, sys.stdout,
              indent=1, sort_keys=True)
