"""`rntp doctor`: the demo config passes on this machine; configs broken one way each FAIL with the named fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from rntp_megatron.cli import main
from rntp_megatron.doctor import FAIL, OK, WARN, fp8_recipes, run_checks

ROOT = Path(__file__).resolve().parent.parent
DEMO = str(ROOT / "recipes" / "configs" / "demo_rl.yaml")


def _by_name(checks) -> dict:
    return {c.name: c for c in checks}


def test_demo_config_passes_and_exits_0(tmp_path, capsys):
    code = main(["doctor", "--config", DEMO, "--set", f"logging.dir={tmp_path / 'run'}"])
    table = capsys.readouterr().out
    assert code == 0, table
    for name in ("python", "torch", "megatron-core", "config", "transformer_engine", "rank layout", "logging.dir",
                 "checkpoint.dir", "tokenizer", "vocabulary", "data.sources[0]", "memory"):
        assert any(line.startswith(name) and f" {OK} " in line for line in table.splitlines()), (name, table)
    assert not (tmp_path / "run").exists()  # the writability probe leaves nothing behind


def test_a_broken_config_exits_1_with_its_fix_in_the_table(capsys):
    assert main(["doctor", "--config", DEMO, "--set", "model.card=tiny", "--set", "model.vocab_size=256"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("vocabulary"))
    assert f" {FAIL} " in line and "fix: model.vocab_size: 384" in line


def _jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


BROKEN = [
    # (overrides, the check that fails, a phrase of its fix)
    (["rl.group_size=many"], "config", "rl.group_size: 8"),
    (["data.sources=[{kind: jsonl, path: /nonexistent/x.jsonl}]"], "data.sources[0]", "data.sources[0].path"),
    (["data.tokenizer.kind=hf", "data.tokenizer.path=/nonexistent/tok"], "tokenizer", "data.tokenizer.path"),
    (["model.card=tiny"], "vocabulary", "model.vocab_size: 384"),
    (["rollout.engine=sglang", "rollout.sglang.python=/nonexistent/python"], "sglang", "tools/install_sglang.sh"),
    (["model.fp8=mxfp8"], "transformer_engine", "model.fp8: null"),
    (["checkpoint.load=/nonexistent/checkpoints"], "checkpoint.load", "checkpoint.load: a checkpoints folder"),
    (["model.card=llama3_1_70b", "model.vocab_size=128256"], "memory", "parallel.use_distributed_optimizer: true"),
]


@pytest.mark.parametrize("overrides, name, fix", BROKEN, ids=[b[1] for b in BROKEN])
def test_each_broken_config_fails_its_check_with_the_fix(overrides, name, fix):
    checks = _by_name(run_checks(DEMO, overrides, env={}))
    assert checks[name].status == FAIL, checks[name]
    assert fix in checks[name].fix, checks[name]


def test_unwritable_dirs_and_bad_records(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    mixed = _jsonl(tmp_path / "mixed.jsonl", ["{not json", '{"txt": "wrong field"}', '{"text": "a real record"}'])
    hopeless = _jsonl(tmp_path / "bad.jsonl", ["{not json", "[1, 2"])
    sources = f"data.sources=[{{kind: jsonl, path: {mixed}}}, {{kind: jsonl, path: {hopeless}}}]"
    checks = _by_name(run_checks(DEMO, [f"checkpoint.dir={blocker / 'ckpt'}", sources], env={}))
    assert checks["checkpoint.dir"].status == FAIL and "checkpoint.dir: a folder" in checks["checkpoint.dir"].fix
    assert checks["logging.dir"].status == OK
    first = checks["data.sources[0]"]
    assert first.status == WARN and "2 skipped (1 malformed_json, 1 missing_field)" in first.detail
    assert checks["data.sources[1]"].status == FAIL and "2 malformed_json" in checks["data.sources[1]"].detail


def test_broken_resume_and_a_dataset_of_another_vocabulary(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000005").mkdir(parents=True)  # a save that died before completing, yet named by latest
    (ckpt / "latest").write_text("iter_0000005")
    (tmp_path / "d.bin").write_bytes(b"\0" * 8)
    (tmp_path / "d.idx").write_bytes(b"")
    (tmp_path / "d.json").write_text('{"vocab_size": 50000}')
    checks = _by_name(run_checks(DEMO, [f"checkpoint.dir={ckpt}",
                                        f"data.sources=[{{kind: megatron, path: {tmp_path / 'd'}}}]"], env={}))
    assert checks["resume"].status == FAIL and "iter_0000005" in checks["resume"].detail
    assert "point" in checks["resume"].fix and "latest" in checks["resume"].fix
    source = checks["data.sources[0]"]
    assert source.status == FAIL and "vocab_size=50000" in source.detail and "prepare-data" in source.fix


def test_slurm_layout_that_does_not_divide_names_the_sizes():
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "3", "SLURM_NNODES": "1", "SLURM_PROCID": "0"}
    layout = _by_name(run_checks(DEMO, ["model.card=tiny", "model.vocab_size=384",
                                        "parallel.tensor_model_parallel_size=2"], env=env))["rank layout"]
    assert layout.status == FAIL and "Slurm job 7: 3 rank(s)" in layout.detail
    assert "launch a multiple of 2 processes" in layout.fix
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_NNODES": "2", "SLURM_PROCID": "0"}
    layout = _by_name(run_checks(DEMO, ["model.card=tiny", "model.vocab_size=384",
                                        "parallel.tensor_model_parallel_size=2", "schedule.micro_batch_size=8"],
                                 env=env))["rank layout"]
    assert layout.status == OK and "4 rank(s) on 2 node(s) = TP 2 x PP 1 x CP 1 x DP 2" in layout.detail


def test_wandb_row(monkeypatch):
    import sys

    offline = ["logging.wandb={project: p, mode: offline}"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    row = _by_name(run_checks(DEMO, offline, env={}))["wandb"]
    assert row.status == FAIL and "pip install -e '.[wandb]'" in row.fix


def test_fp8_recipes_by_gpu_kind():
    assert fp8_recipes((8, 0)) == []  # A100
    assert fp8_recipes((9, 0)) == ["delayed", "tensorwise", "blockwise"]  # H100 / H200
    assert fp8_recipes((10, 0)) == ["delayed", "tensorwise", "blockwise", "mxfp8"]  # B200


@pytest.mark.sglang
@pytest.mark.slow
def test_start_sglang_starts_a_real_server():
    if not (ROOT / "sglang-venv" / "bin" / "python").exists():
        pytest.skip("no sglang-venv (make setup-integration)")
    checks = run_checks(DEMO, [], env={}, start_sglang=True)
    server = _by_name(checks)["sglang server"]
    assert server.status == OK and "generated 4 tokens" in server.detail, server


def test_every_fleet_url_is_checked():
    """rollout.sglang.urls (what slurm/train.sbatch sets) are checked like rollout.sglang.url: one that does not
    answer /health fails the row, named, while the healthy one passes."""
    import http.server
    import socket
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as closed:  # a port nobody listens on once it is closed
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    healthy = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        both = _by_name(run_checks(DEMO, ["rollout.engine=sglang", f"rollout.sglang.urls=[{healthy}, {dead}]"],
                                   env={}))["sglang"]
        assert both.status == FAIL and dead in both.detail and healthy not in both.detail, both
        one = _by_name(run_checks(DEMO, ["rollout.engine=sglang", f"rollout.sglang.urls=[{healthy}]"], env={}))
        assert one["sglang"].status == OK and healthy in one["sglang"].detail, one["sglang"]
    finally:
        server.shutdown()


def test_one_gpu_bound_to_each_task_is_a_valid_layout(monkeypatch):
    """8 tasks a node under --gpus-per-task=1 / --gpu-bind: each task sees one GPU (CUDA_VISIBLE_DEVICES of one
    entry) and that is not 8 ranks on 1 GPU; without the binding, 8 ranks on a node with 1 GPU is. (A faked CUDA of
    one visible device: no GPU here.)"""
    import torch

    from rntp_megatron.config import build_config
    from rntp_megatron.doctor import check_layout

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg = build_config({}, ["model.card=tiny", "model.vocab_size=384", "schedule.micro_batch_size=1"])
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": "3"}
    assert check_layout(cfg, {**env, "CUDA_VISIBLE_DEVICES": "3"}).status == OK
    assert check_layout(cfg, env).status == FAIL
