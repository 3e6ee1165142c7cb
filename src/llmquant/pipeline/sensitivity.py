"""Sensitivities: what each quantizable tensor costs in each candidate type, and the automatic mix built on them.

Two estimators:

* ``proxy``: the second-order output error of the tensor rounded to the type (as llama.cpp rounds it, with the
  tensor's importance vector). For a decoder layer's linear it is tr(ΔW H ΔWᵀ) with H = XᵀX of its inputs on
  the calibration text, gathered by the layer-by-layer runner on the full-precision model; the token embedding
  (a lookup) costs Σ_rows count(row)·‖Δrow‖² over the calibration tokens, and the output head (the embedding
  too, when tied) n_tokens·Σ_j h_j Σ_rows Δw_rj² with h the mean square of the final normed hidden states.
  Without calibration text (a GGUF and its imatrix) every tensor takes the diagonal form n·Σ_j imatrix_j Δw_j².
  The units (squared output change summed over tokens) add up across tensors; they ignore what later layers do
  to an error, which the ``kld`` estimator measures.
* ``kld``: the mean KL divergence from the full-precision model, on a few calibration chunks, of the torch model
  with that one tensor replaced by its rounded values and everything else in full precision.

``auto_plan`` turns the costs and a byte budget into a ``MixPlan`` (``recipes.auto.allocate``), which the
quantize pipeline writes like any llama.cpp mix.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmquant.errors import InputError
from llmquant.formats import FORMATS, dequantize, quantize
from llmquant.gguf_io.writer import tensor_nbytes
from llmquant.recipes.auto import Allocation, Option, TensorGroup, allocate, candidate_types
from llmquant.recipes.file_types import FILE_TYPES, FileType
from llmquant.recipes.mixes import Category, MixPlan, layer_of, should_quantize, tensor_category

ESTIMATORS = ("proxy", "kld")
# GGUF's default data alignment: every tensor's data starts on it, so each tensor costs its bytes rounded up
ALIGNMENT = 32
# room for the keys the quantized file adds to the source's metadata (quantization version, file type)
_HEADER_MARGIN = 96


@dataclass
class Sensitivities:
    """Cost of each (quantizable tensor, candidate type): lower is better, additive over tensors."""

    estimator: str
    costs: dict[str, dict[str, float]]  # GGUF tensor name -> type -> cost
    n_tokens: int = 0  # calibration tokens the costs were measured on (0: from an imatrix alone)
    seconds: float = 0.0
    model: str = ""
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # ggml order, for llama.cpp's fallbacks

    def to_json(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "model": self.model, "n_tokens": self.n_tokens, "seconds": self.seconds,
                "shapes": {n: list(s) for n, s in self.shapes.items()}, "costs": self.costs}

    def cost(self, name: str, type_name: str) -> float | None:
        """The tensor's cost in ``type_name``, or in the type llama.cpp falls back to where its rows do not fit."""
        by_type = self.costs[name]
        if type_name not in by_type and name in self.shapes:
            type_name = next(iter(candidate_types(name, self.shapes[name], [type_name])), type_name)
        return by_type.get(type_name)

    def save(self, path: Path) -> Path:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Sensitivities:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            costs = {str(name): {str(t): float(c) for t, c in types.items()} for name, types in data["costs"].items()}
            shapes = {str(n): tuple(int(d) for d in shape) for n, shape in data.get("shapes", {}).items()}
            return cls(str(data.get("estimator", "proxy")), costs, int(data.get("n_tokens", 0)),
                       float(data.get("seconds", 0.0)), str(data.get("model", "")), shapes)
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
            raise InputError(f"{path}: not a sensitivity file written by 'llmquant sensitivity' ({exc})") from None

    @property
    def types(self) -> list[str]:
        seen: dict[str, None] = {}
        for by_type in self.costs.values():
            seen.update(dict.fromkeys(by_type))
        return sorted(seen, key=lambda t: (-FORMATS[t].bits_per_weight, t) if t in FORMATS else (0, t))


# ---------------------------------------------------------------------------------------------------------------
# Candidates and the tensors they apply to
# ---------------------------------------------------------------------------------------------------------------


def default_candidates(has_imatrix: bool) -> list[str]:
    """Every block format in ``llmquant.formats``, largest first; the i-quants only with an importance matrix."""
    names = [n for n in FORMATS if FORMATS[n].block_size > 1 and (has_imatrix or not n.startswith("IQ"))]
    return sorted(names, key=lambda n: (-FORMATS[n].bits_per_weight, n))


