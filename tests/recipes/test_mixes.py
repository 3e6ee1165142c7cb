"""Our mixes choose every tensor's type exactly as llama.cpp's llama_model_quantize does.

The oracle runs llama.cpp once per (model, file type, options) and caches what it wrote (see conftest.py);
each test compares our pure choice with the types in llama.cpp's output file.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest

from llmquant.gguf_io.header import read_gguf_header
from llmquant.recipes import (
    FILE_TYPES,
    ArchInfo,
    MixOptions,
    MixPlan,
    arch_info_from_metadata,
    choose_tensor_types,
    file_type,
    plan_mix,
    should_quantize,
)

# The file types llmquant offers: every one is checked on the tiny GQA-4 llama, all but one on SmolLM2.
OFFERED = [
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
    "IQ4_NL", "IQ4_XS",
]  # fmt: skip
# SmolLM2 takes about 20 s per i-quant in llama.cpp: IQ4_NL is left to the tiny model, as its rules are IQ4_XS's
# and SmolLM2's IQ4_XS already falls back to IQ4_NL on every 576-wide row.
SMOLLM2_MIXES = [name for name in OFFERED if name != "IQ4_NL"]
# The other llama.cpp file types (IQ1/IQ2/IQ3 need an imatrix; the oracle then gives it one of ones). Left out
# to keep the first run short, as llama.cpp quantizes i-quants slowly: IQ2_XS (same rules as IQ2_XXS), IQ2_S
# (as IQ2_M), IQ1_S (as IQ1_M) and IQ3_S (its one rule, attn_v with GQA >= 4, is IQ3_XS's too).
SLOW_AND_COVERED = {"IQ2_XS", "IQ2_S", "IQ1_S", "IQ3_S"}
OTHERS = [name for name in FILE_TYPES if name not in OFFERED and name not in SLOW_AND_COVERED]
# On the 8-expert model: the mixes whose rules look at the expert count (attn_v/attn_k to Q8_0, attn_output
# to Q5_K, IQ3_M's and the IQ2 mixes' expert rules, MXFP4 for expert stacks), plus the plain ones.
MOE_MIXES = ["Q4_0", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS",
             "IQ3_M", "IQ2_XXS", "MXFP4_MOE"]  # fmt: skip


@functools.lru_cache(maxsize=8)
def _model_tensors(model: Path) -> tuple[list[tuple[str, tuple[int, ...], str]], ArchInfo]:
    header = read_gguf_header(model)
    tensors = [(t.name, t.shape, t.type_name) for t in header.tensors]
    return tensors, arch_info_from_metadata(header.metadata)


def _plan_and_oracle(model: Path, mix: str, options: MixOptions, llama_cpp_mix):
    found = llama_cpp_mix(model, mix, options)
    tensors, arch_info = _model_tensors(model)
    # the oracle gives llama.cpp an imatrix only when it asks for one; the mixes then choose as with one
    if found.used_imatrix and not options.has_imatrix:
        options = dataclasses.replace(options, has_imatrix=True)
    return plan_mix(tensors, arch_info, mix, options), found


def _differences(plan: MixPlan, llama_types: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{tensor: (ours, llama.cpp's)} for every tensor where the two disagree (or one of them lacks it)."""
    names = set(plan.types) | set(llama_types)
    return {
        name: (plan.types.get(name, "-"), llama_types.get(name, "-"))
        for name in sorted(names)
        if plan.types.get(name) != llama_types.get(name)
    }


# ---------------------------------------------------------------------------------------------------------
# Every file type, every tensor
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mix", SMOLLM2_MIXES)
def test_smollm2_types_match_llama_cpp(mix: str, smollm2_f32_gguf: Path, llama_cpp_mix) -> None:
    """SmolLM2: 576-wide rows (fallbacks), GQA 3, 30 layers, tied embeddings."""
    plan, found = _plan_and_oracle(smollm2_f32_gguf, mix, MixOptions(), llama_cpp_mix)
    assert _differences(plan, found.types) == {}


@pytest.mark.parametrize("mix", OFFERED + OTHERS)
def test_tiny_llama_types_match_llama_cpp(mix: str, tiny_llama_f32_gguf: Path, llama_cpp_mix) -> None:
    """A 16-layer llama whose rows all fit k-quants: GQA 4, untied output.weight."""
    plan, found = _plan_and_oracle(tiny_llama_f32_gguf, mix, MixOptions(), llama_cpp_mix)
    assert _differences(plan, found.types) == {}


# The mixes with 70B or Falcon rules (attn_v, attn_output, ffn_down), and Falcon's fused attn_qkv.
SEVENTY_B_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"]
FALCON_MIXES = ["Q2_K", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "IQ4_XS"]


@pytest.mark.parametrize("mix", SEVENTY_B_MIXES)
def test_tiny_70b_types_match_llama_cpp(mix: str, tiny_70b_f32_gguf: Path, llama_cpp_mix) -> None:
    """80 layers with GQA: llama.cpp's 70B rule gives attn_v Q5_K where the mix says Q3_K or Q4_K."""
    plan, found = _plan_and_oracle(tiny_70b_f32_gguf, mix, MixOptions(), llama_cpp_mix)
    assert _differences(plan, found.types) == {}


