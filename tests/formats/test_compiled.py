"""The fused (torch.compile) kernels and the eager path give the same bytes, both ggml's; a kernel that cannot
be built falls back to eager with one warning and the same bytes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from llmquant.formats import compiled, quantize
from llmquant.oracles.ggml import ggml_quantize
from tests.formats.compare import heavy_tailed, random_imatrix

# the formats whose searches run through compiled kernels on the CPU
FUSED = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("type_name", FUSED)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_compiled_and_eager_paths_both_give_ggmls_bytes(type_name: str, with_imatrix: bool):
    w = heavy_tailed(96, 512, seed=71)
    w[3, :64] = 0.0  # all-zero blocks and sub-blocks take the kernels' special case
    w[5, 256:] = 0.0  # and a whole all-zero super-block (k-quants write its scales as zero)
    w[6, :256] *= 1e-30  # one of tiny values, whose scales underflow in fp16
    imatrix = random_imatrix(512, seed=72) if with_imatrix else None
    expected = ggml_quantize(w, type_name, imatrix)
    with compiled.use_compiled(True):
        assert compiled.enabled(torch.from_numpy(w).reshape(-1, 32))
        fused = quantize(w, type_name, imatrix)
    with compiled.use_compiled(False):
        eager = quantize(w, type_name, imatrix)
    assert not compiled._state["broken"], "the kernels failed to compile (see the RuntimeWarning)"
    assert np.array_equal(fused, expected)
    assert np.array_equal(eager, expected)


@pytest.mark.parametrize("use_kernels", [True, False])
def test_q3_k_passes_run_on_the_groups_still_moving(use_kernels: bool, monkeypatch):
    # make_q3_quants gives each pass only the groups that moved in the last; on these small tensors the late
    # passes are down to a single group, which is run twice (a kernel of size 1 would specialize)
    repeats = []
    original_repeat = torch.Tensor.repeat

    def counted_repeat(self, *sizes):
        repeats.append(sizes)
        return original_repeat(self, *sizes)

    monkeypatch.setattr(torch.Tensor, "repeat", counted_repeat)
    with compiled.use_compiled(use_kernels):
        for seed in range(12):
            w = heavy_tailed(8, 256, seed=seed)
            assert np.array_equal(quantize(w, "Q3_K"), ggml_quantize(w, "Q3_K")), seed
    assert repeats, "no pass came down to a single moving group"


def test_a_kernel_that_cannot_compile_falls_back_to_eager(monkeypatch):
    def broken_compile(kernel, args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled, "_load_or_compile", broken_compile)
    monkeypatch.setattr(compiled, "_kernel", functools.cache(compiled._Kernel))  # none loaded in this process yet
    monkeypatch.setitem(compiled._state, "broken", False)
    monkeypatch.setitem(compiled._state, "enabled", True)
    w = heavy_tailed(64, 256, seed=73)
    imatrix = random_imatrix(256, seed=74)
    with pytest.warns(RuntimeWarning, match="compiled kernels are off.*no C\\+\\+ compiler"):
        data = quantize(w, "Q4_0", imatrix)
    assert np.array_equal(data, ggml_quantize(w, "Q4_0", imatrix))
    assert compiled._state["broken"]
    assert not compiled.enabled(torch.zeros(128, 32))


def test_small_inputs_and_other_devices_skip_the_kernels():
    with compiled.use_compiled(True):
        assert not compiled.enabled(torch.zeros(compiled.MIN_GROUPS - 1, 32))
        assert compiled.enabled(torch.zeros(compiled.MIN_GROUPS, 32)) or compiled._state["broken"]
        assert not compiled.enabled(torch.zeros(128, 32, device="meta"))
    with compiled.use_compiled(False):
        assert not compiled.enabled(torch.zeros(128, 32))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_fused_reference_path_hands_odd_scales_to_the_exact_path(type_name: str):
    # enough blocks for the kernels; denormal scales (one chunk goes the exact slow way), ties of +max and
    # -max (the first wins), all-zero blocks and the largest float16 values
    w = heavy_tailed(64, 256, seed=75)
    w[0, :32] = np.linspace(0, 1e-40, 32, dtype=np.float32)
    w[1, :32] = 0.0
    w[1, 3], w[1, 9] = -2.0, 2.0
    w[2, :32] = 65504.0
    w[2, 5] = -65504.0
    w[3, :32] = np.linspace(0.5, 3.0, 32, dtype=np.float32)
    w[3, 4], w[3, 7] = -0.0, 0.0  # min is a tie of -0 and +0: the first is kept
    w[4, :32] = -np.linspace(0.5, 3.0, 32, dtype=np.float32)
    w[4, 4], w[4, 7] = 0.0, -0.0  # the same for max
    with compiled.use_compiled(True):
        denormal = quantize(w, type_name)
        ordinary = quantize(w[1:], type_name)
    assert not compiled._state["broken"]
    assert np.array_equal(denormal, ggml_quantize(w, type_name))
    assert np.array_equal(ordinary, ggml_quantize(w[1:], type_name))


def test_q8_0_kernel_rounds_halfway_levels_as_ggml():
    # blocks whose largest magnitude is 127·d, the others (k + 0.5)·d and their float neighbours: x/d lands on,
    # just below and just above the halves that roundf sends away from zero, for 4096 random scales d
    rng = np.random.default_rng(76)
    n_blocks = 4096
    d = np.exp(rng.uniform(-12, 6, size=(n_blocks, 1))).astype(np.float32)
    k = rng.integers(-127, 127, size=(n_blocks, 32)).astype(np.float32)
    w = ((k + 0.5) * d).astype(np.float32)
    w = np.where(rng.random(w.shape) < 0.5, w, np.nextafter(w, np.where(rng.random(w.shape) < 0.5, 0, 1e30)))
    w[:, 0] = 127 * d[:, 0] * np.where(rng.random(n_blocks) < 0.5, -1, 1)
    w = w.astype(np.float32).reshape(-1, 256)
    with compiled.use_compiled(True):
        fused = quantize(w, "Q8_0")
    assert not compiled._state["broken"]
    assert np.array_equal(fused, ggml_quantize(w, "Q8_0"))
