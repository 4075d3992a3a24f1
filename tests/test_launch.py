"""Launching real `rntp train` jobs: slurm/train.sbatch on a real local Slurm (munge, slurmctld, slurmd, slurmdbd
on 127.0.0.1, started here by tools/slurm_local.sh and stopped at the end if this session started it), and the
NeMo-Run tiny recipe with LocalExecutor (torchrun) and SlurmExecutor (whose task status must be SUCCEEDED).

- sbatch runs a 2-process CPU training job to completion (ranks and rendezvous from SLURM_*).
- USR1 to the batch shell (what `--signal=B:USR1@120` does before the time limit) makes the trainer checkpoint and
  exit 75; the script requeues the job, which resumes from that checkpoint and finishes the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SLURM_LOCAL = REPO / "tools" / "slurm_local.sh"
SBATCH_SCRIPT = REPO / "slurm" / "train.sbatch"
STEPS = 4

TINY_RUN = {
    "model": {"card": "tiny", "vocab_size": 262},
    "data": {"context_len": 64, "min_context": 8},
    "rollout": {"engine": "megatron", "max_new_tokens": 12, "temperature": 1.0},
    "reward": {"name": "prob"},
    "rl": {"objective": "rntp", "group_size": 4},
    "schedule": {"train_steps": STEPS, "global_batch_size": 8, "micro_batch_size": 4, "seq_length": 96, "lr": 3e-3},
    "checkpoint": {"save_interval": 1},
    "logging": {"progress": False, "plot": False},
}


def _have_slurm() -> bool:
    return all(shutil.which(b) or Path(f"/usr/sbin/{b}").exists() for b in ("slurmctld", "slurmd", "slurmdbd", "sbatch"))


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm with accounting; started (and later stopped) here unless it is already up."""
    if not _have_slurm():
        pytest.skip("Slurm is not installed (run tools/install_launch.sh)")
    already_up = subprocess.run([str(SLURM_LOCAL), "status"], capture_output=True).returncode == 0
    if not already_up:
        start = subprocess.run([str(SLURM_LOCAL), "start"], capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr
    yield
    if not already_up:
        subprocess.run([str(SLURM_LOCAL), "stop"], capture_output=True, timeout=120)


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _job_state(job: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def _submit(tmp_path: Path, name: str) -> tuple[str, Path, Path]:
    """sbatch the tiny 2-rank run; returns (job id, run dir, batch log)."""
    import yaml

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(TINY_RUN))
    env = {**os.environ, "RNTP_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(["sbatch", "--parsable", "-J", name, "--ntasks-per-node=2", "-c", "1", "-t", "10",
                          str(SBATCH_SCRIPT), str(config), "--set", "seed=7"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    return job, tmp_path / "runs" / f"{name}-{job}", tmp_path / f"{name}-{job}.out"


def _wait_for(job: str, states: tuple[str, ...], log: Path, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job_state(job)
        if state.split(" ")[0] in states:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    pytest.fail(f"job {job} not in {states} after {timeout}s (state {_job_state(job)!r}):\n"
                f"{log.read_text()[-4000:] if log.exists() else '(no log)'}")


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_runs_a_two_process_training_job_to_completion(slurm_cluster, tmp_path):
    job, run_dir, log = _submit(tmp_path, "rntp-complete")
    state = _wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), log)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "trainer exited with 0" in text
    assert [r["step"] for r in _records(run_dir)] == list(range(STEPS))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"iter_{STEPS:07d}"
    world = json.loads((run_dir / "checkpoints" / latest / "complete.json").read_text())["world_size"]
    assert world == 2  # two Slurm tasks formed one job


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    job, run_dir, log = _submit(tmp_path, "rntp-preempt")
    deadline = time.monotonic() + 600
    while len(_records(run_dir)) < 1 and time.monotonic() < deadline:  # the trainer's handlers are installed
        time.sleep(0.2)
    assert _records(run_dir), log.read_text()[-4000:] if log.exists() else "no log"
    # what Slurm does 120 s before the time limit with --signal=B:USR1@120
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
    state = _wait_for(job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), log, timeout=600)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert "requeueing job" in text and "restart 1" in text, text[-4000:]
    assert "resumed from" in text, text[-4000:]
    # the first attempt logged steps 0..k and saved after step k; the requeued one went on from k + 1
    assert [r["step"] for r in _records(run_dir)] == list(range(STEPS))
    restarts = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in restarts, restarts


# ---------------------------------------------------------------------------------------------------
# NeMo-Run


def _launch(tmp_path: Path, executor: str, *extra: str) -> subprocess.CompletedProcess:
    # NEMORUN_HOME must not contain "nemo_run": NeMo-Run 0.11.1 then doubles the Slurm job paths
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "recipes.launch", "tiny_cpu", "--executor", executor,
                           "--run-dir", str(tmp_path / "run"), "--train-steps", "2", "--name", f"tiny-{executor}",
                           *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _check_recipe_run(tmp_path: Path, out: subprocess.CompletedProcess) -> None:
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "SUCCEEDED" in out.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert json.loads((latest / "complete.json").read_text())["world_size"] == 2


