"""GPTQ onto every block format of the registry, against plain rounding (``quantize`` with the same importance)
and against the formats' own dequantizers (ours and gguf's).

The weights are heavy-tailed (Student-t), the inputs correlated (X = Z·A) with a few channels of large scale:
where GPTQ's error feedback has something to gain over rounding each weight on its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmquant.calibration.layer_runner import InputStatistics
from llmquant.formats import FORMATS, Grid, dequantize, quantize
from llmquant.formats.base import row_mean_square
from llmquant.methods import gptq_quantize, hessian
from llmquant.methods.gptq import _lazy_batch

# GPTQ rounds one column at a time: the formats with one level per weight (not the IQ1-IQ3 codeword formats)
BLOCK_FORMATS = sorted(name for name, fmt in FORMATS.items() if fmt.block_size > 1 and fmt.weights_per_level == 1)
CODEWORD_FORMATS = sorted(name for name, fmt in FORMATS.items() if fmt.weights_per_level > 1)
# twice as many tokens as input columns: H has full rank, so GPTQ's gain carries over to held-out inputs
ROWS, COLUMNS, TOKENS = 64, 512, 1024


def _weights(seed: int = 0, dof: int = 3) -> torch.Tensor:
    """Student-t weights (``dof`` degrees of freedom: heavy tails), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(ROWS, COLUMNS, generator=g)
    chi2 = torch.randn(dof, ROWS, COLUMNS, generator=g).square().sum(0)
    return 0.02 * normal / (chi2 / dof).sqrt()


def _inputs(token_seed: int = 1, n_tokens: int = TOKENS) -> torch.Tensor:
    """Correlated inputs: X = Z·A (A random around the identity, the same for every ``token_seed``) with 16
    channels 10x larger; ``token_seed`` draws the tokens Z, so another seed gives held-out inputs of the same
    distribution."""
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(COLUMNS, COLUMNS, generator=g) / COLUMNS**0.5 + torch.eye(COLUMNS)
    large = torch.randperm(COLUMNS, generator=g)[:16]
    x = torch.randn(n_tokens, COLUMNS, generator=torch.Generator().manual_seed(token_seed)) @ mixing
    x[:, large] *= 10.0
    return x


def _output_error(weights: torch.Tensor, rounded: torch.Tensor, x: torch.Tensor) -> float:
    """‖(W − Ŵ)Xᵀ‖², the quantity GPTQ minimises, in float64."""
    return float((((weights - rounded).double()) @ x.double().T).square().sum())


def _proxy_error(weights: torch.Tensor, rounded: torch.Tensor, H: torch.Tensor) -> float:
    delta = (weights - rounded).double()
    return float(((delta @ H) * delta).sum())


def _rtn(weights: torch.Tensor, type_name: str, imatrix: torch.Tensor) -> torch.Tensor:
    """The oracle: plain rounding with ggml's search, weighted by the same importance."""
    data = quantize(weights, type_name, imatrix=imatrix)
    return torch.from_numpy(dequantize(data, type_name, tuple(weights.shape)))


