"""The layer-by-layer calibration runner: one decoder layer in memory at a time, as in the GPTQ paper (§4).

The calibration chunks are embedded once; then, for each decoder layer, only that layer's weights are read
from the model's safetensors, the current hidden states run through it while forward pre-hooks gather each
linear's input statistics, and a caller's ``process_layer`` sees the layer and those statistics (and may change
the layer's weights in place, e.g. to their quantized values). The layer is then run again, and its outputs
become the next layer's inputs, so each layer is calibrated on what the quantized layers before it produce.

Mixture-of-experts layers: transformers keeps each layer's experts fused in 3-D parameters; the runner puts in
their place the same computation with each expert's projections as ``nn.Linear`` (``_ExpertLinears``), so each
expert's statistics come from the tokens routed to it, and an expert that got none has no statistics at all.

Peak memory is one layer, its statistics and the hidden states of the chunks, never the whole model. The
layer's own code is transformers' (its attention, norms and rotary embeddings, exact for every architecture it
implements); what the model's forward passes each layer (the causal mask, position embeddings) is recorded once
by running the model's own forward with every decoder layer replaced by a recorder.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmquant.errors import InputError
from llmquant.models.architectures import EXPERT_WEIGHT
from llmquant.models.safetensors_io import WeightSource, open_weights


@dataclass
class InputStatistics:
    """What one linear input saw over the calibration tokens (shared by every linear reading the same tensor).

    ``xtx``: Σ xᵀx [in, in] in float64 (GPTQ's H); ``sum_squares``: Σ x² per column (llama.cpp's imatrix sums);
    ``sum_abs``: Σ |x| per column (AWQ's activation magnitude); ``sample``: up to ``max_sample`` input rows, spread
    evenly over the chunks (AWQ's search measures output errors on them)."""

    in_features: int
    with_xtx: bool
    max_sample: int
    xtx: torch.Tensor | None = None
    sum_squares: torch.Tensor | None = None
    sum_abs: torch.Tensor | None = None
    n_tokens: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, sample_every: int) -> None:
        rows = x.detach().reshape(-1, self.in_features).float()
        if self.sum_squares is None:
            self.sum_squares = torch.zeros(self.in_features, dtype=torch.float64, device=rows.device)
            self.sum_abs = torch.zeros(self.in_features, dtype=torch.float64, device=rows.device)
            if self.with_xtx:
                self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=rows.device)
        self.sum_squares += rows.square().sum(0, dtype=torch.float64)
        self.sum_abs += rows.abs().sum(0, dtype=torch.float64)
        if self.xtx is not None:
            as64 = rows.double()
            self.xtx.addmm_(as64.T, as64)
        self.n_tokens += rows.shape[0]
        if self.max_sample and sum(s.shape[0] for s in self.samples) < self.max_sample:
            self.samples.append(rows[::sample_every].clone())

    @property
    def mean_squares(self) -> torch.Tensor:
        """Mean x² per column: llama.cpp's importance vector for the linears reading this input."""
        return (self.sum_squares / max(self.n_tokens, 1)).float()

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.sum_abs / max(self.n_tokens, 1)).float()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples)[: self.max_sample]


@dataclass
class LayerInputs:
    """The linears of one decoder layer grouped by the tensor they read: ``groups[k]`` are module names inside
    the layer (``self_attn.q_proj``, ...) that share ``statistics[k]``."""

    groups: list[tuple[str, ...]]
    statistics: list[InputStatistics]
    # module name -> the checkpoint tensor its weight was read from, where that is not ``<layer prefix><name>.weight``
    # (an expert's projections: ``mlp.experts.3.gate_proj`` <- ``model.layers.0.block_sparse_moe.experts.3.w1.weight``)
    sources: dict[str, str] = field(default_factory=dict)

    def of(self, module_name: str) -> InputStatistics:
        for names, stats in zip(self.groups, self.statistics, strict=True):
            if module_name in names:
                return stats
        raise KeyError(module_name)


ProcessLayer = Callable[[int, nn.Module, LayerInputs], None]


