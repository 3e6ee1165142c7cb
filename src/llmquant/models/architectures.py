"""Per-architecture conversion rules: GGUF architecture, hyper-parameters and tensor transforms, as a table.

Each supported Hugging Face architecture is one ``Architecture`` row. What llama.cpp expects of each comes from
its converter (convert_hf_to_gguf.py, conversion/*.py) and its loader (src/llama-model.cpp); the tensor names
come from gguf's own name map, so a row only states what differs between architectures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gguf
import torch

from llmquant.errors import InputError
from llmquant.models.config import ModelConfig
from llmquant.models.safetensors_io import WeightSource

# HF buffers that are not weights (llama.cpp's converter drops the same)
_NOT_WEIGHTS = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
# one expert's matrix in Mixtral (block_sparse_moe.experts.N.w1) and Qwen-MoE (mlp.experts.N.gate_proj) layouts
EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.*\.layers\.(?P<bid>\d+)\.(?:block_sparse_moe|mlp)\.experts)\.(?P<xid>\d+)\."
                     r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture becomes GGUF."""

    name: str
    hf_architectures: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    hparams: Callable[[ModelConfig], dict[str, Any]]
    permute_qk: bool = False  # llama.cpp's llama graph wants q/k rows in GGML's rotary (interleaved) order
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp by w
    drop_tensors: tuple[str, ...] = ()
    trim_embeddings_to_vocab: bool = False  # Gemma 3: llama.cpp drops embedding rows past the tokenizer's tokens
    add_space_prefix: bool | None = None  # SentencePiece: Gemma tokenizes without a leading space
    extra_tensors: Callable[[ModelConfig], dict[str, torch.Tensor]] | None = None
    moe: bool = False  # experts stored one by one in HF, stacked into one tensor per projection in GGUF

    @property
    def gguf_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


