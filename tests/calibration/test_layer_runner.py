"""The layer-by-layer runner sees, layer by layer, exactly what the whole model's forward feeds each linear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import llmquant.calibration.layer_runner as layer_runner
from llmquant.calibration.layer_runner import LayerInputs, run_layer_by_layer
from tests.models.tiny_models import build_tiny

# every architecture we convert; in the MoE ones each expert's projections are linears of their own
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3-moe"]


@pytest.fixture(scope="module", params=ARCHS)
def arch_folder(request, test_cache: Path) -> tuple[str, Path]:
    return request.param, build_tiny(request.param, test_cache / f"convert-tiny-{request.param}")


def _tokens(folder: Path, n_chunks: int = 3, n_ctx: int = 24) -> torch.Tensor:
    import json

    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (n_chunks, n_ctx), generator=torch.Generator().manual_seed(0))


def _whole_model_inputs(folder: Path, token_ids: torch.Tensor, change_layer=None) -> dict[tuple[int, str], dict]:
    """Per (layer, linear name): Σx² and Σxᵀx of its inputs over the chunks, from transformers' own forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    layers = next(m for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name.endswith("layers"))
    if change_layer is not None:
        change_layer(0, layers[0])
    seen: dict[tuple[int, str], dict] = {}

    def add(key: tuple[int, str], x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        entry = seen.setdefault(key, {"sum_squares": 0, "xtx": 0, "n": 0})
        entry["sum_squares"] = entry["sum_squares"] + x.square().sum(0)
        entry["xtx"] = entry["xtx"] + x.T @ x
        entry["n"] += x.shape[0]

    def experts_hook(module, args, index, path):
        # transformers' fused experts: expert e sees the tokens routed to it, its down_proj act(gate)·up of them
        hidden, top_k_index = args[0], args[1]
        for e in range(module.gate_up_proj.shape[0]):
            x = hidden[(top_k_index == e).any(-1)]
            if x.shape[0] == 0:
                continue
            gate, up = nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
            for proj, inputs in (("gate_proj", x), ("up_proj", x), ("down_proj", module.act_fn(gate) * up)):
                add((index, f"{path}.{e}.{proj}"), inputs)

    handles = []
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__.endswith("Router"):  # routers: F.linear
                handles.append(module.register_forward_pre_hook(lambda _m, args, key=(index, name): add(key, args[0])))
            elif isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, index=index, path=name: experts_hook(m, args, index, path)))
    with torch.no_grad():
        for chunk in token_ids:  # one chunk at a time: the runner batches, the reference need not
            model(input_ids=chunk[None], use_cache=False)
    for handle in handles:
        handle.remove()
    return seen


def _runner_inputs(folder: Path, token_ids: torch.Tensor, change_layer=None, batch_size: int = 2):
    got: dict[tuple[int, str], dict] = {}
    groups: dict[int, list[tuple[str, ...]]] = {}

    def process(index: int, layer: nn.Module, inputs) -> None:
        groups[index] = inputs.groups
        for names, stats in zip(inputs.groups, inputs.statistics, strict=True):
            for name in names:
                got[(index, name)] = {"sum_squares": stats.sum_squares, "xtx": stats.xtx, "n": stats.n_tokens}
        if change_layer is not None:
            change_layer(index, layer)

    run_layer_by_layer(folder, token_ids, process, batch_size=batch_size)
    return got, groups


def test_each_linear_sees_what_the_whole_model_feeds_it(arch_folder):
    arch, folder = arch_folder
    tokens = _tokens(folder)
    expected = _whole_model_inputs(folder, tokens)
    got, _ = _runner_inputs(folder, tokens)  # batches of 2: the last batch of 1 cuts the recorded mask
    assert set(got) == set(expected), arch
    for key, want in expected.items():
        assert got[key]["n"] == want["n"]
        if ".experts." not in key[1]:
            assert want["n"] == tokens.numel()
        torch.testing.assert_close(got[key]["sum_squares"], want["sum_squares"], rtol=1e-4, atol=1e-4,
                                   msg=lambda m, key=key: f"{arch} {key}: {m}")
        torch.testing.assert_close(got[key]["xtx"], want["xtx"], rtol=1e-4, atol=1e-4)  # experts: fused vs not


