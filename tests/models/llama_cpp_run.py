"""Running a GGUF through llama.cpp and a HF folder through transformers on the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmquant.calibration import builtin_text

# no leading space: transformers' Metaspace conversion differs from SentencePiece itself there
TEST_TEXT = builtin_text()[5000:5600].strip()
GGML_TYPE_F32 = 0


def load_llama_cpp(gguf_file: Path, n_ctx: int = 512):
    from llmquant.evaluate.llama_runtime import open_llama

    # F32 KV cache: llama.cpp's default F16 cache alone rounds logits by ~1e-2
    return open_llama(gguf_file, n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2,
                 type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)


def hf_tokens(folder: Path, text: str = TEST_TEXT) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text, add_special_tokens=False)["input_ids"]


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])