@dataclass
class TensorPlan:
    """One GGUF tensor: its name, its final shape (PyTorch order) and how to make it from the HF tensors."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    build: Callable[[list[torch.Tensor]], torch.Tensor]
    kind: gguf.MODEL_TENSOR | None = None
    bid: int | None = None
    n_experts: int = field(default=0)


# ---- hyper-parameters: GGUFWriter ``add_<key>`` → value -------------------------------------------------------


def _rope_scaling(config: ModelConfig) -> dict[str, Any]:
    """Rope scaling keys as convert_hf_to_gguf.py's TextModel.set_gguf_parameters writes them."""
    rope = config.rope_parameters
    rope_type = str(rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        return {"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": float(factor)}
    if rope_type == "yarn" and factor is not None:
        out: dict[str, Any] = {"rope_scaling_type": gguf.RopeScalingType.YARN, "rope_scaling_factor": float(factor),
                               "rope_scaling_orig_ctx_len": int(rope["original_max_position_embeddings"])}
        for key, writer_key in (("extrapolation_factor", "rope_scaling_yarn_ext_factor"),
                                ("attention_factor", "rope_scaling_yarn_attn_factor"),
                                ("beta_fast", "rope_scaling_yarn_beta_fast"),
                                ("beta_slow", "rope_scaling_yarn_beta_slow")):
            if rope.get(key) is not None:
                out[writer_key] = float(rope[key])
        return out
    if rope_type in ("su", "longrope"):
        return {"rope_scaling_type": gguf.RopeScalingType.LONGROPE}
    if rope_type in ("default", "llama3"):  # llama3: carried by the rope_freqs tensor instead
        return {}
    raise InputError(f"{config.folder / 'config.json'}: rope type '{rope_type}' is not supported by llmquant convert")


def common_hparams(config: ModelConfig) -> dict[str, Any]:
    """The keys every decoder writes (convert_hf_to_gguf.py TextModel.set_gguf_parameters)."""
    out: dict[str, Any] = {
        "block_count": config.n_layers,
        "context_length": int(config.require("max_position_embeddings", "n_positions")),
        "embedding_length": config.hidden_size,
        "feed_forward_length": int(config.require("intermediate_size")),
        "head_count": config.n_head,
        "head_count_kv": config.n_head_kv,
        "layer_norm_rms_eps": float(config.require("rms_norm_eps")),
    }
    if (theta := config.rope_parameters.get("rope_theta")) is not None:
        out["rope_freq_base"] = float(theta)
    if (n_experts := config.get("num_local_experts", "num_experts")) is not None:
        out["expert_count"] = int(n_experts)
        out["expert_used_count"] = int(config.require("num_experts_per_tok"))
    if config.get("head_dim") is not None:
        out["key_length"] = out["value_length"] = config.head_dim
    out.update(_rope_scaling(config))
    return out


def llama_hparams(config: ModelConfig) -> dict[str, Any]:
    out = common_hparams(config)
    out["vocab_size"] = config.vocab_size
    out["rope_dimension_count"] = config.head_dim
    return out


def qwen_moe_hparams(config: ModelConfig) -> dict[str, Any]:
    out = common_hparams(config)
    if config.get("moe_intermediate_size") is not None:
        out["expert_feed_forward_length"] = int(config.hparams["moe_intermediate_size"])
    return out


def gemma2_hparams(config: ModelConfig) -> dict[str, Any]:
    out = common_hparams(config)
    out.pop("rope_freq_base", None)  # llama.cpp's Gemma2 converter leaves the default 10000
    out["key_length"] = out["value_length"] = config.head_dim
    out["attn_logit_softcapping"] = float(config.require("attn_logit_softcapping"))
    out["final_logit_softcapping"] = float(config.require("final_logit_softcapping"))
    out["sliding_window"] = int(config.require("sliding_window"))
    return out


def gemma3_hparams(config: ModelConfig) -> dict[str, Any]:
    out = common_hparams(config)
    out["key_length"] = out["value_length"] = config.head_dim
    out["rope_freq_base"] = float(config.rope_parameters.get("rope_theta", 1_000_000.0))  # the global layers'
    rope_all = config.hparams.get("rope_parameters") or {}
    swa_theta = (rope_all.get("sliding_attention") or {}).get("rope_theta", config.get("rope_local_base_freq"))
    if swa_theta is not None:
        out["rope_freq_base_swa"] = float(swa_theta)
    if config.get("final_logit_softcapping"):
        out["final_logit_softcapping"] = float(config.hparams["final_logit_softcapping"])
    if config.get("sliding_window_pattern") != 1:
        out["sliding_window"] = int(config.require("sliding_window"))
    return out


def phi3_hparams(config: ModelConfig) -> dict[str, Any]:
    """As conversion/phi.py Phi3MiniModel: rope over a fraction of the head, original context for longrope."""
    out = common_hparams(config)
    rope = config.rope_parameters
    fraction = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", default=1.0)))
    out["rope_dimension_count"] = int(fraction * config.hidden_size) // config.n_head
    original = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    out["rope_scaling_orig_ctx_len"] = int(original if original is not None else out["context_length"])
    out["sliding_window"] = int(config.get("sliding_window", default=0))  # 0 tells llama.cpp: no sliding window
    out.pop("rope_scaling_type", None)  # Phi-3 carries longrope in its factor tensors
    return out


# ---- generated tensors ---------------------------------------------------------------------------------------


def llama3_rope_freqs(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama 3.1+ frequency scaling as a rope_freqs tensor (convert_hf_to_gguf.py LlamaModel.generate_extra_tensors)."""
    rope = config.rope_parameters
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return {}
    base = float(rope.get("rope_theta", 10000.0))
    dim = config.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    factors = torch.where(wavelen < old_context / high, torch.ones_like(freqs),
                          torch.where(wavelen > old_context / low, torch.full_like(freqs, factor),
                                      1 / ((1 - smooth) / factor + smooth)))
    return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": factors.to(torch.float32)}


def phi3_rope_factors(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Phi-3 longrope: long and short factors as tensors (conversion/phi.py generate_extra_tensors)."""
    rope = config.rope_parameters
    long_factors, short_factors = rope.get("long_factor"), rope.get("short_factor")
    if not long_factors or not short_factors:
        return {}
    return {
        gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": torch.tensor(long_factors).float(),
        gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": torch.tensor(short_factors).float(),
    }


# ---- the table -------------------------------------------------------------------------------------------------

ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", ("LlamaForCausalLM", "LLaMAForCausalLM"), gguf.MODEL_ARCH.LLAMA, llama_hparams,
                 permute_qk=True, extra_tensors=llama3_rope_freqs),
    Architecture("mistral", ("MistralForCausalLM",), gguf.MODEL_ARCH.LLAMA, llama_hparams,
                 permute_qk=True, extra_tensors=llama3_rope_freqs),
    Architecture("mixtral", ("MixtralForCausalLM",), gguf.MODEL_ARCH.LLAMA, llama_hparams,
                 permute_qk=True, moe=True),
    Architecture("qwen2", ("Qwen2ForCausalLM",), gguf.MODEL_ARCH.QWEN2, common_hparams),
    Architecture("qwen3", ("Qwen3ForCausalLM",), gguf.MODEL_ARCH.QWEN3, common_hparams),
    Architecture("qwen3-moe", ("Qwen3MoeForCausalLM",), gguf.MODEL_ARCH.QWEN3MOE, qwen_moe_hparams,
                 moe=True),
    Architecture("gemma2", ("Gemma2ForCausalLM",), gguf.MODEL_ARCH.GEMMA2, gemma2_hparams,
                 norm_offset=1.0, drop_tensors=("lm_head.weight",), add_space_prefix=False),
    Architecture("gemma3", ("Gemma3ForCausalLM",), gguf.MODEL_ARCH.GEMMA3, gemma3_hparams,
                 norm_offset=1.0, trim_embeddings_to_vocab=True, add_space_prefix=False),
    Architecture("phi3", ("Phi3ForCausalLM",), gguf.MODEL_ARCH.PHI3, phi3_hparams, extra_tensors=phi3_rope_factors),
)


