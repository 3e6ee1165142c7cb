"""The importance-matrix collector: forward hooks that add up each weight matrix's squared inputs.

It records what llama.cpp's IMatrixCollector::collect_imatrix records (tools/imatrix/imatrix.cpp): for every
matrix multiplication whose weight is a ``blk.*`` tensor (and ``output.weight`` with ``process_output``), the sum
over tokens of each input column's square and the number of tokens; for MoE expert tensors
(GGML_OP_MUL_MAT_ID) one row of sums and one count per expert, counting only the tokens routed to it.
Sums are float32 on the model's device; no activation outlives its forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.errors import InputError

# Hugging Face model_type -> llama.cpp architecture name, where they differ beyond dashes and underscores
_ARCH_ALIASES = {
    "mistral": "llama",
    "mixtral": "llama",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "granitemoe": "granitemoe",
    "phimoe": "phimoe",
}
# llama-imatrix names the final projection output.weight only when the model has one (not tied to token_embd)
OUTPUT_TENSOR = "output.weight"


@dataclass
class TensorStats:
    """Running sums for one GGUF weight tensor: ``sums[m, j]`` over the tokens matrix ``m`` saw."""

    sums: torch.Tensor  # float32 [n_mat, n_cols]
    counts: torch.Tensor  # int64 [n_mat]


def gguf_arch_for(config: Any) -> Any:
    """The ``gguf.MODEL_ARCH`` for a transformers config, or an input error naming the model type."""
    import gguf

    model_type = getattr(config, "model_type", "")
    name = _ARCH_ALIASES.get(model_type, model_type)
    by_name = {value: arch for arch, value in gguf.MODEL_ARCH_NAMES.items()}
    for candidate in (name, name.replace("_", "-"), name.replace("_", "")):
        if candidate in by_name:
            return by_name[candidate]
    raise InputError(f"model type '{model_type}' has no llama.cpp architecture known to gguf "
                     f"{gguf.__version__ if hasattr(gguf, '__version__') else ''}: cannot name its tensors")


def _num_layers(config: Any) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text_config, "num_hidden_layers", 0) or getattr(text_config, "n_layer", 0))


class ImatrixCollector:
    """Attach to a transformers causal LM; ``stats`` fills up with every forward pass until ``detach()``.

    ``process_output`` also collects the final projection (llama-imatrix's ``--process-output``).
    """

    def __init__(self, model: nn.Module, process_output: bool = False) -> None:
        import gguf

        self.model = model
        config = model.config
        arch = gguf_arch_for(config)
        self._name_map = gguf.get_tensor_name_map(arch, _num_layers(config))
        self._tied_output = bool(getattr(config, "tie_word_embeddings", False))
        self.process_output = process_output
        self.stats: dict[str, TensorStats] = {}
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []
        self._attach()

    # -- naming ---------------------------------------------------------------------------------------------

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF tensor name llama.cpp's converter gives the weight ``hf_name`` (without ``.weight``)."""
        base = self._name_map.get_name(hf_name)
        return None if base is None else base + ".weight"

    def _wanted(self, gguf_name: str | None) -> bool:
        # imatrix.cpp: collect "blk." tensors, and output.weight only with --process-output
        if gguf_name is None:
            return False
        if gguf_name.startswith("blk."):
            return True
        return self.process_output and gguf_name == OUTPUT_TENSOR and not self._tied_output

    # -- hooks ----------------------------------------------------------------------------------------------

    def _attach(self) -> None:
        for module_name, module in self.model.named_modules():
            if _is_stacked_experts(module):
                parts = ("gate_proj", "up_proj", "down_proj")
                names = {part: self.gguf_name(f"{module_name}.{part}") for part in parts}
                if all(self._wanted(n) for n in names.values()):
                    self._patch_experts(module, names)
                continue
            weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
            if weight is None or weight.dim() != 2 or isinstance(module, nn.Embedding):
                continue
            name = self.gguf_name(module_name)
            if self._wanted(name):
                self._handles.append(module.register_forward_pre_hook(self._dense_hook(name, weight)))

    def _entry(self, name: str, n_mat: int, n_cols: int, device: torch.device) -> TensorStats:
        entry = self.stats.get(name)
        if entry is None:
            entry = TensorStats(torch.zeros(n_mat, n_cols, dtype=torch.float32, device=device),
                                torch.zeros(n_mat, dtype=torch.int64, device=device))
            self.stats[name] = entry
        return entry

    def _dense_hook(self, name: str, weight: torch.Tensor) -> Callable:
        n_cols = int(weight.shape[1])

        def hook(module: nn.Module, args: tuple) -> None:
            rows = args[0].detach().reshape(-1, n_cols).float()
            entry = self._entry(name, 1, n_cols, rows.device)
            entry.sums[0] += rows.square().sum(dim=0)
            entry.counts[0] += rows.shape[0]  # imatrix.cpp: counts += ggml_nrows(src1), one per token

        return hook

    def _patch_experts(self, experts: nn.Module, names: dict[str, str]) -> None:
        """Replace the experts' forward by an instrumented copy of transformers' eager loop.

        The input of each expert's down projection exists only inside that loop, so there is nothing to hook.
        """
        layout = {k: getattr(experts, k, default) for k, default in
                  (("is_transposed", False), ("has_bias", False), ("has_gate", True), ("is_concatenated", True))}
        if layout != {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True}:
            raise InputError(f"{type(experts).__name__}: expert weight layout {layout} is not supported by the "
                             "imatrix collector (supported: Mixtral/Qwen-MoE style gate_up_proj + down_proj)")
        n_experts, n_hidden = int(experts.gate_up_proj.shape[0]), int(experts.gate_up_proj.shape[2])
        n_inner = int(experts.down_proj.shape[2])
        collector = self

        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
            device = hidden_states.device
            gate_up_in = {n: collector._entry(names[n], n_experts, n_hidden, device) for n in ("gate_proj", "up_proj")}
            down_in = collector._entry(names["down_proj"], n_experts, n_inner, device)
            with torch.no_grad():
                # routed[t, e] = 1 when token t chose expert e (MUL_MAT_ID counts each (token, slot) pair once)
                valid = top_k_index < n_experts
                routed = torch.zeros(hidden_states.shape[0], n_experts, dtype=torch.float32, device=device)
                routed.scatter_add_(1, top_k_index.clamp(max=n_experts - 1), valid.float())
                squares = hidden_states.detach().float().square()
                sums = routed.T @ squares
                tokens_per_expert = routed.sum(dim=0).round().to(torch.int64)
                for entry in gate_up_in.values():
                    entry.sums += sums
                    entry.counts += tokens_per_expert
            output = torch.zeros_like(hidden_states)
            for expert in torch.nonzero(tokens_per_expert).flatten().tolist():
                token_idx, slot = torch.where(top_k_index == expert)
                current = hidden_states[token_idx]
                gate, up = F.linear(current, experts.gate_up_proj[expert]).chunk(2, dim=-1)
                inner = experts.act_fn(gate) * up
                down_in.sums[expert] += inner.detach().float().square().sum(dim=0)
                down_in.counts[expert] += token_idx.numel()
                out = F.linear(inner, experts.down_proj[expert]) * top_k_weights[token_idx, slot, None]
                output.index_add_(0, token_idx, out.to(output.dtype))
            return output

        experts.forward = forward  # an instance attribute shadows the class's forward until detach()
        self._patched.append(experts)

    def detach(self) -> None:
        """Remove every hook and patch; the model computes as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._patched:
            del module.forward
        self._patched.clear()

    def __enter__(self) -> ImatrixCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- results --------------------------------------------------------------------------------------------

    def sums_and_counts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The collected statistics as numpy arrays on the host, by GGUF tensor name."""
        sums = {name: entry.sums.cpu().numpy() for name, entry in self.stats.items()}
        counts = {name: entry.counts.cpu().numpy() for name, entry in self.stats.items()}
        return sums, counts


def _is_stacked_experts(module: nn.Module) -> bool:
    """transformers' fused MoE experts: 3-D gate_up_proj [n_expert, 2*inner, hidden] and down_proj parameters."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