@pytest.mark.parametrize("mix", FALCON_MIXES)
def test_tiny_falcon_types_match_llama_cpp(mix: str, tiny_falcon_f32_gguf: Path, llama_cpp_mix) -> None:
    """Falcon: output.weight always Q8_0, its own ffn_down/attn_output rules, attn_qkv treated as attn_v."""
    plan, found = _plan_and_oracle(tiny_falcon_f32_gguf, mix, MixOptions(), llama_cpp_mix)
    assert _differences(plan, found.types) == {}


@pytest.mark.parametrize("mix", MOE_MIXES)
def test_tiny_moe_types_match_llama_cpp(mix: str, tiny_moe_f32_gguf: Path, llama_cpp_mix) -> None:
    """An 8-expert llama: 3-D expert stacks, routers, the n_expert == 8 rules."""
    plan, found = _plan_and_oracle(tiny_moe_f32_gguf, mix, MixOptions(), llama_cpp_mix)
    assert _differences(plan, found.types) == {}


# (IQ3_XXS, which llama.cpp only writes with an imatrix, is in the OTHERS run above)
@pytest.mark.parametrize("mix", ["Q4_0", "Q5_0", "IQ4_NL", "IQ4_XS", "Q4_K_M"])
def test_types_with_an_imatrix_match_llama_cpp(mix: str, tiny_llama_f32_gguf: Path, llama_cpp_mix) -> None:
    """With an importance matrix some mixes choose differently (ffn_down of Q4_0/Q5_0/IQ4_*, IQ3_XXS's attn_v)."""
    plan, found = _plan_and_oracle(tiny_llama_f32_gguf, mix, MixOptions(has_imatrix=True), llama_cpp_mix)
    assert _differences(plan, found.types) == {}


@pytest.mark.parametrize("mix", SMOLLM2_MIXES)
def test_smollm2_fallback_count_matches_llama_cpp(mix: str, smollm2_f32_gguf: Path, llama_cpp_mix) -> None:
    """576-wide rows do not fit 256-weight blocks: we count the same fallbacks llama.cpp reports."""
    plan, found = _plan_and_oracle(smollm2_f32_gguf, mix, MixOptions(), llama_cpp_mix)
    assert len(plan.fallbacks) == found.n_fallback


def test_fallback_to_f16_when_no_block_fits() -> None:
    """Rows that fit no 32-weight block go to F16, as llama.cpp's "must use F16 due to unusual shape"."""
    arch_info = ArchInfo("llama", n_layer=1, n_head=1, n_head_kv=1)
    plan = plan_mix([("blk.0.ffn_up.weight", (100, 64))], arch_info, "Q4_K_M")
    assert plan.types["blk.0.ffn_up.weight"] == "F16"
    assert [(f.wanted, f.used) for f in plan.fallbacks] == [("Q4_K", "F16")]


@pytest.mark.parametrize("mix", OFFERED + OTHERS)
def test_needs_imatrix_exactly_when_llama_cpp_refuses(mix: str, tiny_llama_f32_gguf: Path, llama_cpp_mix) -> None:
    found = llama_cpp_mix(tiny_llama_f32_gguf, mix, MixOptions())
    tensors, arch_info = _model_tensors(tiny_llama_f32_gguf)
    plan = plan_mix(tensors, arch_info, mix)  # as llama.cpp's first attempt: no imatrix
    assert bool(plan.needs_imatrix) == found.refused_without_imatrix


def test_order_is_llama_cpps_write_order(smollm2_f32_gguf: Path, llama_cpp_mix) -> None:
    """Tensors come out in the order llama.cpp writes them (by layer, then name): the counting rules depend on it."""
    plan, found = _plan_and_oracle(smollm2_f32_gguf, "Q4_K_M", MixOptions(), llama_cpp_mix)
    assert list(plan.types) == list(found.types)


# ---------------------------------------------------------------------------------------------------------
# llama-quantize's options
# ---------------------------------------------------------------------------------------------------------

