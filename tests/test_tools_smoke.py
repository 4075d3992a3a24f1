"""Every benchmark and probe of tools/ at its --smoke size: it exits 0, prints its table and writes it with --json
(rows present, numbers finite); `tools/bench_all.py --smoke` (the driver of `make bench`) writes its summary. The
tools the driver runs (loss hook, log-prob memory, weight sync, delta sync, engine, data) are checked through the
driver's run; gpu_check.py has its own test."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = ROOT / "sglang-venv" / "bin" / "python"
needs_sglang = pytest.mark.skipif(not SGLANG_PYTHON.exists(), reason="SGLang venv missing (make setup-integration)")


def run_tool(argv: list[str], cwd: Path, nproc: int = 1, timeout: float = 600) -> str:
    """Run a tools/ script (on nproc torchrun ranks when > 1) with OMP_NUM_THREADS=1; its stdout+stderr."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc-per-node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([*launcher, str(ROOT / "tools" / argv[0]), *argv[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


def check_table(path: Path, tool: str) -> list[dict]:
    """The rows of a --json table: present, named, every number finite."""
    table = json.loads(path.read_text())
    assert table["tool"] == tool and table["rows"], table
    for row in table["rows"]:
        numbers = [v for v in row.values() if isinstance(v, (int, float))]
        assert row["name"] and numbers and all(math.isfinite(v) for v in numbers), row
    return table["rows"]


# (script and its arguments besides --smoke/--json, torchrun ranks, what its printed table shows of a JSON row)
TOOLS = [
    pytest.param(["probe_recall.py"], 1, lambda r: f'"step": {r["step"]}', id="probe_recall"),
    pytest.param(["probe_synthetic.py", "--out", "probe"], 1, lambda r: f'"phase": "{r["name"].split()[0]}"',
                 id="probe_synthetic"),
    pytest.param(["bench_routing_mismatch.py"], 1, lambda r: f"{r['dtype']:10s} {r['seed']:4d}",
                 id="bench_routing_mismatch"),
    pytest.param(["bench_site_supply.py"], 1, lambda r: f"| {r['name']} |", id="bench_site_supply"),
    pytest.param(["measure_weight_delta.py"], 1, lambda r: r["name"], id="measure_weight_delta"),
    pytest.param(["bench_moe_sync.py"], 2, lambda r: r["name"], id="bench_moe_sync",
                 marks=pytest.mark.distributed),
    # the fleet sweep at one replica: every channel through SGLangFleet; --rollout-tokens 0 leaves out the
    # throughput part, which would start two more servers
    pytest.param(["bench_weight_sync.py", "--replicas", "1", "--rollout-tokens", "0"], 1,
                 lambda r: f"| {r['channel']} | ", id="bench_weight_sync_replicas",
                 marks=[pytest.mark.sglang, needs_sglang]),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv,nproc,printed", TOOLS)
def test_tool_smoke(argv: list[str], nproc: int, printed: Callable[[dict], str], tmp_path):
    output = run_tool([*argv, "--smoke", "--json", str(tmp_path / "table.json")], tmp_path, nproc)
    for row in check_table(tmp_path / "table.json", Path(argv[0]).stem):
        assert printed(row) in output, (printed(row), output[-3000:])


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.sglang
@needs_sglang
def test_bench_all_smoke(tmp_path, monkeypatch):
    """The driver at --smoke: every headline row ran its tool (or says why not), the tables parse, the summary
    names the commit, the machine and the load average."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import bench_all

    out = tmp_path / "bench"
    run_tool(["bench_all.py", "--smoke", "--out", str(out)], tmp_path, timeout=1200)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size"] == "smoke" and summary["commit"] and summary["machine"]["cores"] >= 1
    assert [r["name"] for r in summary["rows"]] == [r.name for r in bench_all.ROWS]
    for row, spec in zip(summary["rows"], bench_all.ROWS):
        if row["result"] == "not available":
            assert not all((ROOT / n).exists() for n in spec.needs), row
            continue
        assert row["result"] in ("PASS", "FAIL"), row
        rows = check_table(out / f"{bench_all.slug(spec.name)}.json", Path(spec.tool).stem)
        assert spec.judge(rows) == (row["value"], row["result"] == "PASS")
        log = (out / f"{bench_all.slug(spec.name)}.log").read_text()
        assert all(r["name"] in log for r in rows), log[-3000:]  # the tool printed its table
    markdown = (out / "summary.md").read_text()
    assert summary["commit"] in markdown and "load average" in markdown
    assert all(f"| {r['name']} | {r['value']} |" in markdown for r in summary["rows"])
