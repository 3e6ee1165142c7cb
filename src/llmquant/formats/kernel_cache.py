"""The fused kernels saved to disk, so that a new process loads them (about a millisecond each) instead of
compiling them again (10-30 s each).

Each saved kernel is a shared library that ``aoti.build`` compiled and a JSON spec of the inputs it accepts
(dtypes, the sizes the export specialized). A call no saved variant accepts makes ``compiled`` compile one more
and save it too. What the spec cannot see, the code the kernels were compiled from and the machine they were
compiled for, is in the folder's name:

    $LLMQUANT_CACHE/kernels/<hash of llmquant's format sources, torch and Python versions, CPU>/<kernel>-<id>.so
                                                                                              /<kernel>-<id>.json

A kernel that does not load (stale, truncated) is deleted and compiled again. The libraries are native code that
only this user's own runs write, in this user's cache folder, as inductor's own cache is; they are never read
from model input. ``LLMQUANT_KERNEL_CACHE=0`` turns the cache off (every process compiles again).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from llmquant.cache import cache_root

try:
    import fcntl
except ImportError:  # Windows: kernels compiled at once by two processes are both saved (a wasted compile)
    fcntl = None

_ENV = "LLMQUANT_KERNEL_CACHE"
_FORMAT = 2  # bump when what is saved changes (2: AOTInductor packages)
# variants of one kernel kept on disk at most (one per set of dtypes and specialized sizes a job really used)
MAX_VARIANTS = 8
# kernel folders kept (one per llmquant source and torch version used lately)
MAX_FOLDERS = 4

T = TypeVar("T")


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


def load(fn: Callable, constants: tuple, open_library: Callable[[Path, dict], T],
         skip: Collection[str] = ()) -> list[T]:
    """Every saved variant of ``fn`` with these constant arguments, opened (deleting those that do not open),
    but those whose file names are in ``skip``; each name opened is added to ``skip`` when it is a set."""
    where = folder()
    if where is None or not where.is_dir():
        return []
    variants = []
    for spec_path in sorted(where.glob(f"{_stem(fn, constants)}-*.json")):
        if spec_path.name in skip:
            continue
        library = spec_path.with_suffix(".so")
        try:
            variants.append(open_library(library, json.loads(spec_path.read_text())))
            if isinstance(skip, set):
                skip.add(spec_path.name)
        except Exception:  # truncated, or written by a torch this folder's key did not tell apart: compile again
            spec_path.unlink(missing_ok=True)
            library.unlink(missing_ok=True)
    return variants


def save(fn: Callable, constants: tuple, library: Path, spec: dict) -> str | None:
    """Copy a freshly compiled library and its spec into the cache, each under a temporary name and renamed,
    the spec last: a spec is there only when its library is complete. Returns the spec's file name (None when
    nothing was saved). A cache that cannot be written costs only time: one warning, and the next process
    compiles again."""
    where = folder()
    if where is None:
        return None
    stem = _stem(fn, constants)
    try:
        _make(where)
        if len(list(where.glob(f"{stem}-*.json"))) >= MAX_VARIANTS:
            return None
        name = f"{stem}-{uuid.uuid4().hex[:12]}"
        _write(where / f"{name}.so", library.read_bytes())
        _write(where / f"{name}.json", json.dumps(spec).encode())
        return f"{name}.json"
    except Exception as error:
        _warn_once(f"llmquant: could not save a compiled kernel in {where} ({type(error).__name__}: {error}); "
                   f"every new process will compile it again. Set {_ENV}=0 to silence this.")
        return None


@contextlib.contextmanager
def compiling(fn: Callable, constants: tuple) -> Iterator[None]:
    """Hold this kernel's lock, across processes, while compiling it: a process that needs the same kernel
    meanwhile waits, then loads what this one saved instead of compiling it again (``llmquant kernels build``
    compiles several formats at once, and formats share kernels). No lock where the cache is off or unwritable."""
    where = folder()
    try:
        if where is None or fcntl is None:
            raise OSError
        _make(where)
        handle = open(where / f"{_stem(fn, constants)}.lock", "a")  # noqa: SIM115 (closed below, which unlocks)
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


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
        _write(where / _VEC_ISA_RECORD, json.dumps(passed).encode())
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


__all__ = ["MAX_FOLDERS", "MAX_VARIANTS", "compiling", "folder", "load", "record_vec_isa_probe", "reuse_vec_isa_probe",
           "save"]
