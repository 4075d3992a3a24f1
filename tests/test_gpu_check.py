"""tools/gpu_check.py --cpu: the GPU acceptance script's code paths (demo pretrain + RL through `rntp train`, an
exact resume, `rntp convert to-hf` against transformers, the RNTP loss hook vs a plain step) at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_passes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--cpu", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["mode"] == "cpu"
    rows = {(r["check"], r["name"]): r for r in report["rows"]}
    assert not [r for r in report["rows"] if r["name"] == "error"]
    assert rows[("resume", "max rel. loss diff, steps 6..11")]["value"] == 0.0  # exact on the CPU
    assert rows[("export", "max |HF - Megatron| logit (float32)")]["value"] <= 1e-4
    assert rows[("demo", "RL steps with finite loss (of 2)")]["value"] == 2
    assert rows[("loss hook", "RNTP / plain step time")]["value"] > 0
    rl_step = {name: r["value"] for (check, name), r in rows.items() if check == "rl step"}
    assert len(rl_step) == 4 and all(v > 0 for v in rl_step.values()), rl_step  # both layouts, speed-up, wall s
    assert "RNTP / plain step time" in done.stdout  # the table
