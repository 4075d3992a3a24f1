"""The package's modules import one way: no import circle among config, data and rewards (counting imports inside
functions and under TYPE_CHECKING, which a circle only hides), and each of them imports on its own, fresh."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rntp_megatron"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (functions and TYPE_CHECKING blocks too)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rntp_megatron"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    """Whether an import path leads from start to goal."""
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return False


def test_config_data_and_rewards_import_one_way():
    g = import_graph()
    pairs = [("rntp_megatron.data.corpora", "rntp_megatron.data.prepare"),
             ("rntp_megatron.data.proxy", "rntp_megatron.data.sites"),
             ("rntp_megatron.config", "rntp_megatron.rewards.registry"),
             ("rntp_megatron.config", "rntp_megatron.data.tokenizer"),
             ("rntp_megatron.config", "rntp_megatron.rewards"),
             ("rntp_megatron.config", "rntp_megatron.data.sources")]
    circles = [(a, b) for a, b in pairs if reaches(g, a, b) and reaches(g, b, a)]
    assert not circles, f"import circles: {circles}"
    assert not any(reaches(g, m, "rntp_megatron.config") for m in g["rntp_megatron.config"]), \
        "the config is read by the package, it reads none of it back"


def test_each_module_imports_fresh():
    modules = ["rntp_megatron.config", "rntp_megatron.rewards.registry", "rntp_megatron.data.tokenizer",
               "rntp_megatron.rewards.compute", "rntp_megatron.data.corpora", "rntp_megatron.data.prepare",
               "rntp_megatron.data.sites", "rntp_megatron.data.stream"]  # (data.proxy: megatron, checked statically)
    script = ("import importlib, sys\n"
              f"for name in {modules!r}:\n"
              "    for m in [m for m in sys.modules if m.startswith('rntp_megatron')]:\n"
              "        del sys.modules[m]\n"
              "    importlib.import_module(name)\n"
              "from rntp_megatron.config import build_config\n"
              "assert build_config({'reward': {'name': 'info_gain'}}).rl.train_on == 'thought'\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