def find_architecture(config: ModelConfig) -> Architecture:
    for arch in ARCHITECTURES:
        if config.hf_architecture in arch.hf_architectures:
            return arch
    supported = ", ".join(a for arch in ARCHITECTURES for a in arch.hf_architectures if not a.startswith("LLaMA"))
    raise InputError(f"{config.folder / 'config.json'}: architecture {config.hf_architecture} is not supported; "
                     f"llmquant convert supports {supported}")


# ---- tensor plans ----------------------------------------------------------------------------------------------


def permute_rotary_rows(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split rotary row order → GGML's interleaved pairs (as convert_hf_to_gguf.py LlamaModel.permute)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _block_id(name: str) -> int | None:
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None


def _expected_shapes(config: ModelConfig) -> dict[gguf.MODEL_TENSOR, tuple[int, ...]]:
    """Shapes config.json implies, so a weight that does not fit is named before llama.cpp fails on it."""
    hidden, head_dim = config.hidden_size, config.head_dim
    t = gguf.MODEL_TENSOR
    return {
        t.TOKEN_EMBD: (config.vocab_size, hidden), t.OUTPUT: (config.vocab_size, hidden), t.OUTPUT_NORM: (hidden,),
        t.ATTN_NORM: (hidden,), t.ATTN_Q: (config.n_head * head_dim, hidden),
        t.ATTN_K: (config.n_head_kv * head_dim, hidden), t.ATTN_V: (config.n_head_kv * head_dim, hidden),
        t.ATTN_OUT: (hidden, config.n_head * head_dim),
    }


def plan_tensors(arch: Architecture, config: ModelConfig, weights: WeightSource,
                 n_vocab_tokens: int | None = None) -> list[TensorPlan]:
    """Every GGUF tensor of the model, in file order, each with the recipe to build it from the HF tensors."""
    n_layers = config.n_layers
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, n_layers)
    expected = _expected_shapes(config)
    plans: list[TensorPlan] = []
    experts: dict[tuple[str, int, str], dict[int, str]] = {}
    expert_slots: set[tuple[str, int, str]] = set()
    config_file = config.folder / "config.json"

    for hf_name in weights.names():
        if hf_name.endswith(_NOT_WEIGHTS) or hf_name in arch.drop_tensors:
            continue
        bid = _block_id(hf_name)
        if bid is not None and bid >= n_layers:
            raise InputError(f"tensor '{hf_name}' belongs to layer {bid}, but {config_file} says "
                             f"num_hidden_layers={n_layers}")
        if (match := EXPERT_WEIGHT.match(hf_name)) is not None and arch.moe:
            key = (match["prefix"], int(match["bid"]), match["proj"])
            experts.setdefault(key, {})[int(match["xid"])] = hf_name
            if key not in expert_slots:  # a placeholder keeps the file order; filled in below
                expert_slots.add(key)
                plans.append(TensorPlan(name="", shape=(), sources=key, build=_identity, bid=bid))  # type: ignore
            continue
        found = name_map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise InputError(f"tensor '{hf_name}' has no GGUF name for {arch.gguf_name}; "
                             "is this a model of the architecture config.json declares?")
        kind, gguf_name = found
        shape = weights.shape(hf_name)
        if hf_name.endswith(".weight") and kind in expected and shape != expected[kind]:
            raise InputError(f"tensor '{hf_name}' has shape {list(shape)}, but {config_file} implies "
                             f"{list(expected[kind])}; the weights do not match the config")
        plans.append(_single_plan(arch, config, hf_name, gguf_name, kind, shape, bid, n_vocab_tokens))

    out = [_expert_plan(arch, config, weights, name_map, p.sources, experts[p.sources])  # type: ignore[arg-type]
           if p.name == "" else p for p in plans]
    for name, tensor in (arch.extra_tensors(config) if arch.extra_tensors else {}).items():
        out.append(TensorPlan(name=name, shape=tuple(tensor.shape), sources=(), build=lambda _, t=tensor: t))
    _check_complete(out, config, arch)
    return out