def _textbook_gptq(weights: torch.Tensor, H: torch.Tensor, type_name: str, *, act_order: bool,
                   damp: float = 0.01) -> torch.Tensor:
    """An independent GPTQ, as the paper states it before its speed-ups (OBQ's greedy step): float64, no lazy
    batches, no Cholesky; after each column j, the weights move by err·H⁻¹[j, :] and H⁻¹ loses column j
    (H⁻¹ ← H⁻¹ − H⁻¹[:, j]H⁻¹[j, :]/H⁻¹[j, j]). A format block's parameters come from the updated weights when the
    sweep reaches its first column (with act_order: all from the original weights, the columns by descending
    diag H); the rows' mean square is of the updated, not yet rounded, weights."""
    fmt = FORMATS[type_name]
    size = fmt.block_size
    rows, columns = weights.shape
    importance = H.diagonal().float()
    W = weights.double().clone()
    Q = torch.empty_like(W)
    Hinv = torch.linalg.inv(H + damp * H.diagonal().mean() * torch.eye(columns, dtype=H.dtype))
    scale = torch.zeros(rows, columns)
    offset = torch.zeros(rows, columns)

    def choose(start: int, stop: int) -> torch.Tensor:
        sigma2 = None
        if fmt.uses_row_statistics:
            sigma2 = row_mean_square(W.float()).repeat_interleave((stop - start) // size)
        blocks = W[:, start:stop].float().reshape(-1, size)
        per_weight = importance[start:stop].expand(rows, -1).reshape(-1, size)
        grid = fmt.reconstruct(fmt.choose_params(blocks, per_weight, sigma2))
        scale[:, start:stop] = grid.scale.reshape(rows, -1)
        if grid.offset is not None:
            offset[:, start:stop] = grid.offset.reshape(rows, -1)
        return grid.values

    values = choose(0, columns) if act_order else None
    order = torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(columns)
    for j in order.tolist():
        if not act_order and j % size == 0:
            values = choose(j, j + size)
        column = slice(j, j + 1)
        grid = Grid(scale, offset, values)
        w = W[:, j].clone()
        Q[:, j] = grid.weights(grid.nearest(w[:, None].float(), column), column)[:, 0].double()
        err = (w - Q[:, j]) / Hinv[j, j]
        W -= err[:, None] * Hinv[j][None, :]  # zero on the columns already eliminated
        W[:, j] = w
        Hinv -= Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q.float()


@pytest.fixture(scope="module")
def case():
    weights, x = _weights(), _inputs()
    H = hessian(x)
    return weights, x, H


@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
def test_gptq_output_error_is_below_rounding_with_the_same_importance(case, type_name):
    weights, x, H = case
    result = gptq_quantize(weights, H, type_name)
    rtn = _rtn(weights, type_name, H.diagonal().float())
    ours, theirs = _output_error(weights, result.weight, x), _output_error(weights, rtn, x)
    assert ours < 0.8 * theirs, (type_name, ours / theirs)
    # the reported proxy error is that same quantity, tr(ΔW H ΔWᵀ)
    assert result.proxy_error == pytest.approx(ours, rel=1e-6)
    # and the gain is not fitted to the calibration tokens: it holds on tokens GPTQ has not seen
    held_out = _inputs(token_seed=2)
    ours, theirs = _output_error(weights, result.weight, held_out), _output_error(weights, rtn, held_out)
    assert ours < 0.85 * theirs, (type_name, ours / theirs)


@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
def test_gptq_agrees_with_the_textbook_algorithm(case, type_name):
    # the Cholesky form and the lazy batches only reorder the same arithmetic (in float32): a rounding that
    # flips on a near-tie changes the rest of its row, so the two agree on most weights, not all, and their
    # errors agree closely; parameters chosen from the original rather than the updated weights agree on
    # at most ~60% of the weights and give 2-20% more error
    weights, _, H = case
    ours = gptq_quantize(weights, H, type_name)
    textbook = _textbook_gptq(weights, H, type_name, act_order=False)
    assert (ours.weight == textbook).float().mean() > 0.85
    assert ours.proxy_error == pytest.approx(_proxy_error(weights, textbook, H), rel=0.015)


@pytest.mark.parametrize("type_name", ["Q4_1", "Q4_K", "IQ4_XS"])
def test_gptq_with_act_order_agrees_with_the_textbook_algorithm(case, type_name):
    weights, _, H = case
    ours = gptq_quantize(weights, H, type_name, act_order=True)
    textbook = _textbook_gptq(weights, H, type_name, act_order=True)
    assert (ours.weight == textbook).float().mean() > 0.85
    assert ours.proxy_error == pytest.approx(_proxy_error(weights, textbook, H), rel=0.015)


@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
def test_gptq_bytes_dequantize_to_the_returned_weight(case, type_name):
    weights, _, H = case
    result = gptq_quantize(weights, H, type_name)
    fmt = FORMATS[type_name]
    assert result.data.dtype == torch.uint8
    assert tuple(result.data.shape) == (ROWS, COLUMNS // fmt.block_size * fmt.bytes_per_block)
    ours = dequantize(result.data, type_name, (ROWS, COLUMNS))
    assert torch.equal(ours, result.weight)
    theirs = gguf_quants.dequantize(result.data.numpy(), GGMLQuantizationType[type_name]).reshape(ROWS, COLUMNS)
    assert np.array_equal(theirs, result.weight.numpy())


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "IQ4_XS"])
def test_gptq_is_deterministic(case, type_name):
    weights, _, H = case
    first = gptq_quantize(weights, H, type_name)
    second = gptq_quantize(weights.clone(), H.clone(), type_name)
    assert torch.equal(first.data, second.data)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("type_name", BLOCK_FORMATS)
def test_uncorrelated_inputs_give_rounding_parameters(type_name, act_order):
    # a diagonal H has nothing to feed forward: GPTQ chooses the blocks' parameters from the original weights,
    # exactly as quantize does, and rounds each weight to its nearest level, never farther than ggml's levels
    weights = _weights(seed=2)
    diagonal = torch.rand(COLUMNS, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    result = gptq_quantize(weights, torch.diag(diagonal), type_name, act_order=act_order)
    fmt = FORMATS[type_name]
    rtn_data = torch.from_numpy(quantize(weights, type_name, imatrix=diagonal.float()))
    _, ours = fmt.unpack(result.data.reshape(-1, fmt.bytes_per_block))
    _, theirs = fmt.unpack(rtn_data.reshape(-1, fmt.bytes_per_block))
    for field_ours, field_theirs in zip(ours, theirs, strict=True):
        assert torch.equal(field_ours, field_theirs)
    rtn = dequantize(rtn_data, type_name, (ROWS, COLUMNS))
    assert ((result.weight - weights).abs() <= (rtn - weights).abs() * (1 + 1e-6) + 1e-12).all()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "Q6_K"])
