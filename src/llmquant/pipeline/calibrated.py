"""``--method gptq|awq|awq+gptq``: the decoder layers' linears quantized layer by layer on calibration text.

The layer-by-layer runner (``calibration.layer_runner``) hands each decoder layer and its linears' input
statistics to ``_LayerQuantizer``, which applies the method to every linear whose mix type is a block format,
puts the quantized weights back into the layer (so the next layer is calibrated on what the file will compute),
and keeps each tensor's ggml bytes in GGUF row order under its GGUF name. The pipeline then writes those bytes
in place of plain rounding; every other tensor (embeddings, output, norms the method did not change) is
quantized as ``--method rtn`` would.

AWQ divides each input channel of a group of linears by a scale s and multiplies the linears' columns by it;
the 1/s is folded into what produces the input: the RMSNorm before q/k/v and before gate/up (its weight is
written back to the file), up_proj's rows for down_proj, v_proj's rows for o_proj when every attention head has
its own value head (with grouped heads one v row feeds several o columns, so no single scale fits).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmquant.calibration.layer_runner import InputStatistics, LayerInputs, run_layer_by_layer
from llmquant.errors import InputError
from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.methods import awq_search_scales, gptq_quantize
from llmquant.models.architectures import TensorPlan, find_architecture, plan_tensors
from llmquant.models.config import read_config
from llmquant.models.safetensors_io import open_weights

METHODS = ("rtn", "gptq", "awq", "awq+gptq")

# AWQ: where each group's 1/s goes, by the group's first linear (module names inside a decoder layer)
_NORM_BEFORE = {
    "self_attn.q_proj": ("input_layernorm",),
    "self_attn.qkv_proj": ("input_layernorm",),
    "mlp.gate_proj": ("pre_feedforward_layernorm", "post_attention_layernorm"),  # Gemma 2/3: the first
    "mlp.gate_up_proj": ("post_attention_layernorm",),
}
_ROWS_BEFORE = {"mlp.down_proj": "mlp.up_proj", "self_attn.o_proj": "self_attn.v_proj"}


@dataclass
class MethodResult:
    """What the method computed for one file type."""

    tensors: dict[str, np.ndarray]  # GGUF name -> the tensor's bytes in the file (uint8), in GGUF row order
    method: str
    n_tokens: int
    seconds: float
    plain: list[str] = field(default_factory=list)  # block-format linears the method did not reach (plain rounding)
    proxy_error: float = 0.0  # Σ over the method's tensors of tr(ΔW H ΔWᵀ), H on the calibration inputs
    proxy_error_rtn: float = 0.0  # the same for plain rounding of the same weights, for the summary


def parse_method(method: str) -> str:
    name = method.strip().lower()
    if name not in METHODS:
        raise InputError(f"--method {method}: choose from {', '.join(METHODS)}")
    return name


def quantize_with_method(folder: Path, method: str, tensor_types: Mapping[str, str], token_ids: torch.Tensor, *,
                         device: str = "cpu", damp: float = 0.01, act_order: bool = False,
                         progress: bool = False, allow_pickle: bool = False) -> MethodResult:
    """Run ``method`` over the decoder layers of the model in ``folder``, each linear to its type in
    ``tensor_types`` (GGUF name -> type: the file type's mix), calibrated on ``token_ids`` ``[n_chunks, n_ctx]``."""
    method = parse_method(method)
    if method == "rtn":
        raise ValueError("quantize_with_method: rtn needs no calibration")
    start = time.perf_counter()
    config = read_config(folder)
    arch = find_architecture(config)
    weights = open_weights(folder, allow_pickle=allow_pickle)
    plans = {p.sources[0]: p for p in plan_tensors(arch, config, weights) if len(p.sources) == 1}
    layer_quantizer = _LayerQuantizer(method, tensor_types, plans, arch.norm_offset, damp, act_order)
    run_layer_by_layer(folder, token_ids, layer_quantizer, device=device, with_xtx="gptq" in method,
                       progress=progress, allow_pickle=allow_pickle)
    reached = set(layer_quantizer.tensors)
    plain = sorted(name for name, type_name in tensor_types.items()
                   if name.startswith("blk.") and FORMATS[type_name].block_size > 1 and name not in reached
                   and name.endswith(".weight") and _is_matrix_name(name))
    return MethodResult(tensors=layer_quantizer.tensors, method=method, n_tokens=int(token_ids.numel()),
                        seconds=time.perf_counter() - start, plain=plain,
                        proxy_error=layer_quantizer.proxy_error, proxy_error_rtn=layer_quantizer.proxy_error_rtn)


def _is_matrix_name(name: str) -> bool:
    return not name.endswith("norm.weight")


class _LayerQuantizer:
    """The runner's ``process_layer``: the method on one decoder layer, in place."""

    def __init__(self, method: str, tensor_types: Mapping[str, str], plans: Mapping[str, TensorPlan],
                 norm_offset: float, damp: float, act_order: bool) -> None:
        self.method = method
        self.tensor_types = tensor_types
        self.plans = plans
        self.norm_offset = norm_offset
        self.damp = damp
        self.act_order = act_order
        self.tensors: dict[str, np.ndarray] = {}
        self.proxy_error = 0.0
        self.proxy_error_rtn = 0.0
        self.prefix = ""

    def __call__(self, index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        self.prefix = self._layer_prefix(index)
        scales: dict[str, torch.Tensor] = {}  # module name -> the AWQ scale of its input columns
        if self.method.startswith("awq"):
            for names, stats in zip(inputs.groups, inputs.statistics, strict=True):
                group_scales = self._awq_group(layer, names, stats)
                if group_scales is not None:
                    for name in names:
                        scales[name] = group_scales
        with torch.no_grad():
            for names, stats in zip(inputs.groups, inputs.statistics, strict=True):
                for name in names:
                    self._quantize_linear(layer, name, stats, scales.get(name))

    # -- naming -------------------------------------------------------------------------------------------------

    def _layer_prefix(self, index: int) -> str:
        marker = f".layers.{index}."
        for hf_name in self.plans:
            if marker in hf_name:
                return hf_name[: hf_name.index(marker) + len(marker)]
        raise InputError(f"layer {index}: no weight of the model names it")

    def _plan(self, module_name: str) -> TensorPlan | None:
        return self.plans.get(f"{self.prefix}{module_name}.weight")

    def _block_type(self, module_name: str) -> str | None:
        plan = self._plan(module_name)
        if plan is None:
            return None
        type_name = self.tensor_types.get(plan.name)
        return type_name if type_name is not None and FORMATS[type_name].block_size > 1 else None

    # -- AWQ ----------------------------------------------------------------------------------------------------

    def _awq_group(self, layer: nn.Module, names: Sequence[str], stats: InputStatistics) -> torch.Tensor | None:
        """The group's AWQ scales, already folded into the producer of its input; None where there is no
        producer to fold into, or a linear of the group is not quantized to a block format."""
        types = [self._block_type(name) for name in names]
        if any(t is None for t in types):
            return None
        fold = self._fold_target(layer, names)
        if fold is None:
            return None
        linears = [layer.get_submodule(name) for name in names]
        result = awq_search_scales([m.weight.detach() for m in linears], stats.sample, types,
                                   importance=stats.mean_squares)
        if result.alpha == 0.0:
            return None
        s = result.scales.to(linears[0].weight.dtype)
        with torch.no_grad():
            for module in linears:
                module.weight.mul_(s)  # W·diag(s): its input is divided by s
            fold(s)
        return s

    def _fold_target(self, layer: nn.Module, names: Sequence[str]):
        """A function dividing the group's input by s at its producer, or None."""
        first = names[0]
        for norm_name in _NORM_BEFORE.get(first, ()):
            norm = _submodule(layer, norm_name)
            if norm is not None and getattr(norm, "weight", None) is not None:
                return lambda s, norm=norm, norm_name=norm_name: self._fold_into_norm(norm, norm_name, s)
        rows_name = _ROWS_BEFORE.get(first)
        if rows_name is None and first == "mlp.down_proj":
            rows_name = "mlp.gate_up_proj"
        producer = _submodule(layer, rows_name) if rows_name else None
        if not isinstance(producer, nn.Linear):
            return None
        consumer = layer.get_submodule(first)
        n_rows = producer.out_features
        if rows_name == "mlp.gate_up_proj":  # Phi-3: down reads act(gate)·up, up the second half of the rows
            rows = slice(n_rows // 2, n_rows)
        elif n_rows == consumer.in_features:
            rows = slice(0, n_rows)
        else:
            return None  # grouped value heads: one v row feeds several o columns
        if self._block_type(rows_name) is None:
            return None

        def fold(s: torch.Tensor) -> None:
            producer.weight[rows].div_(s[:, None])
            if producer.bias is not None:
                producer.bias[rows].div_(s)
        return fold

    def _fold_into_norm(self, norm: nn.Module, norm_name: str, s: torch.Tensor) -> None:
        """RMSNorm's output ×1/s: its weight (plus Gemma's offset: it multiplies by 1 + w) divided by s; the
        new weight is written to the file."""
        with torch.no_grad():
            effective = norm.weight.detach().float() + self.norm_offset
            norm.weight.copy_((effective / s - self.norm_offset).to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s)
        plan = self._plan(norm_name)
        if plan is None:
            raise InputError(f"{self.prefix}{norm_name}: AWQ changed a norm the GGUF plan does not name")
        values = plan.build([norm.weight.detach().cpu()]).float().numpy()
        self.tensors[plan.name] = values.view(np.uint8).reshape(-1)

    # -- one linear -----------------------------------------------------------------------------------------------

    def _quantize_linear(self, layer: nn.Module, name: str, stats: InputStatistics, s: torch.Tensor | None) -> None:
        module = layer.get_submodule(name)
        plan = self._plan(name)
        if plan is None:
            return
        type_name = self.tensor_types.get(plan.name)
        if type_name is None:
            return
        weight = module.weight.detach().float()
        if FORMATS[type_name].block_size == 1 or tuple(plan.shape) != tuple(weight.shape):
            return  # float types are converted as they are; a reshaped tensor is left to plain rounding
        importance = stats.mean_squares if s is None else stats.mean_squares / s.square()
        if "gptq" in self.method:
            H = stats.xtx if s is None else stats.xtx / (s.double()[:, None] * s.double()[None, :])
            result = gptq_quantize(weight, H, type_name, damp=self.damp, act_order=self.act_order,
                                   importance=importance)
            data, rounded = result.data, result.weight
            rtn = torch.from_numpy(dequantize(quantize(weight, type_name, imatrix=importance.numpy()), type_name,
                                              tuple(weight.shape)))
            self.proxy_error += result.proxy_error
            self.proxy_error_rtn += _proxy(weight, rtn, H)
        else:
            data = torch.from_numpy(quantize(weight, type_name, imatrix=importance.cpu().numpy()))
            rounded = torch.from_numpy(dequantize(data.numpy(), type_name, tuple(weight.shape)))
        module.weight.copy_(rounded.to(module.weight.dtype))
        rows = _gguf_row_order(plan, weight.shape[0])
        self.tensors[plan.name] = np.ascontiguousarray(np.asarray(data.cpu())[rows.numpy()]).reshape(-1)


def _proxy(weight: torch.Tensor, rounded: torch.Tensor, H: torch.Tensor) -> float:
    delta = (weight - rounded).double()
    return float(((delta @ H) * delta).sum())


def _gguf_row_order(plan: TensorPlan, n_rows: int) -> torch.Tensor:
    """Which HF row each GGUF row is (the converter permutes q/k rows for llama.cpp's rotary layout): the plan's
    own transform applied to the row numbers."""
    numbers = torch.arange(n_rows, dtype=torch.float32)[:, None]
    return plan.build([numbers])[:, 0].round().long()


def _submodule(layer: nn.Module, name: str) -> nn.Module | None:
    try:
        return layer.get_submodule(name)
    except AttributeError:
        return None
