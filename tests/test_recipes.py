"""Every shipped recipe (recipes/configs/*.yaml) runs as written, shrunk by the override set next to it
(recipes/configs/shrink/NAME.yaml, laid over it by `rntp train --config RECIPE --config SHRINK`): real
`rntp train` processes (torchrun for more than one rank) train 1 step, stop, resume from their checkpoint and
train step 2, with the recipe's own rollout engine, placement and weight channel (a real SGLang server where
it says sglang). The scratch folder holds what the shrinks point at: a tokenizer of the model family, parquet
text, a Megatron .bin/.idx dataset made by `rntp prepare-data`, and an initial checkpoint (`checkpoint.load`).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
SGLANG_PYTHON = Path(os.environ.get("RNTP_SGLANG_PYTHON", ROOT / "sglang-venv" / "bin" / "python"))
# Ranks of each shrunk run: the recipe's model-parallel layout (as shrunk) times a data-parallel size > 1
# wherever the recipe's cluster gives one (qwen3: TP2 x DP2 for TP2 x DP4; llama: TP2 x PP2 x DP2 for 8x2x4).
RANKS = {"demo_pretrain": 1, "demo_rl": 1, "qwen3_8b_b200": 4, "llama3_1_70b_b200_fp8": 8, "qwen3_30b_a3b_b200": 2}
# ablate_text.yaml is `rntp ablate`'s config (a base run and its branches), run at its smoke scale by
# tests/test_ablate.py; every other YAML is a run config
RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "ablate_text")


def test_every_recipe_has_a_shrink_and_a_rank_count():
    assert RECIPES and set(RECIPES) == set(RANKS) == {p.stem for p in (CONFIGS / "shrink").glob("*.yaml")}


def _recipe_config(name: str, overrides: list[str] = ()):
    from rntp_megatron.config import load_config

    return load_config([CONFIGS / f"{name}.yaml", CONFIGS / "shrink" / f"{name}.yaml"], list(overrides))


def test_shrinks_keep_what_the_recipes_exercise():
    """Same family, same kinds of data, same engine/placement/channel/objective, every parallel size > 1 kept."""
    from rntp_megatron.config import load_config

    for name in RECIPES:
        recipe, shrunk = load_config(CONFIGS / f"{name}.yaml"), _recipe_config(name)
        assert shrunk.model.family == recipe.model.family, name
        assert [s.kind for s in shrunk.data.sources] == [s.kind for s in recipe.data.sources], name
        assert shrunk.data.tokenizer.kind == recipe.data.tokenizer.kind, name
        for section, keys in {"rollout": ("engine", "placement", "off_policy_steps"), "rl": ("objective", "routing_replay"),
                              "data": ("site_selection",)}.items():
            for key in keys:
                assert getattr(getattr(shrunk, section), key) == getattr(getattr(recipe, section), key), (name, key)
        assert shrunk.rollout.sglang.weight_sync == recipe.rollout.sglang.weight_sync, name
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                    "expert_model_parallel_size"):
            assert (getattr(shrunk.parallel, key) > 1) == (getattr(recipe.parallel, key) > 1), (name, key)
        assert shrunk.parallel.sequence_parallel == recipe.parallel.sequence_parallel, name
        assert RANKS[name] <= 8 and shrunk.model.fp8 is None


# --------------------------------------------------------------------------------------------------
# the scratch folder


def _save_initial(rank: int, world_size: int, name: str, out: str) -> None:
    """The shrunk model's random initial weights as a checkpoint at TP1 PP1 (it loads at any layout)."""
    from rntp_megatron.checkpoint import save_checkpoint
    from rntp_megatron.model.provider import build_model
    from rntp_megatron.runtime import destroy_distributed, init_distributed

    cfg = _recipe_config(name, ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                                "parallel.sequence_parallel=false", "parallel.use_distributed_optimizer=false",
                                "parallel.expert_model_parallel_size=1"])
    init_distributed(cfg.parallel, seed=cfg.seed)
    try:
        save_checkpoint(out, 0, [build_model(cfg.model, cfg.parallel)], None, {"step": 0}, {})
    finally:
        destroy_distributed()


