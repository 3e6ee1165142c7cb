"""`llmquant quantize` against llama.cpp's own quantizer (llama_model_quantize) as the oracle.

For each file type: the same tensor types, the same file size, and (with the same importance matrix) at least
99% of every tensor's blocks byte-identical; with an imatrix file, the whole file as `llama-quantize --imatrix`
writes it. All types run on a tiny model with k-quant-friendly widths;
a representative set runs on the real SmolLM2 model (hidden 576: the fallbacks).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llmquant.errors import InputError
from llmquant.gguf_io.header import read_gguf_header
from llmquant.gguf_io.imatrix import imatrix_data_from_sums, write_imatrix_gguf
from llmquant.oracles.llama_quantize import llama_quantize
from llmquant.pipeline.quantize import quantize_model, supported_file_types
from llmquant.recipes import MixOptions
from tests.gguf_fixtures import small_vocab_tokenizer_gguf
from tests.recipes.conftest import TINY_LLAMA, TINY_MOE, write_tiny_llama_gguf

SMOLLM2_TYPES = ["Q4_K_M", "Q2_K", "IQ4_XS"]  # every type runs on the tiny model; these on the real one


@pytest.fixture(scope="module")
def tiny_gguf(test_cache: Path, smollm2_f32_gguf: Path) -> Path:
    """16 layers, hidden 256 (true k-quants everywhere), GQA 4, untied output, SmolLM2's first 512 tokens."""
    tokenizer = small_vocab_tokenizer_gguf(smollm2_f32_gguf, test_cache / "smollm2-tokenizer-512.gguf")
    config = dataclasses.replace(TINY_LLAMA, name="tiny-llama-v512")
    return write_tiny_llama_gguf(config, tokenizer, test_cache / f"{config.name}.gguf")


@pytest.fixture(scope="module")
def tiny_moe_gguf(test_cache: Path, smollm2_f32_gguf: Path) -> Path:
    """8 layers of 8 experts each (stacked ffn_*_exps), SmolLM2's first 512 tokens."""
    tokenizer = small_vocab_tokenizer_gguf(smollm2_f32_gguf, test_cache / "smollm2-tokenizer-512.gguf")
    config = dataclasses.replace(TINY_MOE, name="tiny-moe-8x-v512")
    return write_tiny_llama_gguf(config, tokenizer, test_cache / f"{config.name}.gguf")


