"""``--method gptq|awq|awq+gptq``: AWQ's folding keeps the model, the methods beat plain rounding on the calibration
inputs, and their files have llama-quantize's types and sizes, load in llama.cpp and transformers, and repeat."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from llmquant.calibration.layer_runner import run_layer_by_layer
from llmquant.formats import FORMATS
from llmquant.models.architectures import find_architecture, plan_tensors
from llmquant.models.config import read_config
from llmquant.models.safetensors_io import open_weights
from llmquant.pipeline.calibrated import layer_quantizer_for, quantize_with_method
from llmquant.pipeline.quantize import format_results, quantize_model, supported_file_types
from llmquant.recipes.file_types import FILE_TYPES
from tests.models.llama_cpp_run import llama_cpp_logits, load_llama_cpp
from tests.models.tiny_models import build_tiny
from tests.pipeline.test_quantize import tensors_of

FOLD_ARCHS = ["llama", "llama-mha", "qwen2", "gemma2", "gemma3", "phi3", "mixtral"]
# which groups (by their first linear) take scales, by architecture: o_proj only without grouped value heads
EXPECTED_FOLDS = {
    "llama": {"self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"},
    "llama-mha": {"self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"},
    "qwen2": {"self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"},
    "gemma2": {"self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"},
    "gemma3": {"self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"},
    "phi3": {"self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "mixtral": {"self_attn.q_proj"} | {f"mlp.experts.{e}.down_proj" for e in range(4)},
}


def _tokens(folder: Path, n_chunks: int = 2, n_ctx: int = 32) -> torch.Tensor:
    vocab = read_config(folder).hparams["vocab_size"]
    return torch.randint(0, vocab, (n_chunks, n_ctx), generator=torch.Generator().manual_seed(1))


def _every_matrix_as(folder: Path, type_name: str) -> dict[str, str]:
    config = read_config(folder)
    plans = plan_tensors(find_architecture(config), config, open_weights(folder))
    return {p.name: type_name for p in plans if len(p.shape) >= 2}


def _fused_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The runner's expert-by-expert linears back into transformers' fused expert parameters."""
    out, experts = {}, {}
    for key, value in state.items():
        match = re.match(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
        if match:
            experts.setdefault(match[1], {}).setdefault(int(match[2]), {})[match[3]] = value
        else:
            out[key] = value
    for path, by_expert in experts.items():
        order = sorted(by_expert)
        out[f"{path}.gate_up_proj"] = torch.stack([torch.cat([by_expert[e]["gate_proj"], by_expert[e]["up_proj"]])
                                                   for e in order])
        out[f"{path}.down_proj"] = torch.stack([by_expert[e]["down_proj"] for e in order])
    return out


@pytest.mark.parametrize("arch", FOLD_ARCHS)
def test_awq_scales_folded_into_their_producers_leave_the_model_unchanged(arch, test_cache):
    from transformers import AutoModelForCausalLM

    folder = build_tiny(arch, test_cache / f"convert-tiny-{arch}")
    tokens = _tokens(folder)
    quantizer = layer_quantizer_for(folder, "awq", _every_matrix_as(folder, "Q8_0"))
    states, folded = {}, {}

    def process(index, layer, inputs):
        quantizer.begin_layer(index, inputs)
        generator = torch.Generator().manual_seed(index)
        folded[index] = set()
        for names, stats in zip(inputs.groups, inputs.statistics, strict=True):
            s = torch.rand(stats.in_features, generator=generator) * 1.5 + 0.5  # far from 1: a slip shows
            if quantizer.apply_scales(layer, names, s):
                folded[index].add(names[0])
        states[index] = {k: v.detach().clone() for k, v in layer.state_dict().items()}

    run_layer_by_layer(folder, tokens, process)
    assert folded[0] == folded[1] == EXPECTED_FOLDS[arch]

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        for index, state in states.items():
            model.model.layers[index].load_state_dict(_fused_experts(state))
        after = model(input_ids=tokens).logits
    assert float((after - before).abs().max()) <= 1e-4


@pytest.fixture(scope="module")
def tiny_llama_files(tiny_llama_hf, tmp_path_factory):
    """The tiny llama (widths of 256: true k-quants) as Q4_K_M by every method, on the same calibration."""
    out = tmp_path_factory.mktemp("methods")
    results = {}
    for method in ("rtn", "gptq", "awq", "awq+gptq"):
        results[method] = quantize_model(tiny_llama_hf, out / f"{method}.gguf", "Q4_K_M", calib=["builtin"],
                                         calib_chunks=4, calib_ctx=128, method=method)[0]
    return results


def test_every_method_keeps_llama_quantizes_types_and_size(tiny_llama_files):
    rtn = tensors_of(tiny_llama_files["rtn"].path)
    for method in ("gptq", "awq", "awq+gptq"):
        result = tiny_llama_files[method]
        # the same tensor bytes; the file holds one key more, the method's (quantize.llmquant.method)
        assert result.tensor_bytes == tiny_llama_files["rtn"].tensor_bytes
        ours = tensors_of(result.path)
        assert {n: (t, a.shape) for n, (t, a) in ours.items()} == {n: (t, a.shape) for n, (t, a) in rtn.items()}
        changed = [n for n in ours if not np.array_equal(ours[n][1], rtn[n][1])]
        assert any(n.startswith("blk.") for n in changed), method  # the method did something
        assert "token_embd.weight" not in changed and "output.weight" not in changed
        assert result.method.method == method and result.method.n_tokens == 4 * 128
        assert len(result.method.layer_errors) == 2 and not result.method.plain
        # the importance vectors come from the method's own layer-by-layer pass, not a whole-model imatrix run
        assert result.imatrix.startswith(f"gathered by {method} from builtin (")
        assert set(result.method.importance) >= {n for n in ours if n.startswith("blk.") and "norm" not in n}


def test_gptq_beats_plain_rounding_on_the_calibration_inputs_layer_by_layer(tiny_llama_files):
    for method in ("gptq", "awq+gptq"):
        m = tiny_llama_files[method].method
        assert m.proxy_error < 0.8 * m.proxy_error_rtn, method
        assert all(error < error_rtn for error, error_rtn in m.layer_errors), (method, m.layer_errors)
    awq = tiny_llama_files["awq"].method
    assert awq.proxy_error <= 1.05 * awq.proxy_error_rtn  # its search never loses to α = 0 on its own sample


def test_awq_writes_the_folded_norms(tiny_llama_files):
    norms = [n for n in tiny_llama_files["awq"].method.tensors if n.endswith("norm.weight")]
    assert norms  # the random model's activations gave α > 0 somewhere
    rtn, awq = tensors_of(tiny_llama_files["rtn"].path), tensors_of(tiny_llama_files["awq"].path)
    assert all(not np.array_equal(awq[n][1], rtn[n][1]) for n in norms)


def test_method_files_run_in_llama_cpp_close_to_the_full_model(tiny_llama_files, tiny_llama_hf):
    from tests.models.llama_cpp_run import hf_logits

    ids = list(range(10, 74))
    reference = hf_logits(tiny_llama_hf, ids)

    def error(path: Path) -> float:
        llm = load_llama_cpp(path, n_ctx=128)
        return float(np.sqrt(np.mean((llama_cpp_logits(llm, ids) - reference) ** 2)))

    plain = error(tiny_llama_files["rtn"].path)
    for method in ("gptq", "awq", "awq+gptq"):
        # a fold the file got wrong (a norm not written, rows in the wrong order) would be far off
        assert error(tiny_llama_files[method].path) < 1.5 * plain, method


def test_method_files_load_in_transformers(tiny_llama_files):
    from transformers import AutoModelForCausalLM, GgufConfig

    path = tiny_llama_files["awq+gptq"].path
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 quantization_config=GgufConfig(dequantize=True),
                                                 dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(10, 40)[None]).logits
    assert bool(torch.isfinite(logits).all())


