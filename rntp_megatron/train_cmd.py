"""`rntp train --config run.yaml [--config changes.yaml ...] [--set a.b=c ...]`: one training run (under torchrun,
srun, or alone)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", action="append", help="YAML file of the run config (defaults when omitted); "
                        "repeat it to lay files over each other in order, e.g. a recipe and then site changes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set rl.group_size=16 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from rntp_megatron.config import load_config
    from rntp_megatron.runtime import destroy_distributed
    from rntp_megatron.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    code = Trainer(cfg).run()
    destroy_distributed()
    return code