def test_experts_are_linears_of_their_own_named_after_their_checkpoint_tensors(test_cache):
    folder = build_tiny("mixtral", test_cache / "convert-tiny-mixtral")
    seen = {}

    def process(index: int, _layer: nn.Module, inputs) -> None:
        seen[index] = inputs

    run_layer_by_layer(folder, _tokens(folder), process)
    inputs = seen[0]
    routed = [names for names in inputs.groups if "experts" in names[0]]
    assert routed and all(len(names) in (1, 2) for names in routed)  # (gate, up) share the routed tokens
    assert inputs.sources["mlp.experts.2.gate_proj"] == "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    assert inputs.sources["mlp.experts.2.down_proj"] == "model.layers.0.block_sparse_moe.experts.2.w2.weight"
    assert "self_attn.q_proj" not in inputs.sources  # stored under its own name


def test_linears_reading_one_tensor_are_grouped(test_cache):
    folder = build_tiny("llama", test_cache / "convert-tiny-llama")
    _, groups = _runner_inputs(folder, _tokens(folder))
    for layer_groups in groups.values():
        assert sorted(layer_groups) == sorted([("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                               ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"),
                                               ("mlp.down_proj",)])


def test_a_changed_layer_computes_the_next_layers_inputs(test_cache):
    folder = build_tiny("llama", test_cache / "convert-tiny-llama")
    tokens = _tokens(folder)

    def change(index: int, layer: nn.Module) -> None:
        if index == 0:  # what a method does: the layer's weights replaced in place
            with torch.no_grad():
                layer.mlp.down_proj.weight.mul_(0.5)
                layer.self_attn.o_proj.weight.neg_()

    expected = _whole_model_inputs(folder, tokens, change_layer=change)
    unchanged = _whole_model_inputs(folder, tokens)
    got, _ = _runner_inputs(folder, tokens, change_layer=change)
    key = (1, "self_attn.q_proj")
    torch.testing.assert_close(got[key]["xtx"], expected[key]["xtx"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[key]["xtx"], unchanged[key]["xtx"], rtol=1e-3)


def test_only_the_current_layers_weights_are_read(test_cache, monkeypatch):
    folder = build_tiny("llama", test_cache / "convert-tiny-llama")
    loaded: list[str] = []
    real_open = layer_runner.open_weights

    def spying_open(*args, **kwargs):
        source = real_open(*args, **kwargs)
        real_load = source.load

        def load(name):
            loaded.append(name)
            return real_load(name)
        source.load = load
        return source

    monkeypatch.setattr(layer_runner, "open_weights", spying_open)
    read_by_layer: dict[int, set[str]] = {}

    def process(index: int, _layer: nn.Module, _inputs) -> None:
        read_by_layer[index] = {n for n in loaded if ".layers." in n}
        loaded.clear()

    run_layer_by_layer(folder, _tokens(folder), process)
    assert sorted(read_by_layer) == [0, 1]
    for index, names in read_by_layer.items():
        assert names and all(f".layers.{index}." in n for n in names), (index, sorted(names)[:3])


def test_the_statistics_give_imatrix_and_awq_their_vectors(test_cache):
    folder = build_tiny("llama", test_cache / "convert-tiny-llama")
    seen = {}

    def process(index: int, _layer: nn.Module, inputs) -> None:
        seen[index] = inputs.of("mlp.up_proj")

    tokens = _tokens(folder)
    run_layer_by_layer(folder, tokens, process, with_xtx=False, max_sample=20)
    stats = seen[0]
    assert stats.xtx is None  # not gathered unless asked for
    assert stats.mean_squares.shape == (stats.in_features,)
    torch.testing.assert_close(stats.mean_squares.double(), stats.sum_squares / tokens.numel())
    assert stats.sample.shape == (20, stats.in_features)
    assert bool((stats.mean_abs > 0).all())
    with pytest.raises(KeyError):
        LayerInputs([("mlp.gate_proj",)], [stats]).of("mlp.up_proj")