def test_same_input_gives_the_same_bytes(tiny_llama_hf, tiny_llama_files, tmp_path):
    again = quantize_model(tiny_llama_hf, tmp_path / "again.gguf", "Q4_K_M", calib=["builtin"], calib_chunks=4,
                           calib_ctx=128, method="awq+gptq")[0]
    assert again.path.read_bytes() == tiny_llama_files["awq+gptq"].path.read_bytes()


def test_experts_get_their_own_statistics_and_idle_ones_are_rounded_plainly(test_cache):
    folder = build_tiny("mixtral", test_cache / "convert-tiny-mixtral")
    types = _every_matrix_as(folder, "Q4_0")
    one_token = torch.tensor([[7]])  # top-2 of 4 experts: two of each layer's experts see nothing
    result = quantize_with_method(folder, "gptq", types, one_token)
    stacked = [n for n in types if "_exps" in n]
    assert stacked and all(n in result.tensors for n in stacked)
    assert len(result.idle_experts) == 2 * 2 * 3  # 2 idle experts x 2 layers x gate, up, down
    assert re.fullmatch(r"blk\.\d\.ffn_(gate|up|down)_exps\.weight expert \d", result.idle_experts[0])
    busy = quantize_with_method(folder, "gptq", types, _tokens(folder, n_chunks=4))
    assert not busy.idle_experts


