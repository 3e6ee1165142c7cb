"""Fused CPU kernels for the hottest scale searches, built by ``torch.compile`` from the same PyTorch code.

Eager PyTorch runs a search as dozens of passes over memory (one per element-wise op and candidate); inductor
fuses them into one C++ loop per group, several times faster than both eager and ggml's scalar C. The
operations, their order and their float32 rounding are unchanged (inductor compiles without fast-math or FMA
contraction), so the bytes stay ggml's; the format tests check both paths against ggml.

    LLMQUANT_COMPILE=0   # eager only (no compiler needed); default: compiled on the CPU when it works

The first call of each kernel compiles it (10-30 s, then cached on disk by inductor for later runs). Anything
that goes wrong while compiling turns the kernels off for the rest of the process with one warning: the eager
path gives the same bytes. On CUDA the eager path runs (triton's float division is not correctly rounded).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

_ENV = "LLMQUANT_COMPILE"
# below this many groups a kernel call is not worth it (and sizes 0/1 would make dynamo specialize again)
MIN_GROUPS = 64

_lock = threading.Lock()
_state = {"enabled": os.environ.get(_ENV, "1").strip().lower() not in ("0", "false", "no", "off"), "broken": False}
_ready: set[object] = set()


def enabled(x: torch.Tensor) -> bool:
    """Whether the compiled kernels should handle ``x`` ([n_groups, group_size])."""
    return (_state["enabled"] and not _state["broken"] and x.device.type == "cpu" and x.shape[0] >= MIN_GROUPS)


@contextlib.contextmanager
def use_compiled(on: bool) -> Iterator[None]:
    """Turn the compiled kernels on or off within a block (tests compare both paths with ggml)."""
    before = _state["enabled"]
    _state["enabled"] = on
    try:
        yield
    finally:
        _state["enabled"] = before


@functools.cache
def _compiled(fn: Callable, key: object) -> Callable:
    del key  # one wrapper per (kernel, constant arguments)
    # each format's constants (nmax, group size) are one more specialization of the same code: room for all
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(fn, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})


def run(fn: Callable, constants: tuple, *tensors: torch.Tensor):
    """``fn(*tensors, *constants)`` through its compiled kernel, or None when compiling failed (the caller then
    runs the eager path). The first call of each kernel compiles under a lock, so worker threads wait for it
    instead of compiling it twice."""
    kernel = _compiled(fn, constants)
    key = (fn, constants)
    try:
        if key in _ready:
            return kernel(*tensors, *constants)
        with _lock:
            result = kernel(*tensors, *constants)
            _ready.add(key)
            return result
    except Exception as error:  # no C++ compiler, an inductor bug: the eager path gives the same bytes
        _state["broken"] = True
        warnings.warn(f"llmquant: compiled kernels are off ({type(error).__name__}: {error}); "
                      f"quantizing with eager PyTorch (slower, same bytes). Set {_ENV}=0 to silence this.",
                      RuntimeWarning, stacklevel=2)
        return None


__all__ = ["MIN_GROUPS", "enabled", "run", "use_compiled"]