def _identity(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _single_plan(arch: Architecture, config: ModelConfig, hf_name: str, gguf_name: str, kind: gguf.MODEL_TENSOR,
                 shape: tuple[int, ...], bid: int | None, n_vocab_tokens: int | None) -> TensorPlan:
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if arch.permute_qk and kind in (gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K):
        n_head = config.n_head if kind == gguf.MODEL_TENSOR.ATTN_Q else config.n_head_kv
        steps.append(lambda w, n=n_head: permute_rotary_rows(w, n))
    if arch.norm_offset and hf_name.endswith("norm.weight"):
        steps.append(lambda w, off=arch.norm_offset: w + off)
    if arch.trim_embeddings_to_vocab and kind == gguf.MODEL_TENSOR.TOKEN_EMBD and n_vocab_tokens is not None:
        if n_vocab_tokens < shape[0]:
            shape = (n_vocab_tokens, *shape[1:])
            steps.append(lambda w, n=n_vocab_tokens: w[:n])

    def build(tensors: list[torch.Tensor]) -> torch.Tensor:
        w = tensors[0].to(torch.float32)
        for step in steps:
            w = step(w)
        return w

    return TensorPlan(name=gguf_name, shape=shape, sources=(hf_name,), build=build, kind=kind, bid=bid)


def _expert_plan(arch: Architecture, config: ModelConfig, weights: WeightSource, name_map: gguf.TensorNameMap,
                 key: tuple[str, int, str], by_expert: dict[int, str]) -> TensorPlan:
    """All experts of one projection stacked into a [n_experts, rows, cols] tensor (llama.cpp's ffn_*_exps)."""
    prefix, bid, proj = key
    n_experts = int(config.require("num_local_experts", "num_experts"))
    missing = sorted(set(range(n_experts)) - set(by_expert))
    if missing:
        raise InputError(f"layer {bid}: experts {missing[:5]} of '{prefix}.N.{proj}' are missing; config.json "
                         f"says {n_experts} experts")
    stacked_name = f"{prefix}.{proj}.weight"
    found = name_map.get_type_and_name(stacked_name, try_suffixes=(".weight",))
    if found is None:
        raise InputError(f"tensor '{stacked_name}' has no GGUF name for {arch.gguf_name}")
    sources = tuple(by_expert[i] for i in range(n_experts))
    shapes = {weights.shape(name) for name in sources}
    if len(shapes) != 1:
        raise InputError(f"layer {bid}: the experts of '{prefix}.N.{proj}' differ in shape ({sorted(shapes)})")
    return TensorPlan(name=found[1], shape=(n_experts, *shapes.pop()), sources=sources, kind=found[0], bid=bid,
                      n_experts=n_experts,
                      build=lambda tensors: torch.stack([t.to(torch.float32) for t in tensors]))


def _check_complete(plans: list[TensorPlan], config: ModelConfig, arch: Architecture) -> None:
    names = {p.name for p in plans}
    required = [gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"]
    required += [f"blk.{bid}.attn_norm.weight" for bid in range(config.n_layers)]
    for name in required:
        if name not in names:
            raise InputError(f"{config.folder}: the weights have no tensor for '{name}'; are all shards there?")