def test_a_moe_method_file_runs_in_llama_cpp(test_cache, tmp_path):
    folder = build_tiny("mixtral", test_cache / "convert-tiny-mixtral")
    rtn = quantize_model(folder, tmp_path / "rtn.gguf", "Q4_0", calib=["builtin"], calib_chunks=2,
                         calib_ctx=64)[0]
    ours = quantize_model(folder, tmp_path / "ours.gguf", "Q4_0", calib=["builtin"], calib_chunks=2, calib_ctx=64,
                          method="awq+gptq")[0]
    assert ours.tensor_bytes == rtn.tensor_bytes
    assert any("_exps" in n for n in ours.method.tensors)
    logits = llama_cpp_logits(load_llama_cpp(ours.path, n_ctx=64), list(range(5, 30)))
    assert np.isfinite(logits).all()


def test_a_method_needs_calibration_text_and_a_model_folder(smollm2_f32_gguf, tiny_llama_hf, tmp_path):
    from llmquant.errors import InputError

    with pytest.raises(InputError, match="--calib"):
        quantize_model(tiny_llama_hf, tmp_path / "x.gguf", "Q4_0", method="gptq")
    with pytest.raises(InputError, match="Hugging Face model folder"):
        quantize_model(smollm2_f32_gguf, tmp_path / "x.gguf", "Q4_0", calib=["builtin"], method="awq")
    with pytest.raises(InputError, match="choose from"):
        quantize_model(tiny_llama_hf, tmp_path / "x.gguf", "Q4_0", calib=["builtin"], method="smoothquant")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_the_runner_gathers_the_importance_matrix_of_a_whole_model_run(arch, test_cache):
    """Unchanged layers: the runner's importance vectors are those of llmquant imatrix (llama-imatrix's),
    experts' included, so it can serve imatrix collection."""
    from llmquant.calibration.chunking import chunk_text, load_tokenizer
    from llmquant.calibration.sources import join_sources, load_text_sources
    from llmquant.gguf_io.imatrix import importance_vectors
    from llmquant.pipeline.imatrix import compute_imatrix, load_causal_lm, resolve_device

    folder = build_tiny(arch, test_cache / f"convert-tiny-{arch}")
    chunks = chunk_text(load_tokenizer(folder), join_sources(load_text_sources(["builtin"])), 64, 3)
    expected = importance_vectors(compute_imatrix(load_causal_lm(folder, resolve_device("cpu")), chunks,
                                                  ["builtin"]).data)
    quantizer = layer_quantizer_for(folder, "gptq", _every_matrix_as(folder, "Q8_0"))

    def process(index, _layer, inputs):
        quantizer.begin_layer(index, inputs)
        quantizer.record_importance(inputs)

    run_layer_by_layer(folder, chunks.token_ids, process)
    layer_names = {n for n in expected if n.startswith("blk.")}
    assert layer_names and set(quantizer.importance) == layer_names
    for name in layer_names:
        np.testing.assert_allclose(quantizer.importance[name], expected[name], rtol=1e-4, atol=1e-7, err_msg=name)


