"""The few model facts llama.cpp's mixes look at, read from a GGUF's metadata (a plain dict: no file I/O here)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Architectures whose loader calls a model "70B" (llama.cpp src/models/<arch>.cpp, load_hparams): only that
# size matters to the mixes (attn_v gets Q5_K instead of Q3_K/Q4_K). Value: the block count, and whether the
# model must also use grouped-query attention (llama: 80 layers without GQA is the 65B).
_SEVENTY_B_LAYERS: dict[str, tuple[int, bool]] = {
    "llama": (80, True),
    "qwen2": (80, False),
    "deci": (80, False),
    "olmo": (80, False),
    "jais2": (68, False),
}


@dataclass(frozen=True)
class ArchInfo:
    arch: str  # general.architecture: "llama", "falcon", …
    n_layer: int  # {arch}.block_count (llama.cpp's n_layer_all)
    n_head: int  # attention heads of layer 0
    n_head_kv: int  # key/value heads of layer 0
    n_expert: int = 0  # {arch}.expert_count; 0 for a dense model

    @property
    def n_gqa(self) -> int:
        """Query heads per key/value head (llama_hparams::n_gqa for layer 0); 0 when there are no KV heads."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """Whether llama.cpp's loader sets LLM_TYPE_70B for this model."""
        rule = _SEVENTY_B_LAYERS.get(self.arch)
        if rule is None:
            return False
        n_layer, needs_gqa = rule
        return self.n_layer == n_layer and (not needs_gqa or self.n_head != self.n_head_kv)


def _first_layer(value: Any) -> int:
    # head counts may be per-layer arrays; llama.cpp's n_gqa() and n_head() default to layer 0
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return int(value[0]) if len(value) else 0
    return int(value)


def arch_info_from_metadata(metadata: Mapping[str, Any]) -> ArchInfo:
    """ArchInfo from a GGUF's key/value metadata (values as gguf-py's ``field.contents()`` gives them)."""
    arch = metadata.get("general.architecture")
    if not arch:
        raise ValueError("GGUF metadata has no general.architecture: not a llama.cpp model file")
    arch = str(arch)
    if f"{arch}.block_count" not in metadata:
        raise ValueError(f"GGUF metadata has no {arch}.block_count: cannot tell which layer a tensor is in")
    n_head = _first_layer(metadata.get(f"{arch}.attention.head_count", 0))
    # llama.cpp defaults head_count_kv to head_count when the key is absent
    n_head_kv = _first_layer(metadata.get(f"{arch}.attention.head_count_kv", n_head))
    return ArchInfo(
        arch=arch,
        n_layer=int(metadata[f"{arch}.block_count"]),
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_expert=int(metadata.get(f"{arch}.expert_count", 0)),
    )


__all__ = ["ArchInfo", "arch_info_from_metadata"]
