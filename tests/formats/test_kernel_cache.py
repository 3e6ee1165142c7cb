"""Compiled kernels are saved to disk and loaded by the next process instead of compiled again; the cache never
changes a byte, a saved kernel refuses inputs it was not compiled for, and a cache that is broken, off or
unwritable costs only time."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from llmquant.formats import compiled, kernel_cache
from llmquant.formats.search import _qx_kernel, _qx_numerators
from tests.formats.compare import heavy_tailed, random_imatrix

REPO = Path(__file__).resolve().parents[2]

# run _qx_kernel in a new process and report whether it needed the compiler
_CHILD = """
import json, sys
import torch
from llmquant.formats import compiled
from tests.formats.test_kernel_cache import _qx_inputs
from llmquant.formats.search import _qx_kernel
result = compiled.run(_qx_kernel, (8,), *_qx_inputs(200, 32, seed=81))
print(json.dumps({"result": None if result is None else [t.numpy().tobytes().hex() for t in result],
                  "broken": compiled._state["broken"],
                  "compiler": [name for name in ("torch._dynamo", "torch._inductor") if name in sys.modules]}))
"""


def _child(cache: Path) -> dict:
    env = {**os.environ, "LLMQUANT_CACHE": str(cache), "LLMQUANT_COMPILE": "1", "PYTHONPATH": str(REPO)}
    env.pop("LLMQUANT_KERNEL_CACHE", None)
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=600, env=env,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def kernel_folder(tmp_path, monkeypatch) -> Path:
    """A fresh cache folder, and no kernel loaded in this process yet."""
    yield _fresh_cache(tmp_path / "cache", monkeypatch)
    kernel_cache.folder.cache_clear()


@pytest.fixture(scope="module")
def qx_library(tmp_path_factory) -> Path:
    """A folder holding _qx_kernel (nmax 8, 32-wide groups) compiled once, for tests that need it already built."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        folder = _fresh_cache(tmp_path_factory.mktemp("built") / "cache", monkeypatch)
        with compiled.use_compiled(True):
            assert compiled.run(_qx_kernel, (8,), *_qx_inputs(96, 32, seed=97)) is not None
        kernel_cache.folder.cache_clear()
    assert not compiled._state["broken"]
    return folder


