"""ggml's shared scale searches and numeric helpers, each written once, as numba functions over one group.

Every function here is compiled by numba (``@kernel``) and called from the formats' per-block loops, which are
compiled too. They follow ggml-quants.c operation for operation in float32, so the chosen scales and levels are
ggml's bit for bit. The traps of porting C float code to numba, and how this file avoids them:

- numba computes ``float32 op int`` and ``float32 op <Python float>`` in float64: every constant is a
  ``F32``/``f32(...)`` value and every level that enters float math is converted with ``f32`` first.
- ggml divides by zero on purpose (inf scales of all-zero groups that are then discarded): ``error_model="numpy"``
  gives IEEE results instead of exceptions.
- No fastmath: ggml-base is built without -ffast-math, so its loops are sequential and contract nothing.
- ``nearest_int`` is ggml's bit trick, fp16 conversion is IEEE round-to-nearest-even (LLVM's fptrunc), ``roundf``
  rounds half away from zero, and C's ``(int8_t)`` of a float truncates toward zero.

numba's on-disk cache keys each compiled function on its own source file only: a format's kernel compiled
before an edit of this file keeps the old helpers inlined. Delete ``formats/__pycache__`` after editing here
(an installed release changes every file at once, so users never meet a stale kernel).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# one set of compile options for every format's code: cached on disk by numba, threads run without the GIL
kernel = numba.njit(cache=True, nogil=True, error_model="numpy")
# small helpers called in the innermost loops: inlined into their callers by numba itself
inline_kernel = numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")

f32 = np.float32
# a constant passed on to a kernel as i64(16) is typed int64, not Literal[int](16): numba compiles a kernel once
# for each distinct literal it is called with, so constants at call sites would multiply the first-use compile
i64 = np.int64
GROUP_MAX_EPS = f32(1e-15)  # ggml: below this a group counts as all zero
_MAGIC = f32(12582912.0)  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits


@intrinsic
def float_bits(typingctx, value):
    """The int32 whose bits are float32 ``value`` (C's memcpy between float and int)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@kernel
def nearest_int(value):
    """ggml's nearest_int: round half to even through the 1.5·2^23 bit trick (out of range it wraps as in C)."""
    return (float_bits(f32(value + _MAGIC)) & 0x007FFFFF) - 0x00400000


@kernel
def round_half_away(value):
    """C's roundf: the nearest integer, halves away from zero (as a float32)."""
    magnitude = abs(value)
    whole = np.floor(magnitude)
    if magnitude - whole >= f32(0.5):
        whole += f32(1.0)
    return f32(np.copysign(whole, value))


@kernel
def c_float_to_int(value):
    """C's conversion of a float to a 32-bit int as x86 does it (cvttss2si): truncate toward zero; NaN, ±inf and
    values beyond int32 give INT_MIN. Callers that store a byte keep its low 8 bits."""
    if not abs(value) < f32(2147483648.0):
        return -2147483648
    return int(value)


@intrinsic
def _half_bits(typingctx, value):
    """LLVM's fptrunc to half, as bits: IEEE round to nearest even, overflow to inf (vcvtps2ph with F16C)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.zext(builder.bitcast(half, ir.IntType(16)), ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _half_value(typingctx, bits):
    """The float32 value of the half whose bits are the low 16 of int ``bits`` (exact: fpext)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        half = builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(bits), codegen


@kernel
def fp16_bits(value):
    """float32 → IEEE half bits (int): ggml's GGML_FP32_TO_FP16, round to nearest even, overflow to inf; every NaN
    becomes 0x7E00 with its sign, as ggml's portable conversion gives (the hardware's keeps payload bits)."""
    value = f32(value)
    if value != value:
        return (float_bits(value) >> 16) & 0x8000 | 0x7E00
    return _half_bits(value)


@kernel
def fp16_value(bits):
    """IEEE half bits → their float32 value (GGML_FP16_TO_FP32)."""
    return _half_value(bits)


@kernel
def fp16_round(value):
    """``value`` rounded to half precision and back: what ggml reads after storing it as a ggml_half."""
    return _half_value(fp16_bits(value))


@kernel
def first_largest_magnitude(x):
    """ggml's ``if (ax > amax) { amax = ax; max = x[i]; }``: (amax, max), the first of equal magnitudes winning;
    (0, 0) for an all-zero group."""
    amax = f32(0.0)
    signed_max = f32(0.0)
    for i in range(x.shape[0]):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            signed_max = x[i]
    return amax, signed_max


_QX_CANDIDATES = 19  # the first guess and the 18 neighbouring inverse scales of make_qx_quants


@kernel
def make_qx_quants(x, weights, levels, max_level):
    """ggml's make_qx_quants with rmse_type 1 (the only one its quantizers call): symmetric levels
    ``levels[i]`` in [0, 2·max_level) meaning ``l - max_level``, x ≈ scale·(l - max_level), weighted least squares
    over the first guess ``-max_level/max`` and 18 neighbouring inverse scales. ``weights`` are the importance
    (or x² where ggml passes none). Writes ``levels``; returns the scale (0 for an all-zero group).

    Every candidate's two sums run in ggml's order; the candidates share one pass over the values (their sums are
    independent chains, so the CPU overlaps them), then ggml's keep-if-better scan picks among them in its order."""
    n = x.shape[0]
    amax, signed_max = first_largest_magnitude(x)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            levels[i] = 0
        return f32(0.0)
    nmax = f32(max_level)
    iscales = np.empty(_QX_CANDIDATES, dtype=np.float32)
    iscales[0] = f32(-nmax / signed_max)
    for k in range(1, _QX_CANDIDATES):
        step = k - 10 if k <= 9 else k - 9  # -9 … -1, 1 … 9
        iscales[k] = -(nmax + f32(0.1) * f32(step)) / signed_max
    sumlx = np.zeros(_QX_CANDIDATES, dtype=np.float32)
    suml2 = np.zeros(_QX_CANDIDATES, dtype=np.float32)
    for i in range(n):
        wx = weights[i] * x[i]  # ggml's w*x[i]*l is (w*x[i])*l
        for c in range(_QX_CANDIDATES):
            level = f32(max(-max_level, min(max_level - 1, nearest_int(iscales[c] * x[i]))))
            sumlx[c] += wx * level
            suml2[c] += weights[i] * level * level
    scale = sumlx[0] / suml2[0] if suml2[0] != 0 else f32(0.0)
    best = scale * sumlx[0]
    kept = 0
    for c in range(1, _QX_CANDIDATES):
        if suml2[c] > 0 and sumlx[c] * sumlx[c] > best * suml2[c]:
            scale = sumlx[c] / suml2[c]
            best = scale * sumlx[c]
            kept = c
    for i in range(n):  # ggml writes the levels of each better candidate: the last one kept stays
        levels[i] = max_level + max(-max_level, min(max_level - 1, nearest_int(iscales[kept] * x[i])))
    return scale


@kernel
def make_q3_quants(x, levels, max_level):
    """ggml's make_q3_quants with do_rmse (as Q3_K calls it): levels from ``-max_level/max``, then up to 5 passes
    moving one level at a time while the x²-weighted fit improves. Writes ``levels`` in [0, 2·max_level);
    returns the scale."""
    n = x.shape[0]
    amax, signed_max = first_largest_magnitude(x)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            levels[i] = 0
        return f32(0.0)
    iscale = f32(-f32(max_level) / signed_max)
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        level = max(-max_level, min(max_level - 1, nearest_int(iscale * x[i])))
        levels[i] = level
        w = x[i] * x[i]
        sumlx += w * x[i] * f32(level)
        suml2 += w * f32(level) * f32(level)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            current = f32(levels[i])
            slx = sumlx - w * x[i] * current
            if slx > 0:
                sl2 = suml2 - w * current * current
                new_level = max(-max_level, min(max_level - 1, nearest_int(x[i] * sl2 / slx)))
                if new_level != levels[i]:
                    slx += w * x[i] * f32(new_level)
                    sl2 += w * f32(new_level) * f32(new_level)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        levels[i] = new_level
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        levels[i] += max_level
    return sumlx / suml2 if suml2 > 0 else f32(0.0)


LANES = 32  # groups fitted side by side by make_qkx2_quants: LLVM vectorizes a loop this long, not one of 8


@kernel
def make_qkx2_quants(x, weights, group_size, levels, scales, mins, max_level, rmin, rdelta, n_steps, use_mad):
    """ggml's make_qkx2_quants (and make_qkx3_quants, which differs only in weighting by x² where it gets no
    weights: pass them) on every ``group_size`` run of each row of ``x`` ([n_blocks, block_len] float32, with
    ``weights`` alike): ``x ≈ scale·l - the_min`` with l in 0..max_level and the_min >= 0, weighted least
    squares over the first guess and ``n_steps + 1`` inverse scales ``(rmin + rdelta·k + max_level)/(max - min)``,
    keeping the least ``Σ w·|err|`` (use_mad) or ``Σ w·err²``. Writes ``levels`` (like x) and ``scales`` and
    ``mins`` ([n_blocks, block_len // group_size]; mins are ggml's returned the_min).

    The groups are fitted LANES at a time, transposed so that the inner loops run across groups: each group's
    sums still add its weights in ggml's order, so every result is ggml's bit for bit."""
    n_blocks = x.shape[0]
    per_block = x.shape[1] // group_size
    n_groups = n_blocks * per_block
    for start in range(0, n_groups, LANES):
        lanes = min(LANES, n_groups - start)
        xt = np.empty((group_size, lanes), dtype=np.float32)
        wt = np.empty((group_size, lanes), dtype=np.float32)
        lt = np.empty((group_size, lanes), dtype=np.int32)
        scale = np.empty(lanes, dtype=np.float32)
        the_min = np.empty(lanes, dtype=np.float32)
        for k in range(lanes):
            b, j = divmod(start + k, per_block)
            for i in range(group_size):
                xt[i, k] = x[b, group_size * j + i]
                wt[i, k] = weights[b, group_size * j + i]
        _fit_scale_min_lanes(xt, wt, lt, scale, the_min, max_level, rmin, rdelta, n_steps, use_mad)
        for k in range(lanes):
            b, j = divmod(start + k, per_block)
            scales[b, j] = scale[k]
            mins[b, j] = the_min[k]
            for i in range(group_size):
                levels[b, group_size * j + i] = lt[i, k]


@kernel
def _fit_scale_min_lanes(x, w, levels, scale_out, min_out, max_level, rmin, rdelta, n_steps, use_mad):
    """make_qkx2_quants on the columns of ``x`` [n, lanes] at once (every loop runs over the lanes innermost;
    a lane's branches of ggml's code become selects)."""
    n, lanes = x.shape
    nmax = f32(max_level)
    low = x[0].copy()
    high = x[0].copy()
    sum_w = w[0].copy()
    sum_x = w[0] * x[0]
    for i in range(1, n):
        for k in range(lanes):
            v = x[i, k]
            low[k] = v if v < low[k] else low[k]
            high[k] = v if v > high[k] else high[k]
            sum_w[k] += w[i, k]
            sum_x[k] += w[i, k] * v
    iscale = np.empty(lanes, dtype=np.float32)
    scale = np.empty(lanes, dtype=np.float32)
    best_error = np.zeros(lanes, dtype=np.float32)
    for k in range(lanes):
        low[k] = f32(0.0) if low[k] > 0 else low[k]
        iscale[k] = nmax / (high[k] - low[k])
        scale[k] = f32(1.0) / iscale[k]
    for i in range(n):
        for k in range(lanes):
            level = max(0, min(max_level, nearest_int(iscale[k] * (x[i, k] - low[k]))))
            levels[i, k] = level
            diff = scale[k] * f32(level) + low[k] - x[i, k]
            best_error[k] += w[i, k] * (abs(diff) if use_mad else diff * diff)
    best_low = low.copy()
    if n_steps >= 1:
        candidate = np.empty((n, lanes), dtype=np.int32)
        sum_l = np.empty(lanes, dtype=np.float32)
        sum_l2 = np.empty(lanes, dtype=np.float32)
        sum_xl = np.empty(lanes, dtype=np.float32)
        this_scale = np.empty(lanes, dtype=np.float32)
        this_min = np.empty(lanes, dtype=np.float32)
        error = np.empty(lanes, dtype=np.float32)
        better = np.empty(lanes, dtype=np.bool_)
        for step in range(n_steps + 1):
            for k in range(lanes):
                iscale[k] = (rmin + rdelta * f32(step) + nmax) / (high[k] - best_low[k])
                sum_l[k] = f32(0.0)
                sum_l2[k] = f32(0.0)
                sum_xl[k] = f32(0.0)
            for i in range(n):
                for k in range(lanes):
                    level = max(0, min(max_level, nearest_int(iscale[k] * (x[i, k] - best_low[k]))))
                    candidate[i, k] = level
                    fl = f32(level)
                    sum_l[k] += w[i, k] * fl
                    sum_l2[k] += w[i, k] * fl * fl
                    sum_xl[k] += w[i, k] * fl * x[i, k]
            any_fit = False
            for k in range(lanes):
                det = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k]
                fitted_scale = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / det
                fitted_min = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / det
                if fitted_min > 0:
                    fitted_min = f32(0.0)
                    fitted_scale = sum_xl[k] / sum_l2[k]
                this_scale[k] = fitted_scale
                this_min[k] = fitted_min
                better[k] = det > 0
                any_fit |= det > 0
                error[k] = f32(0.0)
            if not any_fit:
                continue
            for i in range(n):
                for k in range(lanes):
                    diff = this_scale[k] * f32(candidate[i, k]) + this_min[k] - x[i, k]
                    error[k] += w[i, k] * (abs(diff) if use_mad else diff * diff)
            for k in range(lanes):
                better[k] = better[k] and error[k] < best_error[k]
                if better[k]:
                    best_error[k] = error[k]
                    scale[k] = this_scale[k]
                    best_low[k] = this_min[k]
            for i in range(n):
                for k in range(lanes):
                    if better[k]:
                        levels[i, k] = candidate[i, k]
    for k in range(lanes):
        if high[k] <= low[k]:  # all one value (>= 0 after the min's clamp): ggml returns before any fit
            scale_out[k] = f32(0.0)
            min_out[k] = -low[k]
            for i in range(n):
                levels[i, k] = 0
        else:
            scale_out[k] = scale[k]
            min_out[k] = -best_low[k]


