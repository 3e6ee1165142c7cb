"""AWQ's scale search against plain rounding (``quantize``/``dequantize`` with the same importance) and against the
output error computed by hand, token by token.

The inputs are like a transformer's: channels of log-normal scale, a few of them 30x larger (the outliers AWQ
protects); another token seed gives held-out inputs of the same distribution.
"""

from __future__ import annotations

import pytest
import torch

from llmquant.formats import dequantize, quantize
from llmquant.methods.awq import AWQResult, awq_search_scales

ROWS, COLUMNS, TOKENS = 128, 512, 1024


def _weights(seed: int = 0, rows: int = ROWS) -> torch.Tensor:
    return 0.02 * torch.randn(rows, COLUMNS, generator=torch.Generator().manual_seed(seed))


def _inputs(token_seed: int = 1, *, outliers: bool = True) -> torch.Tensor:
    """Tokens drawn by ``token_seed``; the channels' scales (log-normal, 8 channels 30x larger) are the same for
    every seed. ``outliers=False``: every channel alike."""
    x = torch.randn(TOKENS, COLUMNS, generator=torch.Generator().manual_seed(token_seed))
    if not outliers:
        return x
    g = torch.Generator().manual_seed(100)
    large = torch.randperm(COLUMNS, generator=g)[:8]
    channel_scale = torch.exp(0.5 * torch.randn(COLUMNS, generator=g))
    channel_scale[large] *= 30.0
    return x * channel_scale


def _output_error(weight: torch.Tensor, rounded: torch.Tensor, x: torch.Tensor) -> float:
    """‖(Ŵ − W)Xᵀ‖², token by token, in float64."""
    return float(((rounded - weight).double() @ x.double().T).square().sum())