def run_layer_by_layer(folder: Path, token_ids: torch.Tensor, process_layer: ProcessLayer, *,
                       device: torch.device | str = "cpu", batch_size: int = 4, with_xtx: bool = True,
                       max_sample: int = 4096, progress: bool = False, allow_pickle: bool = False) -> None:
    """Calibrate the Hugging Face model in ``folder`` layer by layer on ``token_ids`` ``[n_chunks, n_ctx]``.

    ``process_layer(index, layer, inputs)`` is called once per decoder layer, in order, after the layer's
    inputs have been gathered; it may change the layer's parameters in place, and the changed layer computes
    the next layer's inputs. ``with_xtx``: gather Σ xᵀx per input (GPTQ needs it; imatrix and AWQ do not)."""
    device = torch.device(device)
    weights = open_weights(folder, allow_pickle=allow_pickle)
    shell, layers_path, n_layers = _model_without_layers(folder, weights, device)
    layer_kwargs, hidden = _record_layer_inputs(shell, layers_path, n_layers, token_ids, device, batch_size)
    layer_class = _decoder_layer_class(shell)
    config = shell.config.get_text_config() if hasattr(shell.config, "get_text_config") else shell.config
    del shell
    n_chunks = token_ids.shape[0]
    bar = _progress_bar(n_layers, progress)
    for index in range(n_layers):
        layer, sources = _load_layer(layer_class, config, index, f"{layers_path}.{index}.", weights, device)
        inputs = _gather_inputs(layer, hidden, layer_kwargs[index], batch_size, with_xtx, max_sample, n_chunks)
        inputs.sources = sources
        process_layer(index, layer, inputs)
        del inputs
        with torch.no_grad():
            for start, stop in _batches(n_chunks, batch_size):
                hidden[start:stop] = _layer_output(layer(hidden[start:stop], **_kwargs_for(layer_kwargs[index],
                                                                                            stop - start)))
        del layer
        bar.update(1)
    bar.close()


# ---- the model around its layers -------------------------------------------------------------------------------


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index``: records what the model's forward passes it, returns its input."""

    def __init__(self, index: int, attention_type: str | None, sink: dict[int, dict[str, Any]]) -> None:
        super().__init__()
        self.index = index
        self.sink = sink
        if attention_type is not None:
            self.attention_type = attention_type  # Gemma 2/3's forward picks each layer's mask by it

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise InputError("this architecture passes its decoder layers positional arguments beyond the hidden "
                             "states; the layer-by-layer runner cannot record them")
        self.sink.setdefault(self.index, kwargs)
        return hidden_states


class _StopForward(Exception):
    pass


def _model_without_layers(folder: Path, weights: WeightSource, device: torch.device) -> tuple[nn.Module, str, int]:
    """The causal LM with no decoder layer built (a model of zero layers, its config then restored), its
    non-layer weights loaded; the dotted path of its layer list; the number of layers."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder}: could not read config.json ({exc})") from None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_layers = int(text_config.num_hidden_layers)
    empty = copy.deepcopy(config)
    empty_text = empty.get_text_config() if hasattr(empty, "get_text_config") else empty
    empty_text.num_hidden_layers = 0  # layer_types stay: Gemma 3 builds a rotary embedding per attention type
    try:
        # no random initialisation: the weights the runner uses are loaded next, and the ones it never reads (the
        # output head) stay untouched allocations, which take no memory (a 1.1B's embeddings and head: 0.8 GB)
        with torch.device(device), _no_init_weights():
            model = AutoModelForCausalLM.from_config(empty, dtype=torch.float32)
    except (ValueError, KeyError) as exc:
        raise InputError(f"{folder}: transformers cannot build this model ({exc})") from None
    layers_path = _layers_path(model)
    # the forward slices self.layers[: config.num_hidden_layers] and reads per-layer attention types: give every
    # module the real config back, with the attention implementation transformers chose for the model
    for real, built in ((config, empty), (text_config, empty_text)):
        real._attn_implementation = built._attn_implementation
    for module in model.modules():
        if getattr(module, "config", None) is empty:
            module.config = config
        elif getattr(module, "config", None) is empty_text:
            module.config = text_config
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embed_names = [n for n, p in model.named_parameters() if p is embed.weight]
    unread = {n for n, p in model.named_parameters() if head is not None and p is head.weight and p is not embed.weight}
    targets = model.state_dict(keep_vars=True)  # what load_state_dict would fill: parameters, persistent buffers
    loaded = set()
    with torch.no_grad():  # one tensor at a time, not a state dict of every non-layer weight at once
        for name in weights.names():
            target = targets.get(name)
            if name.startswith(layers_path + ".") or name in unread or target is None:
                continue
            value = weights.load(name)
            if tuple(value.shape) != tuple(target.shape):
                raise InputError(f"{folder}: {name} has shape {tuple(value.shape)}, the config gives "
                                 f"{tuple(target.shape)}")
            target.copy_(value)
            loaded.add(name)
    if not any(n in loaded for n in embed_names):
        raise InputError(f"{folder}: no token embedding among the weights (expected {embed_names[0]})")
    return model.eval(), layers_path, n_layers


def _no_init_weights():
    """transformers' own switch for skipping the random initialisation of a model about to be loaded."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # other transformers versions: initialised as usual, only slower and larger
        import contextlib

        return contextlib.nullcontext()
    return no_init_weights()