def random_imatrix(model: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A plausible importance matrix for every matrix of ``model``: log-normal, a few dominant columns."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in read_gguf_header(model).tensors:  # the header only: GGUFReader would parse the whole vocabulary
        shape = [int(d) for d in t.shape]
        if len(shape) >= 2 and t.name != "token_embd.weight":
            n = shape[0] * (shape[2] if len(shape) > 2 else 1)
            out[t.name] = (rng.lognormal(0.0, 1.0, size=n) ** 2).astype(np.float32)
    return out


def write_imatrix_file(imatrix: dict[str, np.ndarray], path: Path) -> Path:
    """Our imatrix GGUF holding exactly these mean squares (sums with a count of one token)."""
    sums = {name: v.reshape(1, -1) for name, v in imatrix.items()}
    counts = {name: np.ones((1,), dtype=np.float32) for name in imatrix}
    write_imatrix_gguf(path, imatrix_data_from_sums(sums, counts, ["test"], 1))
    return path


def tensors_of(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    header = read_gguf_header(path)
    return {t.name: (t.type_name, header.read_tensor_bytes(t, 0, t.n_bytes)) for t in header.tensors}


def assert_same_as_llama_cpp(ours: Path, theirs: Path) -> None:
    a, b = tensors_of(ours), tensors_of(theirs)
    assert list(a) == list(b), "tensor order differs"
    for name, (their_type, their_bytes) in b.items():
        our_type, our_bytes = a[name]
        assert our_type == their_type, f"{name}: {our_type} vs llama.cpp's {their_type}"
        block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[our_type]][1]
        same = (our_bytes.reshape(-1, block_bytes) == their_bytes.reshape(-1, block_bytes)).all(axis=1).mean()
        assert same >= 0.99, f"{name} ({our_type}): only {same:.2%} of blocks identical"
    assert ours.stat().st_size == theirs.stat().st_size


def quantize_both(src: Path, tmp_path: Path, file_type: str, imatrix: dict[str, np.ndarray] | None,
                  options: MixOptions | None = None, threads: int | None = None) -> tuple[Path, Path]:
    imatrix_file = write_imatrix_file(imatrix, tmp_path / "imatrix.gguf") if imatrix is not None else None
    ours = quantize_model(src, tmp_path / f"ours-{file_type}.gguf", file_type, imatrix_file=imatrix_file,
                          options=options, threads=threads)[0].path
    options = options or MixOptions()
    theirs = llama_quantize(src, tmp_path / f"llama-{file_type}.gguf", file_type, imatrix_file=imatrix_file,
                            pure=options.pure, output_tensor_type=options.output_tensor_type,
                            token_embedding_type=options.token_embedding_type, tensor_types=options.tensor_types,
                            leave_output_tensor=options.leave_output_tensor).output
    return ours, theirs


@pytest.mark.parametrize("file_type", supported_file_types())
def test_every_type_matches_llama_cpp_on_a_tiny_model_with_an_imatrix(file_type, tiny_gguf, tmp_path):
    ours, theirs = quantize_both(tiny_gguf, tmp_path, file_type, random_imatrix(tiny_gguf))
    assert_same_as_llama_cpp(ours, theirs)
    assert ours.read_bytes() == theirs.read_bytes()  # the whole file, the quantize.imatrix.* keys included


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q5_0", "IQ4_NL", "Q3_K_L"])
def test_types_match_llama_cpp_without_an_imatrix(file_type, tiny_gguf, tmp_path):
    ours, theirs = quantize_both(tiny_gguf, tmp_path, file_type, None)
    assert_same_as_llama_cpp(ours, theirs)


@pytest.mark.parametrize("file_type", SMOLLM2_TYPES)
def test_smollm2_matches_llama_cpp(file_type, smollm2_f32_gguf, tmp_path):
    ours, theirs = quantize_both(smollm2_f32_gguf, tmp_path, file_type, random_imatrix(smollm2_f32_gguf))
    assert_same_as_llama_cpp(ours, theirs)
    assert ours.read_bytes() == theirs.read_bytes()  # the whole file, the quantize.imatrix.* keys included


@pytest.mark.parametrize("file_type", ["Q4_K_M", "IQ4_XS"])
def test_experts_in_small_parts_match_llama_cpp(file_type, tiny_moe_gguf, tmp_path, monkeypatch):
    """Stacked expert tensors take one importance vector per expert; with parts of 37 rows (of 256) each expert's
    matrix ends in a part cut short (34 rows), the next expert starts a new part with its own vector, and the
    bytes are still llama.cpp's. (Not 3-row parts: 18,800 calls, which took 6-8 min with the PyTorch searches.)"""
    from llmquant.pipeline import quantize as pipeline

    monkeypatch.setattr(pipeline, "PART_WEIGHTS", 37 * 256)
    ours, theirs = quantize_both(tiny_moe_gguf, tmp_path, file_type, random_imatrix(tiny_moe_gguf))
    assert_same_as_llama_cpp(ours, theirs)
    assert any(name.endswith("_exps.weight") for name in tensors_of(ours))


def test_finished_parts_waiting_to_be_written_stay_bounded(tiny_gguf, tmp_path, monkeypatch):
    """Tensors cut into hundreds of parts: the workers never get more than the queue's length ahead of the
    writer, however many parts one tensor has (finished parts wait in memory)."""
    import threading
    import time

    from llmquant.gguf_io.writer import StreamingGGUFWriter
    from llmquant.pipeline import quantize as pipeline

    monkeypatch.setattr(pipeline, "PART_WEIGHTS", 3 * 256)
    counts = {"started": 0, "written": 0, "most_ahead": 0}
    lock = threading.Lock()
    encode, write = pipeline._encode_part, StreamingGGUFWriter.write

    def counted_encode(*args):
        with lock:
            counts["started"] += 1
            counts["most_ahead"] = max(counts["most_ahead"], counts["started"] - counts["written"])
        return encode(*args)

    def slow_write(self, *args):  # a slow disk: the workers would race ahead
        time.sleep(0.0005)
        with lock:
            counts["written"] += 1
        return write(self, *args)

    monkeypatch.setattr(pipeline, "_encode_part", counted_encode)
    monkeypatch.setattr(StreamingGGUFWriter, "write", slow_write)
    quantize_model(tiny_gguf, tmp_path / "out.gguf", "Q8_0", threads=2)
    assert counts["started"] > 500
    assert counts["most_ahead"] <= pipeline.PARTS_AHEAD_PER_WORKER * 2 + 1


@pytest.mark.parametrize("options", [
    MixOptions(pure=True),
    MixOptions(output_tensor_type="Q8_0", token_embedding_type="Q4_0"),
    MixOptions(tensor_types=(("ffn_down", "Q8_0"), ("attn_.*", "Q5_1"))),
    MixOptions(leave_output_tensor=True),
], ids=["pure", "output-and-embedding-types", "tensor-type-overrides", "leave-output"])
def test_options_match_llama_cpp(options, tiny_gguf, tmp_path):
    ours, theirs = quantize_both(tiny_gguf, tmp_path, "Q4_K_M", random_imatrix(tiny_gguf), options)
    assert_same_as_llama_cpp(ours, theirs)


def test_same_input_gives_the_same_bytes(tiny_gguf, tmp_path):
    first = quantize_model(tiny_gguf, tmp_path / "a.gguf", "Q4_K_M")[0].path
    second = quantize_model(tiny_gguf, tmp_path / "b.gguf", "Q4_K_M")[0].path
    assert first.read_bytes() == second.read_bytes()


def test_several_types_at_once_write_a_folder(tiny_gguf, tmp_path):
    results = quantize_model(tiny_gguf, tmp_path / "quants", "Q8_0,Q4_K_M")
    names = sorted(p.name for p in (tmp_path / "quants").iterdir())
    assert names == sorted(r.path.name for r in results)
    assert [r.file_type for r in results] == ["Q8_0", "Q4_K_M"]
    assert results[0].n_bytes > results[1].n_bytes


def test_a_type_that_needs_an_imatrix_is_refused_without_one(tiny_gguf, tmp_path, monkeypatch):
    from llmquant.pipeline import quantize as pipeline

    monkeypatch.setattr(pipeline, "plan_mix", _needing_imatrix(pipeline.plan_mix))
    with pytest.raises(InputError, match="needs an importance matrix"):
        quantize_model(tiny_gguf, tmp_path / "x.gguf", "Q4_K_M")
    assert list(tmp_path.iterdir()) == []


def _needing_imatrix(plan_mix):
    def wrapped(*args, **kwargs):
        plan = plan_mix(*args, **kwargs)
        plan.needs_imatrix = list(plan.types)[:1]
        return plan

    return wrapped


def test_unknown_type_lists_the_supported_ones(tiny_gguf, tmp_path):
    with pytest.raises(InputError, match="Q4_K_M"):
        quantize_model(tiny_gguf, tmp_path / "x.gguf", "Q4_K_XL")


def test_a_quantized_source_is_refused(smollm2_gguf, tmp_path):
    with pytest.raises(InputError, match="already quantized"):
        quantize_model(smollm2_gguf, tmp_path / "x.gguf", "Q4_K_M")
    assert list(tmp_path.iterdir()) == []


def test_an_error_midway_leaves_nothing_behind(tiny_gguf, tmp_path, monkeypatch):
    from llmquant.pipeline import quantize as pipeline

    calls = {"n": 0}
    real = pipeline._encode_part

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_encode_part", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_gguf, tmp_path / "out.gguf", "Q4_K_M")
    assert list(tmp_path.iterdir()) == []


_MEMORY_SCRIPT = """
import json, sys, threading, time
from pathlib import Path
from llmquant.pipeline.quantize import quantize_model

def rss():  # resident bytes now, file pages included (ru_maxrss cannot be reset after the warm-up)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

small, big, out = sys.argv[1:4]
quantize_model(Path(small), Path(out + ".warm.gguf"), "Q8_0", threads=2)  # imports, numba, worker buffers
before, peak, done = rss(), [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)

sampler = threading.Thread(target=sample)
sampler.start()
quantize_model(Path(big), Path(out), "Q8_0", threads=2)
done.set()
sampler.join()
print(json.dumps({"growth": max(peak[0], rss()) - before}))
"""


def test_memory_stays_far_below_the_models_size(tiny_gguf, smollm2_f32_gguf, tmp_path):
    # parts are read into each worker's buffer, not mapped: mapped pages of the 540 MB source would stay resident
    run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tiny_gguf), str(smollm2_f32_gguf),
                          str(tmp_path / "out.gguf")], capture_output=True, text=True, check=True, timeout=600)
    growth = json.loads(run.stdout.strip().splitlines()[-1])["growth"]
    source = smollm2_f32_gguf.stat().st_size
    print(f"source {source / 2**20:.0f} MiB, peak RSS growth {growth / 2**20:.1f} MiB")
    assert growth < source / 5
    assert (tmp_path / "out.gguf").stat().st_size > source // 4  # Q8_0: every weight was written


