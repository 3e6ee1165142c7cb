"""The two logits producers against each other on the real SmolLM2 files."""

from __future__ import annotations

import numpy as np
import torch

from llmquant.evaluate.backends import unpermute_qk
from llmquant.evaluate.reference import ReferenceLogits
from llmquant.pipeline.evaluate import evaluate_against, reference_logits
from tests.evaluate.conftest import EVAL_CHUNKS, EVAL_CTX


def _llama_cpp_permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, as the converter applies it to q and k."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def test_unpermute_undoes_the_converters_permutation():
    weights = torch.randn(3 * 64, 40)
    for n_head in (1, 3):
        torch.testing.assert_close(unpermute_qk(_llama_cpp_permute(weights, n_head), n_head), weights,
                                   rtol=0, atol=0)


def test_torch_backend_on_the_shipped_q4_1_reproduces_llama_cpp_on_its_f32_file(f32_reference, smollm2_gguf):
    """The F32 fixture is the Q4_1 file dequantized by gguf-py and run by llama.cpp in F32 (F16 KV cache only).

    Our Q4_1 decoding, the GGUF-to-HF renaming and the q/k un-permutation must give back the same model.
    """
    result = evaluate_against(str(smollm2_gguf), ReferenceLogits(f32_reference), backend="torch")
    f = result.figures
    assert result.file_type == "Q4_1"
    assert f.kld_mean < 1e-4 and f.kld_max < 1e-3 and f.top1_agreement == 1.0
    assert abs(f.ln_ppl_ratio) < 1e-3


def test_torch_and_llama_cpp_agree_on_q8_0_within_activation_quantization(tmp_path, eval_text, compared,
                                                                           smollm2_q8_0_gguf):
    """llama.cpp's CPU kernels quantize activations to Q8_0 for Q8_0 weights; our torch backend does not.

    So the two runs of the same Q8_0 file differ by that activation noise alone, which is part of (and so
    smaller than) what llama.cpp's Q8_0 run differs from F32 by: weight plus activation quantization.
    """
    with reference_logits(str(smollm2_q8_0_gguf), [str(eval_text)], EVAL_CTX, EVAL_CHUNKS,
                          backend="llama.cpp") as llama_q8:
        torch_vs_llama = evaluate_against(str(smollm2_q8_0_gguf), llama_q8, backend="torch").figures
    llama_vs_f32 = compared[0]["Q8_0"].figures
    assert torch_vs_llama.n_tokens == llama_vs_f32.n_tokens == EVAL_CHUNKS * (EVAL_CTX - 1 - EVAL_CTX // 2)
    assert torch_vs_llama.kld_mean < llama_vs_f32.kld_mean
    assert torch_vs_llama.top1_agreement >= llama_vs_f32.top1_agreement - 0.02
    # perplexities within the ratio's own error bar of each other
    assert abs(np.log(torch_vs_llama.ppl_ratio)) < 3 * torch_vs_llama.ln_ppl_ratio_err
