#!/usr/bin/env python
"""Export a Megatron dist checkpoint (any TP/PP layout) to a Hugging Face folder: `rntp convert to-hf` as a script.

    python tools/convert_to_hf.py --checkpoint runs/x/checkpoints --out hf/x [--config run.yaml] [--dtype bfloat16]
"""

import sys

from rntp_megatron.cli import main

if __name__ == "__main__":  # the guard matters: dist_checkpointing may spawn helper processes
    sys.exit(main(["convert", "to-hf", *sys.argv[1:]]))
