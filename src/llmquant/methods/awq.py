"""AWQ's scale search onto llama.cpp's block grids (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", §3.2 "Searching to scale").

The linears that share one input X ``[n_tokens, in]`` (q/k/v, gate/up, or a lone down/o) are rewritten as
W·diag(s) fed with X·diag(s)⁻¹, which computes the same outputs; rounding the scaled weights protects the input
channels with large activations (s_j > 1: their weights take more of the grid). The paper searches
s = s_X^α, with s_X the mean activation magnitude per channel, over a grid of α in [0, 1), keeping the α whose
rounded weights give the least output error ‖(Ŵ − W)Xᵀ‖² summed over the linears. The rounding here is the
format's own (``llmquant.formats.quantize``: ggml's search, weighted by the importance vector of the *scaled*
inputs, as llama.cpp weighs by its imatrix), so α = 0 is plain rounding and the search is never worse than it on
the calibration inputs. The 1/s is folded by the caller into whatever produces the input, where that is a
per-channel multiply: the previous RMSNorm's weight for q/k/v (input_layernorm) and gate/up
(post_attention_layernorm); up_proj's rows for down_proj (its input is act(gate)·up, linear in up); v_proj's rows
for o_proj only when heads are not grouped (with grouped-query attention one v row feeds several heads' o_proj
columns, which would need equal scales, so o_proj is then left unscaled).

    result = awq_search_scales([q.weight, k.weight, v.weight], x, ["Q4_K", "Q4_K", "Q6_K"])
    q_scaled = q.weight * result.scales      # W·diag(s), then quantized as usual
    norm.weight /= result.scales             # the producer of x, divided by s
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from llmquant.formats import dequantize, get_format, quantize
from llmquant.methods.error import output_error

# dead channels (mean |x| = 0) are treated as this fraction of the strongest one, so s stays finite and its
# range at most this ratio to the power α
_MIN_RELATIVE_MAGNITUDE = 1e-4


class AWQResult(NamedTuple):
    """What ``awq_search_scales`` returns.

    ``scales``: float32 ``[in]`` on the weights' device, s: the linears' weights become W·diag(s), the producer
    of their input is divided by s. ``alpha``: the chosen exponent (s = s_X^α, normalised). ``errors``: the
    output error Σ_i ‖(Ŵ_i − W_i)Xᵀ‖² for each α of the grid, in grid order (``errors[0]`` is α = 0, i.e. s = 1,
    plain rounding)."""

    scales: torch.Tensor
    alpha: float
    errors: list[float]


def awq_search_scales(weights: Sequence[torch.Tensor], x: torch.Tensor, type_names: Sequence[str], *,
                      n_grid: int = 20, importance: torch.Tensor | None = None,
                      max_tokens: int | None = 4096) -> AWQResult:
    """AWQ's grid search of the per-input-channel scales s for the linears ``weights`` (each ``[out_i, in]``)
    that share the inputs ``x`` ``[n_tokens, in]``; weight i is rounded as ``type_names[i]``.

    ``n_grid``: α takes the values k/n_grid, k = 0 … n_grid − 1 (the paper's 20). ``importance``: one value per
    input column, llama.cpp's imatrix (mean x²) for ggml's search (default: mean x² of ``x``); under the scales
    it becomes importance / s², the imatrix of the scaled inputs. ``max_tokens``: the output error is measured
    on at most this many rows of ``x``, evenly spaced (None: all); s_X and the default importance use all rows.
    """
    weights = list(weights)
    type_names = list(type_names)
    in_features = _check_inputs(weights, x, type_names, n_grid, importance, max_tokens)
    device = weights[0].device
    originals = [w.detach().to(device, torch.float32) for w in weights]
    x = x.detach().to(device, torch.float32).reshape(-1, in_features)
    if importance is None:
        importance = x.square().mean(0)
    importance = importance.detach().to(device, torch.float32).reshape(-1)

    # s_X: the average magnitude of each input channel (the paper's activation statistic)
    magnitude = x.abs().mean(0)
    floor = max(float(magnitude.max()) * _MIN_RELATIVE_MAGNITUDE, torch.finfo(torch.float32).tiny)
    magnitude = magnitude.clamp(min=floor)

    # H = XᵀX of the measured rows: ‖ΔW Xᵀ‖² = tr(ΔW H ΔWᵀ), an [in, in] product instead of one per token
    measured = _evenly_spaced_rows(x, max_tokens).to(torch.float64)
    H = measured.T @ measured

    errors = []
    best_scales, best_alpha, best_error = None, 0.0, float("inf")
    for k in range(n_grid):
        alpha = k / n_grid
        scales = _normalised_scales(magnitude, alpha)
        error = _scaled_rounding_error(originals, type_names, scales, importance, H)
        errors.append(error)
        # strictly less: on a tie the smaller α (closer to plain rounding) is kept
        if error < best_error:
            best_scales, best_alpha, best_error = scales, alpha, error
    return AWQResult(scales=best_scales, alpha=best_alpha, errors=errors)


def _normalised_scales(magnitude: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_X^α / sqrt(max · min), as the AWQ reference normalises (the geometric middle of s at 1, so W·diag(s)
    stays in the weights' range); α = 0 gives exactly 1."""
    if alpha == 0:
        return torch.ones_like(magnitude)
    scales = magnitude.pow(alpha)
    return scales / (scales.max() * scales.min()).sqrt()


def _scaled_rounding_error(originals: list[torch.Tensor], type_names: list[str], scales: torch.Tensor,
                           importance: torch.Tensor, H: torch.Tensor) -> float:
    """Σ_i tr(ΔW_i H ΔW_iᵀ), ΔW_i = Q(W_i·diag(s))·diag(s)⁻¹ − W_i: the output error of the scaled linears
    against the original ones (the folded 1/s restores the inputs)."""
    scaled_importance = importance / scales.square()
    total = 0.0
    for weight, type_name in zip(originals, type_names, strict=True):
        scaled = weight * scales
        data = quantize(scaled, type_name, imatrix=scaled_importance)
        rounded = dequantize(torch.from_numpy(data).to(weight.device), type_name, tuple(weight.shape))
        total += output_error(weight, rounded / scales, H)
    return total


def _evenly_spaced_rows(x: torch.Tensor, max_tokens: int | None) -> torch.Tensor:
    """At most ``max_tokens`` rows of ``x``, spread over all of it (calibration batches come in document order,
    so the first rows would be one document), deterministically."""
    n_tokens = x.shape[0]
    if max_tokens is None or n_tokens <= max_tokens:
        return x
    index = torch.linspace(0, n_tokens - 1, max_tokens, device=x.device).round().long()
    return x[index]


def _check_inputs(weights: list[torch.Tensor], x: torch.Tensor, type_names: list[str], n_grid: int,
                  importance: torch.Tensor | None, max_tokens: int | None) -> int:
    """Shapes, types and values checked before any rounding; returns the shared input width."""
    if not weights:
        raise ValueError("AWQ: no weights to search scales for")
    if len(type_names) != len(weights):
        raise ValueError(f"AWQ: {len(weights)} weights but {len(type_names)} type names")
    if n_grid < 1:
        raise ValueError(f"AWQ: n_grid must be at least 1 (α = 0 only), got {n_grid}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"AWQ: max_tokens must be positive or None, got {max_tokens}")
    in_features = None
    for i, (weight, type_name) in enumerate(zip(weights, type_names, strict=True)):
        if weight.ndim != 2:
            raise ValueError(f"AWQ: weight {i} should be 2-D [out, in], got shape {tuple(weight.shape)}")
        if in_features is None:
            in_features = weight.shape[1]
        elif weight.shape[1] != in_features:
            raise ValueError(f"AWQ: weight {i} has {weight.shape[1]} input columns, weight 0 has {in_features}; "
                             "the linears of one search share their input")
        fmt = get_format(type_name)
        if weight.shape[1] % fmt.block_size:
            raise ValueError(f"AWQ: weight {i}'s row length {weight.shape[1]} is not a multiple of {fmt.name}'s "
                             f"block size {fmt.block_size}")
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"AWQ: weight {i} contains non-finite values (NaN or inf)")
    if x.ndim < 2 or x.shape[-1] != in_features:
        raise ValueError(f"AWQ: inputs have shape {tuple(x.shape)}, expected [n_tokens, {in_features}]")
    if x.numel() == 0:
        raise ValueError("AWQ: no calibration inputs (zero tokens)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("AWQ: the calibration inputs contain non-finite values (NaN or inf)")
    if importance is not None:
        if importance.numel() != in_features:
            raise ValueError(f"AWQ: importance has {importance.numel()} values, the weights {in_features} columns")
        if not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
            raise ValueError("AWQ: importance must be finite and non-negative (mean squared activations)")
    return in_features
