"""eval end to end: the torch backend against transformers, a model against itself, the command line."""

from __future__ import annotations

import json
import math

import torch
from click.testing import CliRunner

from llmquant.calibration.builtin import builtin_text
from llmquant.cli import cli
from llmquant.evaluate.chunks import first_scored
from llmquant.pipeline.evaluate import evaluate_against, reference_logits

CTX = 128
CHUNKS = 2


def _text_file(tmp_path, n_chars: int = 3000):
    path = tmp_path / "text.txt"
    path.write_text(builtin_text()[:n_chars], encoding="utf-8")
    return path


def test_unquantized_model_against_itself_in_torch_matches_transformers(tmp_path, smollm2_hf):
    from transformers import AutoModelForCausalLM

    with reference_logits(str(smollm2_hf), [str(_text_file(tmp_path))], CTX, CHUNKS, backend="torch") as ref:
        result = evaluate_against(str(smollm2_hf), ref, backend="torch")
        tokens = torch.from_numpy(ref.tokens.astype("int64"))
    f = result.figures
    # a model against itself: nothing lost (the reference file's 2.4e-4-nat steps are all that remains)
    assert abs(f.kld_mean) < 1e-5 and f.kld_max < 1e-4
    assert f.top1_agreement == 1.0 and f.rms_dp < 1e-4
    # PPL by hand with transformers on the same chunks: positions n_ctx/2 … n_ctx-2 predict the next token
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_hf), dtype=torch.float32).eval()
    first = first_scored(CTX)
    with torch.inference_mode():
        logits = model(input_ids=tokens).logits[:, first:-1].double()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, first + 1:].reshape(-1))
    assert f.n_tokens == CHUNKS * (CTX - 1 - first)
    assert math.isclose(f.ppl, math.exp(float(nll)), rel_tol=1e-4)
    assert math.isclose(f.ppl_base, f.ppl, rel_tol=1e-3)


def test_eval_command_prints_the_figures_as_json_and_reuses_a_saved_reference(tmp_path, smollm2_f32_gguf,
                                                                             smollm2_q8_0_gguf):
    text = _text_file(tmp_path)
    saved = tmp_path / "f32.logits"
    runner = CliRunner()
    args = [str(smollm2_q8_0_gguf), "-f", str(text), "--ctx", str(CTX), "--chunks", "1", "--json"]
    first = runner.invoke(cli, ["eval", *args, "--reference", str(smollm2_f32_gguf), "--save-reference", str(saved)])
    assert first.exit_code == 0, first.output
    figures = json.loads(first.stdout)
    for key in ("ppl", "ppl_err", "ppl_ratio", "kld_mean", "kld_mean_err", "kld_median", "kld_p99", "kld_p999",
                "kld_max", "top1_agreement", "rms_dp"):
        assert isinstance(figures[key], float), key
    assert figures["n_tokens"] == CTX - 1 - CTX // 2 and figures["file_type"] == "Q8_0"
    assert 0 < figures["kld_mean"] < 0.05 and figures["top1_agreement"] > 0.8
    again = runner.invoke(cli, ["eval", str(smollm2_q8_0_gguf), "--reference", str(saved), "--json"])
    assert again.exit_code == 0, again.output
    reused = json.loads(again.stdout)
    for key in ("ppl", "ppl_base", "kld_mean", "kld_max", "top1_agreement", "rms_dp"):
        assert reused[key] == figures[key], key


def test_eval_command_says_how_many_tokens_a_short_text_has(tmp_path, smollm2_f32_gguf):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.", encoding="utf-8")
    result = CliRunner().invoke(cli, ["eval", str(smollm2_f32_gguf), "--reference", str(smollm2_f32_gguf),
                                      "-f", str(text), "--ctx", "128"])
    from llmquant.evaluate.backends import LlamaCppBackend

    n_tokens = len(LlamaCppBackend(smollm2_f32_gguf, 128).tokenize(text.read_text()))
    assert result.exit_code == 1
    assert f"tokenizes to only {n_tokens} tokens; --ctx 128 needs at least 256" in result.output


def test_saved_reference_with_another_ctx_is_refused(tmp_path, smollm2_f32_gguf):
    import numpy as np

    from llmquant.evaluate.reference import ReferenceWriter

    writer = ReferenceWriter(tmp_path / "ref.logits", np.zeros((1, 16), dtype=np.int32), 49152)
    writer.add_chunk(torch.zeros(7, 49152))
    writer.close()
    result = CliRunner().invoke(cli, ["eval", str(smollm2_f32_gguf), "--reference", str(tmp_path / "ref.logits"),
                                      "--ctx", "128"])
    assert result.exit_code == 1 and "computed with --ctx 16" in result.output
