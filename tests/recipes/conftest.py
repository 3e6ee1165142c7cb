"""Models and the llama.cpp oracle for the mix tests.

* ``tiny_llama_f32_gguf``: a random 16-layer llama with k-quant-friendly widths (hidden 256, ffn 512), GQA 4
  and an untied ``output.weight``; SmolLM2's tokenizer, so llama.cpp treats it as a real model.
* ``tiny_moe_f32_gguf``: the same shape of model with 8 experts per layer (Mixtral-style tensors).
* ``llama_cpp_mix``: runs llama.cpp's ``llama_model_quantize`` once per (model, file type, options) and caches
  the tensor types it wrote, so later runs take no time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter, LlamaFileType

from llmquant.gguf_io.header import read_gguf_header
from llmquant.oracles.llama_quantize import LlamaQuantizeError, llama_quantize
from llmquant.recipes import MixOptions

# bump when the fixture models change, so stale cached files are not reused
_FIXTURE_VERSION = 1


@dataclass(frozen=True)
class TinyConfig:
    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    n_expert_used: int = 0
    tied: bool = False
    arch: str = "llama"  # or "falcon": fused attn_qkv, no ffn_gate, LayerNorm with biases


TINY_LLAMA = TinyConfig("tiny-llama-gqa4", n_layer=16, n_embd=256, n_ff=512, n_head=4, n_head_kv=1)
# 80 layers with GQA: llama.cpp calls it a 70B and gives attn_v more bits
TINY_70B = TinyConfig("tiny-llama-80-layers", n_layer=80, n_embd=256, n_ff=256, n_head=8, n_head_kv=1)
TINY_FALCON = TinyConfig("tiny-falcon", n_layer=8, n_embd=256, n_ff=512, n_head=4, n_head_kv=1, arch="falcon")
TINY_MOE = TinyConfig(
    "tiny-moe-8x", n_layer=8, n_embd=256, n_ff=256, n_head=4, n_head_kv=2, n_expert=8, n_expert_used=2
)


def _tensor_shapes(config: TinyConfig, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """llama.cpp's tensor names with numpy shapes (row length last)."""
    head_dim = config.n_embd // config.n_head
    n_embd_kv = head_dim * config.n_head_kv
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, config.n_embd)}
    shapes["output_norm.weight"] = (config.n_embd,)
    if not config.tied:
        shapes["output.weight"] = (n_vocab, config.n_embd)
    if config.arch == "falcon":
        shapes["output_norm.bias"] = (config.n_embd,)
        for i in range(config.n_layer):
            blk = f"blk.{i}"
            shapes[f"{blk}.attn_norm.weight"] = (config.n_embd,)
            shapes[f"{blk}.attn_norm.bias"] = (config.n_embd,)
            shapes[f"{blk}.attn_qkv.weight"] = (config.n_embd + 2 * n_embd_kv, config.n_embd)
            shapes[f"{blk}.attn_output.weight"] = (config.n_embd, config.n_embd)
            shapes[f"{blk}.ffn_up.weight"] = (config.n_ff, config.n_embd)
            shapes[f"{blk}.ffn_down.weight"] = (config.n_embd, config.n_ff)
        return shapes
    for i in range(config.n_layer):
        blk = f"blk.{i}"
        shapes[f"{blk}.attn_norm.weight"] = (config.n_embd,)
        shapes[f"{blk}.attn_q.weight"] = (config.n_embd, config.n_embd)
        shapes[f"{blk}.attn_k.weight"] = (n_embd_kv, config.n_embd)
        shapes[f"{blk}.attn_v.weight"] = (n_embd_kv, config.n_embd)
        shapes[f"{blk}.attn_output.weight"] = (config.n_embd, config.n_embd)
        shapes[f"{blk}.ffn_norm.weight"] = (config.n_embd,)
        if config.n_expert:
            shapes[f"{blk}.ffn_gate_inp.weight"] = (config.n_expert, config.n_embd)
            shapes[f"{blk}.ffn_gate_exps.weight"] = (config.n_expert, config.n_ff, config.n_embd)
            shapes[f"{blk}.ffn_up_exps.weight"] = (config.n_expert, config.n_ff, config.n_embd)
            shapes[f"{blk}.ffn_down_exps.weight"] = (config.n_expert, config.n_embd, config.n_ff)
        else:
            shapes[f"{blk}.ffn_gate.weight"] = (config.n_ff, config.n_embd)
            shapes[f"{blk}.ffn_up.weight"] = (config.n_ff, config.n_embd)
            shapes[f"{blk}.ffn_down.weight"] = (config.n_embd, config.n_ff)
    return shapes