@kernel
def make_qp_quants(x, weights, levels, max_level):
    """ggml's make_qp_quants: non-negative values (a super-block's sub-block scales or mins) as scale·l,
    l in 0..max_level: the best of 9 inverse scales, then up to 5 passes moving one level at a time.
    Writes ``levels``; returns the scale."""
    n = x.shape[0]
    high = f32(0.0)
    for i in range(n):
        high = max(high, x[i])
    if high < GROUP_MAX_EPS:
        for i in range(n):
            levels[i] = 0
        return f32(0.0)
    nmax = f32(max_level)
    iscale = nmax / high
    scale = f32(1.0) / iscale
    best_mse = f32(0.0)
    for i in range(n):
        levels[i] = nearest_int(iscale * x[i])  # read back as C reads L[i]: a negative x wraps in a uint8 L
        diff = x[i] - scale * f32(levels[i])
        best_mse += weights[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_step = (f32(0.1) * f32(step) + nmax) / high
        scale_step = f32(1.0) / iscale_step
        mse = f32(0.0)
        for i in range(n):
            diff = x[i] - scale_step * f32(min(max_level, nearest_int(iscale_step * x[i])))
            mse += weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_step
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        level = min(max_level, nearest_int(iscale * x[i]))
        levels[i] = level
        sumlx += weights[i] * x[i] * f32(level)
        suml2 += weights[i] * f32(level) * f32(level)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = weights[i]
            current = f32(levels[i])
            slx = sumlx - w * x[i] * current
            sl2 = suml2 - w * current * current
            if slx > 0 and sl2 > 0:
                new_level = min(max_level, nearest_int(x[i] * sl2 / slx))
                if new_level != levels[i]:
                    slx += w * x[i] * f32(new_level)
                    sl2 += w * f32(new_level) * f32(new_level)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        levels[i] = new_level
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else f32(0.0)


@kernel
def sequential_sum_of_squares(x):
    """Σ x² accumulated left to right in float32, from 0, as ggml's loops do."""
    total = f32(0.0)
    for i in range(x.shape[0]):
        total += x[i] * x[i]
    return total


# ---- the low-bit i-quants' codeword searches (IQ1_*, IQ2_*, IQ3_*), over any grid of iq_grids.CodewordGrid ----
# A codeword is ``width`` consecutive entries of a sub-block's arrays, passed as the arrays and its first index
# ``at`` (slices inside these loops would cost a reference count each).

FLT_MAX = f32(3.4028234663852886e38)


@inline_kernel
def nearest_neighbour_codeword(neighbours, start, grid_values, grid_levels, xval, weight, at, scale, levels):
    """ggml's iq2_find_best_neighbour, iq3_find_best_neighbour and iq1_find_best_neighbour2 on any grid: among
    the neighbour list at ``neighbours[start]`` (a count, then codeword indices), the codeword of least
    ``Σ weight·(scale·q - x)²`` (the first of equals) over the codeword at ``at``, where q is the codeword's
    value in ``grid_values`` (float32 [n_grid, width]: 2l + 1 for IQ2/IQ3, IQ1's shifted -1/0/1). Writes its
    level indices ``grid_levels[index]`` into ``levels[at:]``; returns its index."""
    width = grid_values.shape[1]
    best_d2 = FLT_MAX
    best = -1
    for j in range(1, neighbours[start] + 1):
        index = neighbours[start + j]
        d2 = f32(0.0)
        for i in range(width):
            diff = scale * grid_values[index, i] - xval[at + i]
            d2 += weight[at + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            best = index
    best = max(best, 0)  # ggml aborts (or reads out of bounds) where no distance is below FLT_MAX
    for i in range(width):
        levels[at + i] = grid_levels[best, i]
    return best


@inline_kernel
def codeword_of(xval, at, inverse_scale, scale, weight, max_level, bits, index_map, neighbours, grid_values,
                grid_levels, levels):
    """One codeword of the i-quants' searches: each |x| rounded to its level ``nearest_int(0.5·(x/scale - 1))``
    in [0, max_level); the pattern's codeword where it is one, else its best neighbour under ``scale``.
    Writes ``levels[at:]``; returns (codeword index, whether the rounded pattern was on the grid)."""
    pattern = 0
    for i in range(grid_values.shape[1]):
        level = max(0, min(max_level - 1, nearest_int(f32(0.5) * (inverse_scale * xval[at + i] - f32(1.0)))))
        levels[at + i] = level
        pattern |= level << (bits * i)
    index = index_map[pattern]
    if index >= 0:
        return index, True
    index = nearest_neighbour_codeword(neighbours, -index - 1, grid_values, grid_levels, xval, weight, at, scale,
                                       levels)
    return index, False


@inline_kernel
def codeword_fit(xval, weight, levels):
    """(Σ w·x·q, Σ w·q²) of the odd positions q = 2l + 1, summed in ggml's order."""
    sum_qx = f32(0.0)
    sum_q2 = f32(0.0)
    for i in range(xval.shape[0]):
        q = f32(2 * levels[i] + 1)
        sum_qx += weight[i] * xval[i] * q
        sum_q2 += weight[i] * q * q
    return sum_qx, sum_q2


@inline_kernel
def codeword_scale_search(xval, weight, waux, reference, scale, n_steps, step, max_level, bits, index_map,
                          neighbours, grid_values, grid_levels, on_grid_start, recompute_always, recompute_all,
                          levels, trial, on_grid, trial_on_grid):
    """The scale search shared by quantize_row_iq2_xxs/iq2_xs/iq2_s/iq3_xxs/iq3_s_impl on one sub-block of
    magnitudes ``xval``: for each inverse scale ``(2·max_level - 1 + is·step)/reference``, is in
    -n_steps..n_steps, every codeword rounded (``codeword_of``, neighbours weighed by ``waux``), keeping the
    weighted least-squares scale that fits best; then the codewords once more under the kept scale — always or
    only where one kept was off the grid, for every codeword or only those — and the scale refitted.
    ``scale``: the one kept when no candidate fits. Writes ``levels``; returns the scale. ``trial`` (like
    levels), ``on_grid`` and ``trial_on_grid`` (one per codeword): scratch."""
    width = grid_values.shape[1]
    n_codewords = xval.shape[0] // width
    for k in range(n_codewords):
        on_grid[k] = on_grid_start
    best = f32(0.0)
    for s in range(-n_steps, n_steps + 1):
        inverse = (f32(2 * max_level - 1) + f32(s) * step) / reference
        this_scale = f32(1.0) / inverse
        for k in range(n_codewords):
            _, trial_on_grid[k] = codeword_of(xval, width * k, inverse, this_scale, waux, max_level, bits,
                                              index_map, neighbours, grid_values, grid_levels, trial)
        sum_qx, sum_q2 = codeword_fit(xval, weight, trial)
        if sum_q2 > 0 and sum_qx * sum_qx > best * sum_q2:
            scale = sum_qx / sum_q2
            best = scale * sum_qx
            levels[:] = trial
            on_grid[:] = trial_on_grid
    n_off_grid = 0
    for k in range(n_codewords):
        n_off_grid += 0 if on_grid[k] else 1
    if (recompute_always or n_off_grid > 0) and scale > 0:
        inverse = f32(1.0) / scale
        for k in range(n_codewords):
            if recompute_all or not on_grid[k]:
                codeword_of(xval, width * k, inverse, scale, waux, max_level, bits, index_map, neighbours,
                            grid_values, grid_levels, levels)
        sum_qx, sum_q2 = codeword_fit(xval, weight, levels)
        if sum_q2 > 0:
            scale = sum_qx / sum_q2
    return scale