def test_dead_columns_are_zeroed_and_the_rest_still_gains(case, type_name):
    weights, x, _ = case
    x = x.clone()
    dead = torch.zeros(COLUMNS, dtype=torch.bool)
    dead[[0, 5, 100, 300, 301, 511]] = True
    dead[32:64] = True  # a whole legacy block, and part of a k-quant super-block
    x[:, dead] = 0.0
    H = hessian(x)
    result = gptq_quantize(weights, H, type_name)
    assert torch.isfinite(result.weight).all()
    assert torch.equal(dequantize(result.data, type_name, (ROWS, COLUMNS)), result.weight)
    # the reference's W[:, dead] = 0: a dead weight is the grid's nearest level to 0 (0 itself on the
    # symmetric grids), far below the weights' own scale
    assert result.weight[:, dead].abs().max() < 0.1 * weights.abs().max()
    rtn = _rtn(weights, type_name, H.diagonal().float())
    assert _output_error(weights, result.weight, x) < _output_error(weights, rtn, x)


def test_lazy_batch_is_aligned_with_the_format_blocks():
    assert _lazy_batch(128, 32) == 128  # format blocks inside a batch
    assert _lazy_batch(128, 256) == 128  # each super-block starts a batch
    assert _lazy_batch(100, 32) == 128  # neither: rounded up to whole blocks
    assert _lazy_batch(100, 256) == 256


@pytest.mark.parametrize("block_columns", [16, 96])
def test_lazy_batch_size_does_not_change_the_result_much(case, block_columns):
    # the lazy batch only reorders the same updates: its result differs from the default's by float rounding
    # of the updates alone, which can flip a few ties but not the error
    weights, x, H = case
    default = gptq_quantize(weights, H, "Q4_K")
    other = gptq_quantize(weights, H, "Q4_K", block_columns=block_columns)
    assert (default.weight == other.weight).float().mean() > 0.99
    assert other.proxy_error == pytest.approx(default.proxy_error, rel=0.02)


def test_the_runners_statistics_sum_batches_as_one_hessian(case):
    _, x, H = case
    stats = InputStatistics(COLUMNS, with_xtx=True, max_sample=0)
    for chunk in x.split(100):
        stats.add(chunk, sample_every=1)
    assert stats.n_tokens == TOKENS
    assert torch.allclose(stats.xtx, H, rtol=1e-12, atol=1e-9)
    assert torch.allclose((stats.xtx / stats.n_tokens).diagonal(), x.double().square().mean(0), rtol=1e-12)


def test_gptq_rejects_a_hessian_of_the_wrong_size(case):
    weights, _, H = case
    with pytest.raises(ValueError, match="H has shape"):
        gptq_quantize(weights, H[:256, :256], "Q4_K")


@pytest.mark.parametrize("act_order", [False, True])
def test_input_scale_is_gptq_under_the_scaled_hessian(act_order):
    """AWQ's case: the weight is W·diag(s) for inputs x/s; ``input_scale=s`` with the unscaled H is GPTQ under
    H_ij / (s_i s_j), computed in GPTQ's own working copy rather than passed in as a second one."""
    weights, x = _weights(), _inputs()
    s = torch.rand(COLUMNS, generator=torch.Generator().manual_seed(5)) + 0.5
    scaled_weights, H = weights * s, hessian(x)
    importance = (x / s).square().mean(0)
    given = gptq_quantize(scaled_weights, H, "Q4_K", act_order=act_order, importance=importance, input_scale=s)
    scaled_H = H / (s.double()[:, None] * s.double()[None, :])
    explicit = gptq_quantize(scaled_weights, scaled_H, "Q4_K", act_order=act_order, importance=importance)
    assert torch.equal(given.data, explicit.data) and torch.equal(given.weight, explicit.weight)
    assert given.proxy_error == pytest.approx(explicit.proxy_error, rel=1e-6)


@pytest.mark.parametrize("type_name", CODEWORD_FORMATS)
def test_gptq_refuses_codeword_formats_by_name(case, type_name):
    weights, _, H = case
    with pytest.raises(ValueError, match=f"{type_name} chooses one codeword per"):
        gptq_quantize(weights, H, type_name)
