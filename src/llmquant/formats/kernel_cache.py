"""The fused kernels saved to disk, so that a new process loads them (milliseconds) instead of tracing them
(seconds each).

Each saved kernel is what ``torch.compile(...).aot_compile`` gives: the compiled code and the guards it was
traced under (dtypes, the sizes it specialized on, torch's thread count...). A loaded kernel runs only where its
guards pass; where none does, ``compiled`` compiles one more variant and saves it too. What guards cannot see,
the code the kernels were traced from and the machine they were compiled for, is in the folder's name:

    $LLMQUANT_CACHE/kernels/<hash of llmquant's format sources, torch and Python versions, CPU>/<kernel>-<id>.aot

A file that does not load (stale, truncated) is deleted and compiled again. The files are pickles that only this
user's own runs write, in this user's cache folder, as inductor's own cache is. ``LLMQUANT_KERNEL_CACHE=0`` turns
the cache off (every process traces again).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from llmquant.cache import cache_root

_ENV = "LLMQUANT_KERNEL_CACHE"
_FORMAT = 1  # bump when what is saved changes
# variants of one kernel kept on disk at most (one per thread count, dtype, ... that a job really used)
MAX_VARIANTS = 8
# kernel folders kept (one per llmquant source and torch version used lately)
MAX_FOLDERS = 4


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@functools.cache
def folder() -> Path | None:
    """This code's and machine's kernel folder, or None when the cache is off."""
    if os.environ.get(_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    digest = hashlib.sha256()
    for part in (str(_FORMAT), torch.__version__, sys.version, platform.system(), platform.machine(),
                 _cpu_signature()):
        digest.update(part.encode() + b"\0")
    for source in sorted(Path(__file__).parent.glob("*.py")):  # the kernels inline helpers from every module
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return cache_root() / "kernels" / digest.hexdigest()[:24]


def _stem(fn: Callable, constants: tuple) -> str:
    tag = hashlib.sha256(repr(constants).encode()).hexdigest()[:8]
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__qualname__}-{tag}"


def load(fn: Callable, constants: tuple) -> list:
    """Every saved variant of ``fn`` with these constant arguments, loaded (deleting those that do not load)."""
    where = folder()
    if where is None or not where.is_dir():
        return []
    variants = []
    for path in sorted(where.glob(f"{_stem(fn, constants)}-*.aot")):
        try:
            with path.open("rb") as file:
                variants.append(torch.compiler.load_compiled_function(file, f_globals=fn.__globals__))
        except Exception:  # truncated, or written by a torch this folder's key did not tell apart: compile again
            path.unlink(missing_ok=True)
    return variants


def save(fn: Callable, constants: tuple, variant) -> None:
    """Save a freshly compiled variant (written under a temporary name and renamed). A cache that cannot be
    written costs only time: one warning, and the next process traces again."""
    where = folder()
    if where is None:
        return
    stem = _stem(fn, constants)
    try:
        _make(where)
        if len(list(where.glob(f"{stem}-*.aot"))) >= MAX_VARIANTS:
            return
        variant.save_compiled_function(str(where / f"{stem}-{uuid.uuid4().hex[:12]}.aot"))
    except Exception as error:
        _warn_once(f"llmquant: could not save a compiled kernel in {where} ({type(error).__name__}: {error}); "
                   f"every new process will trace it again. Set {_ENV}=0 to silence this.")


# inductor checks each SIMD instruction set the CPU lists by compiling a test library and loading it in a child
# process: about 1 s per process. The first process records the answer in the kernel folder (whose name already
# holds the CPU's flags and torch's version); later ones reuse it when it says every candidate passed.
_VEC_ISA_RECORD = "vec-isa.json"


def _vec_isa_candidates() -> list[str] | None:
    """The instruction sets inductor would probe on this CPU (x86-64 only; None elsewhere)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    from torch._inductor import cpu_vec_isa

    flags = cpu_vec_isa.x86_isa_checker()
    return [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]


def reuse_vec_isa_probe() -> None:
    """Skip inductor's probe when this folder's record says every instruction set the CPU lists passed it."""
    where = folder()
    try:
        if where is None or not (where / _VEC_ISA_RECORD).is_file():
            return
        recorded = json.loads((where / _VEC_ISA_RECORD).read_text())
        candidates = _vec_isa_candidates()
        if candidates and recorded == candidates:
            torch._inductor.config.cpp.vec_isa_ok = True  # what the probe would answer for each of them
    except Exception:  # an unreadable record, another torch's internals: let inductor probe
        return


def record_vec_isa_probe() -> None:
    """After inductor has probed (a kernel compiled or loaded), record which instruction sets passed."""
    where = folder()
    if where is None or (where / _VEC_ISA_RECORD).is_file() or torch._inductor.config.cpp.vec_isa_ok is not None:
        return
    try:
        from torch._inductor import cpu_vec_isa

        passed = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]
        _make(where)
        temporary = where / f".{_VEC_ISA_RECORD}.{uuid.uuid4().hex[:8]}"
        temporary.write_text(json.dumps(passed))
        os.replace(temporary, where / _VEC_ISA_RECORD)
    except Exception:
        return


def _make(where: Path) -> None:
    """Create this code's kernel folder on first use, pruning the oldest of the others."""
    if not where.is_dir():
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        _prune(where.parent, keep=where)


def _prune(kernels: Path, keep: Path) -> None:
    """Delete all but the most recently used folders (others come from older llmquant or torch versions)."""
    try:
        others = sorted((path for path in kernels.iterdir() if path.is_dir() and path != keep),
                        key=lambda path: path.stat().st_mtime, reverse=True)
        for stale in others[MAX_FOLDERS - 1:]:
            shutil.rmtree(stale, ignore_errors=True)
    except OSError:
        return


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


__all__ = ["MAX_FOLDERS", "MAX_VARIANTS", "folder", "load", "record_vec_isa_probe", "reuse_vec_isa_probe", "save"]
