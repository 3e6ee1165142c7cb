"""The error every method minimises and reports: a linear's output error on its calibration inputs."""

from __future__ import annotations

import torch


def output_error(weight: torch.Tensor, rounded: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) with ΔW = rounded − weight (both ``[out, in]``): with H = XᵀX ``[in, in]`` it is ‖ΔW Xᵀ‖², the
    squared change of the linear's outputs over the inputs X, one [in, in] product instead of one per token."""
    delta = (rounded - weight).to(H.device, torch.float64)
    return float(((delta @ H) * delta).sum())
