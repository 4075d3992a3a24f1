"""The CPU compatibility layer: what it redirects, and a loud failure when megatron-core changes under it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rntp_megatron.runtime import cpu_compat
from rntp_megatron.runtime.cuda_inventory import cuda_call_inventory

RECORDED = json.loads((Path(__file__).parent / "data" / "megatron_cuda_calls.json").read_text())


def test_megatron_cuda_call_sites_unchanged():
    """If this fails, megatron-core moved or added CUDA-only calls: re-run the CPU tests, extend
    cpu_compat.REDIRECTS where needed, then regenerate the inventory (command in cuda_inventory.py)."""
    import megatron.core

    version = megatron.core.__version__.split("+")[0]  # a local "+<git hash>" suffix comes from the cwd
    now = cuda_call_inventory()
    recorded = RECORDED["calls"]
    changed = {f: (recorded.get(f), now.get(f)) for f in sorted(set(now) | set(recorded))
               if recorded.get(f) != now.get(f)}
    assert version == RECORDED["megatron_core"] and not changed, (
        f"megatron-core {version} (inventory recorded with {RECORDED['megatron_core']}); "
        f"files whose CUDA call count changed (recorded, now): {changed}")


def test_refuses_untested_megatron(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="0.99.0"):
        cpu_compat._check_megatron_version()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive where CUDA exists")
def test_redirects_are_listed_and_recorded(tmp_path):
    """Building and running a model on CPU goes through redirected calls, each named in REDIRECTS."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from rntp_megatron.config import build_config\n"
        "from rntp_megatron.runtime import init_distributed, destroy_distributed, cpu_compat\n"
        "from rntp_megatron.model.provider import build_model\n"
        "cfg = build_config({'model': {'card': 'tiny'}})\n"
        "init_distributed(cfg.parallel)\n"
        "m = build_model(cfg.model, cfg.parallel)\n"
        "t = torch.randint(0, 256, (1, 8))\n"
        "m(t, torch.arange(8)[None], None, labels=t).sum().backward()\n"
        "print('HITS', sorted({name for name, site in cpu_compat.hits()}))\n"
        "print('SITES', sorted({site for name, site in cpu_compat.hits()}))\n"
        "destroy_distributed()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    hits = eval(next(line for line in out.stdout.splitlines() if line.startswith("HITS"))[5:])
    sites = eval(next(line for line in out.stdout.splitlines() if line.startswith("SITES"))[6:])
    assert "torch.cuda.current_device" in hits
    assert set(hits) <= set(cpu_compat.REDIRECTS), set(hits) - set(cpu_compat.REDIRECTS)
    assert any(site.startswith("core/") for site in sites), sites


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is inactive where CUDA exists")
def test_redirects_paused_lifts_only_the_mode_and_restores_it():
    """Inside cuda_redirects_paused() a device='cuda' literal is no longer rewritten (torch's own error) while
    the patched torch.cuda functions still answer; the mode is back after the block, also after an error,
    and a mode entered above it is left alone."""
    from torch.overrides import TorchFunctionMode

    cpu_compat.install()
    assert torch.zeros(1, device="cuda").device.type == "cpu"
    with cpu_compat.cuda_redirects_paused():
        with pytest.raises((AssertionError, RuntimeError), match="CUDA"):
            torch.zeros(1, device="cuda")
        assert torch.cuda.current_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="inside"):
        with cpu_compat.cuda_redirects_paused():
            raise ValueError("inside")
    assert torch.zeros(1, device="cuda").device.type == "cpu"

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        with cpu_compat.cuda_redirects_paused():  # the compat mode is not innermost: nothing is lifted
            assert torch.zeros(1, device="cuda").device.type == "cpu"
