"""`rntp <command>`: train | demo | prepare-data | convert | plan | eval | doctor | ablate.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; this file only
routes to them, importing a command's module when that command runs (startup stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("rntp_megatron.train_cmd", "train (ntp, rntp or mixed objective) from a YAML config and overrides"),
    "demo": ("rntp_megatron.demo", "run the embedded default job on a tiny CPU model and print its table"),
    "eval": ("rntp_megatron.eval_cmd", "held-out accuracy without/with a thought, per class or entropy bucket"),
    "ablate": ("rntp_megatron.ablate", "pretrain once, then RNTP branches vs next-token training at equal FLOPs"),
    "plan": ("rntp_megatron.plan", "steps, tokens, FLOPs and wall time of an RNTP run on a cluster"),
    "prepare-data": ("rntp_megatron.data.prepare", "tokenize text sources into a Megatron .bin/.idx dataset"),
    "convert": ("rntp_megatron.convert", "Megatron dist checkpoint <-> Hugging Face folder (llama, qwen2, qwen3)"),
    "doctor": ("rntp_megatron.doctor", "check that this node, its software and a run config fit together"),
}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rntp", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
