"""Fused CPU kernels for the hottest scale searches, built by ``torch.compile`` from the same PyTorch code.

Eager PyTorch runs a search as dozens of passes over memory (one per element-wise op and candidate); inductor
fuses them into one C++ loop per group, several times faster than both eager and ggml's scalar C. The
operations, their order and their float32 rounding are unchanged (inductor compiles without fast-math or FMA
contraction), so the bytes stay ggml's; the format tests check both paths against ggml.

    LLMQUANT_COMPILE=0   # eager only (no compiler needed)
    LLMQUANT_COMPILE=1   # always compiled on the CPU
    (unset, or auto)     # formats.quantize: compiled; whole-model jobs ask ``worth_it`` first

The first call of a kernel in a process loads it from ``kernel_cache`` (the first load pays ~2.5 s for importing
dynamo and inductor, the rest milliseconds); a kernel not cached yet is traced (~2 s) and, the first time on a
machine, compiled (10-30 s, cached by inductor), then saved there. A job on a small model is faster without them,
hence ``worth_it``. Anything that goes wrong while compiling turns the kernels off for the rest of the process
with one warning: the eager path gives the same bytes. On CUDA the eager path runs (triton's float division is not
correctly rounded).

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

from llmquant.formats import kernel_cache

_ENV = "LLMQUANT_COMPILE"
# below this many groups a kernel call is not worth it (and sizes 0/1 would make dynamo specialize again)
MIN_GROUPS = 64

_lock = threading.Lock()
# a whole job of fewer weights than this runs eager in auto mode: loading the kernels (~2.5 s per process, plus
# ~2 s to trace each one the kernel cache lacks) costs more than they save on a small model (SmolLM2-135M Q6_K:
# 2.4 s eager, 3.3 s with cached kernels; Q4_K_M: 7.4 s eager, 4.7-5.1 s cached, 12-17 s traced)
AUTO_MIN_WEIGHTS = 1_000_000_000

_MODES = {"0": "off", "false": "off", "no": "off", "off": "off", "1": "on", "true": "on", "yes": "on", "on": "on"}
# enabled: the kernels may run; forced: LLMQUANT_COMPILE (or set_mode) decided, not ``worth_it``'s size rule;
# broken: compiling failed once in this process; inductor_ready: a kernel was loaded or compiled in this process
_state = {"enabled": True, "forced": False, "broken": False, "inductor_ready": False}


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


class _Kernel:
    """One kernel with its constant arguments: the compiled variants (one per guard set: input dtypes, the sizes
    it specialized on, torch's thread count...) loaded from the disk cache or compiled in this process."""

    def __init__(self, fn: Callable, constants: tuple) -> None:
        self.fn = fn
        self.constants = constants
        self.variants: list = []
        self.loaded = False

    def find(self, args: tuple):
        return next((variant for variant in self.variants if variant.guard_check(*args)), None)


@functools.cache
def _kernel(fn: Callable, constants: tuple) -> _Kernel:
    return _Kernel(fn, constants)


def run(fn: Callable, constants: tuple, *tensors: torch.Tensor):
    """``fn(*tensors, *constants)`` through its compiled kernel, or None when compiling failed (the caller then
    runs the eager path). A kernel not yet in this process is loaded from the disk cache or compiled there,
    under a lock, so worker threads wait for it instead of compiling it twice."""
    kernel = _kernel(fn, constants)
    # detached: a view's guards also cover its base's sizes, so the same call on a view and on a plain tensor
    # would need two variants
    args = (*(tensor.detach() for tensor in tensors), *constants)
    try:
        variant = kernel.find(args)
        if variant is None:
            with _lock:
                variant = _load_or_compile(kernel, args)
        return variant.fn(*args)
    except Exception as error:  # no C++ compiler, an inductor bug: the eager path gives the same bytes
        _state["broken"] = True
        warnings.warn(f"llmquant: compiled kernels are off ({type(error).__name__}: {error}); "
                      f"quantizing with eager PyTorch (slower, same bytes). Set {_ENV}=0 to silence this.",
                      RuntimeWarning, stacklevel=2)
        return None


def _load_or_compile(kernel: _Kernel, args: tuple):
    if not _state["inductor_ready"]:
        kernel_cache.reuse_vec_isa_probe()
    if not kernel.loaded:
        kernel.loaded = True
        kernel.variants.extend(kernel_cache.load(kernel.fn, kernel.constants))
    variant = kernel.find(args)  # loaded, or compiled by another thread while this one waited
    if variant is None:
        variant = _compile(kernel.fn, args)
        kernel.variants.append(variant)
        kernel_cache.save(kernel.fn, kernel.constants, variant)
    if not _state["inductor_ready"]:
        _state["inductor_ready"] = True
        kernel_cache.record_vec_isa_probe()
    return variant


def _compile(fn: Callable, args: tuple):
    """Trace and compile ``fn`` for arguments like ``args`` into a function that can be saved to disk and loaded
    by another process without tracing again, its guards kept (a later call that fails them compiles again)."""
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # compile in this process: starting inductor's pool of compile workers costs ~2.5 s per process, more
        # than it saves on a few small kernels (and nothing once they are in the disk cache)
        torch._inductor.config.compile_threads = 1
    # float constants (ggml's epsilons) become part of the code and of its guards, not inputs: a float input's
    # guard does not survive saving
    with torch._dynamo.config.patch(specialize_float=True):
        compiled = torch.compile(fn, dynamic=True, fullgraph=True, options={"cpp_wrapper": True})
        return compiled.aot_compile((args, {}))


__all__ = ["AUTO_MIN_WEIGHTS", "MIN_GROUPS", "enabled", "run", "set_mode", "use_compiled", "worth_it"]
