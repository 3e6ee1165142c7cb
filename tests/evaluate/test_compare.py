"""compare on three real quants: the figures' order, the report and the plot."""

from __future__ import annotations

import json

from llmquant.evaluate.report import pareto_best
from tests.evaluate.conftest import EVAL_CHUNKS, EVAL_CTX


def test_q8_0_is_closer_to_f32_than_q4_0(compared):
    by_type, _ = compared
    q8, q4_0, q4_1 = by_type["Q8_0"].figures, by_type["Q4_0"].figures, by_type["Q4_1"].figures
    assert q8.kld_mean < q4_0.kld_mean and q8.kld_median < q4_0.kld_median and q8.kld_max < q4_0.kld_max
    assert q8.rms_dp < q4_0.rms_dp
    assert q8.top1_agreement >= q4_0.top1_agreement
    assert abs(q8.ln_ppl_ratio) < abs(q4_0.ln_ppl_ratio)
    # the same reference tokens for every file
    assert q8.ppl_base == q4_0.ppl_base == q4_1.ppl_base
    assert q8.n_tokens == EVAL_CHUNKS * (EVAL_CTX - 1 - EVAL_CTX // 2)


def test_shipped_q4_1_is_closer_than_the_q4_0_made_from_it(compared):
    """The F32 fixture is the shipped Q4_1 dequantized: Q4_1 holds its weights exactly (only llama.cpp's
    activation quantization separates them), while Q4_0 re-quantizes them."""
    by_type, _ = compared
    q4_0, q4_1 = by_type["Q4_0"].figures, by_type["Q4_1"].figures
    assert q4_1.kld_mean < q4_0.kld_mean and q4_1.rms_dp < q4_0.rms_dp


def test_report_json_holds_size_bits_and_every_figure(compared):
    by_type, written = compared
    report = json.loads(written["json"].read_text())
    assert report["n_ctx"] == EVAL_CTX and report["n_chunks"] == EVAL_CHUNKS
    rows = {m["file_type"]: m for m in report["models"]}
    assert set(rows) == {"Q8_0", "Q4_0", "Q4_1"}
    for name, row in rows.items():
        result = by_type[name]
        assert row["size_bytes"] == result.size_bytes > 0
        assert row["bits_per_weight"] == result.bits_per_weight
        for key in ("ppl", "ppl_err", "ppl_ratio", "kld_mean", "kld_mean_err", "kld_median", "kld_p99", "kld_p999",
                    "kld_max", "top1_agreement", "rms_dp"):
            assert row[key] == getattr(result.figures, key)
    assert rows["Q8_0"]["bits_per_weight"] > rows["Q4_1"]["bits_per_weight"] > rows["Q4_0"]["bits_per_weight"]
    expected = pareto_best([(m["size_bytes"], m["kld_mean"]) for m in report["models"]])
    assert [m["pareto_best"] for m in report["models"]] == expected


def test_report_markdown_lists_every_file_and_points_at_the_plot(compared):
    by_type, written = compared
    text = written["markdown"].read_text()
    for result in by_type.values():
        assert f"| {result.model.rsplit('/', 1)[-1]} | {result.file_type} |" in text
    assert "![size against KLD](frontier.png)" in text
    png = written["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_pareto_best_marks_the_undominated():
    # (size, KLD): the middle point is beaten on both by none; the last is larger and worse than the second
    assert pareto_best([(1, 0.5), (2, 0.1), (3, 0.2), (2, 0.1)]) == [True, True, False, True]