def parse_candidates(spec: str | Sequence[str] | None, has_imatrix: bool) -> list[str]:
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return default_candidates(has_imatrix)
    names = [s.strip().upper() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    for name in names:
        if name not in FORMATS:
            raise InputError(f"--candidates {name}: not a tensor type llmquant implements; choose from "
                             f"{', '.join(default_candidates(True))}")
    return list(dict.fromkeys(names))


@dataclass(frozen=True)
class QuantizableTensor:
    name: str
    shape: tuple[int, ...]  # ggml order
    candidates: tuple[str, ...]  # after llama.cpp's fallbacks for rows that do not fit

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


def quantizable_tensors(source: Any, candidates: Sequence[str]) -> list[QuantizableTensor]:
    """The source's tensors that llama.cpp quantizes, each with the candidates its rows allow."""
    arch = str(source.metadata["general.architecture"])
    out = []
    for t in source.header.tensors:
        if should_quantize(t.name, t.shape, arch=arch):
            out.append(QuantizableTensor(t.name, tuple(int(d) for d in t.shape),
                                         tuple(candidate_types(t.name, t.shape, candidates))))
    return out


def _importance(imatrix: Mapping[str, np.ndarray] | None, name: str, n_per_row: int) -> np.ndarray | None:
    if imatrix is None or name not in imatrix:
        return None
    vector = np.asarray(imatrix[name], dtype=np.float32).reshape(-1)
    return vector if vector.size == n_per_row else None


def _rounded(weight: torch.Tensor, type_name: str, importance: np.ndarray | None) -> torch.Tensor:
    """The weights as the file will hold them in ``type_name``, quantized as llama.cpp would (``[rows, row]``)."""
    data = quantize(weight, type_name, imatrix=importance)
    return torch.from_numpy(dequantize(data, type_name, tuple(weight.shape)))


def _weighted_error(weight: torch.Tensor, rounded: torch.Tensor, column_weights: torch.Tensor | None,
                    row_weights: torch.Tensor | None = None) -> float:
    """Σ_rj r_r c_j Δw_rj² (unit weights where None): the diagonal form of tr(ΔW H ΔWᵀ)."""
    squared = (rounded - weight).double().square()
    if column_weights is not None:
        squared = squared * column_weights.double()[None, :]
    if row_weights is not None:
        squared = squared * row_weights.double()[:, None]
    return float(squared.sum())


# ---------------------------------------------------------------------------------------------------------------
# The proxy
# ---------------------------------------------------------------------------------------------------------------


def _read_weight(source: Any, name: str) -> torch.Tensor:
    t = source.tensor(name)
    raw = source.read(name, 0, t.n_bytes)
    rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
    return torch.from_numpy(np.asarray(dequantize(raw, t.type_name, (rows, int(t.shape[0]))), dtype=np.float32))


def _pool(threads: int | None) -> ThreadPoolExecutor:
    # ggml's searches are numba code that releases the GIL: one worker per core, torch single-threaded in each
    return ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1, initializer=lambda: torch.set_num_threads(1))


