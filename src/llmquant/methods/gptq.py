"""GPTQ onto llama.cpp's block grids (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1).

A linear layer's weight W ``[out, in]`` sees calibration inputs X ``[n_tokens, in]``; GPTQ minimises the output
error ‖(W − Ŵ)Xᵀ‖² = tr(ΔW H ΔWᵀ) with the Hessian H = XᵀX, one input column at a time: column j is rounded
onto the grid and its error, scaled by the Cholesky factor of H⁻¹, is moved onto the columns not yet rounded.

The grid is the format's own (``llmquant.formats``): when the sweep reaches the first column of a format block
(32 or 256 columns), that block's parameters are chosen for every row by ggml's search (``fmt.choose_params``)
from the weights *as updated so far*, weighted by an importance vector as llama.cpp weighs by its imatrix; the
block's columns are then rounded one by one under those fixed parameters. The result is packed into ggml's bytes,
so llama.cpp reads it like any other tensor of that type.

    H = hessian(x)                    # x: [n_tokens, in_features] inputs of the layer; the layer-by-layer
                                      # runner sums XᵀX over batches (calibration.layer_runner.InputStatistics)
    result = gptq_quantize(weight, H, "Q4_K")
    result.data      # uint8 [out, row_bytes], laid out as llmquant.formats.quantize(weight, "Q4_K")
    result.weight    # float32 [out, in]: exactly what the bytes dequantize to
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from llmquant.errors import LlmquantError
from llmquant.formats import get_format
from llmquant.formats.base import BlockFormat, Grid, row_mean_square
from llmquant.methods.error import output_error

# ---- the Hessian H = XᵀX ----


def hessian(x: torch.Tensor, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H = XᵀX of inputs ``x`` ``[n_tokens, in_features]`` (a plain sum over tokens, not a mean), ``[in, in]``.

    Accumulated in float64 by default: H is a sum over many tokens, and its inverse's Cholesky factor is taken
    from it, so a sum exact to float32's last digits costs nothing later."""
    x = x.detach().reshape(-1, x.shape[-1]).to(dtype)
    return x.T @ x


# ---- GPTQ ----


