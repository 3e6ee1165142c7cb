"""Which tensor type each tensor gets for a llama.cpp file type, exactly as ``llama-quantize`` decides.

    types = choose_tensor_types(tensors, arch_info, "Q4_K_M")      # {"blk.0.attn_v.weight": "Q6_K", …}
    plan = plan_mix(tensors, arch_info, "Q4_K_M", MixOptions(pure=True))   # types, fallbacks, imatrix needs

Reimplements llama.cpp's src/llama-quant.cpp: ``tensor_allows_quantization`` (``should_quantize``),
``llama_tensor_get_type`` (``_choose_type``), ``llama_tensor_get_type_impl`` (``_mix_rule`` and the tables
below), ``tensor_type_fallback`` (``_fallback``) and ``tensor_requires_imatrix`` (``requires_imatrix``).
Pure: tensors come in as names and shapes, types go out as names; nothing here reads a file.

Shapes are in ggml order, as GGUF stores them: ``shape[0]`` is the row length (ne0), ``shape[2]`` the
expert count of a 3-D expert tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from llmquant.recipes.arch import ArchInfo
from llmquant.recipes.file_types import FILE_TYPES, FileType, block_size, file_type, is_quantized

# ---------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str  # llama.cpp's GGUF name: "blk.3.attn_v.weight"
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    source_type: str = "F32"  # the type in the input file: tensors that are never quantized keep it


@dataclass(frozen=True)
class MixOptions:
    """llama-quantize's options that change the mix (names as its command line spells them)."""

    pure: bool = False  # --pure: every quantizable tensor gets the default type (fallbacks still apply)
    output_tensor_type: str | None = None  # --output-tensor-type
    token_embedding_type: str | None = None  # --token-embedding-type
    # --tensor-type REGEX=TYPE, in order; the first pattern found anywhere in the name wins (std::regex_search)
    tensor_types: tuple[tuple[str, str], ...] = ()
    leave_output_tensor: bool = False  # --leave-output-tensor: output.weight keeps its input type
    has_imatrix: bool = False  # an importance matrix is given: some mixes then choose differently


@dataclass(frozen=True)
class Fallback:
    """A tensor whose row length does not fit the type the mix wanted, and the type it got instead."""

    name: str
    wanted: str
    used: str
    row_length: int


@dataclass
class MixPlan:
    file_type: FileType
    types: dict[str, str]  # tensor name -> tensor type, in llama.cpp's write order
    fallbacks: list[Fallback] = field(default_factory=list)  # llama.cpp's n_fallback is len(fallbacks)
    needs_imatrix: list[str] = field(default_factory=list)  # tensors that llama.cpp refuses without an imatrix


# ---------------------------------------------------------------------------------------------------------
# Which tensors are quantized at all (tensor_allows_quantization)
# ---------------------------------------------------------------------------------------------------------

# Substrings that keep a tensor in its input type, with llama.cpp's reasons.
_NEVER_QUANTIZED_PARTS: tuple[str, ...] = (
    "_norm.weight",  # norms
    "ffn_gate_inp.weight",  # MoE router
    "ffn_gate_tid2eid.weight",  # DeepSeek-V4's i32 token -> expert routing table
    "altup",  # Gemma-3n: tiny (4x4)
    "laurel",
    "per_layer_model_proj",  # Gemma-3n: not large
    "ssm_conv1d",  # Mamba/Kimi: small conv1d weights
    "shortconv.conv.weight",
    "indexer.k_proj.weight",  # MiniMax: tiny indexer projections
    "indexer.q_proj.weight",
    # RWKV: small yet 2-D
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",  # T5 relative position bias
    # multimodal
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    # audio codebooks
    "a.rvq.codebook",
    "mm.a.code_embd",
)
# Whole names never quantized: BERT-style position embeddings and token types (LLM_TN POS_EMBD, TOKEN_TYPES).
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})
# glm5-next keeps these small or sensitive tensors as they are.
_GLM5_NEXT_NEVER_QUANTIZED_PARTS: tuple[str, ...] = (
    "hc_",
    "indexer.attn_q_b",
    "indexer.attn_k",
    "indexer.proj",
    "indexer_compressor_gate",
    "indexer_compressor_ape",
    "ssm_f_a.weight",
    "ssm_f_b.weight",
    "ssm_g_a.weight",
    "ssm_g_b.weight",
    "ssm_beta.weight",
    "attn_kv_a_mqa.weight",
    "attn_k_b.weight",
    "attn_v_b.weight",
)