def measure_proxy(source: Any, tensors: Sequence[QuantizableTensor], imatrix: Mapping[str, np.ndarray] | None = None,
                  folder: Path | None = None, token_ids: torch.Tensor | None = None, device: str = "cpu",
                  threads: int | None = None, progress: bool = False) -> Sensitivities:
    """The proxy cost of every tensor in every one of its candidate types (see the module).

    With ``folder`` (the Hugging Face model) and ``token_ids`` ``[n_chunks, n_ctx]`` the decoder layers' linears
    get the full-H form from the layer-by-layer runner; every other tensor, and every tensor without them, the
    diagonal form from ``imatrix`` (or from the statistics the runner gathered)."""
    start = time.perf_counter()
    costs: dict[str, dict[str, float]] = {}
    by_name = {t.name: t for t in tensors}
    importance = dict(imatrix or {})
    head_importance: np.ndarray | None = None
    n_tokens = 0
    if folder is not None and token_ids is not None:
        gathered = _proxy_layers(folder, token_ids, by_name, imatrix, device, threads, progress)
        costs.update(gathered.costs)
        for name, vector in gathered.importance.items():
            importance.setdefault(name, vector)
        head_importance = gathered.head_importance
        n_tokens = int(token_ids.numel())
    rest = [t for t in tensors if t.name not in costs]
    names = {t.name for t in source.header.tensors}
    tied = "output.weight" not in names
    token_counts = torch.bincount(token_ids.reshape(-1).long().cpu()) if token_ids is not None else None
    scale = n_tokens or 1
    mean_importance = float(np.mean([np.mean(v) for v in importance.values()])) if importance else 1.0

    def tensor_costs(t: QuantizableTensor) -> tuple[str, dict[str, float]]:
        weight = _read_weight(source, t.name)
        vector = _importance(importance, t.name, t.shape[0])
        category = tensor_category(t.name)
        is_head = category is Category.OUTPUT or (tied and category is Category.TOKEN_EMBD)
        head_vector = _importance(importance, "output.weight", t.shape[0])
        if head_vector is None and head_importance is not None and head_importance.size == t.shape[0]:
            head_vector = head_importance
        row_weights = None
        if category is Category.TOKEN_EMBD and token_counts is not None:  # a lookup: each row as often as its token
            row_weights = torch.zeros(weight.shape[0], dtype=torch.float64)
            n = min(row_weights.numel(), token_counts.numel())
            row_weights[:n] = token_counts[:n].double()

        def diagonal(rounded: torch.Tensor, columns: np.ndarray | None) -> float:
            # n_tokens · Σ_j h_j Σ_r Δw_rj²; without an importance vector, unit columns at the others' mean scale
            if columns is None:
                return scale * mean_importance * _weighted_error(weight, rounded, None)
            return scale * _weighted_error(weight, rounded, torch.from_numpy(columns))

        out = {}
        for type_name in t.candidates:
            rounded = _rounded(weight, type_name, vector)
            if category is Category.TOKEN_EMBD:
                cost = (_weighted_error(weight, rounded, None, row_weights) if row_weights is not None
                        else diagonal(rounded, None))
                if is_head:
                    cost += diagonal(rounded, head_vector)
            else:
                cost = diagonal(rounded, head_vector if is_head else vector)
            out[type_name] = cost
        return t.name, out

    with _pool(threads) as pool:
        for name, by_type in pool.map(tensor_costs, rest):
            costs[name] = by_type
    ordered = {t.name: costs[t.name] for t in tensors}
    return Sensitivities("proxy", ordered, n_tokens, time.perf_counter() - start,
                         shapes={t.name: t.shape for t in tensors})


@dataclass
class _LayerCosts:
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    head_importance: np.ndarray | None = None


