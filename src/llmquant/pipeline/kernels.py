"""``llmquant kernels``: the fused CPU kernels compiled ahead of the jobs that need them, listed and cleared.

A quantize job compiles the kernels it lacks only when the model is large enough to repay them (``formats.compiled``:
10^9+ weights); smaller jobs run those calls in eager PyTorch, about twice as slow, with the same bytes. ``build``
fills the kernel cache once for every format, so every later job on this machine, of any size, runs the kernels.

Each format is quantized once without and once with an importance vector on a sample tensor, in worker processes
that compile what the cache lacks (one compiler per process: several formats compile at once).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmquant.errors import LlmquantError


@dataclass(frozen=True)
class KernelFile:
    name: str  # e.g. "kquants._q4_k_kernel-1a2b3c4d" (the kernel and a tag of its constant arguments)
    n_bytes: int


def block_formats() -> list[str]:
    """Every format with blocks (the float types have no kernels)."""
    from llmquant.formats import FORMATS

    return [name for name, fmt in FORMATS.items() if fmt.block_size > 1]


def _build_format(name: str) -> tuple[str, float, str | None]:
    """In a worker process: quantize a sample in ``name`` with compiling on; (name, seconds, error or None)."""
    import warnings

    import numpy as np

    from llmquant.formats import compiled, quantize

    compiled.set_mode("on")
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    # wide enough for every format's blocks, enough rows that every kernel runs (compiled.MIN_GROUPS)
    weights = rng.standard_t(4, size=(256, 1536)).astype(np.float32)
    importance = (rng.random(1536) + 0.1).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize(weights, name)
        quantize(weights, name, importance)
    error = None
    if compiled._state["broken"]:
        error = "; ".join(str(w.message) for w in caught) or "compiling failed"
    return name, time.perf_counter() - start, error


def build(formats: Sequence[str] | None = None, jobs: int | None = None,
          on_done: Callable[[str, float], None] | None = None) -> list[str]:
    """Compile every kernel of ``formats`` (default: all) that the cache lacks, ``jobs`` processes at once
    (default: the cores, at most 8; each holds about 1 GB while compiling). Calls ``on_done(format, seconds)``
    as each finishes; returns the formats in the order they finished. Raises LlmquantError when a kernel cannot
    be compiled (no C++ compiler, an inductor bug) or the cache is off."""
    from llmquant.formats import compiled, kernel_cache

    if kernel_cache.folder() is None:
        raise LlmquantError("the kernel cache is off (LLMQUANT_KERNEL_CACHE=0): compiled kernels would not be kept")
    if not compiled._state["enabled"]:
        raise LlmquantError("compiled kernels are off (LLMQUANT_COMPILE=0): unset it to build them")
    names = list(formats) if formats is not None else block_formats()
    jobs = max(1, min(jobs or os.cpu_count() or 1, 8, len(names)))
    finished = []
    # spawn: a fresh interpreter per worker (forking a process that has run torch's threads is unsafe)
    pool = multiprocessing.get_context("spawn").Pool(jobs)
    try:
        for name, seconds, error in pool.imap_unordered(_build_format, names):
            if error:
                raise LlmquantError(f"could not compile the {name} kernels: {error}")
            finished.append(name)
            if on_done:
                on_done(name, seconds)
    except BaseException:  # an error or Ctrl-C: stop the others now
        pool.terminate()
        pool.join()
        raise
    pool.close()  # done: the workers exit on their own
    pool.join()
    return finished


def cached() -> tuple[Path | None, list[KernelFile]]:
    """This llmquant's and machine's kernel folder (None when the cache is off) and the kernels saved in it."""
    from llmquant.formats import kernel_cache

    where = kernel_cache.folder()
    if where is None or not where.is_dir():
        return where, []
    files = []
    for spec in sorted(where.glob("*.json")):
        library = spec.with_suffix(".so")
        if library.is_file():
            files.append(KernelFile(spec.stem.rsplit("-", 1)[0], library.stat().st_size))
    return where, files


def clear() -> int:
    """Delete every saved kernel (of this and older llmquant or torch versions); returns the bytes freed."""
    from llmquant.cache import cache_root

    root = cache_root() / "kernels"
    if not root.is_dir():
        return 0
    n_bytes = sum(path.stat().st_size for path in root.rglob("*") if path.is_file())
    shutil.rmtree(root)
    return n_bytes


__all__ = ["KernelFile", "block_formats", "build", "cached", "clear"]