def _codeword_file_type(name: str) -> bool:
    """A file type whose default tensor type is an IQ1-IQ3 codeword format."""
    return FORMATS[FILE_TYPES[name].default_type].weights_per_level > 1


@pytest.fixture(scope="module")
def every_file_type(tiny_llama_hf, tmp_path_factory):
    """Every file type we offer, by rtn and by a method (one call each: one conversion serves all types): awq+gptq,
    but gptq for the codeword file types (IQ1-IQ3), which rounds their codeword tensors plainly: AWQ's search
    rounds every linear twenty times, and ggml's IQ1/IQ2 searches are the slowest there are (AWQ on a codeword
    grid is tested in tests/methods/test_awq.py)."""
    out = tmp_path_factory.mktemp("every-type")
    options = dict(calib=["builtin"], calib_chunks=1, calib_ctx=64)
    types = supported_file_types()
    by_gptq = [t for t in types if _codeword_file_type(t)]
    by_awq = [t for t in types if t not in by_gptq]
    rtn = quantize_model(tiny_llama_hf, out / "rtn", types, **options)
    ours = quantize_model(tiny_llama_hf, out / "awq", by_awq, method="awq+gptq", **options)
    ours += quantize_model(tiny_llama_hf, out / "gptq", by_gptq, method="gptq", **options)
    made = {o.file_type: o for o in ours}
    return {r.file_type: (r, made[r.file_type]) for r in rtn}


@pytest.mark.parametrize("file_type", supported_file_types())
def test_every_file_type_works_with_a_method_at_llama_quantizes_size(file_type, every_file_type):
    rtn, ours = every_file_type[file_type]
    assert ours.tensor_bytes == rtn.tensor_bytes and ours.type_counts == rtn.type_counts
    block_types = [t for t in ours.type_counts if FORMATS[t].block_size > 1]
    assert bool(ours.method.tensors) == bool(block_types)
    logits = llama_cpp_logits(load_llama_cpp(ours.path, n_ctx=64), list(range(5, 20)))
    assert np.isfinite(logits).all()


def test_calibration_is_recorded_in_the_file_as_llama_quantizes_keys_name_it(tiny_llama_files):
    """--calib: quantize.imatrix.dataset names the sources (as an imatrix file records them), chunks_count the
    chunks used, entries_count the matrices it weighed (each decoder linear: 7 per layer); no file key, there is
    no file. A method's own pass records the same, and the summary line says it."""
    from llmquant.calibration.builtin import BUILTIN_NAME
    from llmquant.gguf_io.header import read_gguf_header

    linear = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight")
    n_matrices = len([t for t in read_gguf_header(tiny_llama_files["rtn"].path).tensors if linear.fullmatch(t.name)])
    assert n_matrices == 14
    for method, result in tiny_llama_files.items():
        found = read_gguf_header(result.path).metadata
        assert {k: v for k, v in found.items() if k.startswith("quantize.imatrix.")} == {
            "quantize.imatrix.dataset": BUILTIN_NAME, "quantize.imatrix.entries_count": n_matrices,
            "quantize.imatrix.chunks_count": 4}, method
        assert list(found)[list(found).index("general.file_type") + 1] == "quantize.imatrix.dataset"
        assert result.imatrix.endswith(f"from builtin ({BUILTIN_NAME}, 4 chunks of 128 tokens, {n_matrices} entries)")
    assert "importance matrix: computed from builtin (" in format_results([tiny_llama_files["rtn"]])


def test_a_method_and_its_settings_are_recorded_in_the_file(tiny_llama_files):
    from llmquant.gguf_io.header import read_gguf_header
    from llmquant.pipeline.calibrated import METHOD_KEY, describe_method

    recorded = {method: read_gguf_header(r.path).metadata.get(METHOD_KEY) for method, r in tiny_llama_files.items()}
    assert recorded == {"rtn": None, "gptq": "gptq damp=0.01 act_order=false", "awq": "awq",
                        "awq+gptq": "awq+gptq damp=0.01 act_order=false"}
    assert describe_method("GPTQ", damp=0.1, act_order=True) == "gptq damp=0.1 act_order=true"
    assert METHOD_KEY.startswith("quantize.") and not METHOD_KEY.startswith("quantize.imatrix.")
