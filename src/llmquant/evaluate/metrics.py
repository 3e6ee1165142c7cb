"""What a quant costs, token by token and in total, with llama-perplexity --kl-divergence's definitions.

Pure math over logits and log-probabilities; the definitions follow llama.cpp's tools/perplexity/perplexity.cpp
(``log_softmax(..., kl_divergence_result &)`` per token, ``kl_divergence()`` for the totals and their ± errors).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

# perplexity.cpp: only reference probabilities above e^-16 enter the KL sum (the stored log-probs span 16 nats)
KLD_LOG_PROB_FLOOR = -16.0


@dataclass(frozen=True)
class TokenScores:
    """Per scored token: negative log-likelihoods, KL(reference ‖ model), Δp and whether the top tokens agree."""

    nll: np.ndarray  # float64 [n]: -log q(target)
    nll_base: np.ndarray  # float64 [n]: -log p(target), p the reference
    kld: np.ndarray  # float64 [n]: sum_i p_i (log p_i - log q_i) over p_i > e^-16
    p_diff: np.ndarray  # float64 [n]: q(target) - p(target)
    same_top: np.ndarray  # bool [n]: argmax q == argmax p

    @staticmethod
    def concat(parts: list[TokenScores]) -> TokenScores:
        return TokenScores(*(np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS))

    def __len__(self) -> int:
        return int(self.nll.shape[0])


_FIELDS = ("nll", "nll_base", "kld", "p_diff", "same_top")


def score_tokens(logits: torch.Tensor, base_log_probs: torch.Tensor, targets: torch.Tensor) -> TokenScores:
    """Score the model's ``logits`` [n, vocab] against the reference's ``base_log_probs`` [n, vocab].

    ``targets`` [n] is the token each position predicts. Float64 throughout, as llama.cpp sums in double.
    """
    if logits.shape != base_log_probs.shape:
        raise ValueError(f"model logits {tuple(logits.shape)} and reference log-probs "
                         f"{tuple(base_log_probs.shape)} differ in shape")
    log_q = torch.log_softmax(logits.to(torch.float64), dim=-1)
    log_p = base_log_probs.to(torch.float64)
    targets = targets.to(torch.int64).reshape(-1, 1).to(log_q.device)
    nll = -log_q.gather(1, targets).squeeze(1)
    nll_base = -log_p.gather(1, targets).squeeze(1)
    counted = log_p > KLD_LOG_PROB_FLOOR
    kld = torch.where(counted, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p)).sum(dim=1)
    # torch.argmax returns the first of equal maxima, as llama.cpp's strict '>' scan does
    same_top = logits.argmax(dim=1).to(log_q.device) == base_log_probs.argmax(dim=1).to(log_q.device)
    p_diff = (-nll).exp() - (-nll_base).exp()
    return TokenScores(*(t.cpu().numpy() for t in (nll, nll_base, kld, p_diff, same_top)))


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error, as perplexity.cpp's mean_and_uncertainty (no error below 11 values)."""
    count = len(values)
    if count < 1:
        return 0.0, 0.0
    mean = float(np.sum(values) / count)
    variance = float(np.sum(np.square(values)) / count) - mean * mean
    error = math.sqrt(variance / (count - 1)) if variance > 0 and count > 10 else 0.0
    return mean, error


def covariance(a: np.ndarray, b: np.ndarray) -> float:
    """Covariance of the two means, as perplexity.cpp's covariance (0 below 10 values)."""
    count = len(a)
    if count < 10:
        return 0.0
    return float((np.sum(a * b) / count - (np.sum(a) / count) * (np.sum(b) / count)) / (count - 1))


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's percentile: linear interpolation at fraction * (n - 1) of the sorted values."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    position = fraction * (len(sorted_values) - 1)
    index = int(position)
    weight = position - index
    upper = sorted_values[min(index + 1, len(sorted_values) - 1)]
    return float((1 - weight) * sorted_values[index] + weight * upper)


@dataclass(frozen=True)
class Figures:
    """The totals llama-perplexity --kl-divergence prints, under the keys ``--json`` shows."""

    n_tokens: int
    ppl: float
    ppl_err: float
    ppl_base: float
    ppl_base_err: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float
    ppl_ratio: float
    ppl_ratio_err: float
    kld_mean: float
    kld_mean_err: float
    kld_median: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    top1_agreement: float  # fraction of tokens, llama.cpp's "Same top p"
    top1_agreement_err: float
    rms_dp: float  # fraction, llama.cpp's "RMS Δp" (printed there in %)
    rms_dp_err: float

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def figures(scores: TokenScores) -> Figures:
    """The totals over all scored tokens, with perplexity.cpp's formulas for the values and their ± errors."""
    count = len(scores)
    if count == 0:
        raise ValueError("no scored tokens")
    log_ppl, log_ppl_err = mean_and_uncertainty(scores.nll)
    log_ppl_base, log_ppl_base_err = mean_and_uncertainty(scores.nll_base)
    log_ppl_cov = covariance(scores.nll, scores.nll_base)
    ln_ratio = log_ppl - log_ppl_base
    # the two perplexities are measured on the same tokens, so their correlation shrinks the ratio's error
    ln_ratio_err = math.sqrt(max(log_ppl_err ** 2 + log_ppl_base_err ** 2 - 2.0 * log_ppl_cov, 0.0))
    kld_mean, kld_err = mean_and_uncertainty(scores.kld)
    kld_sorted = np.sort(scores.kld.astype(np.float32))  # llama.cpp keeps the per-token KLDs as float
    mse_dp, mse_dp_err = mean_and_uncertainty(np.square(scores.p_diff))
    rms_dp = math.sqrt(mse_dp)
    same_top = float(np.count_nonzero(scores.same_top)) / count
    return Figures(
        n_tokens=count,
        ppl=math.exp(log_ppl),
        ppl_err=math.exp(log_ppl) * log_ppl_err,
        ppl_base=math.exp(log_ppl_base),
        ppl_base_err=math.exp(log_ppl_base) * log_ppl_base_err,
        ln_ppl_ratio=ln_ratio,
        ln_ppl_ratio_err=ln_ratio_err,
        ppl_ratio=math.exp(ln_ratio),
        ppl_ratio_err=math.exp(ln_ratio) * ln_ratio_err,
        kld_mean=kld_mean,
        kld_mean_err=kld_err,
        kld_median=float(np.median(kld_sorted)),
        kld_p99=percentile(kld_sorted, 0.99),
        kld_p999=percentile(kld_sorted, 0.999),
        kld_max=float(kld_sorted[-1]),
        top1_agreement=same_top,
        top1_agreement_err=math.sqrt(same_top * (1 - same_top) / (count - 1)) if count > 1 else 0.0,
        rms_dp=rms_dp,
        rms_dp_err=0.5 / rms_dp * mse_dp_err if rms_dp > 0 else 0.0,
    )


__all__ = ["KLD_LOG_PROB_FLOOR", "Figures", "TokenScores", "covariance", "figures", "mean_and_uncertainty",
           "percentile", "score_tokens"]
