"""`rntp ablate`: the spec loader, and the smoke setting of recipes/configs/ablate_text.yaml run end to end on the
encyclopedia corpus (make corpus) as users launch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import numpy as np

from rntp_megatron.ablate import load_spec, merge, paired_bootstrap, phase_config
from rntp_megatron.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "recipes" / "configs" / "ablate_text.yaml"


def test_spec_scales_and_overrides_merge_in_order(tmp_path):
    spec = load_spec(SPEC, "smoke", ["budget.evals=3"])
    assert spec["base"]["model"] == {"card": "tiny", "vocab_size": 262}
    assert spec["budget"] == {"branch_flops": 2.0e8, "evals": 3} and spec["seeds"] == 2
    kept = {name for name, branch in spec["branches"].items() if branch is not None}
    assert kept == {"ntp", "rpt", "rlp"}  # the smoke scale leaves loglik and mixed out
    assert spec["branches"]["ntp"]["rl"] == {"objective": "ntp"}  # the scale's overlay kept the branch's keys
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    with pytest.raises(ConfigError, match="--scale: 'huge'"):
        load_spec(SPEC, "huge")
    with pytest.raises(ConfigError, match="branch_flops"):
        load_spec(SPEC, None, ["budget.branch_flops=0"])
    full = load_spec(SPEC)  # the default scale: the method's branches, 2,000 held-out sites, 3 seeds
    assert set(full["branches"]) == {"ntp", "rpt", "rlp", "loglik", "mixed"}
    assert full["eval"]["sites"] >= 2000 and full["seeds"] == 3
    built = {name: phase_config(full, branch, tmp_path / name, {"checkpoint": {"load": str(tmp_path / "pre")}})
             for name, branch in full["branches"].items()}
    assert built["rpt"]["data"]["site_selection"] == "entropy" and built["rpt"]["reward"]["name"] == "prefix"
    assert built["rlp"]["reward"]["name"] == "info_gain" and built["rlp"]["rl"]["train_on"] == "thought"
    assert built["loglik"]["rl"]["train_on"] == "thought" and built["mixed"]["rl"]["objective"] == "mixed"
    pre = phase_config(full, merge(full["pretrain"], {"rl": {"objective": "ntp"}}), tmp_path / "pre", {})
    assert built["ntp"]["data"] == pre["data"] and built["ntp"]["schedule"]["lr"] == pre["schedule"]["lr"]


def test_paired_bootstrap_interval():
    rng = np.random.Generator(np.random.PCG64(1))
    same = rng.integers(0, 2, 2000).astype(float)
    mean, lo, hi = paired_bootstrap(same - same)
    assert mean == lo == hi == 0.0  # identical answers on every site: no uncertainty left
    better = np.where(rng.random(2000) < 0.1, 1.0, same)  # ~5% more sites right
    mean, lo, hi = paired_bootstrap(better - same)
    assert lo < mean < hi and 0 < lo and hi - lo < 0.03  # ~ 2 * 1.96 * sqrt(0.05 / 2000)


@pytest.mark.slow
def test_smoke_ablation_runs_every_branch_and_seed_to_the_same_budget_and_resumes(tmp_path):
    if not (ROOT / "data" / "encyclopedia" / "heldout.idx").exists():
        if os.environ.get("CI"):
            pytest.fail("make test runs `make corpus`: data/encyclopedia is missing")
        pytest.skip("run `make corpus` first")
    cmd = [sys.executable, "-m", "rntp_megatron.cli", "ablate", "--config", str(SPEC), "--scale", "smoke",
           "--run-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "ablation.json").read_text())
    rows, compared = result["rows"], result["comparison"]
    md = (tmp_path / "ablation.md").read_text()
    assert (tmp_path / "ablation.png").stat().st_size > 0 and "| rlp | 1 |" in md and "bootstrap 95%" in md
    budget, pretrain_steps = 2.0e8, 4
    fixed = json.loads((tmp_path / "heldout_sites.json").read_text())
    assert len(fixed["sites"]) == 6 and fixed["scorer"].endswith("iter_0000004")  # the pretrained model's entropies
    for name, seeds in (("ntp", 1), ("rpt", 2), ("rlp", 2)):  # next-token training samples nothing: run once
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == [f"seed_{s}" for s in range(seeds)]
        for seed in range(seeds):
            (end,) = [r for r in rows if r["branch"] == name and r["seed"] == seed]
            records = [json.loads(line) for line in (tmp_path / name / f"seed_{seed}" / "metrics.jsonl")
                       .read_text().splitlines()]
            totals = [r["flops_total"] for r in records]
            # the budget stops the branch at the first step that reaches it, counting the branch's FLOPs only
            assert totals[-1] == end["flops"] >= budget and (len(totals) == 1 or totals[-2] < budget)
            assert all(r["flops_total"] == r["flops_train"] + r["flops_rollout"] + r["flops_scoring"] for r in records)
            assert (end["flops_rollout"] > 0) == (name != "ntp") and (end["flops_scoring"] > 0) == (name != "ntp")
            sites = json.loads(Path(end["sites"]).read_text())
            assert sites["sites"] == fixed["sites"] and sites["entropy"] == fixed["entropy"]  # one bucketing
            if name == "ntp":  # the pretraining continued: its step, and data past what it had read
                pre = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
                assert records[0]["step"] == pretrain_steps
                assert records[0]["data/episodes"] > pre[-1]["data/episodes"]
    by = {c["branch"]: c for c in compared}
    assert set(by) == {"ntp", "rpt", "rlp", "baseline: pretrained, greedy next token",
                       "baseline: pretrained, untrained think mode"}
    assert by["ntp"]["buckets"]["all"]["diff"] == by["ntp"]["buckets"]["all"]["hi"] == 0.0
    for c in compared:
        cell = c["buckets"]["all"]
        assert cell["n"] == 6 and cell["lo"] <= cell["diff"] <= cell["hi"]
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "ablation.json").read_text()) == result and "resumed" not in again.stdout