def _layers_path(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("layers"):
            return name
    raise InputError(f"{type(model).__name__}: no decoder layer list found (expected a '...layers' module list)")


def _record_layer_inputs(model: nn.Module, layers_path: str, n_layers: int, token_ids: torch.Tensor,
                         device: torch.device, batch_size: int) -> tuple[dict[int, dict[str, Any]], torch.Tensor]:
    """Every layer's keyword arguments (for a batch of ``batch_size`` chunks) and layer 0's hidden states for all
    chunks, from the model's own forward with recorders in place of the layers."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    attention_types = getattr(text_config, "layer_types", None)
    sink: dict[int, dict[str, Any]] = {}
    recorders = nn.ModuleList(_Recorder(i, attention_types[i] if attention_types else None, sink)
                              for i in range(n_layers))
    parent_path, _, attribute = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attribute, recorders)
    hidden_chunks = []
    first_layer_input: list[torch.Tensor] = []

    def capture(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        first_layer_input.append(args[0] if args else kwargs["hidden_states"])

    def stop(*_args: Any) -> None:
        raise _StopForward

    final_norm = _final_norm(model, parent)
    handles = [recorders[0].register_forward_pre_hook(capture, with_kwargs=True)]
    if final_norm is not None:
        handles.append(final_norm.register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            for start, end in _batches(token_ids.shape[0], batch_size):
                first_layer_input.clear()
                try:
                    model(input_ids=token_ids[start:end].to(device), use_cache=False)
                except _StopForward:
                    pass
                hidden_chunks.append(first_layer_input[0].float().clone())
    finally:
        for handle in handles:
            handle.remove()
    return sink, torch.cat(hidden_chunks)


def _final_norm(model: nn.Module, decoder: nn.Module) -> nn.Module | None:
    norm = getattr(decoder, "norm", None) or getattr(decoder, "final_layernorm", None)
    return norm if isinstance(norm, nn.Module) else None


def _decoder_layer_class(model: nn.Module) -> type[nn.Module]:
    names = getattr(model, "_no_split_modules", None) or []
    module = sys.modules[type(model).__module__]
    for name in names:
        if name.endswith("DecoderLayer") and hasattr(module, name):
            return getattr(module, name)
    raise InputError(f"{type(model).__name__}: cannot find its decoder layer class (no_split_modules: {names})")


def _load_layer(layer_class: type[nn.Module], config: Any, index: int, prefix: str, weights: WeightSource,
                device: torch.device) -> tuple[nn.Module, dict[str, str]]:
    """Decoder layer ``index`` with its weights read from the model's files (only this layer's); and, for the
    weights not stored under their module's own name (experts), module name -> checkpoint tensor name."""
    with torch.device("meta"):
        layer = layer_class(config, layer_idx=index)
    expert_paths = _split_fused_experts(layer)
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for name in weights.names():
        if not name.startswith(prefix):
            continue
        key = _layer_key(name, name[len(prefix):], layer, expert_paths)
        state[key] = weights.load(name).float()
        if key != name[len(prefix):]:
            sources[key.removesuffix(".weight")] = name
    layer = layer.to_empty(device=device)
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise InputError(f"layer {index}: the weights under '{prefix}' do not fit {layer_class.__name__} ({what})")
    return layer.eval(), sources


# Mixtral's names for an expert's projections (Qwen-MoE uses the module names themselves)
_PROJECTION = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class _Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)


