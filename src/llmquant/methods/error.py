"""The error every method minimises and reports: a linear's output error on its calibration inputs."""

from __future__ import annotations

import torch

_ROWS_AT_A_TIME = 256


def output_error(weight: torch.Tensor, rounded: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) with ΔW = rounded − weight (both ``[out, in]``): with H = XᵀX ``[in, in]`` it is ‖ΔW Xᵀ‖², the
    squared change of the linear's outputs over the inputs X, one [in, in] product instead of one per token."""
    total = 0.0
    for start in range(0, weight.shape[0], _ROWS_AT_A_TIME):  # a band of rows: float64 temporaries stay small
        stop = start + _ROWS_AT_A_TIME
        delta = (rounded[start:stop] - weight[start:stop]).to(H.device, torch.float64)
        total += float(((delta @ H) * delta).sum())
    return total

