"""What every benchmark and probe in tools/ shares: a `--smoke` size that runs its whole code path in seconds (CI,
tests/test_tools_smoke.py) and a `--json PATH` copy of its table that tests and tools/bench_all.py read.

    args = parse_args(parser, smoke={"repeats": 1, "hidden": 64})   # adds --smoke and --json
    write_json(args.json, "bench_x", [{"name": "plain step", "seconds": 1.2}, ...], hidden=args.hidden)

A JSON table is {"tool", "args", "meta", "rows"}: each row a "name" and its numbers (or short strings).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence


def parse_args(parser: argparse.ArgumentParser, smoke: dict[str, Any],
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """parser's arguments plus --smoke (the `smoke` values become the defaults; flags given still win) and
    --json PATH."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes that run the whole code path in seconds: " +
                             ", ".join(f"{k}={v}" for k, v in smoke.items()))
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON to PATH")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--smoke" in argv:
        parser.set_defaults(**smoke)
    return parser.parse_args(argv)


def write_json(path: Optional[str], tool: str, rows: list[dict[str, Any]], args: Optional[argparse.Namespace] = None,
               **meta: Any) -> None:
    """Write {"tool", "args", "meta", "rows"} to path (nothing when path is None); a row without a "name" or with
    a non-finite number is refused, so a broken measurement cannot pass as a table."""
    for row in rows:
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if "name" not in row or bad:
            raise ValueError(f"{tool}: row {row} has no name or non-finite values in {bad}")
    if path is None:
        return
    out = {"tool": tool, "args": {k: v for k, v in vars(args).items() if k != "json"} if args else {},
           "meta": meta, "rows": rows}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(out, indent=1, default=str) + "\n")