def _proxy_layers(folder: Path, token_ids: torch.Tensor, tensors: Mapping[str, QuantizableTensor],
                  imatrix: Mapping[str, np.ndarray] | None, device: str, threads: int | None,
                  progress: bool) -> _LayerCosts:
    """tr(ΔW H ΔWᵀ) of every decoder-layer linear in each of its candidate types, the full-precision model run layer
    by layer; and the mean square of the final normed hidden states (the output head's importance)."""
    from llmquant.calibration.layer_runner import LayerInputs, run_layer_by_layer
    from llmquant.methods.error import output_error
    from llmquant.models.architectures import find_architecture, plan_tensors
    from llmquant.models.config import read_config
    from llmquant.models.safetensors_io import open_weights

    config = read_config(folder)
    arch = find_architecture(config)
    weights = open_weights(folder)
    plans = plan_tensors(arch, config, weights)
    gguf_of = {p.sources[0]: p.name for p in plans if not p.n_experts and len(p.sources) == 1}
    expert_of = {source: p.name for p in plans if p.n_experts for source in p.sources}
    final_norm = next((p for p in plans if p.name == "output_norm.weight"), None)
    result = _LayerCosts()
    n_layers = config.n_layers
    head_sum: list[torch.Tensor] = []
    head_tokens = [0]

    def norm_output(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        hidden = (output[0] if isinstance(output, tuple) else output).detach().double()
        rows = hidden.reshape(-1, hidden.shape[-1])
        eps = float(getattr(config, "rms_norm_eps", None) or 1e-6)
        w = weights.load(final_norm.sources[0]).double().to(rows.device) + arch.norm_offset
        normed = rows * torch.rsqrt(rows.square().mean(-1, keepdim=True) + eps) * w
        squares = normed.square().sum(0)
        head_sum.append(squares.cpu())
        head_tokens[0] += rows.shape[0]

    with _pool(threads) as pool:
        def process(index: int, layer: torch.nn.Module, inputs: LayerInputs) -> None:
            prefix = _layer_prefix(gguf_of, expert_of, index)
            jobs = []
            for names, stats in zip(inputs.groups, inputs.statistics, strict=True):
                for module_name in names:
                    source = inputs.sources.get(module_name, f"{prefix}{module_name}.weight")
                    gguf_name = gguf_of.get(source) or expert_of.get(source)
                    if gguf_name is None or gguf_name not in tensors:
                        continue
                    weight = layer.get_submodule(module_name).weight.detach().float().cpu()
                    vector = _importance(imatrix, gguf_name, weight.shape[1])
                    if source in expert_of:
                        vector = None  # a stacked tensor's imatrix holds every expert: use the expert's own
                    if vector is None:
                        vector = stats.mean_squares.cpu().numpy()
                    result.importance.setdefault(gguf_name, stats.mean_squares.cpu().numpy())
                    for type_name in tensors[gguf_name].candidates:
                        jobs.append((gguf_name, type_name, pool.submit(
                            lambda w=weight, t=type_name, v=vector, h=stats.xtx: output_error(w, _rounded(w, t, v),
                                                                                                h.cpu()))))
            for gguf_name, type_name, future in jobs:
                by_type = result.costs.setdefault(gguf_name, {})
                by_type[type_name] = by_type.get(type_name, 0.0) + future.result()  # experts add up
            if index == n_layers - 1 and final_norm is not None:
                layer.register_forward_hook(norm_output)

        run_layer_by_layer(folder, token_ids, process, device=device, with_xtx=True, max_sample=0, progress=progress)
    if head_sum:
        result.head_importance = (torch.stack(head_sum).sum(0) / max(head_tokens[0], 1)).float().numpy()
    return result


def _layer_prefix(gguf_of: Mapping[str, str], expert_of: Mapping[str, str], index: int) -> str:
    marker = f".layers.{index}."
    for hf_name in (*gguf_of, *expert_of):
        if marker in hf_name:
            return hf_name[: hf_name.index(marker) + len(marker)]
    raise InputError(f"layer {index}: no weight of the model names it")


# ---------------------------------------------------------------------------------------------------------------
# The measured KL divergence
# ---------------------------------------------------------------------------------------------------------------


def measure_kld(folder: Path, tensors: Sequence[QuantizableTensor], token_ids: torch.Tensor,
                imatrix: Mapping[str, np.ndarray] | None = None, device: str = "cpu", threads: int | None = None,
                progress: bool = False) -> Sensitivities:
    """Mean KL divergence from the full-precision model over ``token_ids``'s positions, with one tensor at a time
    rounded to each of its candidate types (everything else in full precision)."""
    from transformers import AutoModelForCausalLM

    from llmquant.models.architectures import find_architecture, plan_tensors
    from llmquant.models.config import read_config
    from llmquant.models.safetensors_io import open_weights

    start = time.perf_counter()
    config = read_config(folder)
    plans = {p.name: p for p in plan_tensors(find_architecture(config), config, open_weights(folder))}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    except Exception as exc:  # transformers raises many kinds for a broken folder
        raise InputError(f"{folder}: could not load the model ({type(exc).__name__}: {exc})") from None
    parameters = dict(model.named_parameters(remove_duplicate=False))
    ids = token_ids.to(device)

    @torch.inference_mode()
    def log_probs() -> torch.Tensor:
        return torch.cat([torch.log_softmax(model(input_ids=ids[i:i + 1], use_cache=False).logits[0].float(), -1)
                          for i in range(ids.shape[0])])

    reference = log_probs()
    p_reference = reference.exp()
    costs: dict[str, dict[str, float]] = {}
    from tqdm.auto import tqdm

    with _pool(threads) as pool:
        for t in tqdm(tensors, desc="kld", unit="tensor", disable=not progress, dynamic_ncols=True):
            plan = plans.get(t.name)
            if plan is None or len(plan.sources) != 1 or plan.sources[0] not in parameters:
                raise InputError(f"kld: tensor {t.name} is not one parameter of the torch model (an expert stack?); "
                                 "use --sensitivity proxy")
            parameter = parameters[plan.sources[0]]
            if tuple(parameter.shape) != t.numpy_shape:
                raise InputError(f"kld: tensor {t.name} is reshaped from {plan.sources[0]}; use --sensitivity proxy")
            original = parameter.detach().clone()
            weight = original.float().cpu()
            vector = _importance(imatrix, t.name, t.shape[0])
            # rows are rounded independently, so the checkpoint's row order (before the converter's q/k
            # permutation) gives the same rounded rows as the file's
            rounded = dict(zip(t.candidates, pool.map(lambda type_name, w=weight, v=vector: _rounded(w, type_name, v),
                                                      t.candidates), strict=True))
            costs[t.name] = {}
            for type_name, values in rounded.items():
                with torch.no_grad():
                    parameter.copy_(values.to(parameter.device, parameter.dtype))
                quantized = log_probs()
                kld = float((p_reference * (reference - quantized)).sum(-1).mean())
                costs[t.name][type_name] = max(kld, 0.0)
            with torch.no_grad():
                parameter.copy_(original)
    return Sensitivities("kld", costs, int(token_ids.numel()), time.perf_counter() - start,
                         shapes={t.name: t.shape for t in tensors})


# ---------------------------------------------------------------------------------------------------------------
# Budgets and the automatic plan
# ---------------------------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``3.9GB``, ``3.9GiB``, ``500MB``, ``123456789`` (bytes) -> bytes."""
    match = _SIZE.match(str(text))
    if not match or (match.group(2) is None and "." in match.group(1)):
        raise InputError(f"--target-size {text}: give bytes (an integer) or a size such as 3.9GB, 3.6GiB, 500MB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def _padded(n_bytes: int) -> int:
    return -(-n_bytes // ALIGNMENT) * ALIGNMENT


@dataclass
class AutoPlan:
    plan: MixPlan
    allocation: Allocation
    predicted_bytes: int  # the whole file, header included
    budget_bytes: int
    estimator: str

    def summary(self) -> str:
        return (f"auto mix from {self.estimator} sensitivities: predicted {self.predicted_bytes:,} bytes for a budget "
                f"of {self.budget_bytes:,}; general.file_type {self.plan.file_type.name} (the nearest llama.cpp mix)")


def header_bytes(source: Any) -> int:
    """The quantized file's bytes before its tensor data: the source's, with room for the keys quantize adds."""
    first = min((t.offset for t in source.header.tensors), default=0)
    return _padded(first + _HEADER_MARGIN)


def budget_for(source: Any, target_size: int | None = None, target_bpw: float | None = None) -> int:
    """The whole file's byte budget: ``target_size``, or ``target_bpw`` bits for each weight (as llama.cpp counts
    bits per weight: all tensors' bytes over all their weights) plus the header."""
    if (target_size is None) == (target_bpw is None):
        raise InputError("--type auto: give exactly one of --target-size or --target-bpw")
    if target_size is not None:
        return int(target_size)
    if target_bpw <= 0:
        raise InputError(f"--target-bpw {target_bpw}: must be positive")
    n_weights = sum(t.n_elements for t in source.header.tensors)
    return header_bytes(source) + int(target_bpw * n_weights / 8)


def nearest_file_type(source: Any, tensor_bytes: int, has_imatrix: bool) -> FileType:
    """The llama.cpp file type whose own mix of this model is nearest in size: what ``general.file_type`` says."""
    from llmquant.pipeline.quantize import plan_file_type, supported_file_types

    best: tuple[int, FileType] | None = None
    for name in supported_file_types():
        ft = FILE_TYPES[name]
        if FORMATS[ft.default_type].block_size == 1:
            continue
        try:
            plan = plan_file_type(source, ft, has_imatrix=has_imatrix)
        except ValueError:
            continue
        if any(t not in FORMATS for t in plan.types.values()):
            continue
        size = sum(tensor_nbytes(tuple(reversed(source.tensor(n).shape)), _qtype(t)) for n, t in plan.types.items())
        if best is None or abs(size - tensor_bytes) < best[0]:
            best = (abs(size - tensor_bytes), ft)
    if best is None:
        raise InputError("no llama.cpp file type can be planned for this model")
    return best[1]


def _qtype(type_name: str) -> Any:
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[type_name]


def auto_plan(source: Any, sensitivities: Sensitivities, budget_bytes: int, candidates: Sequence[str],
              has_imatrix: bool, fixed: Mapping[str, str] | None = None) -> AutoPlan:
    """The automatic mix of ``source`` for a whole-file budget: every quantizable tensor's type from
    ``recipes.auto.allocate`` over its candidates' padded bytes and ``sensitivities``; tensors in ``fixed``
    (name -> type, e.g. from --tensor-type) and the tensors llama.cpp never quantizes keep their type."""
    fixed = dict(fixed or {})
    tensors = quantizable_tensors(source, candidates)
    quantizable = {t.name for t in tensors}
    groups = []
    types: dict[str, str] = {}
    fixed_bytes = 0
    for t in source.header.tensors:
        if t.name in quantizable and t.name not in fixed:
            continue
        types[t.name] = fixed.get(t.name, t.type_name)
        fixed_bytes += _padded(tensor_nbytes(tuple(reversed(t.shape)), _qtype(types[t.name])))
    for t in tensors:
        if t.name in fixed:
            continue
        measured = sensitivities.costs.get(t.name)
        if measured is None:
            raise InputError(f"the sensitivities ({sensitivities.model or sensitivities.estimator}) have no entry for "
                             f"tensor {t.name}: measure them on this model")
        options = tuple(Option(c, _padded(tensor_nbytes(t.numpy_shape, _qtype(c))), measured[c])
                        for c in t.candidates if c in measured)
        if not options:
            raise InputError(f"tensor {t.name}: none of its candidate types ({', '.join(t.candidates)}) was measured; "
                             f"the sensitivities have {', '.join(measured)}")
        groups.append(TensorGroup((t.name,), options))
    head = header_bytes(source)
    if budget_bytes < head + fixed_bytes:
        raise InputError(f"a budget of {budget_bytes:,} bytes is too small: the header and the tensors kept as they "
                         f"are need {head + fixed_bytes:,} already")
    allocation = allocate(groups, budget_bytes - head - fixed_bytes)
    types.update(allocation.types)
    ordered = {t.name: types[t.name] for t in source.header.tensors}
    tensor_bytes = sum(tensor_nbytes(tuple(reversed(source.tensor(n).shape)), _qtype(ty)) for n, ty in ordered.items())
    ft = nearest_file_type(source, tensor_bytes, has_imatrix)
    plan = MixPlan(file_type=ft, types=ordered)
    return AutoPlan(plan, allocation, head + fixed_bytes + allocation.n_bytes, budget_bytes, sensitivities.estimator)


# ---------------------------------------------------------------------------------------------------------------
# The job: measure, and the report of ``llmquant sensitivity``
# ---------------------------------------------------------------------------------------------------------------


def measure_sensitivities(source: Any, estimator: str, candidates: Sequence[str],
                          imatrix: Mapping[str, np.ndarray] | None = None, folder: Path | None = None,
                          token_ids: torch.Tensor | None = None, device: str = "cpu", threads: int | None = None,
                          progress: bool = False, log: Callable[[str], None] = lambda _msg: None) -> Sensitivities:
    estimator = estimator.strip().lower()
    if estimator not in ESTIMATORS:
        raise InputError(f"--sensitivity {estimator}: choose from {', '.join(ESTIMATORS)}")
    tensors = quantizable_tensors(source, candidates)
    if estimator == "kld":
        if folder is None or token_ids is None:
            raise InputError("--sensitivity kld runs the model on calibration text: give a Hugging Face folder and "
                             "--calib TEXT")
        log(f"measuring the KL divergence of {len(tensors)} tensors in {len(candidates)} types")
        return measure_kld(folder, tensors, token_ids, imatrix, device=device, threads=threads, progress=progress)
    log(f"measuring the output error of {len(tensors)} tensors in {len(candidates)} types")
    return measure_proxy(source, tensors, imatrix, folder=folder, token_ids=token_ids, device=device, threads=threads,
                         progress=progress)


def kind_of(name: str) -> str:
    """``attn_q``, ``ffn_down``, ``token_embd``, …: the tensor's name without its layer and suffix."""
    base = re.sub(r"^blk\.\d+\.", "", name)
    return base.removesuffix(".weight")


def layer_table(sensitivities: Sensitivities, type_name: str) -> tuple[list[int | None], list[str], np.ndarray]:
    """Rows: layers (None for the tensors outside the blocks); columns: tensor kinds; values: the cost in
    ``type_name`` or its llama.cpp fallback (NaN where that tensor has neither)."""
    layers = sorted({layer_of(n) for n in sensitivities.costs}, key=lambda x: -1 if x is None else x)
    kinds = list(dict.fromkeys(kind_of(n) for n in sensitivities.costs))
    table = np.full((len(layers), len(kinds)), np.nan)
    for name in sensitivities.costs:
        cost = sensitivities.cost(name, type_name)
        if cost is not None:
            table[layers.index(layer_of(name)), kinds.index(kind_of(name))] = cost
    return layers, kinds, table


def format_report(sensitivities: Sensitivities, reference_type: str | None = None) -> str:
    """report.md: per-tensor costs by type, per-layer and per-kind totals, the most sensitive tensors first."""
    types = sensitivities.types
    reference_type = reference_type or _middle_type(types)
    lines = [f"# Sensitivities ({sensitivities.estimator})", "",
             f"{len(sensitivities.costs)} tensors, {sensitivities.n_tokens} calibration tokens, "
             f"{sensitivities.seconds:.1f} s. Cost: "
             + ("mean KL divergence with only that tensor quantized." if sensitivities.estimator == "kld"
                else "output error tr(ΔW H ΔWᵀ) on the calibration inputs (lower is better)."), "",
             f"## Per layer (total cost in {reference_type}, or llama.cpp's fallback where the rows do not fit)", "",
             "| layer | total | most sensitive kind |",
             "|---|---|---|"]
    layers, kinds, table = layer_table(sensitivities, reference_type)
    for row, layer in zip(table, layers, strict=True):
        if np.all(np.isnan(row)):
            continue
        lines.append(f"| {'-' if layer is None else layer} | {np.nansum(row):.4g} | {kinds[int(np.nanargmax(row))]} |")
    lines += ["", f"## Per kind of tensor (total cost in {reference_type})", "", "| kind | total |", "|---|---|"]
    for k, kind in sorted(enumerate(kinds), key=lambda item: -np.nansum(table[:, item[0]])):
        lines.append(f"| {kind} | {np.nansum(table[:, k]):.4g} |")
    lines += ["", "## Per tensor", "", "| tensor | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    order = sorted(sensitivities.costs, key=lambda n: -(sensitivities.cost(n, reference_type) or 0.0))
    for name in order:
        by_type = sensitivities.costs[name]
        lines.append(f"| {name} | " + " | ".join(f"{by_type[t]:.4g}" if t in by_type else "" for t in types) + " |")
    return "\n".join(lines) + "\n"


def _middle_type(types: Sequence[str]) -> str:
    return "Q4_K" if "Q4_K" in types else types[len(types) // 2]


def plot_heatmap(sensitivities: Sensitivities, path: Path, types: Sequence[str] | None = None) -> Path:
    """heatmap.png: log10 cost, layers × tensor kinds, one panel per type."""
    from llmquant.evaluate.report import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    types = list(types or sensitivities.types)
    tables = [layer_table(sensitivities, t) for t in types]
    values = np.concatenate([t[2][np.isfinite(t[2]) & (t[2] > 0)] for t in tables]) if tables else np.array([1.0])
    low, high = (np.log10(values.min()), np.log10(values.max())) if values.size else (0.0, 1.0)
    n = len(types)
    columns = min(n, 4)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 0.16 * len(tables[0][0]) * rows + 2.0), dpi=110,
                             squeeze=False)
    image = None
    for ax, type_name, (layers, kinds, table) in zip(axes.flat, types, tables, strict=False):
        with np.errstate(divide="ignore", invalid="ignore"):
            shown = np.log10(np.where(table > 0, table, np.nan))
        image = ax.imshow(shown, aspect="auto", cmap="magma", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(f"{type_name} (or its fallback)", fontsize=8)
        ax.set_xticks(range(len(kinds)), kinds, rotation=90, fontsize=6)
        ax.set_yticks(range(len(layers)), ["-" if x is None else str(x) for x in layers], fontsize=5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=f"log10 cost ({sensitivities.estimator})")
    fig.suptitle("where quantization hurts: layers × tensor kinds, per type", fontsize=10)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(temporary)
    plt.close(fig)
    os.replace(temporary, path)
    return path


def write_sensitivity_report(sensitivities: Sensitivities, output_dir: Path, plot: bool = True) -> dict[str, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": sensitivities.save(output_dir / "sensitivity.json")}
    markdown = output_dir / "report.md"
    temporary = output_dir / ".report.md.tmp"
    temporary.write_text(format_report(sensitivities), encoding="utf-8")
    os.replace(temporary, markdown)
    paths["markdown"] = markdown
    if plot:
        paths["plot"] = plot_heatmap(sensitivities, output_dir / "heatmap.png")
    return paths


def run_sensitivity(model: str | os.PathLike, output_dir: str | os.PathLike, calib: Sequence[str] | None = None,
                    imatrix_file: str | os.PathLike | None = None, estimator: str = "proxy",
                    candidates: str | Sequence[str] | None = None, calib_chunks: int = 8, calib_ctx: int = 512,
                    device: str = "cpu", threads: int | None = None, progress: bool = False,
                    log: Callable[[str], None] = lambda _msg: None) -> tuple[Sensitivities, dict[str, Path]]:
    """``llmquant sensitivity``: measure, then write sensitivity.json, report.md and heatmap.png."""
    with prepared_source(model, output_dir, calib, imatrix_file, calib_chunks, calib_ctx, device, progress,
                         log) as prepared:
        names = parse_candidates(candidates, has_imatrix=prepared.imatrix is not None)
        sensitivities = measure_sensitivities(prepared.source, estimator, names, prepared.imatrix,
                                              folder=prepared.folder, token_ids=prepared.token_ids, device=device,
                                              threads=threads, progress=progress, log=log)
    sensitivities.model = str(model)
    return sensitivities, write_sensitivity_report(sensitivities, Path(output_dir))


@dataclass
class PreparedSource:
    source: Any  # pipeline.quantize.GGUFSource
    folder: Path | None
    token_ids: torch.Tensor | None
    imatrix: dict[str, np.ndarray] | None


class prepared_source:  # noqa: N801 - used as a context manager, like open()
    """The model as a GGUF source (converted to a temporary one from a folder), its calibration tokens and an
    importance matrix (given, or computed from ``calib`` as quantize computes it); the temporary files go at exit."""

    def __init__(self, model, scratch_parent, calib, imatrix_file, calib_chunks, calib_ctx, device, progress,
                 log) -> None:
        self.args = (model, Path(scratch_parent), list(calib or []), imatrix_file, calib_chunks, calib_ctx, device,
                     progress, log)
        self.workdir: Path | None = None

    def __enter__(self) -> PreparedSource:
        import tempfile

        from llmquant.gguf_io.imatrix import importance_vectors, load_importance
        from llmquant.models.demo import DEMO_MODEL_NAME, resolve_model
        from llmquant.pipeline.quantize import GGUFSource, _calibration_tokens, _is_gguf, _lossless_outtype

        model, scratch_parent, calib, imatrix_file, calib_chunks, calib_ctx, device, progress, log = self.args
        model_path = resolve_model(model) if str(model) == DEMO_MODEL_NAME else Path(model).expanduser()
        if not model_path.exists():
            raise InputError(f"{model_path}: no such file or folder")
        imatrix = load_importance(Path(imatrix_file)) if imatrix_file else None
        scratch_parent.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=".llmquant-", dir=scratch_parent))
        folder = token_ids = None
        if _is_gguf(model_path):
            if calib:
                raise InputError("--calib needs a Hugging Face model folder to run; for a GGUF give --imatrix FILE")
            source_path = model_path
        elif model_path.is_dir():
            from llmquant.pipeline.convert import convert_model

            source_path = self.workdir / "source.gguf"
            log(f"converting {model_path} to a temporary GGUF")
            convert_model(model_path, source_path, outtype=_lossless_outtype(model_path), progress=progress)
            folder = model_path
            if calib:
                token_ids, _ = _calibration_tokens(model_path, calib, calib_ctx, calib_chunks)
                if imatrix is None:
                    from llmquant.pipeline.imatrix import run_imatrix

                    log(f"computing the importance matrix from {', '.join(calib)}")
                    run = run_imatrix(model_path, calib, output=self.workdir / "imatrix.gguf", n_ctx=calib_ctx,
                                      n_chunks=calib_chunks, device=device, progress=progress)
                    imatrix = importance_vectors(run.data)
        else:
            raise InputError(f"{model_path}: not a GGUF file or a Hugging Face model folder")
        return PreparedSource(GGUFSource.open(source_path), folder, token_ids, imatrix)

    def __exit__(self, *_exc: Any) -> None:
        import shutil

        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


__all__ = ["ESTIMATORS", "AutoPlan", "Sensitivities", "auto_plan", "budget_for", "default_candidates",
           "measure_kld", "measure_proxy", "measure_sensitivities", "parse_candidates", "parse_size",
           "run_sensitivity", "write_sensitivity_report"]


# ---------------------------------------------------------------------------------------------------------------
# ``quantize --type auto``
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoRequest:
    """What ``--type auto`` was asked for: a budget, the candidate types, where the sensitivities come from."""

    target_size: int | None = None  # the whole file, in bytes
    target_bpw: float | None = None
    candidates: str | tuple[str, ...] | None = None
    estimator: str = "proxy"
    sensitivities_file: str | None = None
    calib_chunks: int = 8  # chunks of the calibration text the sensitivities are measured on


def plan_auto(request: AutoRequest, source: Any, folder: Path | None, imatrix: Mapping[str, np.ndarray] | None,
              calib: Sequence[str] | None, calib_ctx: int = 512, has_imatrix: bool = False, device: str = "cpu",
              threads: int | None = None, progress: bool = False,
              log: Callable[[str], None] = lambda _msg: None) -> AutoPlan:
    """The automatic mix for ``quantize``: the sensitivities (loaded, or measured on ``calib``), then the plan."""
    from llmquant.pipeline.quantize import _calibration_tokens

    budget = budget_for(source, request.target_size, request.target_bpw)
    candidates = parse_candidates(request.candidates, has_imatrix)
    if request.sensitivities_file:
        sensitivities = Sensitivities.load(request.sensitivities_file)
    else:
        token_ids = _calibration_tokens(folder, calib, calib_ctx, request.calib_chunks)[0] if folder and calib else None
        sensitivities = measure_sensitivities(source, request.estimator, candidates, imatrix, folder=folder,
                                              token_ids=token_ids, device=device, threads=threads, progress=progress,
                                              log=log)
    return auto_plan(source, sensitivities, budget, candidates, has_imatrix)
