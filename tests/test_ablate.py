"""`rntp ablate`: the spec loader, and the smoke setting of recipes/configs/ablate_text.yaml run end to end on the
encyclopedia corpus (make corpus) as users launch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rntp_megatron.ablate import load_spec, merge
from rntp_megatron.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "recipes" / "configs" / "ablate_text.yaml"


def test_spec_scales_and_overrides_merge_in_order():
    spec = load_spec(SPEC, "smoke", ["budget.evals=3"])
    assert spec["base"]["model"] == {"card": "tiny", "vocab_size": 262}
    assert spec["budget"] == {"branch_flops": 2.0e8, "evals": 3}
    kept = {name for name, branch in spec["branches"].items() if branch is not None}
    assert kept == {"ntp", "rntp_prefix", "rntp_info_gain", "mixed"}  # the smoke scale leaves the 2-site pair out
    assert load_spec(SPEC)["branches"]["prefix_2sites_interleaved"]["data"]["episode_format"] == "interleaved"
    assert spec["branches"]["ntp"]["rl"] == {"objective": "ntp"}  # the scale's overlay kept the branch's keys
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    with pytest.raises(ConfigError, match="--scale: 'huge'"):
        load_spec(SPEC, "huge")
    with pytest.raises(ConfigError, match="branch_flops"):
        load_spec(SPEC, None, ["budget.branch_flops=0"])


@pytest.mark.slow
def test_smoke_ablation_runs_every_branch_to_the_same_budget_and_resumes(tmp_path):
    if not (ROOT / "data" / "encyclopedia" / "heldout.idx").exists():
        if os.environ.get("CI"):
            pytest.fail("make test runs `make corpus`: data/encyclopedia is missing")
        pytest.skip("run `make corpus` first")
    cmd = [sys.executable, "-m", "rntp_megatron.cli", "ablate", "--config", str(SPEC), "--scale", "smoke",
           "--run-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "ablation.json").read_text())
    assert (tmp_path / "ablation.png").stat().st_size > 0 and "| rntp_info_gain |" in (tmp_path / "ablation.md").read_text()
    budget = 2.0e8
    for name in ("ntp", "rntp_prefix", "rntp_info_gain", "mixed"):
        start, end = [r for r in rows if r["branch"] == name]
        assert start["flops"] == 0 and start["eval"] == rows[0]["eval"]  # every branch starts from one checkpoint
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        totals = [r["flops_total"] for r in records]
        # the budget stops the branch at the first step that reaches it
        assert totals[-1] == end["flops"] >= budget and (len(totals) == 1 or totals[-2] < budget)
        assert all(r["flops_total"] == r["flops_train"] + r["flops_rollout"] + r["flops_scoring"] for r in records)
        assert (end["flops_rollout"] > 0) == (name != "ntp")
        assert (end["flops_scoring"] > 0) == (name == "rntp_info_gain")
        assert set(end["eval"]["all"]) >= {"no_thought", "thought", "info_gain", "ppl"}
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "ablation.json").read_text()) == rows and "resumed" not in again.stdout
