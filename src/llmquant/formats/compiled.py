"""Fused CPU kernels for the hottest scale searches, compiled by inductor from the same PyTorch code.

Eager PyTorch runs a search as dozens of passes over memory (one per element-wise op and candidate); inductor
fuses them into one C++ loop per group, several times faster than both eager and ggml's scalar C. The
operations, their order and their float32 rounding are unchanged (inductor compiles without fast-math or FMA
contraction), so the bytes stay ggml's; the format tests check both paths against ggml.

    LLMQUANT_COMPILE=0   # eager only (no compiler needed)
    LLMQUANT_COMPILE=1   # always compiled on the CPU, compiling what the kernel cache lacks
    (unset, or auto)     # cached kernels always run; a missing one is compiled by formats.quantize, and by
                         # a whole-model job only where ``worth_it`` says so (else that call runs eager)

Each kernel is exported and compiled into a shared library (``aoti``) once per machine (10-30 s), saved in
``kernel_cache`` and loaded by later processes in about a millisecond, without importing dynamo or inductor.
A call whose sizes or dtypes no saved variant accepts compiles one more. Anything that goes wrong while
compiling turns the kernels off for the rest of the process with one warning: the eager path gives the same
bytes. On CUDA the eager path runs (triton's float division is not correctly rounded).

Writing a kernel: keep it element-major ([n, n_groups], one contiguous row per element) with the loops unrolled;
inductor's per-row reductions, ``&``/``|`` of comparison masks and masks converted to integers all come out many
times slower than nested ``torch.where`` (``search.where_all``) and arithmetic (``levels >> 4``, not
``levels >= 16``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from llmquant.formats import aoti, kernel_cache

_ENV = "LLMQUANT_COMPILE"
# below this many groups a kernel call is not worth it (and sizes 0/1 would make the export specialize)
MIN_GROUPS = 64

_lock = threading.Lock()
# in auto mode a whole-model job of fewer weights than this compiles no kernel the cache lacks: compiling one costs
# 10-30 s, more than the kernels save on a small model (SmolLM2-135M Q4_K_M: 7.4 s eager, ~2 s with cached kernels)
AUTO_MIN_WEIGHTS = 1_000_000_000

_MODES = {"0": "off", "false": "off", "no": "off", "off": "off", "1": "on", "true": "on", "yes": "on", "on": "on"}
# enabled: the kernels may run; forced: LLMQUANT_COMPILE (or set_mode) decided, not ``worth_it``'s size rule;
# broken: compiling failed once in this process; may_compile: a kernel the disk cache lacks is compiled (else
# that call runs eager)
_state = {"enabled": True, "forced": False, "broken": False, "may_compile": True}
# the kernels that calls wanted but the cache lacked while compiling was not allowed (those calls ran eager)
_missing: set[str] = set()


def set_mode(mode: str) -> None:
    """``"on"``, ``"off"`` or ``"auto"``: what LLMQUANT_COMPILE=1, =0 or unset choose, set from code."""
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"compile mode {mode!r}: choose on, off or auto")
    _state["enabled"] = mode != "off"
    _state["forced"] = mode != "auto"


set_mode(_MODES.get(os.environ.get(_ENV, "auto").strip().lower(), "auto"))


def worth_it(n_weights: int) -> bool:
    """Whether a job quantizing ``n_weights`` weights should compile the kernels the disk cache lacks: as
    LLMQUANT_COMPILE says when set, else only for jobs large enough to repay compiling them (the kernels already
    in the cache run for any job)."""
    if not _state["enabled"] or _state["broken"]:
        return False
    return _state["forced"] or n_weights >= AUTO_MIN_WEIGHTS


def enabled(x: torch.Tensor, n_groups: int | None = None) -> bool:
    """Whether the compiled kernels should handle ``x`` ([n_groups, group_size]; ``n_groups`` overrides)."""
    n_groups = x.shape[0] if n_groups is None else n_groups
    return _state["enabled"] and not _state["broken"] and x.device.type == "cpu" and n_groups >= MIN_GROUPS


def take_missing() -> set[str]:
    """The kernels that calls since the last ``take_missing`` ran eager for, because the cache lacked them and
    ``may_compile`` was off (forgotten once taken)."""
    missing = set(_missing)
    _missing.difference_update(missing)
    return missing


def may_compile(on: bool) -> contextlib.AbstractContextManager[None]:
    """Within a block, compile the kernels the disk cache lacks (on), or run eager where a kernel is missing."""
    return _state_within("may_compile", on)


def use_compiled(on: bool) -> contextlib.AbstractContextManager[None]:
    """Turn the compiled kernels on or off within a block (tests compare both paths with ggml)."""
    return _state_within("enabled", on)


@contextlib.contextmanager
def _state_within(key: str, value: bool) -> Iterator[None]:
    before = _state[key]
    _state[key] = value
    try:
        yield
    finally:
        _state[key] = before


class _Kernel:
    """One kernel with its constant arguments and its compiled variants (one per set of static sizes and dtypes
    it met), loaded from the disk cache or compiled in this process."""

    def __init__(self, fn: Callable, constants: tuple) -> None:
        self.fn = fn
        self.constants = constants
        self.variants: list[aoti.Library] = []
        self.loaded = False
        self.saved_names: set[str] = set()  # the cache's files already loaded

    def find(self, tensors: tuple) -> aoti.Library | None:
        return next((variant for variant in self.variants if variant.accepts(tensors)), None)


@functools.cache
def _kernel(fn: Callable, constants: tuple) -> _Kernel:
    return _Kernel(fn, constants)


def run(fn: Callable, constants: tuple, *tensors: torch.Tensor):
    """``fn(*tensors, *constants)`` through its compiled kernel, or None (the caller then runs the eager path)
    when compiling failed or the kernel is missing where ``may_compile`` is off. A kernel not yet in this process
    is loaded from the disk cache or compiled there, under a lock, so worker threads wait for it instead of
    compiling it twice."""
    kernel = _kernel(fn, constants)
    # the compiled code indexes its inputs as contiguous tensors
    tensors = tuple(tensor.detach().contiguous() for tensor in tensors)
    try:
        variant = kernel.find(tensors)
        if variant is None:
            with _lock:
                variant = _load_or_compile(kernel, tensors)
            if variant is None:
                _missing.add(kernel.fn.__qualname__)
                return None
        return variant(tensors)
    except Exception as error:  # no C++ compiler, an inductor bug: the eager path gives the same bytes
        _state["broken"] = True
        warnings.warn(f"llmquant: compiled kernels are off ({type(error).__name__}: {error}); "
                      f"quantizing with eager PyTorch (slower, same bytes). Set {_ENV}=0 to silence this.",
                      RuntimeWarning, stacklevel=2)
        return None


def _load_or_compile(kernel: _Kernel, tensors: tuple) -> aoti.Library | None:
    if not kernel.loaded:
        kernel.loaded = True
        kernel.variants.extend(kernel_cache.load(kernel.fn, kernel.constants, aoti.Library, kernel.saved_names))
    variant = kernel.find(tensors)  # loaded, or compiled by another thread while this one waited
    if variant is None and _state["may_compile"]:
        with kernel_cache.compiling(kernel.fn, kernel.constants):
            # another process may have compiled it while this one waited for the lock
            kernel.variants.extend(kernel_cache.load(kernel.fn, kernel.constants, aoti.Library, kernel.saved_names))
            variant = kernel.find(tensors)
            if variant is None:
                variant = _compile(kernel, tensors)
                kernel.variants.append(variant)
    return variant


def _compile(kernel: _Kernel, tensors: tuple) -> aoti.Library:
    """Compile one more variant of ``kernel`` for inputs like ``tensors``, load it and save it to the cache."""
    import torch._inductor

    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # compile in this process: starting inductor's pool of compile workers costs ~2.5 s per process, more
        # than it saves on a few small kernels (and nothing once they are in the disk cache)
        torch._inductor.config.compile_threads = 1
    kernel_cache.reuse_vec_isa_probe()
    with tempfile.TemporaryDirectory(prefix="llmquant-kernel-") as scratch:
        library, spec = aoti.build(kernel.fn, kernel.constants, tensors, Path(scratch))
        variant = aoti.Library(library, spec)  # loaded before the folder goes (the loaded library stays)
        saved = kernel_cache.save(kernel.fn, kernel.constants, library, spec)
        if saved:
            kernel.saved_names.add(saved)
    kernel_cache.record_vec_isa_probe()
    if not variant.accepts(tensors):
        raise RuntimeError(f"the kernel compiled for {kernel.fn.__qualname__} does not accept its own inputs")
    return variant


__all__ = ["AUTO_MIN_WEIGHTS", "MIN_GROUPS", "enabled", "may_compile", "run", "set_mode", "take_missing",
           "use_compiled", "worth_it"]