def _rounded(weight: torch.Tensor, type_name: str, imatrix: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(dequantize(quantize(weight, type_name, imatrix=imatrix), type_name, tuple(weight.shape)))


def _awq_rounded(weight: torch.Tensor, type_name: str, scales: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
    """The oracle of AWQ's rounding: Q(W·diag(s)) under the scaled inputs' imatrix, then ·diag(s)⁻¹."""
    return _rounded(weight * scales, type_name, imatrix / scales.square()) / scales


def _reference_scales(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's s = s_X^α with s_X = mean |x|, normalised as the AWQ reference: s / sqrt(max(s)·min(s))."""
    s = x.abs().mean(0).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K"])
def test_first_error_is_plain_rounding_with_default_importance(type_name):
    w, x = _weights(), _inputs()
    result = awq_search_scales([w], x, [type_name], n_grid=4)
    rtn = _output_error(w, _rounded(w, type_name, x.square().mean(0)), x)
    assert result.errors[0] == pytest.approx(rtn, rel=1e-6)


def test_chosen_alpha_has_the_least_error():
    w, x = _weights(), _inputs()
    result = awq_search_scales([w], x, ["IQ4_XS"], n_grid=10)
    assert isinstance(result, AWQResult) and len(result.errors) == 10
    best = min(result.errors)
    assert result.errors[round(result.alpha * 10)] == best
    assert best <= result.errors[0]
    assert result.alpha > 0  # with outliers, some scaling pays
    torch.testing.assert_close(result.scales, _reference_scales(x, result.alpha))
    # the returned scales reproduce the reported error
    error = _output_error(w, _awq_rounded(w, "IQ4_XS", result.scales, x.square().mean(0)), x)
    assert best == pytest.approx(error, rel=1e-6)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K", "IQ4_XS"])
def test_awq_beats_rounding_on_held_out_inputs_with_outlier_channels(type_name):
    # measured held-out AWQ/RTN error: Q4_0 0.40, Q4_K 0.85, IQ4_XS 0.65
    w, x, held_out = _weights(), _inputs(1), _inputs(2)
    imatrix = x.square().mean(0)
    result = awq_search_scales([w], x, [type_name])
    rtn = _output_error(w, _rounded(w, type_name, imatrix), held_out)
    awq = _output_error(w, _awq_rounded(w, type_name, result.scales, imatrix), held_out)
    assert awq < 0.9 * rtn


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_K"])
def test_uniform_activations_give_scales_near_one_and_little_gain(type_name):
    w, x = _weights(), _inputs(outliers=False)
    result = awq_search_scales([w], x, [type_name], n_grid=10)
    # only sampling noise in mean |x| to scale by: s within a few percent of 1 whatever α wins
    assert float((result.scales - 1).abs().max()) < 0.15
    assert min(result.errors) > 0.98 * result.errors[0]


def test_weights_sharing_an_input_are_searched_jointly():
    # two linears of different types (like q and v kept at different precisions), a given importance vector
    q, v, x = _weights(0), _weights(1, rows=64), _inputs()
    importance = _inputs(3).square().mean(0) + 0.5
    result = awq_search_scales([q, v], x, ["Q4_K", "Q4_0"], n_grid=4, importance=importance)
    s = _reference_scales(x, 0.5)
    by_hand = (_output_error(q, _awq_rounded(q, "Q4_K", s, importance), x)
               + _output_error(v, _awq_rounded(v, "Q4_0", s, importance), x))
    assert result.errors[2] == pytest.approx(by_hand, rel=1e-6)
    # joint: one α for both, chosen on the sum of their errors
    q_alone = awq_search_scales([q], x, ["Q4_K"], n_grid=4, importance=importance)
    v_alone = awq_search_scales([v], x, ["Q4_0"], n_grid=4, importance=importance)
    sums = [a + b for a, b in zip(q_alone.errors, v_alone.errors, strict=True)]
    assert result.errors == pytest.approx(sums, rel=1e-9)
    assert result.alpha == 0.25 * min(range(4), key=sums.__getitem__)


def test_error_is_measured_on_at_most_max_tokens_rows():
    w, x = _weights(), _inputs()
    result = awq_search_scales([w], x, ["Q4_0"], n_grid=1, max_tokens=256)
    rows = torch.linspace(0, TOKENS - 1, 256).round().long()
    rtn = _output_error(w, _rounded(w, "Q4_0", x.square().mean(0)), x[rows])
    assert result.errors[0] == pytest.approx(rtn, rel=1e-6)


def test_row_length_not_a_multiple_of_the_block_size_is_refused():
    w = torch.randn(8, 576)
    x = torch.randn(16, 576)
    with pytest.raises(ValueError, match=r"576.*Q4_K.*256"):
        awq_search_scales([w], x, ["Q4_K"])


def test_bad_shapes_are_refused():
    w, x = _weights(), _inputs()
    with pytest.raises(ValueError, match="input columns"):
        awq_search_scales([w, torch.randn(4, 256)], x, ["Q4_0", "Q4_0"])
    with pytest.raises(ValueError, match="expected"):
        awq_search_scales([w], x[:, :256], ["Q4_0"])
    with pytest.raises(ValueError, match="type names"):
        awq_search_scales([w, w], x, ["Q4_0"])
    with pytest.raises(ValueError, match="importance"):
        awq_search_scales([w], x, ["Q4_0"], importance=torch.ones(256))


def test_non_finite_values_are_refused():
    w, x = _weights(), _inputs()
    bad_w, bad_x = w.clone(), x.clone()
    bad_w[3, 7] = float("nan")
    bad_x[5, 2] = float("inf")
    with pytest.raises(ValueError, match="weight 0.*non-finite"):
        awq_search_scales([bad_w], x, ["Q4_0"])
    with pytest.raises(ValueError, match="inputs.*non-finite"):
        awq_search_scales([w], bad_x, ["Q4_0"])
    with pytest.raises(ValueError, match="importance"):
        awq_search_scales([w], x, ["Q4_0"], importance=torch.full((COLUMNS,), -1.0))


@pytest.mark.parametrize("type_name", ["IQ2_XXS", "IQ3_S"])
def test_codeword_formats_are_searched_under_their_own_rounding(type_name):
    """IQ1-IQ3 choose one codeword per 4 or 8 weights: AWQ only quantizes and dequantizes, so the search and
    its reported errors hold for them as for every format."""
    w, x = _weights(rows=32), _inputs()
    result = awq_search_scales([w], x, [type_name], n_grid=4)
    assert result.errors[0] == pytest.approx(_output_error(w, _rounded(w, type_name, x.square().mean(0)), x),
                                             rel=1e-6)
    assert min(result.errors) == result.errors[round(result.alpha * 4)] <= result.errors[0]
    chosen = _output_error(w, _awq_rounded(w, type_name, result.scales, x.square().mean(0)), x)
    assert min(result.errors) == pytest.approx(chosen, rel=1e-6)
