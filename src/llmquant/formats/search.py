"""Shared scale searches (weighted least squares over candidate scales) the format families call.

Every function works on a whole batch of groups at once: ``x`` is float32 ``[n_groups, group_size]``.
Two helpers write this file at once: each keeps to its own section (edit with small anchored replacements).
"""

from __future__ import annotations

import numpy as np
import torch

from llmquant.formats import compiled

# ==== symmetric searches (make_qx_quants, make_q3_quants, nearest_int) ====

# ggml's threshold below which a group counts as all zero (GROUP_MAX_EPS in ggml-quants.c)
GROUP_MAX_EPS = 1e-15


def nearest_int(values: torch.Tensor) -> torch.Tensor:
    """float32 → int32 exactly as ggml's nearest_int: add 1.5·2^23 and read the low mantissa bits.

    In range this is round-half-to-even; out of range it wraps the way ggml's bit trick does."""
    bits = (values.to(torch.float32) + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def divide_scalar_by(numerator: float, values: torch.Tensor) -> torch.Tensor:
    """``numerator / values`` rounded once, as C's float division (torch's ``scalar / tensor`` takes a
    reciprocal and then multiplies, which rounds twice)."""
    return torch.full_like(values, numerator).div_(values)


def sqrt_f32(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root, as C's sqrtf (torch's CPU float32 sqrt can be 1 ulp off)."""
    # the float64 root is correctly rounded, and rounding it again to float32 is too: 53 >= 2·24 + 2 makes the
    # double rounding of a square root innocuous (Figueroa, "When is double rounding innocuous?", 1995)
    return values.to(torch.float64).sqrt_().to(torch.float32)


def sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum ``[n_groups, n]`` along n left to right in float32, as ggml's scalar loops accumulate
    (torch's reductions add pairwise, which differs in the last bit and flips near-ties)."""
    return sequential_sum_rows(terms.t())


def sequential_sum_rows(terms: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum ``[n, ...]`` over its first dim left to right in float32 (element-major: each step adds one row),
    from +0 as ggml's loops start, or from the first row (``from_zero=False``; they differ only in that
    -0 alone stays -0).

    On the CPU this is one numpy reduction over axis 0 of a C-contiguous array, which numpy runs as exactly
    that loop (row after row into one accumulator; its pairwise summation is only for the contiguous axis), in
    C and without the GIL; elsewhere one in-place add per row."""
    if terms.device.type == "cpu" and terms.dtype == torch.float32 and terms.dim() >= 2 and terms.shape[0] > 1:
        rows = np.ascontiguousarray(terms.detach().numpy())  # contiguity is what makes numpy's order sequential
        flat = rows.reshape(rows.shape[0], -1)
        total = np.add.reduce(flat, axis=0, initial=0.0) if from_zero else np.add.reduce(flat, axis=0)
        return torch.from_numpy(total.reshape(rows.shape[1:]))
    total = torch.zeros_like(terms[0]) if from_zero else terms[0].clone()
    for row in terms if from_zero else terms[1:]:
        total.add_(row)
    return total


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each group, keeping its sign; the first one wins on ties and an
    all-zero group gives +0 (as ggml's ``if (ax > amax) { amax = ax; max = x[i]; }``)."""
    # two fast reductions decide every group but those whose max and -min tie; only those look for the first
    return _signed_absmax_from_extremes(x, x.amax(dim=1), x.amin(dim=1))


def _signed_absmax_from_extremes(x: torch.Tensor, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    # the larger magnitude of each group's max and min; groups where they tie look for the first in ``x``
    picked = torch.where(high >= -low, high, low)
    tied = (high == -low) & (high > 0)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        picked[rows] = _signed_absmax_first(x[rows])
    return torch.where(picked != 0, picked, torch.zeros_like(picked))


def _signed_absmax_first(x: torch.Tensor) -> torch.Tensor:
    # signed_absmax by position: the first value of largest magnitude
    magnitude = x.abs()
    amax = magnitude.amax(dim=1, keepdim=True)
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
    first = torch.where(magnitude == amax, positions, x.shape[1]).amin(dim=1, keepdim=True)
    picked = x.gather(1, first).squeeze(1)
    return torch.where(amax.squeeze(1) > 0, picked, torch.zeros_like(picked))


def _f32(value: float) -> float:
    """Round a Python float to the nearest float32, for constants ggml computes in float."""
    return float(torch.tensor(value, dtype=torch.float32))


def _rmse_weights(x: torch.Tensor, rmse_type: int) -> torch.Tensor:
    # the weight of each value in make_qx_quants when no importance is given
    if rmse_type == 1:
        return x * x
    if rmse_type == 2:
        return torch.ones_like(x)
    if rmse_type == 3:
        return x.abs()
    return sqrt_f32(x.abs())


def make_qx_quants(
    x: torch.Tensor, nmax: int, rmse_type: int = 1, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale search, as ggml's make_qx_quants: levels ``l`` in [-nmax, nmax) with ``x ≈ scale·l``.

    Starts from ``-nmax / max`` and (for rmse_type > 0) tries the 18 neighbouring inverse scales
    ``-(nmax + 0.1·k) / max``, keeping the one with the best weighted least-squares fit
    (``sumlx² / suml2``). ``weights`` replaces the rmse_type weighting when given; a negative rmse_type
    returns after the first fit with the mean of the two scales; 0 skips the fit.
    Returns ``(scale [n_groups], levels [n_groups, n] int32 in [0, 2·nmax))``; all-zero groups give 0, 0.
    """
    if rmse_type > 0:
        return _qx_search(x, nmax, weights if weights is not None else _rmse_weights(x, rmse_type))
    signed_max = signed_absmax(x)
    all_zero = signed_max.abs() < GROUP_MAX_EPS
    safe_max = torch.where(all_zero, torch.ones_like(signed_max), signed_max)

    def levels_for(inverse_scale: torch.Tensor) -> torch.Tensor:
        return nearest_int(inverse_scale[:, None] * x).clamp_(-nmax, nmax - 1)

    inverse_scale = divide_scalar_by(float(-nmax), safe_max)
    levels = levels_for(inverse_scale)
    zero_scale = torch.zeros_like(signed_max)

    def finish(scale: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = torch.where(all_zero[:, None], torch.zeros_like(levels), levels + nmax)
        return torch.where(all_zero, zero_scale, scale), levels

    if rmse_type == 0:
        return finish(divide_scalar_by(1.0, inverse_scale), levels)
    return_early = rmse_type < 0
    w = weights if weights is not None else _rmse_weights(x, abs(rmse_type))
    wx = w * x

    def fit(levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        as_float = levels.to(torch.float32)
        return sequential_sum(wx * as_float), sequential_sum(w * as_float * as_float)

    sumlx, suml2 = fit(levels)
    scale = torch.where(suml2 != 0, sumlx / suml2, zero_scale)
    if return_early:
        first_guess = divide_scalar_by(1.0, inverse_scale)
        return finish(torch.where(suml2 > 0, 0.5 * (scale + first_guess), first_guess), levels)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        # -(nmax + 0.1f*is) / max, with the numerator rounded to float as in ggml
        numerator = -_f32(float(nmax) + _f32(_f32(0.1) * step))
        candidate = levels_for(divide_scalar_by(numerator, safe_max))
        cand_sumlx, cand_suml2 = fit(candidate)
        better = (cand_suml2 > 0) & (cand_sumlx * cand_sumlx > best * cand_suml2)
        levels = torch.where(better[:, None], candidate, levels)
        scale = torch.where(better, cand_sumlx / cand_suml2, scale)
        best = torch.where(better, scale * cand_sumlx, best)
    return finish(scale, levels)


# candidates scored per pass of _qx_search: enough to share each torch call's overhead, few enough that the
# [group_size, candidates, n_groups] temporaries stay near the cache
_QX_BATCH_WEIGHTS = 1 << 17


def where_all(conditions: list[torch.Tensor], then: torch.Tensor, otherwise: torch.Tensor) -> torch.Tensor:
    """``torch.where(c1 & c2 & ..., then, otherwise)`` as nested selects. The same values; in a ``compiled``
    kernel eight times faster, as inductor's vectorized CPU code combines comparison masks slowly."""
    for condition in reversed(conditions):
        then = torch.where(condition, then, otherwise)
    return then


def _signed_absmax_columns(x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """signed_absmax from the element-major copy ``xt`` (reductions over contiguous rows); ``x`` for ties."""
    return _signed_absmax_from_extremes(x, xt.amax(dim=0), xt.amin(dim=0))


def first_largest_magnitude(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``if (ax > amax) { amax = ax; max = x[i]; }`` over ``values`` (one tensor per position, in order),
    unrolled for the fused kernels: (amax, max) per group, the first of equal magnitudes winning; +0, +0 for an
    all-zero group."""
    amax = torch.zeros_like(values[0])
    signed_max = torch.zeros_like(values[0])
    for value in values:
        magnitude = value.abs()
        larger = magnitude > amax
        amax = torch.where(larger, magnitude, amax)
        signed_max = torch.where(larger, value, signed_max)
    return amax, signed_max


def _q3_start_kernel(xt: torch.Tensor, nmax: int) -> tuple[torch.Tensor, ...]:
    """make_q3_quants up to its passes for ``compiled`` (element-major, [n, n_groups]): the first value of
    largest magnitude, ``iscale = -nmax/max``, the rounded levels and the sums ``(w·x)·l`` and ``(w·l)·l`` from
    +0, w = x². Returns the levels (float), sumlx, suml2, iscale and which groups are all zero (1.0)."""
    amax, signed_max = first_largest_magnitude([xt[i] for i in range(xt.shape[0])])
    all_zero = amax < GROUP_MAX_EPS
    inverse_scale = divide_scalar_by(float(-nmax), torch.where(all_zero, torch.ones_like(signed_max), signed_max))
    levels = []
    sumlx = torch.zeros_like(amax)
    suml2 = torch.zeros_like(amax)
    for i in range(xt.shape[0]):  # |iscale·x| <= nmax: round (half to even) is nearest_int there
        level = torch.round(xt[i] * inverse_scale).clamp(-nmax, nmax - 1)
        w = xt[i] * xt[i]
        sumlx = sumlx + (w * xt[i]) * level
        suml2 = suml2 + (w * level) * level
        levels.append(level)
    return (torch.stack(levels), sumlx, suml2, inverse_scale,
            torch.where(all_zero, torch.ones_like(amax), torch.zeros_like(amax)))


def _q3_pass_kernel(xt: torch.Tensor, levels: torch.Tensor, sumlx: torch.Tensor, suml2: torch.Tensor,
                    nmax: int) -> tuple[torch.Tensor, ...]:
    """One pass of make_q3_quants' level moves for ``compiled`` (element-major, [n, n_groups]): value by value,
    the eager loop's operations in its order (w = x² recomputed: cheaper than reading it). Returns the levels,
    the two sums and which groups moved (1.0)."""
    moved = torch.zeros_like(sumlx)
    out = []
    for i in range(xt.shape[0]):
        current = levels[i]
        w = xt[i] * xt[i]
        wx = w * xt[i]
        without_lx = sumlx - wx * current
        without_l2 = suml2 - (w * current) * current
        bits = ((xt[i] * without_l2) / without_lx + 12582912.0).view(torch.int32)
        proposed = ((bits & 0x007FFFFF) - 0x00400000).clamp(-nmax, nmax - 1).to(torch.float32)
        new_lx = without_lx + wx * proposed
        new_l2 = without_l2 + (w * proposed) * proposed
        accept = [without_lx > 0, proposed != current, new_l2 > 0,
                  (new_lx * new_lx) * suml2 > (sumlx * sumlx) * new_l2]
        out.append(where_all(accept, proposed, current))
        sumlx, suml2 = where_all(accept, new_lx, sumlx), where_all(accept, new_l2, suml2)
        moved = where_all(accept, torch.ones_like(moved), moved)
    return torch.stack(out), sumlx, suml2, moved


def _qx_numerators(nmax: int) -> list[float]:
    # -nmax, then -(nmax + 0.1f*is) for is = -9..9 but 0, rounded to float as in ggml
    return [float(-nmax)] + [-_f32(float(nmax) + _f32(_f32(0.1) * step)) for step in range(-9, 10) if step]


def _qx_search(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants for rmse_type > 0: the first inverse scale ``-nmax/max`` and 18 more, scored together.

    Element-major (``[n, candidates, n_groups]``) so each step of ggml's left-to-right sums is one contiguous
    row, and several candidates share every torch call; only the keep-if-better scan runs candidate by
    candidate. Rounding is torch.round (half to even): every scaled value is below nmax + 1 in magnitude (max
    is the value of largest magnitude and at least GROUP_MAX_EPS), where ggml's nearest_int is exactly that.
    Only the kept inverse scale is tracked: ggml recomputes the kept levels from it too. On the CPU the fused
    kernel (``_qx_kernel``) does the same work in one pass."""
    numerators = _qx_numerators(nmax)
    if compiled.enabled(x):
        fused = compiled.run(_qx_kernel, (nmax,), x.contiguous(), weights.contiguous(),
                             torch.tensor(numerators, dtype=x.dtype, device=x.device))
        if fused is not None:
            return fused
    n, n_groups = x.shape[1], x.shape[0]
    xt = x.t().contiguous()
    wt = weights.t().contiguous()
    wxt = wt * xt
    signed_max = _signed_absmax_columns(x, xt)
    all_zero = signed_max.abs() < GROUP_MAX_EPS
    safe_max = torch.where(all_zero, torch.ones_like(signed_max), signed_max)
    iscales = torch.tensor(numerators, dtype=x.dtype, device=x.device)[:, None] / safe_max
    batch = max(1, min(len(numerators), _QX_BATCH_WEIGHTS // max(n * n_groups, 1)))
    levels_buffer = torch.empty((n, batch, n_groups), dtype=x.dtype, device=x.device)
    terms_buffer = torch.empty((n, 2, batch, n_groups), dtype=x.dtype, device=x.device)
    scale = best = best_iscale = None
    for first in range(0, len(numerators), batch):
        count = min(batch, len(numerators) - first)
        levels = levels_buffer[:, :count]
        terms = terms_buffer[:, :, :count]
        torch.mul(xt[:, None, :], iscales[first:first + count], out=levels)
        levels.round_().clamp_(-nmax, nmax - 1)
        # sumlx += w*x*l and suml2 += w*l*l, as ggml multiplies: (w*x)*l and (w*l)*l
        torch.mul(wxt[:, None, :], levels, out=terms[:, 0])
        torch.mul(wt[:, None, :], levels, out=terms[:, 1]).mul_(levels)
        sums = sequential_sum_rows(terms)
        for k in range(count):
            sumlx, suml2 = sums[0, k], sums[1, k]
            if scale is None:  # the first guess
                scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
                best = scale * sumlx
                best_iscale = iscales[0]
                continue
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = torch.where(better, sumlx / suml2, scale)
            best = torch.where(better, scale * sumlx, best)
            best_iscale = torch.where(better, iscales[first + k], best_iscale)
    final = levels_buffer[:, 0]
    torch.mul(xt, best_iscale, out=final)
    final.round_().clamp_(-nmax, nmax - 1).add_(nmax)
    if bool(all_zero.any()):
        final[:, all_zero] = 0
        scale = torch.where(all_zero, torch.zeros_like(scale), scale)
    return scale, final.t().to(torch.int32)


def _qx_kernel(x: torch.Tensor, weights: torch.Tensor, numerators: torch.Tensor,
               nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole of _qx_search for ``compiled``: the same float32 operations in the same order, written
    group-major ([n_groups, candidates, n]) with ggml's loops unrolled (the first-wins largest magnitude, the
    left-to-right sums), so inductor fuses the search into one loop over groups. Returns the scale and the
    levels in [0, 2·nmax) as int32; all-zero groups give 0, 0."""
    n = x.shape[1]
    amax, signed_max = first_largest_magnitude([x[:, i] for i in range(n)])
    all_zero = amax < GROUP_MAX_EPS
    safe_max = torch.where(all_zero, torch.ones_like(signed_max), signed_max)
    iscales = numerators[None, :] / safe_max[:, None]
    levels = torch.round(x[:, None, :] * iscales[:, :, None]).clamp(-nmax, nmax - 1)
    # sumlx += (w*x)*l and suml2 += (w*l)*l, from +0 as ggml's loops
    terms_lx = (weights * x)[:, None, :] * levels
    terms_l2 = (weights[:, None, :] * levels) * levels
    sumlx = torch.zeros_like(terms_lx[..., 0])
    suml2 = torch.zeros_like(terms_l2[..., 0])
    for i in range(n):
        sumlx = sumlx + terms_lx[..., i]
        suml2 = suml2 + terms_l2[..., i]
    first_lx, first_l2 = sumlx[:, 0], suml2[:, 0]
    scale = torch.where(first_l2 != 0, first_lx / first_l2, torch.zeros_like(first_l2))
    best = scale * first_lx
    best_iscale = iscales[:, 0]
    for k in range(1, iscales.shape[1]):
        cand_lx, cand_l2 = sumlx[:, k], suml2[:, k]
        better = (cand_l2 > 0) & (cand_lx * cand_lx > best * cand_l2)
        scale = torch.where(better, cand_lx / cand_l2, scale)
        best = torch.where(better, scale * cand_lx, best)
        best_iscale = torch.where(better, iscales[:, k], best_iscale)
    final = torch.round(x * best_iscale[:, None]).clamp(-nmax, nmax - 1) + nmax
    final = torch.where(all_zero[:, None], torch.zeros_like(final), final)
    return torch.where(all_zero, torch.zeros_like(scale), scale), final.to(torch.int32)


def _q3_pass_eager(xt: torch.Tensor, levels: torch.Tensor, sumlx: torch.Tensor, suml2: torch.Tensor,
                   nmax: int) -> tuple[torch.Tensor, ...]:
    """_q3_pass_kernel in eager PyTorch, a few calls per value on contiguous rows, updating ``levels`` and the
    sums in place. Returns the levels, the two sums and which groups moved (True)."""
    levels, sumlx, suml2 = levels.clone(), sumlx.clone(), suml2.clone()
    w = xt * xt
    wx = w * xt
    without_lx, without_l2, proposed = (torch.empty_like(sumlx) for _ in range(3))
    new_lx, new_l2, product = (torch.empty_like(sumlx) for _ in range(3))
    moved = torch.zeros_like(sumlx, dtype=torch.bool)
    for i in range(xt.shape[0]):
        xi, wi, wxi, current = xt[i], w[i], wx[i], levels[i]
        torch.sub(sumlx, torch.mul(wxi, current, out=product), out=without_lx)
        torch.mul(wi, current, out=product).mul_(current)
        torch.sub(suml2, product, out=without_l2)
        # nearest_int(x*sl2/slx): the bit trick, as the quotient may be huge or not finite
        torch.mul(xi, without_l2, out=proposed).div_(without_lx).add_(12582912.0)
        bits = proposed.view(torch.int32)
        bits.bitwise_and_(0x007FFFFF).sub_(0x00400000)
        torch.clamp(bits, -nmax, nmax - 1, out=bits)
        proposed.copy_(bits)
        torch.add(without_lx, torch.mul(wxi, proposed, out=product), out=new_lx)
        torch.mul(wi, proposed, out=product).mul_(proposed)
        torch.add(without_l2, product, out=new_l2)
        accept = (without_lx > 0) & (proposed != current) & (new_l2 > 0)
        accept &= (new_lx * new_lx) * suml2 > (sumlx * sumlx) * new_l2
        torch.where(accept, proposed, current, out=current)
        torch.where(accept, new_lx, sumlx, out=sumlx)
        torch.where(accept, new_l2, suml2, out=suml2)
        moved |= accept
    return levels, sumlx, suml2, moved


def make_q3_quants(x: torch.Tensor, nmax: int, do_rmse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric scale search of Q3_K's reference path, as ggml's make_q3_quants.

    Rounds with ``-nmax / max``; with ``do_rmse`` then moves one level at a time (five passes, weights x²)
    while that improves the least-squares fit, updating the running sums after each value as ggml does.
    Returns ``(scale [n_groups], levels [n_groups, n] int32 in [0, 2·nmax))``; all-zero groups give 0, 0.
    """
    # element-major ([n, n_groups]): each value's step is a few calls on contiguous rows
    xt = x.t().contiguous()
    zero_scale = torch.zeros_like(xt[0])
    fused = compiled.run(_q3_start_kernel, (nmax,), xt) if do_rmse and compiled.enabled(x) else None
    if fused is not None:
        levels, sumlx, suml2, inverse_scale, all_zero = fused
        all_zero = all_zero != 0
    else:
        signed_max = _signed_absmax_columns(x, xt)
        all_zero = signed_max.abs() < GROUP_MAX_EPS
        safe_max = torch.where(all_zero, torch.ones_like(signed_max), signed_max)
        inverse_scale = divide_scalar_by(float(-nmax), safe_max)
        # |iscale*x| <= nmax: torch.round (half to even) is ggml's nearest_int there
        levels = torch.mul(xt, inverse_scale).round_().clamp_(-nmax, nmax - 1)  # float
    if not do_rmse:
        scale = divide_scalar_by(1.0, inverse_scale)
    else:
        if fused is None:
            w = xt * xt
            sumlx = sequential_sum_rows((w * xt) * levels)
            suml2 = sequential_sum_rows(w * levels * levels)
        # value by value, in ggml's order: each accepted move changes the sums the next value sees. A pass
        # with no move leaves a group as it was, which is ggml's early break; so only the groups that moved
        # in a pass take the next (in practice 15%, then 4%: about 1.2 passes' work instead of 5)
        active = None  # the indices of the groups still moving; None: all
        use_kernel = compiled.enabled(x)  # decided once: a kernel call beats eager even for a few groups
        for _ in range(5):
            if active is None:
                state = (xt, levels, sumlx, suml2)
            else:
                if active.numel() == 1:  # twice (the same result written twice): sizes 0 and 1 make
                    active = active.repeat(2)  # the export specialize the kernel again
                state = (xt.index_select(1, active), levels.index_select(1, active),
                         sumlx.index_select(0, active), suml2.index_select(0, active))
            fused = compiled.run(_q3_pass_kernel, (nmax,), *state) if use_kernel else None
            new_levels, new_lx, new_l2, moved = fused if fused is not None else _q3_pass_eager(*state, nmax)
            if active is None:
                levels, sumlx, suml2 = new_levels, new_lx, new_l2
                active = moved.nonzero().squeeze(1)
            else:
                levels[:, active], sumlx[active], suml2[active] = new_levels, new_lx, new_l2
                active = active[moved.nonzero().squeeze(1)]
            if active.numel() == 0:
                break
        scale = torch.where(suml2 > 0, sumlx / suml2, zero_scale)
    # still element-major (contiguous, all_zero broadcast along rows), then one transposing copy
    levels = torch.where(all_zero, torch.zeros_like(levels), levels.add_(nmax)).to(torch.int32)
    return torch.where(all_zero, zero_scale, scale), levels.t().contiguous()


# ==== end of symmetric searches ====

# ==== scale + min searches (make_qkx1/2/3_quants, make_qp_quants) ====
# make_qkx1_quants is left out: llama.cpp's Q4_K/Q5_K reference paths no longer call it (commented out there).
# Every sum below is accumulated one element at a time in float32, in ggml's order (ggml-base is built without
# -ffast-math, so its float loops are sequential): that is what makes the chosen candidate byte-identical.


def _mm_float32(value: float) -> float:
    """A Python float rounded to float32, so constants such as 0.1f enter the math as ggml's C sees them."""
    return torch.tensor(value, dtype=torch.float32).item()


def _mm_scalar_over(value: float, tensor: torch.Tensor) -> torch.Tensor:
    """value / tensor as one float32 division: torch's ``scalar / tensor`` multiplies by a reciprocal instead."""
    return torch.full_like(tensor, value) / tensor


def _mm_over_scalar(tensor: torch.Tensor, value: float) -> torch.Tensor:
    """tensor / value as a true division (on CUDA, ``tensor / scalar`` multiplies by the scalar's reciprocal)."""
    return tensor / torch.full_like(tensor, value)


def _mm_sqrt(values: torch.Tensor) -> torch.Tensor:
    """sqrtf, correctly rounded: torch's float32 CPU sqrt (Sleef, 0.5001 ulp) is not; via float64 it is exact."""
    return torch.sqrt(values.to(torch.float64)).to(torch.float32)


def _mm_nearest_int(values: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int (the 12582912 bit trick, so inf, NaN and huge values wrap as in ggml), as float32."""
    return nearest_int(values).to(torch.float32)


def _mm_first_extreme(x: torch.Tensor, largest: bool) -> torch.Tensor:
    """Per row, the first element equal to the max (or min): ggml's `if (x[i] > max) max = x[i]` loops keep the
    first of tied values, which decides the sign when +0 and -0 tie (torch's amax/amin may return either)."""
    extreme = x.amax(dim=1) if largest else x.amin(dim=1)
    first = (x == extreme[:, None]).to(torch.uint8).argmax(dim=1)
    return x.gather(1, first[:, None]).squeeze(1)


def _mm_sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum ``[n_groups, n]`` over n in float32, first term to last, as ggml's scalar loops do."""
    return sequential_sum_rows(terms.t(), from_zero=False)


def _mm_sequential_sum_rows(terms: torch.Tensor) -> torch.Tensor:
    """Sum ``[n, ...]`` over its first dim in float32, first row to last (element-major layout)."""
    return sequential_sum_rows(terms, from_zero=False)


def _mm_fit(sum_w: torch.Tensor, sum_x: torch.Tensor, sum_l: torch.Tensor, sum_l2: torch.Tensor,
            sum_xl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The weighted least-squares ``x ≈ scale*L + min`` of one candidate from its sums, min capped at 0 (then
    the scale alone refits): (det, scale, min). Shared by the eager loop and the fused step."""
    det = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
    positive = this_min > 0
    this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
    return det, this_scale, torch.where(positive, torch.zeros_like(this_min), this_min)


def _mm_keep_better(det: torch.Tensor, error: torch.Tensor, this_scale: torch.Tensor, this_min: torch.Tensor,
                    iscale: torch.Tensor, best_error: torch.Tensor, best_scale: torch.Tensor,
                    kept_iscale: torch.Tensor, kept_offset: torch.Tensor,
                    best_min: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep the candidate where it is strictly better (the first best wins): the new (best_error, best_scale,
    kept_iscale, kept_offset, best_min); kept_offset is the min its levels were computed from."""
    better = [det > 0, error < best_error]
    return (where_all(better, error, best_error), where_all(better, this_scale, best_scale),
            where_all(better, iscale, kept_iscale), where_all(better, best_min, kept_offset),
            where_all(better, this_min, best_min))


def _mm_search_scale_and_min(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                             nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body shared by llama.cpp's make_qkx2_quants and make_qkx3_quants: fit ``x ≈ scale * L + min``
    (L in 0..nmax, min <= 0) by weighted least squares over nstep+1 candidate inverse scales, keep the best.

    The candidates run one after another, as in ggml: once one is kept, its min is the one the next candidates
    are computed from (``(rmin + rdelta*is + nmax)/(max - min)`` and ``x - min``), so they cannot be batched.
    """
    n, n_groups = x.shape[1], x.shape[0]
    xt = x.t().contiguous()  # [n, n_groups]: element-major, so each step of a sequential sum reads one row
    wt = weights.t().contiguous()
    low = _mm_first_extreme(x, largest=False)
    high = x.amax(dim=1)
    terms = torch.empty((n, 3, n_groups), dtype=torch.float32, device=x.device)
    torch.mul(wt, xt, out=terms[:, 1])
    terms[:, 0] = wt
    sums = _mm_sequential_sum_rows(terms[:, :2])
    sum_w, sum_x = sums[0], sums[1]
    low = torch.where(low > 0, torch.zeros_like(low), low)
    flat = high <= low  # all values equal (for make_qkx2's `max == min` this is the same set of groups)
    high = torch.where(flat, low + 1, high)  # only keeps the flat groups finite; their result is fixed below
    levels = torch.empty_like(xt)
    diff = torch.empty_like(xt)

    def levels_for(iscale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        # nearest_int(iscale*(x - min)) clamped to 0..nmax, into the `levels` buffer
        torch.sub(xt, offset, out=levels)
        levels.mul_(iscale)
        levels.copy_(_mm_nearest_int(levels))
        return levels.clamp_(0, nmax)

    def error_of(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        # sum_i w_i * |scale*L_i + min - x_i| (or its square), in ggml's order
        torch.mul(levels, scale, out=diff)
        diff.add_(offset).sub_(xt)
        if use_mad:
            diff.abs_()
        else:
            diff.mul_(diff)
        return _mm_sequential_sum_rows(diff.mul_(wt))

    inverse_scale = _mm_scalar_over(nmax, high - low)
    best_scale = _mm_scalar_over(1.0, inverse_scale)
    best_min = low
    levels_for(inverse_scale, low)
    best_error = error_of(best_scale, best_min)
    # the levels of the kept candidate are recomputed at the end from the inverse scale and min that made them
    kept_iscale, kept_offset = inverse_scale, low
    if nstep >= 1 and compiled.enabled(x):
        # the candidates through the fused step kernel: same operations, one pass over the groups each
        rmin32, rdelta32 = _mm_float32(rmin), _mm_float32(rdelta)
        state = (best_error, best_scale, kept_iscale, kept_offset, best_min)
        for step in range(nstep + 1):
            numerator = _mm_float32(_mm_float32(_mm_float32(rdelta32 * step) + rmin32) + nmax)
            fused = compiled.run(_mm_candidate_kernel, (nmax, use_mad), xt, wt, sum_w, sum_x, high, *state,
                                 torch.tensor(numerator, dtype=torch.float32, device=x.device))
            if fused is None:
                break
            state = fused
        else:
            nstep = 0  # every candidate is done
            best_error, best_scale, kept_iscale, kept_offset, best_min = state
    if nstep >= 1:
        rmin32, rdelta32 = _mm_float32(rmin), _mm_float32(rdelta)
        for step in range(nstep + 1):
            numerator = _mm_float32(_mm_float32(_mm_float32(rdelta32 * step) + rmin32) + nmax)
            iscale = _mm_scalar_over(numerator, high - best_min)
            levels_for(iscale, best_min)
            torch.mul(wt, levels, out=terms[:, 0])
            torch.mul(terms[:, 0], levels, out=terms[:, 1])
            torch.mul(terms[:, 0], xt, out=terms[:, 2])
            sums = _mm_sequential_sum_rows(terms)
            det, this_scale, this_min = _mm_fit(sum_w, sum_x, sums[0], sums[1], sums[2])
            error = error_of(this_scale, this_min)
            best_error, best_scale, kept_iscale, kept_offset, best_min = _mm_keep_better(
                det, error, this_scale, this_min, iscale, best_error, best_scale, kept_iscale, kept_offset, best_min)
    best_levels = levels_for(kept_iscale, kept_offset)
    best_scale = torch.where(flat, torch.zeros_like(best_scale), best_scale)
    best_min = torch.where(flat, low, best_min)
    best_levels = torch.where(flat[None, :], torch.zeros_like(best_levels), best_levels)
    return best_scale, -best_min, best_levels.t().to(torch.uint8).contiguous()


def _mm_candidate_kernel(xt: torch.Tensor, wt: torch.Tensor, sum_w: torch.Tensor, sum_x: torch.Tensor,
                         high: torch.Tensor, best_error: torch.Tensor, best_scale: torch.Tensor,
                         kept_iscale: torch.Tensor, kept_offset: torch.Tensor, best_min: torch.Tensor,
                         numerator: torch.Tensor, nmax: int, use_mad: bool) -> tuple[torch.Tensor, ...]:
    """One candidate of _mm_search_scale_and_min for ``compiled``, element-major (``xt``, ``wt``: [n, n_groups])
    with ggml's loops unrolled: the levels from the running min, the five sums and the fit, the error, and the
    keep-if-better update, in the eager code's order. Returns the new (best_error, best_scale, kept_iscale,
    kept_offset, best_min)."""
    n = xt.shape[0]
    iscale = numerator / (high - best_min)
    levels = []
    for i in range(n):  # nearest_int's bit trick, as eager (the scaled value may be out of range)
        bits = ((xt[i] - best_min) * iscale + 12582912.0).view(torch.int32)
        levels.append(((bits & 0x007FFFFF) - 0x00400000).to(torch.float32).clamp(0, nmax))
    weighted = wt[0] * levels[0]
    sum_l, sum_l2, sum_xl = weighted, weighted * levels[0], weighted * xt[0]
    for i in range(1, n):  # from the first term on, as _mm_sequential_sum_rows
        weighted = wt[i] * levels[i]
        sum_l = sum_l + weighted
        sum_l2 = sum_l2 + weighted * levels[i]
        sum_xl = sum_xl + weighted * xt[i]
    det, this_scale, this_min = _mm_fit(sum_w, sum_x, sum_l, sum_l2, sum_xl)
    error = None
    for i in range(n):
        diff = levels[i] * this_scale + this_min - xt[i]
        term = (diff.abs() if use_mad else diff * diff) * wt[i]
        error = term if error is None else error + term
    return _mm_keep_better(det, error, this_scale, this_min, iscale, best_error, best_scale, kept_iscale,
                           kept_offset, best_min)


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As llama.cpp's make_qkx2_quants: ``x ≈ scale * L - the_min`` per group, L in 0..nmax.

    ``x``, ``weights``: float32 ``[n_groups, group_size]``. Returns (scale ``[n_groups]``, the_min ``[n_groups]``
    (>= 0, subtracted), L uint8 ``[n_groups, group_size]``).
    """
    return _mm_search_scale_and_min(x, weights, nmax, rmin, rdelta, nstep, use_mad)


def make_qkx3_quants(x: torch.Tensor, weights: torch.Tensor | None, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As llama.cpp's make_qkx3_quants: make_qkx2's search, weighting by x² where no weights are given."""
    if weights is None:
        weights = x * x
    return _mm_search_scale_and_min(x, weights, nmax, rmin, rdelta, nstep, use_mad)


# ggml's GROUP_MAX_EPS: below this a group of (sub-block) scales counts as all zero
_MM_GROUP_MAX_EPS = _mm_float32(1e-15)


def make_qp_quants(x: torch.Tensor, nmax: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As llama.cpp's make_qp_quants: quantize non-negative values (the sub-block scales or mins of a
    super-block) to ``scale * L``, L in 0..nmax: 8 candidate scales, then up to 5 passes moving one L at a time.

    ``x``, ``weights``: float32 ``[n_groups, n]``. Returns (scale ``[n_groups]``, L uint8 ``[n_groups, n]``).
    """
    n_groups, n = x.shape
    xt = x.t().contiguous()
    wt = weights.t().contiguous()
    high = torch.clamp(x.amax(dim=1), min=0.0)
    all_zero = high < _MM_GROUP_MAX_EPS
    high = torch.where(all_zero, torch.ones_like(high), high)

    def squared_error(iscale: torch.Tensor, clamp: bool) -> torch.Tensor:
        scale = _mm_scalar_over(1.0, iscale)
        total = torch.zeros_like(high)
        for i in range(n):
            level = _mm_nearest_int(iscale * xt[i])
            if clamp:
                level = level.clamp(max=nmax)
            diff = xt[i] - scale * level
            total = total + wt[i] * diff * diff
        return total

    best_iscale = _mm_scalar_over(nmax, high)
    best_error = squared_error(best_iscale, clamp=False)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        numerator = _mm_float32(_mm_float32(_mm_float32(0.1) * step) + nmax)
        iscale = _mm_scalar_over(numerator, high)
        error = squared_error(iscale, clamp=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_iscale = torch.where(better, iscale, best_iscale)

    levels = [_mm_nearest_int(best_iscale * xt[i]).clamp(max=nmax) for i in range(n)]
    sum_lx = torch.zeros_like(high)
    sum_l2 = torch.zeros_like(high)
    for i in range(n):
        sum_lx = sum_lx + wt[i] * xt[i] * levels[i]
        sum_l2 = sum_l2 + wt[i] * levels[i] * levels[i]
    # a pass that changes nothing leaves the state as it was, so running all 5 equals ggml's early exit
    for _ in range(5):
        for i in range(n):
            w, xi, li = wt[i], xt[i], levels[i]
            slx = sum_lx - w * xi * li
            sl2 = sum_l2 - w * li * li
            usable = (slx > 0) & (sl2 > 0)
            new_l = _mm_nearest_int(xi * sl2 / torch.where(usable, slx, torch.ones_like(slx))).clamp(max=nmax)
            slx = slx + w * xi * new_l
            sl2 = sl2 + w * new_l * new_l
            accept = usable & (new_l != li) & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            levels[i] = torch.where(accept, new_l, li)
            sum_lx = torch.where(accept, slx, sum_lx)
            sum_l2 = torch.where(accept, sl2, sum_l2)
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
    scale = torch.where(all_zero, torch.zeros_like(scale), scale)
    out = torch.stack(levels, dim=1)
    out = torch.where(all_zero[:, None], torch.zeros_like(out), out)
    return scale, out.to(torch.uint8)


# ==== end of scale + min searches ====