def n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count ([576, 1] is 1-D)."""
    for i in range(len(shape) - 1, 0, -1):
        if shape[i] > 1:
            return i + 1
    return 1


def should_quantize(name: str, shape: Sequence[int], *, arch: str = "llama", leave_output_tensor: bool = False) -> bool:
    """Whether llama.cpp quantizes this tensor at all (tensor_allows_quantization); if not, it keeps its type."""
    if n_dims(shape) < 2:  # only 2-D matrices and 3-D expert stacks
        return False
    if not name.endswith("weight"):
        return False
    if leave_output_tensor and name == "output.weight":
        return False
    if name in _NEVER_QUANTIZED_NAMES:
        return False
    parts = _NEVER_QUANTIZED_PARTS + (_GLM5_NEXT_NEVER_QUANTIZED_PARTS if arch == "glm5-next" else ())
    return not any(part in name for part in parts)


# ---------------------------------------------------------------------------------------------------------
# Tensor categories (tensor_get_category) and llama.cpp's processing order
# ---------------------------------------------------------------------------------------------------------


class Category(Enum):
    TOKEN_EMBD = "token_embd"
    ATTN_Q = "attn_q"
    ATTN_V = "attn_v"
    ATTN_K = "attn_k"
    ATTN_QKV = "attn_qkv"
    ATTN_KV_B = "attn_kv_b"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


# Checked in this order, first substring found wins (so ffn_up_exps is FFN_UP, ffn_gate_shexp FFN_GATE).
_CATEGORY_PARTS: tuple[tuple[str, Category], ...] = (
    ("attn_qkv.weight", Category.ATTN_QKV),
    ("attn_kv_b.weight", Category.ATTN_KV_B),
    ("attn_v.weight", Category.ATTN_V),
    ("attn_k.weight", Category.ATTN_K),
    ("attn_q.weight", Category.ATTN_Q),
    ("attn_output.weight", Category.ATTN_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)
# The value tensors: smaller than the others (GQA) and more sensitive, so the mixes give them more bits.
_ATTN_V_LIKE = frozenset({Category.ATTN_V, Category.ATTN_QKV, Category.ATTN_KV_B})


def tensor_category(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Category.TOKEN_EMBD
    for part, category in _CATEGORY_PARTS:
        if part in name:
            return category
    return Category.OTHER


_LAYER = re.compile(r"blk\.([+-]?\d+)\.")


def layer_of(name: str) -> int | None:
    """The block number in ``blk.N.…``, or None for tensors outside the blocks."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def llama_order_key(name: str) -> tuple[int, str]:
    """llama.cpp visits (and writes) tensors by layer, non-block tensors first, then by name (weight_name_comparer).

    The order matters: some mixes count attn_v/ffn_down tensors as they go rather than reading the layer.
    """
    layer = layer_of(name)
    return (-1 if layer is None else layer, name)


# ---------------------------------------------------------------------------------------------------------
# The mixes (llama_tensor_get_type_impl), as tables: file type -> rule giving a type, or None to keep the default
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Site:
    """What a rule may look at: where the tensor sits, and the model."""

    i_layer: int  # the layer (or, for attn_v and dense ffn tensors, llama.cpp's running count)
    n_layer: int
    model: ArchInfo
    has_imatrix: bool

    @property
    def first_eighth(self) -> bool:
        return self.i_layer < self.n_layer // 8

    @property
    def more_bits(self) -> bool:
        # llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer between
        n = self.n_layer
        return self.i_layer < n // 8 or self.i_layer >= 7 * n // 8 or (self.i_layer - n // 8) % 3 == 2

    @property
    def gqa4(self) -> bool:
        return self.model.n_gqa >= 4

    @property
    def falcon(self) -> bool:
        return self.model.arch == "falcon"


_Rule = Callable[[_Site], "str | None"]


def _always(type_name: str) -> _Rule:
    return lambda site: type_name


# The very low-bit i-quant mixes share their own branch in llama.cpp.
_LOW_BIT_IQ = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})