def test_malloc_keeps_freed_memory_for_the_next_part_where_it_is_glibc():
    import platform

    from llmquant.pipeline.quantize import keep_freed_memory

    assert keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_our_file_runs_in_llama_cpp_and_loads_in_transformers(smollm2_f32_gguf, tmp_path):
    from llmquant.evaluate.llama_runtime import open_llama

    path = quantize_model(smollm2_f32_gguf, tmp_path / "smollm2-Q4_K_M.gguf", "Q4_K_M")[0].path
    llm = open_llama(path, n_ctx=128, verbose=False, n_threads=2)
    text = llm("The capital of France is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
    assert "Paris" in text

    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                 quantization_config=GgufConfig(dequantize=True),
                                                 dtype=torch.float32)
    assert model.config.num_hidden_layers == 30


def test_cli_quantizes_the_demo_model_with_an_on_the_fly_imatrix(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "llmquant", "quantize", "smollm2-135m", "-o", str(tmp_path / "q"), "--type",
         "Q8_0,IQ4_NL", "--calib", "builtin", "--calib-chunks", "1", "--calib-ctx", "128"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "q"
    assert sorted(p.name for p in out.iterdir()) == ["smollm2-135m-IQ4_NL.gguf", "smollm2-135m-Q8_0.gguf"]
    assert "importance matrix: computed from builtin" in proc.stdout
    assert "bits per weight" in proc.stdout
    inspect = subprocess.run([sys.executable, "-m", "llmquant", "inspect", str(out / "smollm2-135m-IQ4_NL.gguf"),
                              "--json"], capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(inspect.stdout)["key_metadata"]["file_type"] == "IQ4_NL"


@pytest.mark.parametrize("file_type", ["Q4_0", "Q5_1", "Q6_K", "Q3_K_M"])
def test_two_worker_threads_give_llama_cpps_file(file_type, tiny_gguf, tmp_path):
    # the numba searches release the GIL: two worker threads run them at once, and the file is still llama.cpp's,
    # byte for byte
    ours, theirs = quantize_both(tiny_gguf, tmp_path, file_type, random_imatrix(tiny_gguf), threads=2)
    assert_same_as_llama_cpp(ours, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
