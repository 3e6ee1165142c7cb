"""``llmquant convert``: the real SmolLM2 against transformers and llama.cpp, output types, bad input, memory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from llmquant.cli import cli
from llmquant.errors import InputError
from llmquant.formats import quantize
from llmquant.pipeline.convert import convert_model
from tests.models.llama_cpp_run import TEST_TEXT, hf_logits, hf_tokens, llama_cpp_logits, load_llama_cpp
from tests.models.tiny_models import build_tiny


@pytest.fixture(scope="module")
def smollm2_converted_f32(smollm2_hf: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-f32.gguf"
    convert_model(smollm2_hf, out, outtype="f32")
    return out


@pytest.fixture(scope="module")
def tiny_llama(test_cache: Path) -> Path:
    return build_tiny("llama", test_cache / "convert-tiny-llama")


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


# ---- the real model --------------------------------------------------------------------------------------------


def test_smollm2_logits_match_transformers(smollm2_hf: Path, smollm2_converted_f32: Path):
    ids = hf_tokens(smollm2_hf)
    reference = hf_logits(smollm2_hf, ids)
    logits = llama_cpp_logits(load_llama_cpp(smollm2_converted_f32), ids)
    assert np.abs(logits - reference).max() < 1e-3


def test_smollm2_tokenizes_like_transformers(smollm2_hf: Path, smollm2_converted_f32: Path):
    llm = load_llama_cpp(smollm2_converted_f32)
    chat = "<|im_start|>user\nWhat is 12345 + 678?<|im_end|>\n<|im_start|>assistant\n"
    assert llm.tokenize(TEST_TEXT.encode(), add_bos=False, special=False) == hf_tokens(smollm2_hf)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == hf_tokens(smollm2_hf, chat)


def test_smollm2_metadata_is_what_llama_cpp_reads(smollm2_hf: Path, smollm2_converted_f32: Path):
    config = json.loads((smollm2_hf / "config.json").read_text())
    meta = load_llama_cpp(smollm2_converted_f32).metadata
    assert meta["general.architecture"] == "llama"
    assert int(meta["llama.block_count"]) == config["num_hidden_layers"]
    assert int(meta["llama.attention.head_count_kv"]) == config["num_key_value_heads"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert int(meta["tokenizer.ggml.eos_token_id"]) == config["eos_token_id"]
    assert "im_start" in meta["tokenizer.chat_template"]
    assert int(meta["general.file_type"]) == gguf.LlamaFileType.ALL_F32
    assert meta["general.size_label"] == "135M"
    reader = gguf.GGUFReader(smollm2_converted_f32)
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd


# ---- output types ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outtype,tolerance", [("f16", 0.05), ("bf16", 0.3), ("q8_0", 0.3)])
def test_outtypes_load_and_predict_close_to_f32(tiny_llama: Path, tmp_path: Path, outtype: str, tolerance: float):
    out = convert_model(tiny_llama, tmp_path / f"m-{outtype}.gguf", outtype=outtype).path
    ids = hf_tokens(tiny_llama)[:64]
    logits = llama_cpp_logits(load_llama_cpp(out), ids)
    reference = hf_logits(tiny_llama, ids)
    assert np.abs(logits - reference).max() < tolerance
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() > 0.9
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.ffn_down.weight"] == outtype.upper()
    assert types["blk.0.attn_norm.weight"] == "F32"  # norms stay F32, as llama.cpp's converter keeps them


def test_q8_0_bytes_equal_the_formats_module(tiny_llama: Path, tmp_path: Path):
    out = convert_model(tiny_llama, tmp_path / "m-q8_0.gguf", outtype="q8_0").path
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    with safe_open(str(tiny_llama / "model.safetensors"), "pt") as f:
        for hf_name, gguf_name in [("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                                   ("lm_head.weight", "output.weight")]:
            expected = quantize(f.get_tensor(hf_name).float(), "Q8_0")
            assert np.array_equal(np.asarray(tensors[gguf_name].data).reshape(expected.shape), expected)


def test_cli_convert_writes_the_file(tiny_llama: Path, tmp_path: Path):
    out = tmp_path / "cli.gguf"
    result = CliRunner().invoke(cli, ["convert", str(tiny_llama), "-o", str(out), "--outtype", "f16"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "llama" in result.output
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16


def test_sharded_safetensors_convert_like_one_file(tiny_llama: Path, tmp_path: Path):
    folder = _copy(tiny_llama, tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in shard_names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded = convert_model(folder, tmp_path / "sharded.gguf", outtype="f32").path
    single = convert_model(tiny_llama, tmp_path / "single.gguf", outtype="f32").path
    a = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(sharded).tensors}
    b = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(single).tensors}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ---- bad input: one clear line, nothing left behind ------------------------------------------------------------


def _assert_cli_error(args: list[str], tmp_path: Path, *fragments: str) -> None:
    result = CliRunner().invoke(cli, ["convert", *args, "-o", str(tmp_path / "out.gguf")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
    for fragment in fragments:
        assert fragment in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("out.gguf", ".out.gguf"))]


def test_missing_config_is_one_line(tiny_llama: Path, tmp_path: Path):
    folder = _copy(tiny_llama, tmp_path)
    (folder / "config.json").unlink()
    _assert_cli_error([str(folder)], tmp_path, "config.json", "missing")


def test_corrupt_config_is_one_line(tiny_llama: Path, tmp_path: Path):
    folder = _copy(tiny_llama, tmp_path)
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    _assert_cli_error([str(folder)], tmp_path, "config.json", "not valid JSON")


def test_truncated_safetensors_is_named(tiny_llama: Path, tmp_path: Path):
    folder = _copy(tiny_llama, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    _assert_cli_error([str(folder)], tmp_path, "model.safetensors", "truncated")


def test_missing_tokenizer_is_one_line(tiny_llama: Path, tmp_path: Path):
    folder = _copy(tiny_llama, tmp_path)
    for name in ("tokenizer.json", "tokenizer.model"):
        (folder / name).unlink(missing_ok=True)
    _assert_cli_error([str(folder)], tmp_path, "no tokenizer")


def test_shape_that_does_not_match_config_is_named(tiny_llama: Path, tmp_path: Path):
    folder = _copy(tiny_llama, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_key_value_heads"] = config["num_attention_heads"]
    (folder / "config.json").write_text(json.dumps(config))
    _assert_cli_error([str(folder)], tmp_path, "k_proj", "shape", "config.json")


def test_pickled_weights_are_refused_without_opt_in(tiny_llama: Path, tmp_path: Path):
    folder = _copy(tiny_llama, tmp_path)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    _assert_cli_error([str(folder)], tmp_path, "pytorch_model.bin", "--allow-pickle")
    out = convert_model(folder, tmp_path / "pickled.gguf", outtype="f32", allow_pickle=True).path
    assert gguf.GGUFReader(out).tensors


def test_interrupted_conversion_leaves_nothing(tiny_llama: Path, tmp_path: Path, monkeypatch):
    import llmquant.pipeline.convert as convert_module

    calls = {"n": 0}
    real_encode = convert_module.encode

    def interrupting_encode(tensor, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_encode(tensor, qtype)

    monkeypatch.setattr(convert_module, "encode", interrupting_encode)
    with pytest.raises(KeyboardInterrupt):
        convert_model(tiny_llama, tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []


def test_offline_hub_id_says_so(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="cannot be reached"):
        convert_model("no-such-org/no-such-model", tmp_path / "out.gguf")


# ---- memory ----------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, sys, threading, time
    from llmquant.pipeline.convert import convert_model

    def rss() -> int:  # resident bytes now (ru_maxrss cannot be reset after the warm-up)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    small, big, out = sys.argv[1:4]
    convert_model(small, out + ".warm.gguf", outtype="f16")  # imports and one-time allocations
    before, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    convert_model(big, out, outtype="f16")
    done.set()
    sampler.join()
    print(json.dumps({"before": before, "growth": max(peak[0], rss()) - before}))
""")