OPTION_CASES = {
    "pure-q4_k_m": ("Q4_K_M", MixOptions(pure=True)),
    "pure-q2_k": ("Q2_K", MixOptions(pure=True)),
    "output-q8_0": ("Q4_K_M", MixOptions(output_tensor_type="Q8_0")),
    "token-embedding-q4_0": ("Q3_K_M", MixOptions(token_embedding_type="Q4_0")),
    "output-and-token-embedding": ("Q5_K_M", MixOptions(output_tensor_type="Q4_K", token_embedding_type="F16")),
    "overrides": (
        "Q4_K_M",
        MixOptions(tensor_types=((r"attn_v", "Q8_0"), (r"blk\.1[0-5]\.ffn_down", "Q2_K"), ("ffn_up", "IQ4_NL"))),
    ),
    # overriding some attn_v tensors shifts llama.cpp's running count for the rest
    "override-early-attn-v": ("Q4_K_M", MixOptions(tensor_types=((r"blk\.[0-2]\.attn_v", "Q5_0"),))),
    "override-on-pure": ("Q3_K_S", MixOptions(pure=True, tensor_types=(("attn_output", "Q6_K"),))),
    "leave-output": ("Q4_K_M", MixOptions(leave_output_tensor=True)),
    "leave-output-with-output-type": ("Q6_K", MixOptions(leave_output_tensor=True, output_tensor_type="Q8_0")),
    "float-file-with-output-type": ("F16", MixOptions(output_tensor_type="Q8_0", tensor_types=(("attn", "Q4_0"),))),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_options_match_llama_cpp_on_tiny_llama(case: str, tiny_llama_f32_gguf: Path, llama_cpp_mix) -> None:
    mix, options = OPTION_CASES[case]
    plan, found = _plan_and_oracle(tiny_llama_f32_gguf, mix, options, llama_cpp_mix)
    assert _differences(plan, found.types) == {}


TIED_OPTION_CASES = {
    # tied embeddings: token_embd is the output projection, so --output-tensor-type reaches it too
    "output-q5_0": ("Q4_K_M", MixOptions(output_tensor_type="Q5_0")),
    "token-embedding-q4_0": ("Q4_K_M", MixOptions(token_embedding_type="Q4_0")),
    "pure-q4_k_m": ("Q4_K_M", MixOptions(pure=True)),
    "overrides": ("Q5_K_M", MixOptions(tensor_types=(("token_embd", "Q4_0"), ("attn_q", "Q6_K")))),
}


@pytest.mark.parametrize("case", sorted(TIED_OPTION_CASES))
def test_options_match_llama_cpp_on_smollm2(case: str, smollm2_f32_gguf: Path, llama_cpp_mix) -> None:
    mix, options = TIED_OPTION_CASES[case]
    plan, found = _plan_and_oracle(smollm2_f32_gguf, mix, options, llama_cpp_mix)
    assert _differences(plan, found.types) == {}
    assert len(plan.fallbacks) == found.n_fallback


# ---------------------------------------------------------------------------------------------------------
# The pieces on their own
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("blk.0.attn_q.weight", (256, 256), True),
        ("blk.0.ffn_down_exps.weight", (256, 256, 8), True),
        ("blk.0.attn_norm.weight", (256,), False),  # 1-D
        ("blk.0.attn_q.bias", (256, 2), False),  # not a weight
        ("blk.0.ffn_norm.weight", (256, 4), False),  # norms stay as they are even when 2-D
        ("blk.0.ffn_gate_inp.weight", (256, 8), False),  # MoE router
        ("position_embd.weight", (256, 1024), False),
        ("token_types.weight", (256, 2), False),
        ("blk.0.attn_q.weight", (256, 1), False),  # trailing 1s do not count: 1-D
    ],
)
def test_should_quantize(name: str, shape: tuple[int, ...], expected: bool) -> None:
    assert should_quantize(name, shape) is expected


def test_leave_output_tensor_keeps_output_weight() -> None:
    assert should_quantize("output.weight", (256, 1000))
    assert not should_quantize("output.weight", (256, 1000), leave_output_tensor=True)


def test_arch_info_from_smollm2_metadata(smollm2_f32_gguf: Path) -> None:
    info = arch_info_from_metadata(read_gguf_header(smollm2_f32_gguf).metadata)
    assert (info.arch, info.n_layer, info.n_head, info.n_head_kv, info.n_expert) == ("llama", 30, 9, 3, 0)
    assert info.n_gqa == 3
    assert not info.is_70b


def test_arch_info_reads_experts_and_per_layer_heads() -> None:
    metadata = {
        "general.architecture": "llama",
        "llama.block_count": 80,
        "llama.attention.head_count": [64] * 80,
        "llama.attention.head_count_kv": [8] * 80,
        "llama.expert_count": 8,
    }
    info = arch_info_from_metadata(metadata)
    assert (info.n_head, info.n_head_kv, info.n_expert, info.n_gqa) == (64, 8, 8, 8)
    assert info.is_70b


def test_file_types_table_matches_gguf() -> None:
    """Our LLAMA_FTYPE ids are gguf-py's LlamaFileType values."""
    from gguf import LlamaFileType

    for name, entry in FILE_TYPES.items():
        enum_name = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
        assert entry.ftype == int(LlamaFileType[enum_name]), name


def test_unknown_file_type_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="Q4_K_M"):
        file_type("Q4_K_Z")


def test_unknown_override_type_is_a_clear_error() -> None:
    arch_info = ArchInfo("llama", n_layer=1, n_head=1, n_head_kv=1)
    with pytest.raises(ValueError, match="Q9_K"):
        choose_tensor_types(
            [("blk.0.attn_q.weight", (256, 256))], arch_info, "Q4_K_M", MixOptions(tensor_types=(("attn_q", "Q9_K"),))
        )
