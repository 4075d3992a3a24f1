"""The docs are the repository's: no file of the project points a reader outside it (the method, the config
reference and the design live in docs/, so a clone holds everything its files refer to), and the config
reference names every knob of the config tree."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# spelled in pieces, so this file does not name them itself
FORBIDDEN = ["../" + "shared", "/work/" + "shared", "ALGORITHMS" + ".md", "DESIGN" + ".md"]
SKIP_DIRS = {".git", ".venv", "sglang-venv", "runs", "__pycache__", ".pytest_cache", "node_modules"}


def project_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git), else every file outside virtualenvs and run output."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        return [ROOT / p for p in out.split("\0") if p and (ROOT / p).is_file() and not (ROOT / p).is_symlink()]
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [Path(folder) / n for n in names]
    return files


def test_no_file_names_a_path_outside_the_repository():
    files = project_files()
    assert any(f.name == "README.md" for f in files) and any(f.suffix == ".py" for f in files)
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary data
        for lineno, line in enumerate(text.splitlines(), 1):
            found += [f"{path.relative_to(ROOT)}:{lineno}: {word}" for word in FORBIDDEN if word in line]
    assert not found, "files point outside the repository:\n" + "\n".join(found)


def test_the_docs_the_readme_links_exist():
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/method.md", "docs/config.md", "docs/design.md"):
        assert f"({doc})" in readme and (ROOT / doc).is_file(), doc


def _knobs(cls, prefix: str = "") -> list[str]:
    """Dotted names of every leaf field of a config dataclass (lists of dataclasses count as one knob)."""
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            out += _knobs(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_the_config_reference_names_every_knob():
    from rntp_megatron.config import RunConfig

    doc = (ROOT / "docs" / "config.md").read_text()
    missing = [k for k in _knobs(RunConfig) if f"`{k.split('.')[-1]}`" not in doc and f"`{k}`" not in doc
               and k.split(".", 1)[-1] not in doc]
    assert not missing, f"docs/config.md does not describe: {missing}"
