"""Fused CPU kernels for the hottest scale searches, built by ``torch.compile`` from the same PyTorch code.

Eager PyTorch runs a search as dozens of passes over memory (one per element-wise op and candidate); inductor
fuses them into one C++ loop per group, several times faster than both eager and ggml's scalar C. The
operations, their order and their float32 rounding are unchanged (inductor compiles without fast-math or FMA
contraction), so the bytes stay ggml's; the format tests check both paths against ggml.

    LLMQUANT_COMPILE=0   # eager only (no compiler needed)
    LLMQUANT_COMPILE=1   # always compiled on the CPU
    (unset, or auto)     # formats.quantize: compiled; whole-model jobs ask ``worth_it`` first

The first call of each kernel in a process traces it (a few seconds) and the first ever compiles it (10-30 s,
then cached on disk by inductor): a job on a small model is faster without them, hence ``worth_it``. Anything
that goes wrong while compiling turns the kernels off for the rest of the process with one warning: the eager
path gives the same bytes. On CUDA the eager path runs (triton's float division is not correctly rounded).

Writing a kernel: keep it element-major ([n, n_groups], one contiguous row per element) with the loops unrolled;
inductor's per-row reductions, ``&``/``|`` of comparison masks and masks converted to integers all come out many
times slower than nested ``torch.where`` (``search.where_all``) and arithmetic (``levels >> 4``, not
``levels >= 16``).
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
# a whole job of fewer weights than this runs eager in auto mode: tracing the kernels (seconds per process)
# costs more than they save on a model this small (SmolLM2-135M: 24 s eager, 32 s compiled, end to end)
AUTO_MIN_WEIGHTS = 1_000_000_000

_MODES = {"0": "off", "false": "off", "no": "off", "off": "off", "1": "on", "true": "on", "yes": "on", "on": "on"}
# enabled: the kernels may run; forced: LLMQUANT_COMPILE (or set_mode) decided, not ``worth_it``'s size rule;
# broken: compiling failed once in this process
_state = {"enabled": True, "forced": False, "broken": False}
_ready: set[object] = set()


def set_mode(mode: str) -> None:
    """``"on"``, ``"off"`` or ``"auto"``: what LLMQUANT_COMPILE=1, =0 or unset choose, set from code."""
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"compile mode {mode!r}: choose on, off or auto")
    _state["enabled"] = mode != "off"
    _state["forced"] = mode != "auto"


set_mode(_MODES.get(os.environ.get(_ENV, "auto").strip().lower(), "auto"))


def worth_it(n_weights: int) -> bool:
    """Whether a job quantizing ``n_weights`` weights should use the kernels: as LLMQUANT_COMPILE says when set,
    else only for jobs large enough to repay tracing them."""
    if not _state["enabled"] or _state["broken"]:
        return False
    return _state["forced"] or n_weights >= AUTO_MIN_WEIGHTS


def enabled(x: torch.Tensor, n_groups: int | None = None) -> bool:
    """Whether the compiled kernels should handle ``x`` ([n_groups, group_size]; ``n_groups`` overrides)."""
    n_groups = x.shape[0] if n_groups is None else n_groups
    return _state["enabled"] and not _state["broken"] and x.device.type == "cpu" and n_groups >= MIN_GROUPS


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
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # compile in this process: starting inductor's pool of compile workers costs ~2.5 s per process, more
        # than it saves on a few small kernels (and nothing once they are in the disk cache)
        torch._inductor.config.compile_threads = 1
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


__all__ = ["AUTO_MIN_WEIGHTS", "MIN_GROUPS", "enabled", "run", "set_mode", "use_compiled", "worth_it"]