def _scratch(folder: Path, name: str) -> None:
    """What the shrink of `name` points at, written under `folder`."""
    from rntp_megatron.cli import main
    from rntp_megatron.runtime.spawn import run_ranks
    from tests.family_tokenizers import write_family_tokenizer

    cfg = _recipe_config(name)
    if cfg.data.tokenizer.kind == "hf":
        family = "qwen3" if cfg.model.family.startswith("qwen3") else "llama3"
        write_family_tokenizer(folder / cfg.data.tokenizer.path, family)
    for src in cfg.data.sources:
        if src.kind == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            from pydoc_data.topics import topics

            (folder / src.path).mkdir(parents=True, exist_ok=True)
            texts = [topics[k] for k in sorted(topics)[:80]]
            pq.write_table(pa.table({src.text_field: texts}), folder / src.path / "part-00000.parquet")
    for src in cfg.data.sources:
        if src.kind == "megatron":
            parquet = next(s.path for s in cfg.data.sources if s.kind == "parquet")
            assert main(["prepare-data", "--source", f"parquet:{folder / parquet}", "--tokenizer", "hf",
                         "--tokenizer-path", str(folder / cfg.data.tokenizer.path), "--output",
                         str(folder / src.path), "--no-progress"]) == 0
    if cfg.checkpoint.load:
        run_ranks(_save_initial, 1, (name, str(folder / Path(cfg.checkpoint.load).parent)))


# --------------------------------------------------------------------------------------------------
# the runs


def _train(folder: Path, name: str, extra: list[str]) -> subprocess.CompletedProcess:
    """`rntp train` on the shrunk recipe in `folder` (torchrun with RANKS[name] ranks when more than one)."""
    from rntp_megatron.runtime.spawn import free_port

    ranks = RANKS[name]
    launch = [sys.executable, "-m", "rntp_megatron.cli"]
    if ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
                  f"--master-port={free_port()}", "-m", "rntp_megatron.cli"]
    sets = [*extra]
    if _recipe_config(name).rollout.engine == "sglang":  # this machine's server venv and a free port
        sets += [f"rollout.sglang.python={SGLANG_PYTHON}", f"rollout.sglang.port={free_port()}"]
    command = [*launch, "train", "--config", str(CONFIGS / f"{name}.yaml"),
               "--config", str(CONFIGS / "shrink" / f"{name}.yaml"), *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=900)


def _case(name: str):
    marks = [pytest.mark.slow]
    if RANKS[name] > 1:
        marks.append(pytest.mark.distributed)
    if _recipe_config(name).rollout.engine == "sglang":
        missing = f"SGLang server virtualenv missing ({SGLANG_PYTHON}); run tools/install_sglang.sh"
        marks += [pytest.mark.sglang, pytest.mark.skipif(not SGLANG_PYTHON.exists(), reason=missing)]
    return pytest.param(name, marks=marks, id=name)


def _failure(out: subprocess.CompletedProcess) -> str:
    """What a failed run said: its stdout's end, every distinct error line of every rank, stderr's end."""
    errors = list(dict.fromkeys(line for line in out.stderr.splitlines() if "Error" in line and "Warn" not in line))
    return "\n".join([out.stdout[-2000:], *errors[:40], out.stderr[-3000:]])


@pytest.mark.parametrize("name", [_case(n) for n in RECIPES])
def test_recipe_trains_two_steps_and_resumes(name, tmp_path):
    _scratch(tmp_path, name)
    first = _train(tmp_path, name, ["schedule.train_steps=1"])
    assert first.returncode == 0, _failure(first)
    second = _train(tmp_path, name, [])
    assert second.returncode == 0, _failure(second)
    assert "resumed from run/checkpoints/iter_0000001 at step 1" in second.stdout
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines if line.strip()]
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        assert math.isfinite(m["loss"]) and m["consumed_tokens"] > 0, m
        if "reward" in m:  # rollouts came back, were scored and trained on; the weights reached the engine
            assert m["thought_len"] > 0 and math.isfinite(m["reward"]) and m["prompt_cut_rate"] == 0, m
            assert m["weight_version"] == m["step"] + 1, m
        if _recipe_config(name).rl.routing_replay:  # replayed, and SGLang's experts compared with the trainer's
            assert 0 <= m["moe/routing_mismatch"] <= 1 and 0 <= m["moe/rollout_routing_mismatch"] <= 1, m
    assert (tmp_path / "run" / "checkpoints" / "iter_0000002").is_dir()
