"""CPU compatibility layer for megatron-core: redirect its CUDA-only calls to CPU, only when CUDA is absent.

megatron-core assumes a GPU in a handful of places (device="cuda" literals, torch.cuda.current_device() as a
device argument, torch.cuda RNG and stream calls, `param.type()` string checks in the optimizer). On a
CPU-only torch these raise. `install()` redirects exactly the calls listed in REDIRECTS and records the
megatron call site of each hit (`hits()`), so nothing is patched silently. It refuses to run under a
megatron-core release it was not checked against (TESTED_MEGATRON), and tests/test_cpu_compat.py fails
when the set of CUDA call sites in the modules we use changes (tests/data/megatron_cuda_calls.json).

On a machine with CUDA, `install()` does nothing.

The device rewrite is a TorchFunctionMode, so every torch call in the installing thread pays a Python hop
through it; `cuda_redirects_paused()` lifts it around code known not to need it (the in-process engine's
decode forwards), where that hop is a large share of a small model's step.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import threading
import traceback
from typing import Any, Callable, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

TESTED_MEGATRON = ("0.19",)

# Every redirected call: name -> (what megatron does with it, what it becomes on CPU).
REDIRECTS: dict[str, str] = {
    "torch.cuda.current_device": "device argument for parameters and buffers -> torch.device('cpu')",
    "torch.cuda.synchronize": "timers and checkpoint saving -> no-op",
    "torch.cuda.get_rng_state": "RNG tracker fork() -> CPU generator state",
    "torch.cuda.set_rng_state": "RNG tracker fork() restore -> no-op (CPU generator untouched)",
    "torch.cuda.manual_seed": "seeding the tracker -> no-op (torch.manual_seed seeds CPU)",
    "torch.cuda.manual_seed_all": "seeding -> no-op",
    "torch.cuda.current_stream": "stream bookkeeping -> dummy stream",
    "torch.cuda.default_stream": "stream bookkeeping -> dummy stream",
    "torch.cuda.Stream": "side streams -> dummy stream",
    "torch.cuda.stream": "stream context -> nullcontext",
    "torch.cuda.Event": "timing events -> dummy event",
    "torch.cuda.nvtx.range_push": "profiling ranges -> no-op",
    "torch.cuda.nvtx.range_pop": "profiling ranges -> no-op",
    "torch.Tensor.cuda": "moving tensors to the GPU -> the tensor itself",
    "torch.Tensor.type()": "optimizer checks 'torch.cuda.FloatTensor' -> CUDA type names for megatron callers",
    "device='cuda' / pin_memory=True": "tensor factories and .to() -> device='cpu', pin_memory=False",
}

_HITS: collections.Counter = collections.Counter()
_LOCK = threading.Lock()
_INSTALLED = False
_MODE: Optional["_CudaToCpu"] = None  # the process-wide mode install() entered (in the installing thread)


def _megatron_site() -> str:
    """file:line of the innermost megatron frame on the stack (the caller being redirected)."""
    # A frame walk, not traceback.extract_stack: that reads every frame's source line, and prefill forwards
    # record a hit per layer.
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if "/megatron/" in filename:
            return f"{filename.split('/megatron/', 1)[1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "outside megatron"


def _record(name: str) -> None:
    with _LOCK:
        _HITS[(name, _megatron_site())] += 1


def hits() -> dict[tuple[str, str], int]:
    """(redirected call, megatron file:line) -> count, since install()."""
    with _LOCK:
        return dict(_HITS)


class _DummyEvent:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _record("torch.cuda.Event")

    def record(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


class _DummyStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _record("torch.cuda.Stream")

    def wait_stream(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any, **kwargs: Any) -> _DummyEvent:
        return _DummyEvent()

    def __enter__(self) -> "_DummyStream":
        return self

    def __exit__(self, *args: Any) -> bool:
        return False


def _is_cuda(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)  # an int device means a CUDA ordinal


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device='cuda' (or a CUDA ordinal) to 'cpu' and pin_memory=True to False in every torch call."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            _record("device='cuda' / pin_memory=True")
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if getattr(func, "__name__", "") == "to" and len(args) > 1 and _is_cuda(args[1]):
            _record("device='cuda' / pin_memory=True")
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _returning(name: str, value: Callable[..., Any]) -> Callable[..., Any]:
    def redirected(*args: Any, **kwargs: Any) -> Any:
        _record(name)
        return value(*args, **kwargs)

    redirected.__name__ = name.rsplit(".", 1)[-1]
    return redirected


def _check_megatron_version() -> None:
    import megatron.core

    version = megatron.core.__version__
    if not version.startswith(TESTED_MEGATRON):
        raise RuntimeError(
            f"rntp_megatron.runtime.cpu_compat was checked against megatron-core {TESTED_MEGATRON}, found "
            f"{version}: re-run tests/test_cpu_compat.py and update REDIRECTS before using it on CPU"
        )


def install() -> bool:
    """Redirect megatron-core's CUDA-only calls to CPU when CUDA is unavailable. Returns whether it is active."""
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    _check_megatron_version()
    cuda = torch.cuda
    cuda.current_device = _returning("torch.cuda.current_device", lambda: torch.device("cpu"))
    cuda.synchronize = _returning("torch.cuda.synchronize", lambda *a, **k: None)
    cuda.get_rng_state = _returning("torch.cuda.get_rng_state", lambda *a, **k: torch.get_rng_state())
    cuda.set_rng_state = _returning("torch.cuda.set_rng_state", lambda *a, **k: None)
    cuda.manual_seed = _returning("torch.cuda.manual_seed", lambda *a, **k: None)
    cuda.manual_seed_all = _returning("torch.cuda.manual_seed_all", lambda *a, **k: None)
    cuda.current_stream = _returning("torch.cuda.current_stream", lambda *a, **k: _DummyStream())
    cuda.default_stream = _returning("torch.cuda.default_stream", lambda *a, **k: _DummyStream())
    cuda.Stream = _DummyStream
    cuda.stream = _returning("torch.cuda.stream", lambda *a, **k: contextlib.nullcontext())
    cuda.Event = _DummyEvent
    cuda.nvtx.range_push = _returning("torch.cuda.nvtx.range_push", lambda *a, **k: None)
    cuda.nvtx.range_pop = _returning("torch.cuda.nvtx.range_pop", lambda *a, **k: None)
    torch.Tensor.cuda = _returning("torch.Tensor.cuda", lambda self, *a, **k: self)

    plain_type = torch.Tensor.type

    def tensor_type(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = plain_type(self, *args, **kwargs)
        # Only megatron's optimizer compares these strings; everyone else keeps the true name.
        if not args and not kwargs and ".cuda." not in name:
            caller = traceback.extract_stack(limit=2)[0].filename
            if "/megatron/core/optimizer" in caller:
                _record("torch.Tensor.type()")
                return name.replace("torch.", "torch.cuda.", 1)
        return name

    torch.Tensor.type = tensor_type
    global _MODE
    _MODE = _CudaToCpu()
    _MODE.__enter__()  # stays active in this thread for the life of the process
    _INSTALLED = True
    return True


@contextlib.contextmanager
def cuda_redirects_paused() -> Iterator[None]:
    """Lift the device='cuda' -> 'cpu' TorchFunctionMode for the block, then restore it.

    Only the mode is lifted: the torch.cuda functions and Tensor.cuda / Tensor.type stay redirected. A
    device='cuda' literal reached inside the block raises torch's own "not compiled with CUDA" error, so
    use it around code whose hits() stay unchanged. Where the mode is not the innermost one of this thread
    (install() inactive, another mode entered above it, or another thread), the block runs unchanged.
    """
    if _MODE is None or torch.overrides._get_current_function_mode() is not _MODE:
        yield
        return
    _MODE.__exit__(None, None, None)
    try:
        yield
    finally:
        _MODE.__enter__()