class _ExpertLinears(nn.ModuleList):
    """transformers' fused experts (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) computed expert by expert
    with ``nn.Linear`` projections: the same outputs, each expert's inputs seen by its own linears' hooks."""

    def __init__(self, fused: nn.Module) -> None:
        n_experts, two_intermediate, hidden = fused.gate_up_proj.shape
        super().__init__(_Expert(hidden, two_intermediate // 2) for _ in range(n_experts))
        self.act_fn = fused.act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for number, expert in enumerate(self):
            token_index, slot = torch.where(top_k_index == number)
            if token_index.numel() == 0:
                continue
            x = hidden_states[token_index]
            y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            out.index_add_(0, token_index, (y * top_k_weights[token_index, slot, None]).to(out.dtype))
        return out


def _split_fused_experts(layer: nn.Module) -> list[str]:
    """Replace every fused experts module of ``layer`` by ``_ExpertLinears``; their module paths."""
    paths = []
    for name, module in list(layer.named_modules()):
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.ndim == 3:
            parent_path, _, attribute = name.rpartition(".")
            parent = layer.get_submodule(parent_path) if parent_path else layer
            with torch.device("meta"):
                setattr(parent, attribute, _ExpertLinears(module))
            paths.append(name)
    return paths


def _layer_key(name: str, key: str, layer: nn.Module, expert_paths: list[str]) -> str:
    """Where checkpoint tensor ``name`` (``key`` relative to the layer) goes in ``layer``: ``key`` itself, or for
    a MoE layer its expert's projection (``block_sparse_moe.experts.3.w1.weight`` ->
    ``mlp.experts.3.gate_proj.weight``) and its router (``block_sparse_moe.gate.weight`` -> ``mlp.gate.weight``)."""
    if not expert_paths:
        return key
    experts_path = expert_paths[0]
    block_path = experts_path.rpartition(".")[0]
    match = EXPERT_WEIGHT.match(name)  # the converter's own pattern for an expert's checkpoint tensor
    if match:
        return f"{experts_path}.{match['xid']}.{_PROJECTION.get(match['proj'], match['proj'])}.weight"
    if key.startswith("block_sparse_moe.") and not hasattr(layer, "block_sparse_moe"):
        return f"{block_path}.{key.removeprefix('block_sparse_moe.')}"
    return key


def _gather_inputs(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch_size: int,
                   with_xtx: bool, max_sample: int, n_chunks: int) -> LayerInputs:
    """Run the chunks through ``layer`` with a pre-hook on each linear; linears that read the same tensor in a
    forward pass (q/k/v, gate/up) share one InputStatistics."""
    linears = [(name, module) for name, module in layer.named_modules() if _is_linear(module)]
    groups: list[list[str]] = []
    statistics: list[InputStatistics] = []
    group_of: dict[str, int] = {}  # module name -> its group, fixed by the first batch
    leaders: set[str] = set()  # the first linear of each group in a forward pass: it adds the group's input
    # this batch's input tensors and their groups; held, so that no later tensor can take a freed one's address
    seen: list[tuple[torch.Tensor, int]] = []
    sample_every = max(1, n_chunks * hidden.shape[1] // max_sample) if max_sample else 1

    def hook_for(name: str, module: nn.Linear) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in group_of:  # the first batch: linears reading one tensor form one group
                group = next((g for tensor, g in seen if tensor is x), None)
                if group is None:
                    group = len(groups)
                    seen.append((x, group))
                    groups.append([])
                    statistics.append(InputStatistics(module.weight.shape[1], with_xtx, max_sample))
                    leaders.add(name)
                group_of[name] = group
                groups[group].append(name)
            if name in leaders:
                statistics[group_of[name]].add(x, sample_every)
        return hook

    handles = [module.register_forward_pre_hook(hook_for(name, module)) for name, module in linears]
    try:
        with torch.no_grad():
            for start, stop in _batches(n_chunks, batch_size):
                layer(hidden[start:stop], **_kwargs_for(kwargs, stop - start))
                seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return LayerInputs([tuple(g) for g in groups], statistics)


def _is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a MoE router (transformers' ``*Router``: a linear by ``F.linear`` on its 2-D weight,
    llama.cpp's ffn_gate_inp, which its imatrix covers too)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("Router") and isinstance(weight, nn.Parameter) and weight.ndim == 2


def _batches(n: int, batch_size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def _kwargs_for(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """The recorded keyword arguments for a batch of ``batch`` chunks (a mask recorded for a larger batch is cut)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and key == "attention_mask" and value.shape[0] > batch:
            value = value[:batch]
        out[key] = value
    out["use_cache"] = False
    return out


def _layer_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="layer", desc="calibrate", disable=not enabled, dynamic_ncols=True)