class GPTQResult(NamedTuple):
    """What ``gptq_quantize`` returns.

    ``data``: ggml's bytes, uint8 ``[out, row_bytes]`` on the weight's device (the layout of
    ``llmquant.formats.quantize``); ``weight``: float32 ``[out, in]``, what ``data`` dequantizes to;
    ``proxy_error``: tr(ΔW H ΔWᵀ) with ΔW = weight − Ŵ and the undamped H, i.e. ‖ΔW Xᵀ‖² when H = XᵀX."""

    data: torch.Tensor
    weight: torch.Tensor
    proxy_error: float


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, type_name: str, *, damp: float = 0.01,
                  block_columns: int = 128, act_order: bool = False,
                  importance: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> GPTQResult:
    """GPTQ of ``weight`` ``[out, in]`` onto the block format ``type_name`` under the Hessian ``H`` ``[in, in]``.

    ``damp``: the dampening λ = damp · mean(diag H) added to H's diagonal (the paper's 1%).
    ``block_columns``: the lazy batch B of columns whose updates to later columns are applied at once; it is
    kept aligned with the format's blocks (a divisor or a multiple of the block size, else rounded up to one).
    ``act_order``: sweep the columns by descending diag(H), with "static groups": every block's parameters are
    then chosen beforehand from the original weights (as plain rounding would choose them).
    ``importance``: one weight per input column for ggml's parameter search (default: diag of the undamped H,
    llama.cpp's imatrix up to a constant factor).
    ``input_scale``: AWQ's s, when ``weight`` is W·diag(s) for the inputs x/s and ``H`` the unscaled inputs'
    XᵀX: GPTQ then works with diag(1/s) H diag(1/s) (scaled in its own copy of H, not in a second one).
    """
    fmt = get_format(type_name)
    if fmt.block_size <= 1:
        raise ValueError(f"GPTQ: {fmt.name} is not a block format (nothing to round)")
    if fmt.weights_per_level > 1:
        raise ValueError(f"GPTQ: {fmt.name} chooses one codeword per {fmt.weights_per_level} weights; GPTQ's sweep "
                         "rounds one column at a time")
    if weight.ndim != 2:
        raise ValueError(f"GPTQ: expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if in_features % fmt.block_size:
        raise ValueError(f"GPTQ: row length {in_features} is not a multiple of {fmt.name}'s block size "
                         f"{fmt.block_size}")
    if tuple(H.shape) != (in_features, in_features):
        raise ValueError(f"GPTQ: H has shape {tuple(H.shape)}, expected [{in_features}, {in_features}]")
    device = weight.device
    original = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(original).all()):
        raise ValueError("GPTQ: the weight contains non-finite values")
    H = H.detach().to(device, torch.float64)
    if importance is None:
        importance = H.diagonal().clamp(min=0)
    importance = importance.detach().to(device, torch.float32).reshape(-1)
    if importance.numel() != in_features:
        raise ValueError(f"GPTQ: importance has {importance.numel()} values, rows have {in_features} columns")

    W = original.clone()
    H_work = H.clone()  # the one working copy: scaled, permuted and factored in place
    if input_scale is not None:
        s = input_scale.detach().to(device, torch.float64).reshape(-1)
        for start in range(0, in_features, 256):  # H_ij / (s_i s_j), a band of rows at a time
            H_work[start:start + 256] /= s[start:start + 256, None] * s[None, :]
    # dead inputs (always zero in the calibration data): their weights cannot matter; as the reference, give
    # them H_jj = 1 so H stays invertible and zero their weights
    dead = H_work.diagonal() == 0
    H_work.diagonal()[dead] = 1.0
    W[:, dead] = 0.0

    lazy_batch = _lazy_batch(block_columns, fmt.block_size)
    if act_order:
        # static groups: every block's parameters from the original weights, then the sweep in the order of
        # descending diag H (the columns that matter most are rounded first, while most columns can still
        # absorb their error)
        params, grid = _static_params(fmt, W, importance)
        order = torch.argsort(H_work.diagonal(), descending=True)
        grid = Grid(grid.scale[:, order], None if grid.offset is None else grid.offset[:, order], grid.values)
        H_work = H_work[order[:, None], order[None, :]]
        Hinv = _float32_column_major(_inverse_hessian_factor(H_work, damp))
        del H_work
        sweep = _sweep(fmt, W[:, order], Hinv, importance, grid, lazy_batch)
        inverse = torch.argsort(order)  # back to the columns' own order
        Q, levels = sweep.quantized[:, inverse], sweep.levels[:, inverse]
    else:
        Hinv = _float32_column_major(_inverse_hessian_factor(H_work, damp))
        del H_work
        sweep = _sweep(fmt, W, Hinv, importance, None, lazy_batch)
        params, Q, levels = sweep.params, sweep.quantized, sweep.levels
    del Hinv, sweep, W  # before the error is measured: the largest layer's peak

    data = fmt.pack(levels.reshape(-1, fmt.block_size), params).reshape(out_features, -1)
    if input_scale is not None:  # tr(ΔW H_s ΔWᵀ) = tr((ΔW/s) H (ΔW/s)ᵀ): no scaled H needed
        s = input_scale.detach().to(device, torch.float32).reshape(1, -1)
        return GPTQResult(data=data, weight=Q, proxy_error=output_error(original / s, Q / s, H))
    return GPTQResult(data=data, weight=Q, proxy_error=output_error(original, Q, H))


def _lazy_batch(block_columns: int, block_size: int) -> int:
    """The lazy batch B, kept so that each format block's columns have had every earlier column's update when
    the block's parameters are chosen: either each format block starts a batch (B divides the block size: all
    earlier batches' updates are applied by then) or lies inside one (B a multiple: its columns are updated in
    place as the batch sweeps)."""
    if block_columns < 1:
        raise ValueError(f"GPTQ: block_columns must be positive, got {block_columns}")
    if block_size % block_columns == 0 or block_columns % block_size == 0:
        return block_columns
    return math.ceil(block_columns / block_size) * block_size


def _inverse_hessian_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor U of (H + λI)⁻¹, λ = damp · mean(diag H) (Algorithm 1's H⁻¹ ← Cholesky(H⁻¹)ᵀ).
    Row j of U, from j on, is how column j's rounding error is spread over the columns after it.
    Computed in ``H``'s own memory (LAPACK's factorizations work in place): H is overwritten by U and returned,
    so a large layer's Hessian is never held twice."""
    info = torch.empty((), dtype=torch.int32, device=H.device)
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    torch.linalg.cholesky_ex(H, out=(H, info))
    if int(info) != 0:
        raise LlmquantError(f"GPTQ: the dampened Hessian is not positive definite (damp={damp}); "
                            "use a larger damp or more calibration tokens")
    torch.cholesky_inverse(H, out=H)
    torch.linalg.cholesky_ex(H, upper=True, out=(H, info))
    if int(info) != 0:
        raise LlmquantError(f"GPTQ: the inverse Hessian is not positive definite (damp={damp}); use a larger damp")
    return H


def _float32_column_major(U: torch.Tensor) -> torch.Tensor:
    """U as float32 in column-major layout, the layout torch's own upper Cholesky factor comes in: the sweep's
    float32 products (and so which near-ties round which way) depend on the layout, and GPTQ was measured with
    this one."""
    n = U.shape[0]
    return torch.empty_strided((n, n), (1, n), dtype=torch.float32, device=U.device).copy_(U)


