"""Every command the README, a recipe header (the top comment of recipes/configs/*.yaml) or the NeMo-Run
launcher's docstring names runs as written, parsed from those files so that a renamed command, subcommand, flag,
module or recipe fails here:

- `rntp SUB... --flags` (also after `torchrun ... -m rntp_megatron.cli`): the subcommand's `--help` exits 0 and
  lists every flag the command uses; a config file it names exists and loads;
- `python -m recipes.launch RECIPE ...`: the launcher builds the recipe and its executor (a Slurm executor of a
  GPU recipe asks for the node's GPUs); another `python -m MODULE` or `python tools/X.py`: its `--help` exits 0;
- `sbatch ... slurm/train.sbatch CONFIG`: the script's dry run (RNTP_DRY_RUN) exits 0 and launches the trainer;
- `make TARGET`: `make -n TARGET` exits 0; `tools/X.sh`: the script exists and parses (`bash -n`).
Placeholders in square brackets (`[--set ...]`) and trailing `# comments` are dropped.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PREFIXES = ("rntp ", "python ", "torchrun ", "sbatch ", "make ", "tools/")


def _clean(command: str) -> list[str]:
    """The commands of one snippet: comments and [optional] placeholders dropped, split at &&."""
    command = re.sub(r"\s+#\s.*$", "", command)
    while re.search(r"\[[^\[\]]*\]", command):
        command = re.sub(r"\s*\[[^\[\]]*\]", "", command)
    return [" ".join(part.split()) for part in command.split("&&") if part.strip()]


def _header(path: Path) -> str:
    """A YAML file's top comment as one text (comment marks dropped, lines joined)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return " ".join(lines)


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for each command in README.md (code spans and bash blocks), each recipe header and the
    launcher's docstring."""
    found: list[tuple[str, str]] = []
    readme = (REPO / "README.md").read_text()
    spans = [(" ".join(s.split()), "README.md") for s in re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", readme)]
    blocks = [(line, "README.md") for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
              for line in block.splitlines()]
    headers = [(s, str(p.relative_to(REPO))) for p in sorted((REPO / "recipes" / "configs").glob("*.yaml"))
               for s in re.findall(r"`([^`]+)`", _header(p))]
    launch_doc = (REPO / "recipes" / "launch.py").read_text().split('"""')[1].replace("\\\n", " ")
    launcher = [(line.strip(), "recipes/launch.py") for line in launch_doc.splitlines()
                if line.strip().startswith("python -m")]
    for snippet, where in spans + blocks + headers + launcher:
        found += [(where, c) for c in _clean(snippet) if c.startswith(PREFIXES)]
    return sorted(set(found))


COMMANDS = documented_commands()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _check_rntp(args: list[str]) -> None:
    from rntp_megatron.cli import main
    from rntp_megatron.config import load_config

    path = []
    for a in args:
        if a.startswith("-"):
            break
        path.append(a)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0, f"rntp {' '.join(path)} --help exited {done.value.code}"
    flags = {a.split("=")[0] for a in args if a.startswith("--")}
    unknown = sorted(f for f in flags if f not in out.getvalue())
    assert not unknown, f"rntp {' '.join(path)} has no {unknown}:\n{out.getvalue()}"
    if "--config" in args:
        config = args[args.index("--config") + 1]
        if config.startswith("recipes/"):  # a shipped file (run.yaml stands for the reader's own)
            assert (REPO / config).is_file(), config
            if path[0] in ("train", "doctor", "plan"):
                load_config(REPO / config)


def _check_launch(args: list[str]) -> None:
    pytest.importorskip("nemo_run")
    from recipes import launch

    parsed = launch.parse_args(args)
    _, executor = launch.build(parsed)
    if parsed.executor == "slurm" and parsed.gpus_per_node is None and parsed.recipe.endswith(("b200", "fp8")):
        assert executor.gpus_per_node == 8, f"{parsed.recipe} on Slurm asks for {executor.gpus_per_node} GPUs a node"


def _check_sbatch(args: list[str], tmp_path: Path) -> None:
    script = next(i for i, a in enumerate(args) if a.endswith("train.sbatch"))
    env = {**_env(), "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "rntp", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_NTASKS_PER_NODE": "8", "RNTP_PYTHON": sys.executable, "RNTP_DRY_RUN": "1", "RNTP_NODES": "n1"}
    out = subprocess.run(["bash", *args[script:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "rntp_megatron.cli train" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("where, command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_runs(where, command, tmp_path):
    words = shlex.split(command)
    if words[0] == "torchrun":
        words = ["rntp", *words[words.index("rntp_megatron.cli") + 1:]]
    if words[0] == "rntp":
        _check_rntp(words[1:])
    elif words[:3] == ["python", "-m", "recipes.launch"]:
        _check_launch(words[3:])
    elif words[0] == "python":
        target = words[1:3] if words[1] == "-m" else words[1:2]
        out = subprocess.run([sys.executable, *target, "--help"], cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, f"{where}: {command}: {out.stderr[-2000:]}"
    elif words[0] == "sbatch":
        _check_sbatch(words, tmp_path)
    elif words[0] == "make":
        out = subprocess.run(["make", "-n", *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{where}: {command}: {out.stderr}"
    else:
        assert (REPO / words[0]).is_file(), f"{where}: {command}: no such script"
        assert subprocess.run(["bash", "-n", str(REPO / words[0])]).returncode == 0, f"{where}: {command}"


def test_the_commands_are_found():
    """The parser finds the commands it is meant to check (a change of format would leave nothing tested)."""
    kinds = {c.split()[0] for _, c in COMMANDS} | {" ".join(c.split()[:3]) for _, c in COMMANDS}
    assert {"rntp", "sbatch", "make", "torchrun", "python -m recipes.launch"} <= kinds, kinds
    assert any(w.startswith("recipes/configs/") for w, _ in COMMANDS)