def write_tiny_llama_gguf(config: TinyConfig, tokenizer_from: Path, dst: Path) -> Path:
    """A random F32 llama GGUF with llama.cpp's tensor names and metadata, and a real tokenizer. Cached."""
    if dst.is_file():
        return dst
    source = read_gguf_header(tokenizer_from)
    n_vocab = len(source.metadata["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(sum(map(ord, config.name)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp_dir:
        tmp = Path(tmp_dir) / dst.name
        writer = GGUFWriter(tmp, config.arch)
        writer.add_name(config.name)
        writer.add_file_type(int(LlamaFileType.ALL_F32))
        writer.add_block_count(config.n_layer)
        writer.add_context_length(2048)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_ff)
        writer.add_head_count(config.n_head)
        writer.add_head_count_kv(config.n_head_kv)
        writer.add_rope_freq_base(10000.0)
        if config.arch == "falcon":
            writer.add_layer_norm_eps(1e-5)
        else:
            writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_dimension_count(config.n_embd // config.n_head)
        writer.add_vocab_size(n_vocab)
        if config.n_expert:
            writer.add_expert_count(config.n_expert)
            writer.add_expert_used_count(config.n_expert_used)
        for key, value in source.metadata.items():
            if key.startswith("tokenizer."):
                value_type, item_type = source.value_types[key]
                writer.add_key_value(key, value, value_type, sub_type=item_type)
        for name, shape in _tensor_shapes(config, n_vocab).items():
            if len(shape) == 1:
                values = np.ones(shape, dtype=np.float32)
            else:
                values = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
            writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.rename(dst)
    return dst


@pytest.fixture(scope="session")
def tiny_llama_f32_gguf(test_cache: Path, smollm2_f32_gguf: Path) -> Path:
    """Random 16-layer llama, hidden 256 (every row fits k-quants), GQA 4, untied output.weight."""
    return write_tiny_llama_gguf(
        TINY_LLAMA, smollm2_f32_gguf, test_cache / f"{TINY_LLAMA.name}-v{_FIXTURE_VERSION}.gguf"
    )


@pytest.fixture(scope="session")
def tiny_70b_f32_gguf(test_cache: Path, smollm2_f32_gguf: Path) -> Path:
    """Random 80-layer llama with GQA 8 (narrow: hidden 256): llama.cpp's LLM_TYPE_70B."""
    return write_tiny_llama_gguf(TINY_70B, smollm2_f32_gguf, test_cache / f"{TINY_70B.name}-v{_FIXTURE_VERSION}.gguf")


@pytest.fixture(scope="session")
def tiny_falcon_f32_gguf(test_cache: Path, smollm2_f32_gguf: Path) -> Path:
    """Random 8-layer Falcon: fused attn_qkv, multi-query attention, untied output.weight."""
    path = test_cache / f"{TINY_FALCON.name}-v{_FIXTURE_VERSION}.gguf"
    return write_tiny_llama_gguf(TINY_FALCON, smollm2_f32_gguf, path)


@pytest.fixture(scope="session")
def tiny_moe_f32_gguf(test_cache: Path, smollm2_f32_gguf: Path) -> Path:
    """Random 8-layer llama with 8 experts per layer (ffn_*_exps, ffn_gate_inp), GQA 2, untied output.weight."""
    return write_tiny_llama_gguf(TINY_MOE, smollm2_f32_gguf, test_cache / f"{TINY_MOE.name}-v{_FIXTURE_VERSION}.gguf")


# ---------------------------------------------------------------------------------------------------------
# llama.cpp's choices, cached
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleMix:
    """What llama_model_quantize wrote for one (model, file type, options)."""

    types: dict[str, str]  # tensor name -> type, in the file's order
    n_fallback: int  # llama.cpp's own count of fallback tensors
    refused_without_imatrix: bool  # llama.cpp stopped: "this quantization requires an imatrix"
    used_imatrix: bool  # the types come from a run with an importance matrix (all ones)
    seconds: float


def fake_imatrix(model: Path) -> dict[str, np.ndarray]:
    """An importance matrix of ones for every matrix in ``model``: enough for llama.cpp to accept IQ1/IQ2 mixes."""
    imatrix = {}
    for tensor in read_gguf_header(model).tensors:
        shape = tensor.shape
        if len(shape) >= 2:
            n_experts = shape[2] if len(shape) > 2 else 1
            imatrix[tensor.name] = np.ones(shape[0] * n_experts, dtype=np.float32)
    return imatrix


def _oracle_kwargs(options: MixOptions) -> dict:
    return {
        "pure": options.pure,
        "output_tensor_type": options.output_tensor_type,
        "token_embedding_type": options.token_embedding_type,
        "tensor_types": options.tensor_types,
        "leave_output_tensor": options.leave_output_tensor,
    }


def run_oracle(model: Path, mix: str, options: MixOptions, work_dir: Path) -> OracleMix:
    """llama_model_quantize on ``model``; without an imatrix first unless ``options.has_imatrix``, then with one."""
    dst = work_dir / f"{model.stem}-{mix}.gguf"
    refused = False
    result = None
    try:
        if not options.has_imatrix:
            try:
                result = llama_quantize(model, dst, mix, **_oracle_kwargs(options))
            except LlamaQuantizeError as error:
                if "requires an imatrix" not in error.log:
                    raise
                refused = True
        if result is None:
            result = llama_quantize(model, dst, mix, imatrix=fake_imatrix(model), **_oracle_kwargs(options))
        types = result.tensor_types()
    finally:
        dst.unlink(missing_ok=True)
    return OracleMix(
        types=types,
        n_fallback=result.n_fallback,
        refused_without_imatrix=refused,
        used_imatrix=refused or options.has_imatrix,
        seconds=result.seconds,
    )


@pytest.fixture(scope="session")
def llama_cpp_mix(test_cache: Path) -> Callable[..., OracleMix]:
    """``llama_cpp_mix(model, "Q4_K_M", MixOptions(...))``: llama.cpp's types, computed once and cached as JSON."""
    import llama_cpp

    cache_dir = test_cache / "llama-cpp-mixes"
    cache_dir.mkdir(parents=True, exist_ok=True)

    def oracle(model: Path, mix: str, options: MixOptions | None = None) -> OracleMix:
        options = options or MixOptions()
        identity = json.dumps(
            [model.name, model.stat().st_size, mix, dataclasses.asdict(options), llama_cpp.__version__],
            sort_keys=True,
        )
        digest = hashlib.sha1(identity.encode()).hexdigest()[:16]
        cached = cache_dir / f"{model.stem}-{mix}-{digest}.json"
        if cached.is_file():
            return OracleMix(**json.loads(cached.read_text()))
        with tempfile.TemporaryDirectory(dir=cache_dir) as work_dir:
            found = run_oracle(model, mix, options, Path(work_dir))
        cached.write_text(json.dumps(dataclasses.asdict(found)))
        return found

    return oracle
