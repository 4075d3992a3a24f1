"""One resolver for every option that takes a checkpoint: the checkpoints folder, its `latest` file, or an iter_*
folder all mean the same complete checkpoint, and the resolution names its step."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest

from rntp_megatron.checkpoint import COMPLETE, LATEST, CheckpointError, resolve_checkpoint


def _fake_run(root: Path, steps: list[int]) -> Path:
    """A checkpoints folder with complete iter_* folders for `steps` and `latest` naming the last."""
    for step in steps:
        d = root / f"iter_{step:07d}"
        d.mkdir(parents=True)
        (d / COMPLETE).write_text(json.dumps({"step": step, "world_size": 1}))
    (root / LATEST).write_text(f"iter_{steps[-1]:07d}")
    return root


def test_folder_latest_file_and_iter_folder_resolve_and_name_the_step(tmp_path, capsys):
    root = _fake_run(tmp_path / "checkpoints", [20, 40])
    for given, step in ((root, 40), (root / LATEST, 40), (root / "iter_0000020", 20)):
        assert resolve_checkpoint(given, "checkpoint.load") == root / f"iter_{step:07d}"
        assert f"checkpoint.load: {given} -> {root / f'iter_{step:07d}'} (step {step})" in capsys.readouterr().out


def test_bad_paths_say_what_to_pass(tmp_path):
    with pytest.raises(CheckpointError, match="--checkpoint: .* does not exist; fix: --checkpoint: a checkpoints"):
        resolve_checkpoint(tmp_path / "nowhere", "--checkpoint")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="nor a checkpoint directory with a `latest`.*fix: checkpoint: a"):
        resolve_checkpoint(tmp_path / "empty")
    broken = tmp_path / "broken"
    (broken / "iter_0000003").mkdir(parents=True)  # a save that died before completing
    (broken / LATEST).write_text("iter_0000003")
    for given in (broken, broken / LATEST):
        with pytest.raises(CheckpointError, match="iter_0000003.*complete.json"):
            resolve_checkpoint(given)


def test_convert_and_eval_take_the_latest_file(tmp_path, capsys):
    """`rntp convert to-hf --checkpoint .../latest` (the issue's NotADirectoryError) now resolves, and stops
    only at the next question (this fake checkpoint records no model)."""
    from rntp_megatron import convert

    root = _fake_run(tmp_path / "checkpoints", [7])
    args = Namespace(direction="to-hf", checkpoint=str(root / LATEST), out=str(tmp_path / "hf"), config=None,
                     overrides=[], tokenizer=None, dtype=None, overwrite=False, tp=None, pp=1)
    with pytest.raises(convert.ConvertError, match="iter_0000007 does not record its model"):
        convert.to_hf(args)
    assert "(step 7)" in capsys.readouterr().out