def _search_arguments(fmt: BlockFormat, W: torch.Tensor, start: int, stop: int,
                      importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Blocks ``[out·k, block_size]`` of columns start:stop, their importance laid out per weight, and (for the
    legacy formats) each row's mean square, as ``quantize_rows`` gives ggml's search."""
    out_features = W.shape[0]
    blocks = W[:, start:stop].reshape(-1, fmt.block_size)
    block_importance = importance[start:stop].reshape(1, -1).expand(out_features, -1).reshape(-1, fmt.block_size)
    row_sigma2 = None
    if fmt.uses_row_statistics:
        row_sigma2 = row_mean_square(W).repeat_interleave((stop - start) // fmt.block_size)
    return blocks, block_importance, row_sigma2


def _static_params(fmt: BlockFormat, W: torch.Tensor, importance: torch.Tensor) -> tuple[tuple, Grid]:
    """Every block's parameters from ``W`` at once, and their grid laid out as ``W`` ``[out, in]``."""
    params = fmt.choose_params(*_search_arguments(fmt, W, 0, W.shape[1], importance))
    return params, _as_rows(fmt.reconstruct(params), W.shape)


def _as_rows(grid: Grid, shape: torch.Size) -> Grid:
    return Grid(grid.scale.reshape(shape), None if grid.offset is None else grid.offset.reshape(shape), grid.values)


class _Sweep(NamedTuple):
    quantized: torch.Tensor  # float32 [out, in]: the rounded weights Q
    levels: torch.Tensor  # int32 [out, in]: their level indices
    params: tuple | None  # the format's Params over the blocks in row-major order (None under a given grid)


def _sweep(fmt: BlockFormat, W: torch.Tensor, Hinv: torch.Tensor, importance: torch.Tensor, grid: Grid | None,
           batch: int) -> _Sweep:
    """Algorithm 1 on ``W`` (updated in place): round each column, spread its error over the later columns,
    within a lazy batch at once per column and beyond it once per batch. With ``grid`` None, each format
    block's parameters are chosen when the sweep reaches its first column."""
    out_features, in_features = W.shape
    bs = fmt.block_size
    Q = torch.empty_like(W)
    levels = torch.empty(out_features, in_features, dtype=torch.int32, device=W.device)
    chosen = []  # each format block's Params, in column order
    scale = offset = None
    values = None if grid is None else grid.values
    if grid is not None:
        scale, offset = grid.scale, grid.offset
    for i1 in range(0, in_features, batch):
        i2 = min(i1 + batch, in_features)
        Hinv1 = Hinv[i1:i2, i1:i2]
        Err1 = torch.empty(out_features, i2 - i1, dtype=W.dtype, device=W.device)
        for i in range(i2 - i1):
            j = i1 + i
            if grid is None and j % bs == 0:
                # the block's columns have every earlier column's update (see _lazy_batch): choose its
                # parameters from the updated weights; W's columns before j hold their updated values too,
                # the row statistics' "current row"
                params = fmt.choose_params(*_search_arguments(fmt, W, j, j + bs, importance))
                chosen.append(params)
                block_grid = fmt.reconstruct(params)
                scale, offset, values = block_grid.scale, block_grid.offset, block_grid.values
            # fmt.encode(w, params, columns) is reconstruct(params).nearest(w, columns): the grid is built once
            # per block, then each column is rounded under it
            position = j % bs if grid is None else j
            column_grid = Grid(scale[:, position:position + 1],
                               None if offset is None else offset[:, position:position + 1], values)
            w = W[:, j]
            level = column_grid.nearest(w[:, None])
            q = column_grid.weights(level)[:, 0]
            levels[:, j] = level[:, 0]
            Q[:, j] = q
            # the error scaled by [H⁻¹]_jj, moved onto the batch's later columns by row j of H⁻¹'s factor
            err = (w - q) / Hinv1[i, i]
            W[:, j + 1:i2].addr_(err, Hinv1[i, i + 1:], alpha=-1.0)
            Err1[:, i] = err
        # the lazy batch update: the whole batch's errors onto every column after it
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)
    params = None if grid is not None else _interleave(chosen, fmt)
    return _Sweep(quantized=Q, levels=levels, params=params)


def _interleave(chosen: list[tuple], fmt: BlockFormat) -> tuple:
    """Per format block column k, Params over the rows → one Params over all blocks in row-major order (row r's
    block k at r·n_k + k), the order of ``quantize``'s bytes."""
    fields = zip(*chosen, strict=True)
    return fmt.Params(*(torch.stack(field, dim=1).reshape(-1, *field[0].shape[1:]) for field in fields))
