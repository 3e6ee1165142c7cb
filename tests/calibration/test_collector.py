"""The collector against an independent computation: capture inputs in a plain forward, square and sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmquant.calibration.chunking import make_chunks
from llmquant.calibration.collector import ImatrixCollector
from llmquant.pipeline.imatrix import compute_imatrix

LLAMA_SUFFIXES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                  "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                  "mlp.down_proj": "ffn_down"}


def _random_chunks(vocab_size: int, n_chunks: int, n_ctx: int, bos_id: int | None = None, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (n_chunks * n_ctx + 7,), generator=generator).tolist()
    return make_chunks(tokens, n_ctx, bos_id=bos_id)


def _capture_inputs(model: torch.nn.Module, module_names: list[str], input_ids: torch.Tensor) -> dict:
    """Inputs of the named modules during one plain forward, kept whole (float64 on the host)."""
    captured: dict[str, list[np.ndarray]] = {name: [] for name in module_names}
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_pre_hook(
            lambda mod, args, name=name: captured[name].append(args[0].detach().double().numpy().copy()))
        for name in module_names
    ]
    try:
        with torch.no_grad():
            model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_hf):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_hf, dtype=torch.float32).eval()


def test_dense_sums_equal_squared_inputs_of_a_plain_forward(tiny_llama):
    chunks = _random_chunks(tiny_llama.config.vocab_size, n_chunks=3, n_ctx=32, bos_id=tiny_llama.config.bos_token_id)
    run = compute_imatrix(tiny_llama, chunks, ["random"], batch_size=2)

    n_layers = tiny_llama.config.num_hidden_layers
    names = [f"model.layers.{i}.{suffix}" for i in range(n_layers) for suffix in LLAMA_SUFFIXES]
    captured = _capture_inputs(tiny_llama, names, chunks.token_ids)
    assert set(run.data.entries) == {f"blk.{i}.{g}.weight" for i in range(n_layers) for g in LLAMA_SUFFIXES.values()}
    for name in names:
        layer, suffix = name.split(".")[2], name.split(".", 3)[3]
        entry = run.data.entries[f"blk.{layer}.{LLAMA_SUFFIXES[suffix]}.weight"]
        inputs = np.concatenate([x.reshape(-1, x.shape[-1]) for x in captured[name]])
        np.testing.assert_allclose(entry.sums[0], (inputs ** 2).sum(axis=0), rtol=2e-5, atol=1e-6)
        assert entry.counts.tolist() == [chunks.n_chunks * chunks.n_ctx]


def test_batching_chunks_does_not_change_the_sums(tiny_llama):
    chunks = _random_chunks(tiny_llama.config.vocab_size, n_chunks=4, n_ctx=32)
    one = compute_imatrix(tiny_llama, chunks, ["random"], batch_size=1)
    four = compute_imatrix(tiny_llama, chunks, ["random"], batch_size=4)
    for name, entry in one.data.entries.items():
        np.testing.assert_allclose(four.data.entries[name].sums, entry.sums, rtol=1e-4)
        assert four.data.entries[name].counts.tolist() == entry.counts.tolist()
    assert four.perplexity == pytest.approx(one.perplexity, rel=1e-4)


def test_perplexity_scores_the_second_half_of_each_chunk(tiny_llama):
    chunks = _random_chunks(tiny_llama.config.vocab_size, n_chunks=2, n_ctx=32)
    run = compute_imatrix(tiny_llama, chunks, ["random"])
    with torch.no_grad():
        logits = tiny_llama(input_ids=chunks.token_ids, use_cache=False).logits.double()
    first = chunks.n_ctx // 2  # imatrix.cpp: "const int first = n_ctx/2"
    log_probs = torch.log_softmax(logits[:, first:-1], dim=-1)
    nll = -log_probs.gather(-1, chunks.targets[:, first + 1:, None]).mean()
    assert run.perplexity == pytest.approx(float(torch.exp(nll)), rel=1e-5)


def test_detach_restores_the_model(tiny_moe):
    input_ids = torch.arange(40).reshape(2, 20) % tiny_moe.config.vocab_size
    with torch.no_grad():
        before = tiny_moe(input_ids=input_ids, use_cache=False).logits
        with ImatrixCollector(tiny_moe) as collector:
            during = tiny_moe(input_ids=input_ids, use_cache=False).logits
        after = tiny_moe(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-5)  # our expert loop computes what theirs does
    assert collector.stats and not collector._handles and not collector._patched
    assert torch.equal(after, before)


def test_moe_experts_count_only_their_routed_tokens(tiny_moe):
    config = tiny_moe.config
    chunks = _random_chunks(config.vocab_size, n_chunks=2, n_ctx=48)
    run = compute_imatrix(tiny_moe, chunks, ["random"], batch_size=2)

    blocks = [f"model.layers.{i}.mlp" for i in range(config.num_hidden_layers)]
    captured = _capture_inputs(tiny_moe, blocks, chunks.token_ids)
    modules = dict(tiny_moe.named_modules())
    for layer, block in enumerate(blocks):
        x = torch.from_numpy(np.concatenate([c.reshape(-1, c.shape[-1]) for c in captured[block]]))
        router = modules[f"{block}.gate"]
        experts = modules[f"{block}.experts"]
        # routing recomputed from the router's weight: softmax then top-k, as both model families do
        probs = torch.softmax(x @ router.weight.detach().double().T, dim=-1)
        chosen = torch.topk(probs, config.num_experts_per_tok).indices
        n_experts = experts.gate_up_proj.shape[0]
        expected_counts = torch.bincount(chosen.flatten(), minlength=n_experts)

        gate = run.data.entries[f"blk.{layer}.ffn_gate_exps.weight"]
        up = run.data.entries[f"blk.{layer}.ffn_up_exps.weight"]
        down = run.data.entries[f"blk.{layer}.ffn_down_exps.weight"]
        router_entry = run.data.entries[f"blk.{layer}.ffn_gate_inp.weight"]
        assert gate.sums.shape == (n_experts, config.hidden_size)
        assert down.sums.shape == (n_experts, experts.down_proj.shape[2])
        for entry in (gate, up, down):
            assert entry.counts.tolist() == expected_counts.tolist()
        assert expected_counts.sum() == config.num_experts_per_tok * x.shape[0]
        assert router_entry.counts.tolist() == [x.shape[0]]  # the router is a plain matmul over every token
        np.testing.assert_allclose(router_entry.sums[0], (x ** 2).sum(0).numpy(), rtol=2e-5)

        w_gate_up = experts.gate_up_proj.detach().double()
        w_down_cols = experts.down_proj.shape[2]
        for expert in range(n_experts):
            routed = x[(chosen == expert).any(dim=-1)]
            np.testing.assert_allclose(gate.sums[expert], (routed ** 2).sum(0).numpy(), rtol=2e-5, atol=1e-6)
            np.testing.assert_allclose(up.sums[expert], gate.sums[expert])
            g, u = (routed @ w_gate_up[expert].T).split(w_down_cols, dim=-1)
            inner = F.silu(g) * u
            np.testing.assert_allclose(down.sums[expert], (inner ** 2).sum(0).numpy(), rtol=1e-4, atol=1e-7)


def test_output_projection_is_collected_only_when_asked_and_untied(tiny_llama):
    chunks = _random_chunks(tiny_llama.config.vocab_size, n_chunks=1, n_ctx=32)
    assert "output.weight" not in compute_imatrix(tiny_llama, chunks, ["r"]).data.entries
    with_output = compute_imatrix(tiny_llama, chunks, ["r"], process_output=True).data.entries["output.weight"]
    assert with_output.counts.tolist() == [32] and with_output.n_cols == tiny_llama.config.hidden_size
    tiny_llama.config.tie_word_embeddings = True  # llama.cpp then multiplies by token_embd, which it never collects
    try:
        assert "output.weight" not in compute_imatrix(tiny_llama, chunks, ["r"], process_output=True).data.entries
    finally:
        tiny_llama.config.tie_word_embeddings = False