def _fresh_cache(cache: Path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMQUANT_CACHE", str(cache))
    monkeypatch.delenv("LLMQUANT_KERNEL_CACHE", raising=False)
    kernel_cache.folder.cache_clear()
    monkeypatch.setattr(compiled, "_kernel", functools.cache(compiled._Kernel))
    monkeypatch.setitem(compiled._state, "broken", False)
    monkeypatch.setitem(compiled._state, "may_compile", True)
    return kernel_cache.folder()


def _copy_built(built: Path, folder: Path) -> None:
    """Put the pre-built kernel in ``folder``, as another process would have saved it."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in built.glob("search._qx_kernel-*"):
        shutil.copyfile(path, folder / path.name)


def _qx_inputs(n_groups: int, width: int, seed: int) -> tuple[torch.Tensor, ...]:
    x = torch.from_numpy(heavy_tailed(n_groups, width, seed=seed))
    weights = torch.from_numpy(random_imatrix(n_groups * width, seed=seed + 1).reshape(n_groups, width))
    return x, weights, torch.tensor(_qx_numerators(8), dtype=torch.float32)


def _same(a, b) -> bool:
    return all(torch.equal(left, right) for left, right in zip(a, b, strict=True))


def test_a_new_process_loads_the_kernels_the_last_one_compiled(qx_library: Path):
    # qx_library: this process compiled the kernel and saved it; a new process loads it without the compiler
    saved = list(qx_library.glob("*.so"))
    assert [path.name.split("-")[0] for path in saved] == ["search._qx_kernel"]
    assert saved[0].with_suffix(".json").is_file()
    child = _child(qx_library.parent.parent)
    assert not child["broken"]
    assert child["compiler"] == [], "the new process imported the compiler instead of loading the kernel"
    expected = _qx_kernel(*_qx_inputs(200, 32, seed=81), 8)
    assert [bytes.fromhex(part) for part in child["result"]] == [t.numpy().tobytes() for t in expected]


def test_a_saved_kernel_that_does_not_load_is_deleted(kernel_folder: Path):
    kernel_folder.mkdir(parents=True)
    junk = kernel_folder / f"{kernel_cache._stem(_qx_kernel, (8,))}-0123456789ab.so"
    junk.write_bytes(b"not a shared library")
    junk.with_suffix(".json").write_text('{"inputs": [], "ranges": {}, "single": false}')
    assert kernel_cache.load(_qx_kernel, (8,), compiled.aoti.Library) == []
    assert not junk.exists() and not junk.with_suffix(".json").exists()


def test_other_static_sizes_get_their_own_variant_and_thread_counts_do_not(kernel_folder: Path, qx_library: Path):
    wide, narrow = _qx_inputs(96, 32, seed=83), _qx_inputs(96, 16, seed=85)
    _copy_built(qx_library, kernel_folder)
    with compiled.use_compiled(True):
        torch.set_num_threads(1)
        assert _same(compiled.run(_qx_kernel, (8,), *wide), _qx_kernel(*wide, 8))
        torch.set_num_threads(2)  # the kernels take their threads from OpenMP when they run: the same variant
        assert _same(compiled.run(_qx_kernel, (8,), *wide), _qx_kernel(*wide, 8))
        torch.set_num_threads(1)
        assert len(list(kernel_folder.glob("search._qx_kernel-*.so"))) == 1
        # the width is specialized: the 32-wide variant must refuse 16-wide groups (it would read past them)
        assert not compiled._kernel(_qx_kernel, (8,)).variants[0].accepts(narrow)
        assert _same(compiled.run(_qx_kernel, (8,), *narrow), _qx_kernel(*narrow, 8))
    assert not compiled._state["broken"]
    assert len(list(kernel_folder.glob("search._qx_kernel-*.so"))) == 2
    variants = compiled._kernel(_qx_kernel, (8,)).variants
    assert [variant.accepts(wide) for variant in variants] == [True, False]
    assert [variant.accepts(narrow) for variant in variants] == [False, True]
    assert not variants[0].accepts(tuple(t.double() for t in wide)), "a dtype it was not compiled for"


def test_threads_share_a_kernel(kernel_folder: Path, qx_library: Path):
    inputs = [_qx_inputs(512, 32, seed=87 + 2 * i) for i in range(4)]
    _copy_built(qx_library, kernel_folder)
    with compiled.use_compiled(True):
        compiled.run(_qx_kernel, (8,), *inputs[0])  # loaded once, before the threads start
        results: dict[int, tuple] = {}

        def work(i: int) -> None:
            torch.set_num_threads(1)
            for _ in range(20):
                results[i] = compiled.run(_qx_kernel, (8,), *inputs[i])

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not compiled._state["broken"]
    assert all(_same(results[i], _qx_kernel(*inputs[i], 8)) for i in range(4))


def test_without_may_compile_a_missing_kernel_runs_eager_and_a_cached_one_runs(kernel_folder: Path,
                                                                                qx_library: Path):
    inputs = _qx_inputs(96, 32, seed=95)
    with compiled.use_compiled(True), compiled.may_compile(False):  # a small job in auto mode
        assert compiled.run(_qx_kernel, (8,), *inputs) is None  # nothing cached: eager, nothing compiled
        assert not kernel_folder.exists() or not list(kernel_folder.glob("*.so"))
        _copy_built(qx_library, kernel_folder)  # an earlier job compiled it
        compiled._kernel.cache_clear()  # and this is a new process
        assert _same(compiled.run(_qx_kernel, (8,), *inputs), _qx_kernel(*inputs, 8))
    assert not compiled._state["broken"]


def test_an_unwritable_cache_warns_once_and_still_gives_the_bytes(tmp_path, monkeypatch, kernel_folder: Path,
                                                                   qx_library: Path):
    built = next(qx_library.glob("*.so"))
    spec = json.loads(built.with_suffix(".json").read_text())

    def build(fn, constants, tensors, scratch: Path):  # the library compiled before, without compiling again
        shutil.copyfile(built, scratch / "kernel.so")
        return scratch / "kernel.so", spec

    monkeypatch.setattr(compiled.aoti, "build", build)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LLMQUANT_CACHE", str(blocker))
    kernel_cache.folder.cache_clear()
    kernel_cache._warn_once.cache_clear()
    inputs = _qx_inputs(96, 32, seed=99)
    with compiled.use_compiled(True), pytest.warns(RuntimeWarning, match="could not save a compiled kernel"):
        result = compiled.run(_qx_kernel, (8,), *inputs)
    assert not compiled._state["broken"]
    assert _same(result, _qx_kernel(*inputs, 8))


def test_the_cache_can_be_turned_off(monkeypatch, kernel_folder: Path):
    assert kernel_folder is not None and kernel_folder.parent.name == "kernels"
    monkeypatch.setenv("LLMQUANT_KERNEL_CACHE", "0")
    kernel_cache.folder.cache_clear()
    assert kernel_cache.folder() is None
    assert kernel_cache.load(_qx_kernel, (8,), compiled.aoti.Library) == []


def test_the_folder_changes_with_the_kernels_source(monkeypatch, kernel_folder: Path):
    real_read = Path.read_bytes

    def edited(path: Path) -> bytes:
        data = real_read(path)
        return data + b"\n# edited" if path.name == "search.py" else data

    monkeypatch.setattr(Path, "read_bytes", edited)
    kernel_cache.folder.cache_clear()
    assert kernel_cache.folder() != kernel_folder


def test_a_new_folder_prunes_all_but_the_latest_old_ones(kernel_folder: Path):
    kernels = kernel_folder.parent
    kernels.mkdir(parents=True)
    for age in range(6):  # folders of older sources, the first the most recently used
        old = kernels / f"old-{age}"
        old.mkdir()
        (old / "k.so").write_bytes(b"x")
        os.utime(old, (1_000_000 - age, 1_000_000 - age))
    library = kernel_folder.parent.parent / "built.so"
    library.write_bytes(b"a library")
    kernel_cache.save(_qx_kernel, (8,), library, {"inputs": []})
    assert sorted(path.name for path in kernels.iterdir()) == sorted(
        [kernel_folder.name] + [f"old-{age}" for age in range(kernel_cache.MAX_FOLDERS - 1)])
    saved = list(kernel_folder.glob("search._qx_kernel-*.so"))
    assert len(saved) == 1 and saved[0].read_bytes() == b"a library"
    assert json.loads(saved[0].with_suffix(".json").read_text()) == {"inputs": []}
    assert not list(kernel_folder.glob(".*")), "a temporary file was left behind"


def test_a_kernel_another_process_is_compiling_is_waited_for_and_loaded(kernel_folder: Path, qx_library: Path,
                                                                         monkeypatch):
    builds = []

    def build(fn, constants, tensors, scratch: Path):  # compiling here would mean the lock did not hold
        builds.append(fn.__qualname__)
        raise RuntimeError("compiled a kernel another process was compiling")

    monkeypatch.setattr(compiled.aoti, "build", build)
    inputs = _qx_inputs(96, 32, seed=101)
    results = []
    with kernel_cache.compiling(_qx_kernel, (8,)):  # "another process" holds the kernel's lock
        with compiled.use_compiled(True):
            waiting = threading.Thread(target=lambda: results.append(compiled.run(_qx_kernel, (8,), *inputs)))
            waiting.start()
            waiting.join(timeout=1.0)
            assert waiting.is_alive(), "the call did not wait for the lock"
            assert compiled._kernel(_qx_kernel, (8,)).loaded  # it looked in the cache before waiting: empty
            _copy_built(qx_library, kernel_folder)  # the other process saves the kernel and lets go
    waiting.join(timeout=60)
    assert not waiting.is_alive()
    assert builds == [] and not compiled._state["broken"]
    assert _same(results[0], _qx_kernel(*inputs, 8))