@pytest.mark.nemo_run
@pytest.mark.slow
def test_tiny_recipe_with_local_executor_and_torchrun(tmp_path):
    pytest.importorskip("nemo_run")
    _check_recipe_run(tmp_path, _launch(tmp_path, "local", "--ntasks-per-node", "2"))


@pytest.mark.nemo_run
@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_recipe_with_slurm_executor_succeeds(slurm_cluster, tmp_path):
    pytest.importorskip("nemo_run")
    out = _launch(tmp_path, "slurm", "--partition", "debug", "--ntasks-per-node", "2", "--cpus-per-task", "1",
                  "--time", "00:10:00")
    _check_recipe_run(tmp_path, out)


@pytest.mark.nemo_run
@pytest.mark.slow
def test_launcher_fails_when_the_task_fails(tmp_path):
    """run.run can return normally after a failed task: the launcher must look at the status and exit 1."""
    pytest.importorskip("nemo_run")
    out = _launch(tmp_path, "local", "--ntasks-per-node", "1", "--set", "model.vocab_size=100")  # < tokenizer's 262
    assert out.returncode == 1, (out.stdout + out.stderr)[-4000:]
    assert "FAILED" in out.stdout


def _dry_run(tmp_path: Path, env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    """train.sbatch run as its batch shell would be, on the given hosts, printing the steps it would launch."""
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({**TINY_RUN, "checkpoint": {"load": str(tmp_path / "init")}}))
    base = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "rntp", "SLURM_SUBMIT_DIR": str(tmp_path),
            "SLURM_NTASKS_PER_NODE": "8", "RNTP_PYTHON": sys.executable, "RNTP_DRY_RUN": "1"}
    return subprocess.run(["bash", str(SBATCH_SCRIPT), str(config), *overrides], env={**base, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _steps(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith("[dry-run]")]


def test_sbatch_sglang_nodes_start_one_replica_per_node(tmp_path):
    """RNTP_SGLANG_NODES=2 of 4 nodes: the weights exported once, a replica on each of n3 and n4 from them, the
    trainer on n1-n2 with both URLs and the distributed channel."""
    steps = _steps(_dry_run(tmp_path, {"RNTP_NODES": "n1 n2 n3 n4", "RNTP_SGLANG_NODES": "2"}))
    convert, train = steps[0], steps[-1]
    replicas = sorted(steps[1:-1], key=lambda step: step.split("--nodelist=")[1])  # launched in the background
    model = str(tmp_path / "runs" / "rntp-4242" / "hf_init")
    assert "convert to-hf" in convert and str(tmp_path / "init") in convert and model in convert
    assert len(replicas) == 2
    for step, node in zip(replicas, ("n3", "n4")):
        assert f"--nodelist={node} " in step and "--nodes=1" in step and "sglang.launch_server" in step
        assert f" {model} " in step and "--host 0.0.0.0" in step.replace("\\ ", " ")
    assert "--nodelist=n1\\,n2" in train or "--nodelist=n1,n2" in train
    assert "rollout.sglang.urls=\\[http://n3:30000\\,http://n4:30000\\]" in train or \
        "rollout.sglang.urls=[http://n3:30000,http://n4:30000]" in train
    assert "rollout.sglang.weight_sync=distributed" in train and "--ntasks=16" in train


def test_sbatch_sglang_replica_spanning_two_nodes(tmp_path):
    """RNTP_SGLANG_NODES_PER_REPLICA=2: one replica over n2-n3 (its TP spans them), the trainer on n1, and a given
    HF folder is used as it is (nothing exported)."""
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text("{}")
    steps = _steps(_dry_run(tmp_path, {"RNTP_NODES": "n1 n2 n3", "RNTP_SGLANG_NODES": "2",
                                       "RNTP_SGLANG_NODES_PER_REPLICA": "2", "RNTP_SGLANG_MODEL": str(model)}))
    replica, train = sorted(steps, key=lambda step: "rntp_megatron.cli train" in step)
    assert "--nodes=2" in replica and ("--nodelist=n2\\,n3" in replica or "--nodelist=n2,n3" in replica)
    assert ("rollout.sglang.urls=\\[http://n2:30000\\]" in train or "rollout.sglang.urls=[http://n2:30000]" in train)


def test_sbatch_refuses_a_replica_split_that_does_not_divide(tmp_path):
    out = _dry_run(tmp_path, {"RNTP_NODES": "n1 n2 n3 n4", "RNTP_SGLANG_NODES": "3",
                              "RNTP_SGLANG_NODES_PER_REPLICA": "2"})
    assert out.returncode == 2 and "does not divide RNTP_SGLANG_NODES=3" in out.stderr