# output.weight (and token_embd.weight when tied to it): Q5_K for these, else Q6_K unless the mix is Q8_0.
_OUTPUT_Q5_K = frozenset({"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})

# token_embd.weight of an untied model.
_TOKEN_EMBD_TYPE: dict[str, str] = {
    "IQ2_XXS": "Q2_K",
    "IQ2_XS": "Q2_K",
    "IQ1_S": "Q2_K",
    "IQ1_M": "Q2_K",
    "IQ2_S": "IQ3_S",
    "IQ2_M": "IQ3_S",
    "IQ3_XXS": "IQ3_S",
    "TQ1_0": "Q4_K",
    "TQ2_0": "Q4_K",
    "Q2_0": "Q4_K",
}

# attn_v (and attn_qkv, attn_kv_b); i_layer is llama.cpp's running count of these tensors (i_attention_wv).
_ATTN_V_RULES: dict[str, _Rule] = {
    "Q2_K": lambda s: "Q4_K" if s.gqa4 else "Q3_K",
    "Q2_K_S": lambda s: "Q4_K" if s.gqa4 else None,
    "IQ3_XXS": lambda s: "Q4_K" if s.gqa4 else ("IQ3_XXS" if s.has_imatrix else "IQ3_S"),
    "IQ3_XS": lambda s: "Q4_K" if s.gqa4 else None,
    "IQ3_S": lambda s: "Q4_K" if s.gqa4 else None,
    "IQ3_M": _always("Q4_K"),
    "Q3_K_M": lambda s: "Q5_K" if s.i_layer < 2 else "Q4_K",
    "Q3_K_L": _always("Q5_K"),
    "IQ4_NL": lambda s: "Q5_K" if s.gqa4 else None,
    "IQ4_XS": lambda s: "Q5_K" if s.gqa4 else None,
    "Q4_K_M": lambda s: "Q6_K" if s.more_bits else None,
    "Q5_K_M": lambda s: "Q6_K" if s.more_bits else None,
    "Q4_K_S": lambda s: "Q5_K" if s.i_layer < 4 else None,
}

_ATTN_K_RULES: dict[str, _Rule] = {"IQ3_XS": _always("IQ3_XXS"), "IQ3_XXS": _always("IQ2_S")}
_ATTN_Q_RULES = _ATTN_K_RULES

# ffn_down; i_layer is the block number for MoE models, llama.cpp's running count (i_ffn_down) otherwise.
_FFN_DOWN_RULES: dict[str, _Rule] = {
    "Q2_K": _always("Q3_K"),
    "Q2_K_S": lambda s: "Q4_K" if s.first_eighth else None,
    "IQ3_XXS": lambda s: None if s.has_imatrix else ("Q4_K" if s.first_eighth else "Q3_K"),
    # "arch != FALCON || use_more_bits": every non-Falcon layer past the first sixteenth gets Q4_K
    "Q3_K_M": lambda s: "Q5_K" if s.i_layer < s.n_layer // 16 else ("Q4_K" if not s.falcon or s.more_bits else "Q3_K"),
    "IQ3_M": lambda s: "Q4_K" if s.first_eighth or (s.model.n_expert == 8 and s.more_bits) else None,
    "Q3_K_L": lambda s: "Q4_K" if s.falcon else "Q5_K",
    "Q4_K_M": lambda s: (
        ("Q6_K" if s.i_layer < s.n_layer // 16 else "Q5_K" if s.more_bits else "Q4_K")
        if s.falcon
        else ("Q6_K" if s.more_bits else None)
    ),
    "IQ4_NL": lambda s: "Q5_K" if s.first_eighth and not s.has_imatrix else None,
    "IQ4_XS": lambda s: "Q5_K" if s.first_eighth and not s.has_imatrix else None,
    "Q5_K_M": lambda s: "Q6_K" if s.more_bits else None,
    "Q4_K_S": lambda s: "Q5_K" if not s.falcon and s.first_eighth else None,
    # only with an imatrix, so that the plain Q4_0/Q5_0 mixes stay what they always were
    "Q4_0": lambda s: "Q4_1" if s.has_imatrix and s.first_eighth else None,
    "Q5_0": lambda s: "Q5_1" if s.has_imatrix and s.first_eighth else None,
}

# attn_output of an 8-expert (Mixtral-like) model, and of any other model (Falcon has its own line).
_ATTN_OUTPUT_8_EXPERTS_Q5_K = frozenset(
    {"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S", "IQ3_M", "IQ4_XS"}
)
_ATTN_OUTPUT_TYPE: dict[str, str] = {
    "Q2_K": "Q3_K",
    "IQ3_XXS": "IQ3_S",
    "Q3_K_M": "Q4_K",
    "Q3_K_L": "Q5_K",
    "IQ3_M": "Q4_K",
}
_ATTN_OUTPUT_FALCON_TYPE: dict[str, str] = {"Q3_K_L": "Q4_K"}

# ffn_gate and ffn_up: IQ3_XS drops the middle three quarters of the layers to IQ3_XXS.
_FFN_GATE_UP_RULES: dict[str, _Rule] = {
    "IQ3_XS": lambda s: "IQ3_XXS" if s.n_layer // 8 <= s.i_layer < 7 * s.n_layer // 8 else None,
}


def _apply(rules: dict[str, _Rule], mix: str, site: _Site, current: str) -> str:
    rule = rules.get(mix)
    chosen = rule(site) if rule else None
    return chosen or current


# ---------------------------------------------------------------------------------------------------------
# Fallbacks for rows that are not a multiple of the block size (tensor_type_fallback)
# ---------------------------------------------------------------------------------------------------------

# A 256-wide type -> a 32-wide type of about the same size; if even that does not fit, F16.
_FALLBACK_TYPE: dict[str, str] = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


def _fallback(name: str, shape: Sequence[int], wanted: str, fallbacks: list[Fallback]) -> str:
    row_length = int(shape[0])
    if row_length % block_size(wanted) == 0:
        return wanted
    if wanted in _FALLBACK_TYPE:
        used = _FALLBACK_TYPE[wanted]
    elif block_size(wanted) <= 32:
        used = wanted  # already a 32-wide block: nothing smaller to demote to, so the check below makes it F16
    else:
        raise ValueError(
            f"tensor {name}: rows of {row_length} weights do not fit {wanted}'s blocks of {block_size(wanted)}, "
            f"and llama.cpp defines no fallback type for {wanted}; choose another type for this tensor"
        )
    if row_length % block_size(used) != 0:
        used = "F16"  # llama.cpp: "must use F16 due to unusual shape"
    fallbacks.append(Fallback(name, wanted, used, row_length))
    return used


# ---------------------------------------------------------------------------------------------------------
# Choosing one tensor's type (llama_tensor_get_type and llama_tensor_get_type_impl)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _MixState:
    """llama.cpp's quantize_state_impl: counts that depend on the tensors visited before this one."""

    model: ArchInfo
    mix: FileType
    options: MixOptions
    overrides: list[tuple[re.Pattern[str], str]]
    has_tied_embeddings: bool  # no output.weight: token_embd doubles as the output projection
    n_attention_wv: int
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0

    def site(self, i_layer: int, n_layer: int) -> _Site:
        return _Site(i_layer, n_layer, self.model, self.options.has_imatrix)

    def ffn_site(self, name: str, running_count: int) -> _Site:
        # Mixtral's experts are not stored in layer order, so MoE models read the layer from the name
        n_layer = self.model.n_layer
        if max(1, self.model.n_expert) > 1:
            layer = layer_of(name)
            if layer is None:
                raise ValueError(f"cannot tell which layer tensor {name} belongs to (expected blk.N.…)")
            if not 0 <= layer < n_layer:
                raise ValueError(f"tensor {name} is in layer {layer}, but the model has {n_layer} layers")
            return self.site(layer, n_layer)
        return self.site(running_count, n_layer)


def _output_type(state: _MixState, shape: Sequence[int], current: str) -> str:
    """output.weight, and token_embd.weight when tied to it: the output projection gets more bits."""
    if state.options.output_tensor_type is not None:
        return state.options.output_tensor_type
    mix = state.mix.name
    if mix == "MXFP4_MOE":
        return "Q8_0"
    if state.model.arch == "falcon" or shape[0] % block_size(current) != 0:
        return "Q8_0"
    if mix in _OUTPUT_Q5_K:
        return "Q5_K"
    return current if current == "Q8_0" else "Q6_K"


def _mix_rule(state: _MixState, name: str, shape: Sequence[int], category: Category, current: str) -> str:
    """llama_tensor_get_type_impl: the file type's adjustments for one tensor; updates the running counts."""
    mix = state.mix.name
    model = state.model

    # glm5-next keeps its query projections and nextn.eh_proj at Q8_0 or better
    if model.arch == "glm5-next" and any(p in name for p in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if current not in ("F32", "BF16", "F16"):
            return "Q8_0"

    if category is Category.OUTPUT or (state.has_tied_embeddings and category is Category.TOKEN_EMBD):
        return _output_type(state, shape, current)

    if mix == "MXFP4_MOE":
        # expert stacks -> MXFP4, everything else -> Q8_0 (bailingmoe3's 3-D MLA projections are not experts)
        is_expert = len(shape) > 2 and shape[2] > 1
        if model.arch == "bailingmoe3":
            is_expert = is_expert and category in (Category.FFN_UP, Category.FFN_GATE, Category.FFN_DOWN)
        return "MXFP4" if is_expert else "Q8_0"

    if category is Category.TOKEN_EMBD:
        if state.options.token_embedding_type is not None:
            return state.options.token_embedding_type
        return _TOKEN_EMBD_TYPE.get(mix, current)

    if mix in _LOW_BIT_IQ:
        return _low_bit_iq_rule(state, category, current)

    if category in _ATTN_V_LIKE:
        site = state.site(state.i_attention_wv, state.n_attention_wv)
        chosen = _apply(_ATTN_V_RULES, mix, site, current)
        if model.is_70b and chosen in ("Q3_K", "Q4_K"):
            # 70B: 8 heads share each attn_v, so it is 8x smaller than attn_q; more bits cost almost nothing
            chosen = "Q5_K"
        if model.n_expert == 8:
            chosen = "Q8_0"  # llama.cpp: for the 8-expert model this trades just ~128MB
        state.i_attention_wv += 1
        return chosen
    # (llama.cpp's separate attn_qkv branch is never reached: attn_qkv is attn_v-like and handled above)

    if category is Category.ATTN_K:
        if model.n_expert == 8:
            return "Q8_0"
        return _apply(_ATTN_K_RULES, mix, state.site(0, model.n_layer), current)

    if category is Category.ATTN_Q:
        return _apply(_ATTN_Q_RULES, mix, state.site(0, model.n_layer), current)

    if category is Category.FFN_DOWN:
        chosen = _apply(_FFN_DOWN_RULES, mix, state.ffn_site(name, state.i_ffn_down), current)
        state.i_ffn_down += 1
        return chosen

    if category is Category.ATTN_OUTPUT:
        if model.arch == "falcon":
            return _ATTN_OUTPUT_FALCON_TYPE.get(mix, current)
        if model.n_expert == 8:
            return "Q5_K" if mix in _ATTN_OUTPUT_8_EXPERTS_Q5_K else current
        return _ATTN_OUTPUT_TYPE.get(mix, current)

    if category is Category.FFN_GATE:
        chosen = _apply(_FFN_GATE_UP_RULES, mix, state.ffn_site(name, state.i_ffn_gate), current)
        state.i_ffn_gate += 1
        return chosen

    if category is Category.FFN_UP:
        chosen = _apply(_FFN_GATE_UP_RULES, mix, state.ffn_site(name, state.i_ffn_up), current)
        state.i_ffn_up += 1
        return chosen

    return current


def _low_bit_iq_rule(state: _MixState, category: Category, current: str) -> str:
    """The IQ1/IQ2 mixes: value, first-eighth ffn_down and attn_output tensors get a sturdier type."""
    mix = state.mix.name
    model = state.model
    iq2_s_or_m = mix in ("IQ2_S", "IQ2_M")
    if category in _ATTN_V_LIKE:
        state.i_attention_wv += 1
        if model.n_gqa >= 4 or model.n_expert >= 4:
            return "Q4_K"
        return "IQ3_S" if iq2_s_or_m else "Q2_K"
    if model.n_expert == 8 and category is Category.ATTN_K:
        return "Q4_K"
    if category is Category.FFN_DOWN:
        # a running count even for MoE models here, against n_layer (llama.cpp's n_ffn_down)
        first_eighth = state.i_ffn_down < model.n_layer // 8
        state.i_ffn_down += 1
        if first_eighth:
            return "IQ3_S" if iq2_s_or_m else "Q2_K"
        return current
    if category is Category.ATTN_OUTPUT:
        if model.n_expert == 8:
            return "Q5_K"
        if mix in ("IQ1_S", "IQ1_M"):
            return "IQ2_XXS"
        if iq2_s_or_m:
            return "IQ3_S"
    return current


def _choose_type(state: _MixState, spec: TensorSpec, fallbacks: list[Fallback]) -> str:
    """llama_tensor_get_type: options first, then the mix, then the fallback for awkward row lengths."""
    options = state.options
    category = tensor_category(spec.name)
    if not should_quantize(
        spec.name, spec.shape, arch=state.model.arch, leave_output_tensor=options.leave_output_tensor
    ):
        return spec.source_type

    if options.token_embedding_type is not None and category is Category.TOKEN_EMBD:
        # per_layer_token_embd follows --token-embedding-type unless a --tensor-type pattern names it
        named = spec.name == "per_layer_token_embd.weight" and any(p.search(spec.name) for p, _ in state.overrides)
        if not named:
            return options.token_embedding_type
    if options.output_tensor_type is not None and category is Category.OUTPUT:
        return options.output_tensor_type

    chosen = state.mix.default_type
    if not is_quantized(chosen):
        return chosen  # F32/F16/BF16 files: no mix, no overrides, no fallbacks

    manual = next((type_name for pattern, type_name in state.overrides if pattern.search(spec.name)), None)
    if manual is not None:
        chosen = manual  # an override also skips the running counts of the mix rules, as in llama.cpp
    elif not options.pure:
        chosen = _mix_rule(state, spec.name, spec.shape, category, chosen)
    return _fallback(spec.name, spec.shape, chosen, fallbacks)


# ---------------------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------------------


def requires_imatrix(name: str, type_name: str, mix: str | FileType) -> bool:
    """Whether llama.cpp refuses to write this tensor in this type without an importance matrix."""
    mix_name = mix.name if isinstance(mix, FileType) else file_type(mix).name
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if type_name in ("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"):
        return True
    # k-quants never need one, except the Q2_K tensors of a Q2_K_S file
    return type_name == "Q2_K" and mix_name == "Q2_K_S"


def _as_spec(tensor: TensorSpec | Sequence) -> TensorSpec:
    if isinstance(tensor, TensorSpec):
        return tensor
    name, shape, *rest = tensor
    return TensorSpec(str(name), tuple(int(d) for d in shape), *(str(r) for r in rest))


def _check_type_name(what: str, type_name: str | None) -> None:
    if type_name is not None:
        try:
            block_size(type_name)
        except ValueError:
            raise ValueError(f"{what}: unknown ggml tensor type {type_name!r}") from None


def plan_mix(
    tensors: Iterable[TensorSpec | Sequence],
    arch_info: ArchInfo,
    mix: str | FileType,
    options: MixOptions | None = None,
) -> MixPlan:
    """Every tensor's type for file type ``mix``, with the fallbacks taken and the tensors needing an imatrix.

    ``tensors``: TensorSpec, or (name, shape) / (name, shape, source_type) tuples, shape in ggml order.
    """
    file_type_ = mix if isinstance(mix, FileType) else file_type(mix)
    options = options or MixOptions()
    _check_type_name("--output-tensor-type", options.output_tensor_type)
    _check_type_name("--token-embedding-type", options.token_embedding_type)
    overrides: list[tuple[re.Pattern[str], str]] = []
    for pattern, type_name in options.tensor_types:
        _check_type_name(f"--tensor-type {pattern}", type_name)
        try:
            overrides.append((re.compile(pattern), type_name))
        except re.error as error:
            raise ValueError(f"--tensor-type: {pattern!r} is not a valid regular expression: {error}") from None

    specs = sorted((_as_spec(t) for t in tensors), key=lambda s: llama_order_key(s.name))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("two tensors share a name; each tensor name must be unique")
    state = _MixState(
        model=arch_info,
        mix=file_type_,
        options=options,
        overrides=overrides,
        has_tied_embeddings="output.weight" not in names,
        n_attention_wv=sum(tensor_category(n) in _ATTN_V_LIKE for n in names),
    )
    plan = MixPlan(file_type=file_type_, types={})
    for spec in specs:
        chosen = _choose_type(state, spec, plan.fallbacks)
        plan.types[spec.name] = chosen
        allowed = should_quantize(
            spec.name, spec.shape, arch=arch_info.arch, leave_output_tensor=options.leave_output_tensor
        )
        if allowed and requires_imatrix(spec.name, chosen, file_type_):
            plan.needs_imatrix.append(spec.name)
    return plan


def choose_tensor_types(
    tensors: Iterable[TensorSpec | Sequence],
    arch_info: ArchInfo,
    mix: str | FileType,
    options: MixOptions | None = None,
) -> dict[str, str]:
    """{tensor name: tensor type} for file type ``mix`` (e.g. "Q4_K_M"), as llama-quantize chooses them."""
    return plan_mix(tensors, arch_info, mix, options).types


__all__ = [
    "FILE_TYPES",
    "Category",
    "Fallback",
    "MixOptions",
    "MixPlan",
    "TensorSpec",
    "choose_tensor_types",
    "layer_of",
    "llama_order_key",
    "n_dims",
    "plan_mix",
    "requires_imatrix",
    "should_quantize",
    "tensor_category",
]