def _many_layer_model(tiny: Path, target: Path, n_layers: int, width: int) -> tuple[int, int]:
    """A llama of ``n_layers`` equal square layers, written shard by shard: (total bytes, largest tensor bytes)."""
    shutil.copytree(tiny, target)
    (target / "model.safetensors").unlink()
    config = json.loads((target / "config.json").read_text())
    vocab = config["vocab_size"]
    config.update(hidden_size=width, intermediate_size=width, num_hidden_layers=n_layers, num_attention_heads=8,
                  num_key_value_heads=8, head_dim=width // 8, tie_word_embeddings=True)
    (target / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for bid in range(-1, n_layers):
        shard = f"model-{bid + 2:05d}-of-{n_layers + 1:05d}.safetensors"
        if bid < 0:
            tensors = {"model.embed_tokens.weight": torch.randn(vocab, width, generator=generator),
                       "model.norm.weight": torch.ones(width)}
        else:
            p = f"model.layers.{bid}."
            tensors = {p + name: torch.randn(width, width, generator=generator) * 0.02 for name in (
                "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")}
            tensors |= {p + "input_layernorm.weight": torch.ones(width),
                        p + "post_attention_layernorm.weight": torch.ones(width)}
        save_file(tensors, str(target / shard), metadata={"format": "pt"})
        weight_map.update({name: shard for name in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
    (target / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total, width * width * 4


def test_peak_memory_stays_near_the_largest_tensor(tiny_llama: Path, tmp_path: Path):
    total, largest = _many_layer_model(tiny_llama, tmp_path / "big", n_layers=24, width=1024)
    assert total > 100 * largest
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tiny_llama), str(tmp_path / "big"),
                          str(tmp_path / "big.gguf")], capture_output=True, text=True, check=True)
    growth = json.loads(run.stdout.strip().splitlines()[-1])["growth"]
    print(f"model {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"peak RSS growth {growth / 2**20:.1f} MiB")
    assert growth < 8 * largest
    assert (tmp_path / "big.gguf").stat().st_size > total // 2  # F16: every weight was written
