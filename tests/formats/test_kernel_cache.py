"""Compiled kernels are saved to disk and loaded by the next process instead of traced again; the cache never
changes a byte, and a cache that is broken, off or unwritable costs only time."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmquant.formats import compiled, kernel_cache, quantize
from llmquant.formats.search import _qx_kernel
from llmquant.oracles.ggml import ggml_quantize
from tests.formats.compare import heavy_tailed, random_imatrix

REPO = Path(__file__).resolve().parents[2]

# quantize in a new process (Q4_0 with an imatrix: two kernels) and report what dynamo had to trace
_CHILD = """
import json, sys
import numpy as np, torch
torch.set_num_threads(1)
from llmquant.formats import compiled, quantize
from tests.formats.compare import heavy_tailed, random_imatrix
data = quantize(heavy_tailed(96, 512, seed=81), "Q4_0", random_imatrix(512, seed=82))
from torch._dynamo.utils import counters
print(json.dumps({"bytes": data.tobytes().hex(), "traced": counters["stats"]["unique_graphs"],
                  "broken": compiled._state["broken"]}))
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
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMQUANT_KERNEL_CACHE", raising=False)
    kernel_cache.folder.cache_clear()
    monkeypatch.setattr(compiled, "_kernel", functools.cache(compiled._Kernel))
    monkeypatch.setitem(compiled._state, "broken", False)
    yield kernel_cache.folder()
    kernel_cache.folder.cache_clear()


def test_a_new_process_loads_the_kernels_the_last_one_compiled(tmp_path):
    expected = ggml_quantize(heavy_tailed(96, 512, seed=81), "Q4_0", random_imatrix(512, seed=82))
    first = _child(tmp_path)
    saved = list((tmp_path / "kernels").glob("*/*.aot"))
    second = _child(tmp_path)
    assert not first["broken"] and not second["broken"]
    assert first["traced"] >= 2, "the first process should have traced the Q4_0 search's kernels"
    assert {path.name.split("-")[0] for path in saved} == {"legacy._sym_weights", "search._qx_kernel"}
    assert second["traced"] == 0, "the second process traced again instead of loading the saved kernels"
    assert bytes.fromhex(first["bytes"]) == expected.tobytes()
    assert bytes.fromhex(second["bytes"]) == expected.tobytes()


def test_a_saved_kernel_that_does_not_load_is_deleted(kernel_folder: Path):
    kernel_folder.mkdir(parents=True)
    junk = kernel_folder / f"{kernel_cache._stem(_qx_kernel, (8,))}-0123456789ab.aot"
    junk.write_bytes(b"not a compiled function")
    assert kernel_cache.load(_qx_kernel, (8,)) == []
    assert not junk.exists()


def test_each_guard_set_gets_its_own_variant_on_disk(kernel_folder: Path):
    import torch

    w, imatrix = heavy_tailed(96, 512, seed=83), random_imatrix(512, seed=84)
    expected = ggml_quantize(w, "Q4_0", imatrix)
    with compiled.use_compiled(True):
        torch.set_num_threads(1)
        assert np.array_equal(quantize(w, "Q4_0", imatrix), expected)
        one_thread = len(list(kernel_folder.glob("search._qx_kernel-*.aot")))
        torch.set_num_threads(2)  # part of the kernels' guards: the one-thread variant does not serve here
        assert np.array_equal(quantize(w, "Q4_0", imatrix), expected)
        torch.set_num_threads(1)
    assert not compiled._state["broken"]
    assert one_thread == 1
    assert len(list(kernel_folder.glob("search._qx_kernel-*.aot"))) == 2
    assert len(compiled._kernel(_qx_kernel, (8,)).variants) == 2


def test_an_unwritable_cache_warns_once_and_still_gives_the_bytes(tmp_path, monkeypatch, kernel_folder: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LLMQUANT_CACHE", str(blocker))
    kernel_cache.folder.cache_clear()
    kernel_cache._warn_once.cache_clear()
    w, imatrix = heavy_tailed(64, 256, seed=85), random_imatrix(256, seed=86)
    with compiled.use_compiled(True), pytest.warns(RuntimeWarning, match="could not save a compiled kernel"):
        data = quantize(w, "Q4_0", imatrix)
    assert not compiled._state["broken"]
    assert np.array_equal(data, ggml_quantize(w, "Q4_0", imatrix))


def test_the_cache_can_be_turned_off(monkeypatch, kernel_folder: Path):
    assert kernel_folder is not None and kernel_folder.parent.name == "kernels"
    monkeypatch.setenv("LLMQUANT_KERNEL_CACHE", "0")
    kernel_cache.folder.cache_clear()
    assert kernel_cache.folder() is None
    assert kernel_cache.load(_qx_kernel, (8,)) == []


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
        (old / "k.aot").write_bytes(b"x")
        os.utime(old, (1_000_000 - age, 1_000_000 - age))
    kernel_cache.save(_qx_kernel, (8,), _FakeVariant())
    assert sorted(path.name for path in kernels.iterdir()) == sorted(
        [kernel_folder.name] + [f"old-{age}" for age in range(kernel_cache.MAX_FOLDERS - 1)])
    assert len(list(kernel_folder.glob("search._qx_kernel-*.aot"))) == 1


class _FakeVariant:
    def save_compiled_function(self, path: str) -> None:
        Path(path).write_bytes(b"saved")
