"""``--method gptq|awq|awq+gptq``: the decoder layers' linears quantized layer by layer on calibration text.

The layer-by-layer runner (``calibration.layer_runner``) hands each decoder layer and its linears' input
statistics to ``LayerQuantizer``, which applies the method to every linear whose mix type is a block format,
puts the quantized weights back into the layer (so the next layer is calibrated on what the file will compute),
and keeps each tensor's ggml bytes in GGUF row order under its GGUF name. The pipeline then writes those bytes
in place of plain rounding; every other tensor (embeddings, output, norms the method did not change) is
quantized as ``--method rtn`` would.

AWQ divides each input channel of a group of linears by a scale s and multiplies the linears' columns by it;
the 1/s is folded into what produces the input: the RMSNorm before q/k/v and before gate/up (its weight is
written back to the file), up_proj's rows for down_proj, v_proj's rows for o_proj when every attention head has
its own value head (with grouped heads one v row feeds several o columns, so no single scale fits).

Mixture-of-experts layers: each expert's projections get their own statistics from the tokens routed to it (the
runner's ``_ExpertLinears``); its down_proj takes AWQ scales folded into its own up_proj rows, its gate/up none
(the norm before them is shared by every expert). The experts' bytes are stacked as llama.cpp's ``ffn_*_exps``
tensors; an expert that got no calibration token is rounded plainly, and the summary says which.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmquant.calibration.layer_runner import InputStatistics, LayerInputs, run_layer_by_layer
from llmquant.errors import InputError
from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.methods import awq_search_scales, gptq_quantize, output_error
from llmquant.models.architectures import TensorPlan, find_architecture, plan_tensors
from llmquant.models.config import read_config
from llmquant.models.safetensors_io import open_weights

METHODS = ("rtn", "gptq", "awq", "awq+gptq")
# the file's record of the method and its settings: under llama-quantize's "quantize." keys, in a name of ours
METHOD_KEY = "quantize.llmquant.method"

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

    tensors: Mapping[str, np.ndarray]  # GGUF name -> the tensor's bytes in the file (uint8), in GGUF row order
    method: str
    n_tokens: int
    seconds: float
    plain: list[str] = field(default_factory=list)  # block-format linears the method did not reach (plain rounding)
    idle_experts: list[str] = field(default_factory=list)  # "blk.0.ffn_up_exps.weight expert 3": no token, plain
    # tensors of a codeword format (IQ1-IQ3: levels chosen per 4 or 8 weights), which GPTQ's column-by-column
    # sweep cannot round: plain rounding (after AWQ's scales, for awq+gptq)
    not_gptq: list[str] = field(default_factory=list)
    importance: dict[str, np.ndarray] = field(default_factory=dict)  # GGUF name -> the imatrix vector it gathered
    proxy_error: float = 0.0  # Σ over the method's tensors of tr(ΔW H ΔWᵀ), H on the calibration inputs
    proxy_error_rtn: float = 0.0  # the same for plain rounding of the same weights, for the summary
    layer_errors: list[tuple[float, float]] = field(default_factory=list)  # per layer: (proxy_error, its rtn's)

    def to_json(self) -> dict:
        return {"method": self.method, "calibration_tokens": self.n_tokens, "seconds": self.seconds,
                "tensors": len(self.tensors), "output_error": self.proxy_error,
                "output_error_rtn": self.proxy_error_rtn,
                "layers": [{"layer": i, "output_error": e, "output_error_rtn": r}
                           for i, (e, r) in enumerate(self.layer_errors)],
                "plain": self.plain, "idle_experts": self.idle_experts, "not_gptq": self.not_gptq}


def parse_method(method: str) -> str:
    name = method.strip().lower()
    if name not in METHODS:
        raise InputError(f"--method {method}: choose from {', '.join(METHODS)}")
    return name


def describe_method(method: str, damp: float = 0.01, act_order: bool = False) -> str:
    """``awq+gptq damp=0.01 act_order=false``: the method and the settings it used (GPTQ's; AWQ takes none), as the
    file records it under METHOD_KEY."""
    method = parse_method(method)
    if "gptq" not in method:
        return method
    return f"{method} damp={damp:g} act_order={str(bool(act_order)).lower()}"


def quantize_with_method(folder: Path, method: str, tensor_types: Mapping[str, str], token_ids: torch.Tensor, *,
                         device: str = "cpu", damp: float = 0.01, act_order: bool = False,
                         progress: bool = False, allow_pickle: bool = False,
                         store: MutableMapping[str, np.ndarray] | None = None) -> MethodResult:
    """Run ``method`` over the decoder layers of the model in ``folder``, each linear to its type in
    ``tensor_types`` (GGUF name -> type: the file type's mix), calibrated on ``token_ids`` ``[n_chunks, n_ctx]``.
    ``store``: where the tensors' bytes go as they are made (e.g. a ``SpilledBytes`` file; default a dict)."""
    method = parse_method(method)
    if method == "rtn":
        raise ValueError("quantize_with_method: rtn needs no calibration")
    start = time.perf_counter()
    layer_quantizer = layer_quantizer_for(folder, method, tensor_types, damp=damp, act_order=act_order,
                                          allow_pickle=allow_pickle)
    if store is not None:
        layer_quantizer.tensors = store
    run_layer_by_layer(folder, token_ids, layer_quantizer, device=device, progress=progress,
                       allow_pickle=allow_pickle)
    reached = set(layer_quantizer.tensors)
    plain = sorted(name for name, type_name in tensor_types.items()
                   if name.startswith("blk.") and FORMATS[type_name].block_size > 1 and name not in reached
                   and name.endswith(".weight") and _is_matrix_name(name))
    return MethodResult(tensors=layer_quantizer.tensors, method=method, n_tokens=int(token_ids.numel()),
                        seconds=time.perf_counter() - start, plain=plain, idle_experts=layer_quantizer.idle_experts,
                        not_gptq=layer_quantizer.not_gptq,
                        proxy_error=layer_quantizer.proxy_error, proxy_error_rtn=layer_quantizer.proxy_error_rtn,
                        layer_errors=layer_quantizer.layer_errors, importance=layer_quantizer.importance)


def layer_quantizer_for(folder: Path, method: str, tensor_types: Mapping[str, str], *, damp: float = 0.01,
                        act_order: bool = False, allow_pickle: bool = False) -> LayerQuantizer:
    """The runner's ``process_layer`` for ``method`` on the model in ``folder``: what ``quantize_with_method``
    runs, for a caller (or a test) that drives the runner itself."""
    config = read_config(folder)
    arch = find_architecture(config)
    weights = open_weights(folder, allow_pickle=allow_pickle)
    all_plans = plan_tensors(arch, config, weights)
    plans = {p.sources[0]: p for p in all_plans if not p.n_experts}
    expert_plans = {source: (p, e) for p in all_plans if p.n_experts for e, source in enumerate(p.sources)}
    return LayerQuantizer(parse_method(method), tensor_types, plans, expert_plans, arch.norm_offset, damp, act_order)


def _is_matrix_name(name: str) -> bool:
    return not name.endswith("norm.weight")


class LayerQuantizer:
    """The runner's ``process_layer``: the method on one decoder layer, in place."""

    def __init__(self, method: str, tensor_types: Mapping[str, str], plans: Mapping[str, TensorPlan],
                 expert_plans: Mapping[str, tuple[TensorPlan, int]], norm_offset: float, damp: float,
                 act_order: bool) -> None:
        self.method = method
        self.tensor_types = tensor_types
        self.plans = plans
        self.expert_plans = expert_plans  # checkpoint name of one expert's weight -> (stacked plan, expert)
        self.expert_parts: dict[str, dict[int, np.ndarray]] = {}  # stacked GGUF name -> expert -> its bytes
        # GGUF name -> mean x² per input column (llama.cpp's imatrix vector), for whatever rounds a tensor plainly
        self.importance: dict[str, np.ndarray] = {}
        self.idle_experts: list[str] = []
        self.not_gptq: list[str] = []
        self.norm_offset = norm_offset
        self.damp = damp
        self.act_order = act_order
        self.tensors: MutableMapping[str, np.ndarray] = {}
        self.proxy_error = 0.0
        self.proxy_error_rtn = 0.0
        self.layer_error = self.layer_error_rtn = 0.0
        self.layer_errors: list[tuple[float, float]] = []  # per decoder layer: (the method's, plain rounding's)
        self.prefix = ""
        self.sources: Mapping[str, str] = {}

    def begin_layer(self, index: int, inputs: LayerInputs) -> None:
        """Decoder layer ``index`` is next (its names, no errors yet)."""
        self.prefix = self._layer_prefix(index)
        self.sources = inputs.sources
        self.layer_error = self.layer_error_rtn = 0.0
        self.row_scales: dict[str, torch.Tensor] = {}  # producer -> how AWQ divided its rows (consumer's s)

    def __call__(self, index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        self.begin_layer(index, inputs)
        originals = {name: layer.get_submodule(name).weight.detach().float().clone()
                     for names in inputs.groups for name in names}
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
                    # each original goes as soon as its linear is done: a layer's worth of copies is not held
                    self._quantize_linear(layer, name, stats, scales.get(name), originals.pop(name))
                stats.xtx = None  # nor every group's Hessian while the last (ffn_down's, the largest) is worked on
            self._finish_experts(layer, inputs)
        self.record_importance(inputs)
        self.layer_errors.append((self.layer_error, self.layer_error_rtn))
        self.proxy_error += self.layer_error
        self.proxy_error_rtn += self.layer_error_rtn

    # -- naming -------------------------------------------------------------------------------------------------

    def _layer_prefix(self, index: int) -> str:
        marker = f".layers.{index}."
        for hf_name in self.plans:
            if marker in hf_name:
                return hf_name[: hf_name.index(marker) + len(marker)]
        raise InputError(f"layer {index}: no weight of the model names it")

    def _source(self, module_name: str) -> str:
        return self.sources.get(module_name, f"{self.prefix}{module_name}.weight")

    def _plan(self, module_name: str) -> TensorPlan | None:
        """The GGUF tensor of a module's weight (for an expert: the stacked tensor of its projection)."""
        source = self._source(module_name)
        if source in self.expert_plans:
            return self.expert_plans[source][0]
        return self.plans.get(source)

    def _block_type(self, module_name: str) -> str | None:
        plan = self._plan(module_name)
        if plan is None:
            return None
        type_name = self.tensor_types.get(plan.name)
        return type_name if type_name is not None and FORMATS[type_name].block_size > 1 else None

    def _keep(self, module_name: str, plan: TensorPlan, data: np.ndarray) -> None:
        """A linear's bytes under its GGUF name: in GGUF row order, or as one expert of a stacked tensor."""
        source = self._source(module_name)
        if source in self.expert_plans:
            parts = self.expert_parts.setdefault(plan.name, {})
            parts[self.expert_plans[source][1]] = np.ascontiguousarray(data).reshape(-1)
            if len(parts) == plan.n_experts:
                self.tensors[plan.name] = np.concatenate([parts[e] for e in range(plan.n_experts)])
                del self.expert_parts[plan.name]
            return
        rows = _gguf_row_order(plan, data.shape[0])
        self.tensors[plan.name] = np.ascontiguousarray(data[rows.numpy()]).reshape(-1)

    def record_importance(self, inputs: LayerInputs) -> None:
        """Each linear's importance vector under its GGUF name; a stacked expert tensor's is its experts' vectors
        one after another, ones for an expert that got no token (as llama.cpp's imatrix loader fills them)."""
        by_expert: dict[str, dict[int, np.ndarray]] = {}
        for names, stats in zip(inputs.groups, inputs.statistics, strict=True):
            vector = stats.mean_squares.cpu().numpy()
            for name in names:
                source = self._source(name)
                if source in self.expert_plans:
                    plan, expert = self.expert_plans[source]
                    by_expert.setdefault(plan.name, {})[expert] = vector
                elif (plan := self.plans.get(source)) is not None:
                    self.importance[plan.name] = vector
        for stacked, vectors in by_expert.items():
            n_experts = next(p.n_experts for p, _ in self.expert_plans.values() if p.name == stacked)
            width = next(iter(vectors.values())).shape[0]
            self.importance[stacked] = np.concatenate([vectors.get(e, np.ones(width, np.float32))
                                                       for e in range(n_experts)])

    def _finish_experts(self, layer: nn.Module, inputs: LayerInputs) -> None:
        """Experts that got no calibration token have no statistics: rounded plainly, and named in the summary."""
        reached = {name for names in inputs.groups for name in names}
        for module_name, source in inputs.sources.items():
            if source not in self.expert_plans or module_name in reached:
                continue
            plan, expert = self.expert_plans[source]
            type_name = self._block_type(module_name)
            if type_name is None:
                continue
            module = layer.get_submodule(module_name)
            weight = module.weight.detach().float().cpu()
            data = quantize(weight, type_name)
            module.weight.copy_(torch.from_numpy(dequantize(data, type_name, tuple(weight.shape))))
            self._keep(module_name, plan, data)
            self.idle_experts.append(f"{plan.name} expert {expert}")

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
        result = awq_search_scales([layer.get_submodule(name).weight.detach() for name in names], stats.sample,
                                   types, importance=stats.mean_squares)
        if result.alpha == 0.0:
            return None
        self.apply_scales(layer, names, result.scales, fold)
        return result.scales

    def apply_scales(self, layer: nn.Module, names: Sequence[str], s: torch.Tensor, fold=None) -> bool:
        """The linears ``names`` (one input) take W·diag(s) and their input's producer divides by s: the layer
        computes the same outputs in full precision. False (nothing changed) where there is no producer to fold
        into."""
        fold = fold or self._fold_target(layer, names)
        if fold is None:
            return False
        with torch.no_grad():
            for name in names:
                module = layer.get_submodule(name)
                module.weight.mul_(s.to(module.weight.dtype))
            fold(s)
        return True

    def _fold_target(self, layer: nn.Module, names: Sequence[str]):
        """A function dividing the group's input by s at its producer, or None."""
        first = names[0]
        for norm_name in _NORM_BEFORE.get(first, ()):
            norm = _submodule(layer, norm_name)
            if norm is not None and getattr(norm, "weight", None) is not None:
                return lambda s, norm=norm, norm_name=norm_name: self._fold_into_norm(norm, norm_name, s)
        rows_name = _ROWS_BEFORE.get(first)
        if rows_name is None and first.endswith(".down_proj"):  # an expert's down: its own up rows
            rows_name = first.removesuffix("down_proj") + "up_proj"
        if first == "mlp.down_proj" and _submodule(layer, "mlp.up_proj") is None:
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
            row_scale = self.row_scales.setdefault(rows_name, torch.ones(n_rows, device=s.device))
            row_scale[rows] *= s
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

    def _quantize_linear(self, layer: nn.Module, name: str, stats: InputStatistics, s: torch.Tensor | None,
                         original: torch.Tensor) -> None:
        """Quantize one linear (its weight already W·diag(s) under AWQ); ``original`` is W before any scaling, for
        the output error against plain rounding (llama.cpp's, with the same importance)."""
        module = layer.get_submodule(name)
        plan = self._plan(name)
        if plan is None:
            return
        type_name = self.tensor_types.get(plan.name)
        if type_name is None:
            return
        weight = module.weight.detach().float()
        if FORMATS[type_name].block_size == 1 or tuple(plan.shape[-2:]) != tuple(weight.shape):
            return  # float types are converted as they are; a reshaped tensor is left to plain rounding
        importance = stats.mean_squares if s is None else stats.mean_squares / s.square()
        use_gptq = "gptq" in self.method and FORMATS[type_name].weights_per_level == 1
        if "gptq" in self.method and not use_gptq:
            self.not_gptq.append(plan.name)
        if use_gptq:
            result = gptq_quantize(weight, stats.xtx, type_name, damp=self.damp, act_order=self.act_order,
                                   importance=importance, input_scale=s)
            data, rounded = np.asarray(result.data.cpu()), result.weight.float()
        else:
            data = quantize(weight, type_name, imatrix=importance.cpu().numpy())
            rounded = torch.from_numpy(dequantize(data, type_name, tuple(weight.shape))).to(weight.device)
        module.weight.copy_(rounded.to(module.weight.dtype))
        self._keep(name, plan, data)
        # the output error on the calibration inputs, tr(ΔW H ΔWᵀ), in the original model's coordinates: the
        # rounded weight with AWQ's column scales and any row scales (folded from its consumer) undone
        effective = rounded if s is None else rounded / s.float()
        if name in self.row_scales:
            effective = effective * self.row_scales[name][:, None]
        plain = dequantize(quantize(original, type_name, imatrix=stats.mean_squares.cpu().numpy()), type_name,
                           tuple(original.shape))
        self.layer_error += output_error(original, effective, stats.xtx)
        self.layer_error_rtn += output_error(original, torch.from_numpy(plain).to(original.device), stats.xtx)


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
