"""The figures against direct numpy computations of their definitions (llama.cpp's perplexity.cpp)."""

from __future__ import annotations

import math

import numpy as np
import torch

from llmquant.evaluate.metrics import KLD_LOG_PROB_FLOOR, TokenScores, figures, percentile, score_tokens


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _random_case(seed: int = 0, n: int = 200, vocab: int = 50):
    rng = np.random.default_rng(seed)
    base_logits = rng.normal(scale=3.0, size=(n, vocab))
    model_logits = base_logits + rng.normal(scale=0.3, size=(n, vocab))
    targets = rng.integers(0, vocab, size=n)
    return model_logits, _log_softmax(base_logits), targets


def test_token_scores_match_numpy_definitions():
    model_logits, base_log_probs, targets = _random_case()
    scores = score_tokens(torch.from_numpy(model_logits), torch.from_numpy(base_log_probs),
                          torch.from_numpy(targets))
    log_q = _log_softmax(model_logits)
    rows = np.arange(len(targets))
    p = np.exp(base_log_probs)
    np.testing.assert_allclose(scores.nll, -log_q[rows, targets], rtol=1e-12)
    np.testing.assert_allclose(scores.nll_base, -base_log_probs[rows, targets], rtol=1e-12)
    terms = np.where(base_log_probs > -16.0, p * (base_log_probs - log_q), 0.0)  # perplexity.cpp's cut-off
    np.testing.assert_allclose(scores.kld, terms.sum(axis=1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(scores.p_diff, np.exp(log_q[rows, targets]) - p[rows, targets], atol=1e-12)
    np.testing.assert_array_equal(scores.same_top, model_logits.argmax(1) == base_log_probs.argmax(1))


def test_kld_leaves_out_reference_probabilities_below_e_to_the_minus_16():
    base = np.log(np.array([[0.7, 0.3 - 1e-8, 1e-8]]))  # the last one is below e^-16 (1.1e-7)
    model = np.log(np.array([[0.5, 0.25, 0.25]]))
    scores = score_tokens(torch.from_numpy(model), torch.from_numpy(base), torch.tensor([0]))
    counted = base[0] > KLD_LOG_PROB_FLOOR
    expected = (np.exp(base[0]) * (base[0] - model[0]))[counted].sum()
    assert counted.tolist() == [True, True, False]
    assert math.isclose(float(scores.kld[0]), expected, rel_tol=1e-12)


def test_identical_distributions_have_zero_kld_and_full_agreement():
    _, base_log_probs, targets = _random_case(seed=1)
    scores = score_tokens(torch.from_numpy(base_log_probs + 5.0), torch.from_numpy(base_log_probs),
                          torch.from_numpy(targets))
    f = figures(scores)
    assert abs(f.kld_mean) < 1e-12 and f.kld_max < 1e-12
    assert f.top1_agreement == 1.0 and f.rms_dp < 1e-12
    assert math.isclose(f.ppl, f.ppl_base, rel_tol=1e-12) and math.isclose(f.ppl_ratio, 1.0, rel_tol=1e-12)


def test_figures_match_numpy_statistics():
    model_logits, base_log_probs, targets = _random_case(seed=2)
    scores = score_tokens(torch.from_numpy(model_logits), torch.from_numpy(base_log_probs),
                          torch.from_numpy(targets))
    f = figures(scores)
    n = len(targets)
    sem = lambda v: np.std(v) / math.sqrt(n - 1)  # noqa: E731  (perplexity.cpp: sqrt(var/(n-1)), var over n)
    assert f.n_tokens == n
    assert math.isclose(f.ppl, math.exp(scores.nll.mean()), rel_tol=1e-12)
    assert math.isclose(f.ppl_err, f.ppl * sem(scores.nll), rel_tol=1e-9)
    assert math.isclose(f.ppl_base, math.exp(scores.nll_base.mean()), rel_tol=1e-12)
    diff = scores.nll - scores.nll_base  # the ratio's error is the standard error of the paired difference
    assert math.isclose(f.ln_ppl_ratio, diff.mean(), rel_tol=1e-9)
    assert math.isclose(f.ln_ppl_ratio_err, sem(diff), rel_tol=1e-6)
    assert math.isclose(f.ppl_ratio, math.exp(diff.mean()), rel_tol=1e-9)
    assert math.isclose(f.kld_mean, scores.kld.mean(), rel_tol=1e-12)
    assert math.isclose(f.kld_mean_err, sem(scores.kld), rel_tol=1e-9)
    kld32 = scores.kld.astype(np.float32)
    assert math.isclose(f.kld_median, float(np.median(kld32)), rel_tol=1e-6)
    assert math.isclose(f.kld_p99, float(np.percentile(kld32, 99.0)), rel_tol=1e-5)
    assert math.isclose(f.kld_p999, float(np.percentile(kld32, 99.9)), rel_tol=1e-5)
    assert math.isclose(f.kld_max, float(kld32.max()), rel_tol=1e-7)
    top = np.mean(model_logits.argmax(1) == base_log_probs.argmax(1))
    assert math.isclose(f.top1_agreement, top, rel_tol=1e-12)
    assert math.isclose(f.top1_agreement_err, math.sqrt(top * (1 - top) / (n - 1)), rel_tol=1e-12)
    assert math.isclose(f.rms_dp, math.sqrt(np.mean(scores.p_diff ** 2)), rel_tol=1e-9)
    assert math.isclose(f.rms_dp_err, 0.5 / f.rms_dp * sem(scores.p_diff ** 2), rel_tol=1e-6)


def test_no_error_bars_on_ten_tokens_or_fewer():
    model_logits, base_log_probs, targets = _random_case(seed=3, n=10)
    f = figures(score_tokens(torch.from_numpy(model_logits), torch.from_numpy(base_log_probs),
                             torch.from_numpy(targets)))
    assert f.ppl_err == 0.0 and f.kld_mean_err == 0.0 and f.ln_ppl_ratio_err == 0.0


def test_percentile_interpolates_as_numpy_linear():
    values = np.sort(np.random.default_rng(4).exponential(size=997))
    for fraction in (0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0):
        assert math.isclose(percentile(values, fraction), float(np.percentile(values, 100 * fraction)),
                            rel_tol=1e-9)


def test_scores_concatenate_in_order():
    model_logits, base_log_probs, targets = _random_case(seed=5, n=20)
    whole = score_tokens(torch.from_numpy(model_logits), torch.from_numpy(base_log_probs), torch.from_numpy(targets))
    parts = [score_tokens(torch.from_numpy(model_logits[s]), torch.from_numpy(base_log_probs[s]),
                          torch.from_numpy(targets[s])) for s in (slice(0, 7), slice(7, 20))]
    joined = TokenScores.concat(parts)
    np.testing.assert_array_equal(joined.kld, whole.kld)
    np.testing.assert_array_equal(joined.same_top, whole.same_top)
