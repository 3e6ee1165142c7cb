"""open_llama: every llama.cpp model in llmquant is loaded through it, so it must decode on this CPU."""

from __future__ import annotations

import numpy as np

from llmquant.evaluate.llama_runtime import cpu_has_amx, open_llama


def test_open_llama_decodes_and_turns_extra_buffers_off_only_on_amx_cpus(smollm2_q4_0_gguf):
    # Q4_0 is a type ggml's AMX path takes: on an AMX CPU with extra buffers on, this decode can fault
    llm = open_llama(smollm2_q4_0_gguf, n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    assert llm.model_params.use_extra_bufts is (not cpu_has_amx())
    llm.eval(llm.tokenize(b"The capital of France is"))
    assert np.isfinite(np.array(llm.scores[: llm.n_tokens])).all()
    # the default is restored for anyone else who creates a Llama
    import llama_cpp

    assert llama_cpp.llama_model_default_params().use_extra_bufts
