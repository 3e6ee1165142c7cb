"""Evaluation fixtures: a short text, the F32 model's reference logits, and quants scored against them.

Small on purpose (ctx 128, 2 chunks: 126 scored tokens) so the whole suite runs in a few minutes on one core;
each model run is made once per session and shared by the tests that read its figures.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmquant.calibration.builtin import builtin_text

EVAL_CTX = 128
EVAL_CHUNKS = 2


@pytest.fixture(scope="session")
def eval_text(tmp_path_factory) -> Path:
    """The start of the built-in text: about 700 tokens, five chunks of 128."""
    path = tmp_path_factory.mktemp("eval") / "text.txt"
    path.write_text(builtin_text()[:3000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def f32_reference(tmp_path_factory, smollm2_f32_gguf: Path, eval_text: Path) -> Path:
    """The F32 model's log-probs from llama.cpp, saved as llama-perplexity's kld-base file."""
    from llmquant.pipeline.evaluate import reference_logits

    target = tmp_path_factory.mktemp("reference") / "f32.logits"
    with reference_logits(str(smollm2_f32_gguf), [str(eval_text)], EVAL_CTX, EVAL_CHUNKS, backend="llama.cpp",
                          save_to=target):
        pass
    return target


@pytest.fixture(scope="session")
def compared(tmp_path_factory, f32_reference: Path, smollm2_q8_0_gguf: Path, smollm2_q4_0_gguf: Path,
             smollm2_gguf: Path):
    """``compare`` of Q8_0, Q4_0 and the shipped Q4_1 against the F32 reference, through llama.cpp."""
    from llmquant.pipeline.evaluate import compare_models

    out = tmp_path_factory.mktemp("report")
    results, written = compare_models([str(smollm2_q8_0_gguf), str(smollm2_q4_0_gguf), str(smollm2_gguf)],
                                      str(f32_reference), out, backend="llama.cpp")
    by_type = {r.file_type: r for r in results}
    return by_type, written
