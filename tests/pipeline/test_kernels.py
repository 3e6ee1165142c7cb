"""``llmquant kernels``: build fills the kernel cache so that a small job, which compiles nothing itself, runs the
kernels; the quantize summary says when a job ran without them; list and clear."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmquant.cli import cli
from llmquant.errors import LlmquantError
from llmquant.formats import compiled, kernel_cache, quantize
from llmquant.oracles.ggml import ggml_quantize
from llmquant.pipeline import kernels
from llmquant.pipeline.quantize import GGUFSource, format_results, quantize_gguf
from llmquant.recipes.file_types import file_type
from tests.formats.compare import heavy_tailed


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    """An empty kernel cache, auto mode, and no kernel loaded in this process yet (as in a new process)."""
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LLMQUANT_KERNEL_CACHE", raising=False)
    kernel_cache.folder.cache_clear()
    monkeypatch.setattr(compiled, "_kernel", functools.cache(compiled._Kernel))
    for key in ("enabled", "forced", "broken", "may_compile"):
        monkeypatch.setitem(compiled._state, key, compiled._state[key])
    compiled.set_mode("auto")
    compiled._state["broken"] = False
    yield tmp_path / "cache"
    kernel_cache.folder.cache_clear()


def _quantize_q8_0(model: Path, output: Path):
    compiled._kernel.cache_clear()  # a new process: what the cache holds now is loaded
    compiled._missing.clear()
    return quantize_gguf(GGUFSource.open(model), output, file_type("Q8_0"), threads=2)


def test_build_lets_a_small_job_run_the_kernels(empty_cache: Path, smollm2_f32_gguf: Path, tmp_path: Path):
    before = _quantize_q8_0(smollm2_f32_gguf, tmp_path / "before.gguf")  # auto mode: too small to compile
    assert before.eager_kernels == 1
    assert "1 fused CPU kernel not compiled on this machine yet" in format_results([before])
    assert "llmquant kernels build" in format_results([before])
    assert kernels.cached()[1] == []

    done = []
    assert kernels.build(["Q8_0"], jobs=1, on_done=lambda name, seconds: done.append(name)) == ["Q8_0"]
    assert done == ["Q8_0"]
    where, files = kernels.cached()
    assert where == kernel_cache.folder() and where.is_relative_to(empty_cache)
    assert [f.name.split("-")[0] for f in files] == ["legacy._q8_0_kernel"]
    assert files[0].n_bytes > 0

    after = _quantize_q8_0(smollm2_f32_gguf, tmp_path / "after.gguf")
    assert after.eager_kernels == 0
    assert "not compiled" not in format_results([after])
    assert (tmp_path / "after.gguf").read_bytes() == (tmp_path / "before.gguf").read_bytes()

    kernels.build(["Q8_0"], jobs=1)  # everything cached: nothing more is compiled
    assert kernels.cached()[1] == files
    assert kernels.clear() >= files[0].n_bytes
    assert kernels.cached()[1] == []
    assert kernels.clear() == 0


def test_build_refuses_when_the_cache_is_off(empty_cache: Path, monkeypatch):
    monkeypatch.setenv("LLMQUANT_KERNEL_CACHE", "0")
    kernel_cache.folder.cache_clear()
    with pytest.raises(LlmquantError, match="kernel cache is off"):
        kernels.build(["Q8_0"])


def test_build_covers_every_format_with_blocks():
    names = kernels.block_formats()
    assert {"Q8_0", "Q4_K", "Q6_K", "IQ4_XS"} <= set(names)
    assert not {"F32", "F16", "BF16"} & set(names)


@pytest.fixture(scope="module")
def session_kernels() -> Path:
    """The kernel folder the test session filled (``fused_kernels_compiled``)."""
    return kernel_cache.folder()


def test_cli_lists_and_clears_the_kernels(session_kernels: Path, empty_cache: Path):
    runner = CliRunner()
    listed = runner.invoke(cli, ["kernels", "list"])
    assert listed.exit_code == 0, listed.output
    assert "0 kernels" in listed.output and "llmquant kernels build" in listed.output
    folder = kernel_cache.folder()
    folder.mkdir(parents=True)
    for path in session_kernels.glob("legacy._q8_0_kernel-*"):  # as if an earlier job had compiled it
        shutil.copyfile(path, folder / path.name)
    w = heavy_tailed(256, 512, seed=3)
    with compiled.may_compile(False):  # runs the copied kernel; compiles nothing
        assert np.array_equal(quantize(w, "Q8_0"), ggml_quantize(w, "Q8_0"))
    assert compiled.take_missing() == set()
    listed = runner.invoke(cli, ["kernels", "list"])
    assert "1 kernel," in listed.output and "legacy._q8_0_kernel" in listed.output
    cleared = runner.invoke(cli, ["kernels", "clear"])
    assert cleared.exit_code == 0 and "deleted" in cleared.output
    assert "0 kernels" in runner.invoke(cli, ["kernels", "list"]).output
