"""Sensitivities and ``--type auto``: the proxy is the output error transformers' own activations give, the kld
estimator the KL divergence of the torch model, and the automatic files fit their budget and run in llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmquant.errors import InputError
from llmquant.formats import dequantize, quantize
from llmquant.gguf_io.header import read_gguf_header
from llmquant.pipeline.quantize import GGUFSource, quantize_model
from llmquant.pipeline.sensitivity import (
    AutoRequest,
    Sensitivities,
    auto_plan,
    measure_kld,
    measure_proxy,
    parse_size,
    quantizable_tensors,
    write_sensitivity_report,
)
from tests.models.llama_cpp_run import llama_cpp_logits, load_llama_cpp

CANDIDATES = ["Q2_K", "Q4_K", "Q8_0"]


def _tokens(vocab: int, n_chunks: int = 2, n_ctx: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (n_chunks, n_ctx), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tiny(tiny_llama_hf, tmp_path_factory):
    """The tiny llama as an F32 GGUF source, calibration tokens, and its proxy sensitivities on them."""
    from llmquant.pipeline.convert import convert_model

    out = tmp_path_factory.mktemp("sensitivity")
    convert_model(tiny_llama_hf, out / "source.gguf", outtype="f32")
    source = GGUFSource.open(out / "source.gguf")
    vocab = int(json.loads((tiny_llama_hf / "config.json").read_text())["vocab_size"])
    token_ids = _tokens(vocab)
    tensors = quantizable_tensors(source, CANDIDATES)
    proxy = measure_proxy(source, tensors, folder=tiny_llama_hf, token_ids=token_ids, threads=2)
    return {"folder": tiny_llama_hf, "source": source, "tokens": token_ids, "tensors": tensors, "proxy": proxy,
            "out": out}


def test_the_proxy_of_a_linear_is_its_output_change_on_transformers_own_inputs(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny["folder"]), dtype=torch.float32).eval()
    inputs = {}
    for name in ("model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj"):
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, [])
                                                            .append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for chunk in tiny["tokens"]:
            model(input_ids=chunk[None], use_cache=False)
    for hf_name, gguf_name in (("model.layers.1.self_attn.v_proj", "blk.1.attn_v.weight"),
                               ("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight")):
        x = torch.cat(inputs[hf_name]).double()
        weight = model.get_submodule(hf_name).weight.detach()
        importance = (x.square().mean(0)).float().numpy()  # the imatrix the runner gathers
        for type_name in CANDIDATES:
            rounded = torch.from_numpy(dequantize(quantize(weight, type_name, imatrix=importance), type_name,
                                                  tuple(weight.shape)))
            expected = float(((rounded.double() - weight.double()) @ x.T).square().sum())
            # float32 activations from two code paths: a block's search may tip the other way, nothing more
            assert tiny["proxy"].costs[gguf_name][type_name] == pytest.approx(expected, rel=2e-3)


def test_every_quantizable_tensor_has_a_cost_that_falls_with_more_bits(tiny):
    proxy = tiny["proxy"]
    assert set(proxy.costs) == {t.name for t in tiny["tensors"]}
    assert "token_embd.weight" in proxy.costs and "output.weight" in proxy.costs
    for name, by_type in proxy.costs.items():
        assert set(by_type) == set(CANDIDATES), name
        assert by_type["Q8_0"] < by_type["Q4_K"] < by_type["Q2_K"], name


def test_the_kld_estimator_is_the_torch_models_kl_divergence_with_one_tensor_rounded(tiny):
    from transformers import AutoModelForCausalLM

    tensors = [t for t in tiny["tensors"] if t.name in ("blk.0.attn_q.weight", "blk.1.ffn_up.weight")]
    kld = measure_kld(tiny["folder"], tensors, tiny["tokens"], threads=2)
    model = AutoModelForCausalLM.from_pretrained(str(tiny["folder"]), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=tiny["tokens"]).logits, -1)
        weight = model.model.layers[1].mlp.up_proj.weight
        weight.copy_(torch.from_numpy(dequantize(quantize(weight, "Q2_K"), "Q2_K", tuple(weight.shape))))
        rounded = torch.log_softmax(model(input_ids=tiny["tokens"]).logits, -1)
    expected = float((reference.exp() * (reference - rounded)).sum(-1).mean())
    assert kld.costs["blk.1.ffn_up.weight"]["Q2_K"] == pytest.approx(expected, rel=1e-4)
    for by_type in kld.costs.values():
        assert by_type["Q8_0"] < by_type["Q2_K"]


@pytest.fixture(scope="module")
def auto_file(tiny):
    saved = tiny["proxy"].save(tiny["out"] / "sensitivity.json")
    budget = tiny["source"].path.stat().st_size // 5
    request = AutoRequest(target_size=budget, candidates=",".join(CANDIDATES), sensitivities_file=str(saved))
    result = quantize_model(tiny["folder"], tiny["out"] / "auto.gguf", "auto", auto=request)[0]
    return result, budget, saved


def test_the_auto_file_fits_its_budget_and_the_prediction(auto_file):
    result, budget, _ = auto_file
    assert result.n_bytes <= budget
    assert result.n_bytes <= result.auto.predicted_bytes <= budget
    assert result.auto.predicted_bytes - result.n_bytes < 256  # the header margin and the last tensor's padding
    header = read_gguf_header(result.path)
    types = {t.name: t.type_name for t in header.tensors}
    assert types == result.auto.plan.types
    assert len({types[n] for n in result.auto.allocation.types}) > 1  # a real mix
    assert header.metadata["general.file_type"] == result.auto.plan.file_type.ftype


def test_the_auto_file_runs_in_llama_cpp(auto_file, tiny):
    llm = load_llama_cpp(auto_file[0].path, n_ctx=64)
    logits = llama_cpp_logits(llm, list(range(10, 42)))
    assert np.isfinite(logits).all()


def test_the_same_sensitivities_give_the_same_bytes(auto_file, tiny, tmp_path):
    result, budget, saved = auto_file
    request = AutoRequest(target_size=budget, candidates=",".join(CANDIDATES), sensitivities_file=str(saved))
    again = quantize_model(tiny["folder"], tmp_path / "again.gguf", "auto", auto=request)[0]
    assert again.path.read_bytes() == result.path.read_bytes()


def test_a_larger_budget_never_costs_more(tiny):
    source, proxy = tiny["source"], tiny["proxy"]
    costs = [auto_plan(source, proxy, source.path.stat().st_size * f // 10, CANDIDATES, False).allocation.cost
             for f in (2, 3, 5)]
    assert costs[0] >= costs[1] >= costs[2]


def test_sensitivities_without_a_tensor_are_refused(tiny):
    partial = Sensitivities("proxy", dict(list(tiny["proxy"].costs.items())[1:]))
    with pytest.raises(InputError, match="no entry for tensor"):
        auto_plan(tiny["source"], partial, tiny["source"].path.stat().st_size, CANDIDATES, False)


def test_the_report_holds_the_table_the_json_and_the_heat_map(tiny, tmp_path):
    paths = write_sensitivity_report(tiny["proxy"], tmp_path / "report")
    assert Sensitivities.load(paths["json"]).costs == tiny["proxy"].costs
    assert "blk.0.ffn_down.weight" in paths["markdown"].read_text()
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("text", "expected"), [("3.9GB", 3_900_000_000), ("1GiB", 2**30), ("80MB", 80_000_000),
                                                ("1.5MiB", 1_572_864), ("123456", 123456)])
def test_sizes_are_read_with_their_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["3.9", "lots", "4 GB please", "-1MB"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(InputError, match="--target-size"):
        parse_size(text)


def test_auto_needs_a_budget(tiny):
    with pytest.raises(InputError, match="--target-size"):
        quantize_model(tiny["folder"], Path(tiny["out"]) / "x.gguf", "auto")


def test_the_sensitivity_command_writes_its_report_and_quantize_reuses_it(tiny, tmp_path):
    from click.testing import CliRunner

    from llmquant.cli import cli

    runner = CliRunner()
    report = tmp_path / "report"
    done = runner.invoke(cli, ["sensitivity", str(tiny["folder"]), "--calib", "builtin", "--calib-chunks", "1",
                               "--calib-ctx", "32", "--candidates", "Q4_K,Q8_0", "-o", str(report)])
    assert done.exit_code == 0, done.output
    assert {p.name for p in report.iterdir()} == {"sensitivity.json", "report.md", "heatmap.png"}
    assert set(Sensitivities.load(report / "sensitivity.json").types) == {"Q4_K", "Q8_0"}
    done = runner.invoke(cli, ["quantize", str(tiny["folder"]), "-o", str(tmp_path / "auto.gguf"), "--type", "auto",
                               "--target-bpw", "7", "--candidates", "Q4_K,Q8_0", "--sensitivities",
                               str(report / "sensitivity.json")])
    assert done.exit_code == 0, done.output
    assert "auto mix from proxy sensitivities: predicted" in done.output and "general.file_type" in done.output
    help_text = runner.invoke(cli, ["sensitivity", "--help"]).output
    assert "Example" in help_text and "llmquant sensitivity" in help_text


def test_the_budget_options_belong_to_type_auto(tiny, tmp_path):
    from click.testing import CliRunner

    from llmquant.cli import cli

    done = CliRunner().invoke(cli, ["quantize", str(tiny["folder"]), "-o", str(tmp_path / "x.gguf"), "--type",
                                    "Q4_K_M", "--target-bpw", "4.5"])
    assert done.exit_code != 0 and "go with --type auto" in done.output


def test_auto_refuses_the_mix_options_it_would_ignore(tiny):
    from llmquant.recipes.mixes import MixOptions

    with pytest.raises(InputError, match="--type auto chooses"):
        quantize_model(tiny["folder"], Path(tiny["out"]) / "x.gguf", "auto", auto=AutoRequest(target_bpw=5),
                       options=MixOptions(tensor_types=(("attn_v", "Q8_0"),)))
