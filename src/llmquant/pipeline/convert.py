"""``llmquant convert``: a Hugging Face model folder → a GGUF that llama.cpp runs as it runs its own conversion.

The job: read and check config.json, weights and tokenizer; plan every GGUF tensor from the declared shapes;
write header, metadata and tensor table; then read, transform, encode and write one tensor at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from llmquant.errors import InputError
from llmquant.gguf_io.writer import StreamingGGUFWriter, tensor_nbytes
from llmquant.models.architectures import Architecture, TensorPlan, find_architecture, plan_tensors
from llmquant.models.config import ModelConfig, read_config
from llmquant.models.demo import DEMO_MODEL_NAME, demo_model_folder
from llmquant.models.safetensors_io import WeightSource
from llmquant.models.tokenizer_export import export_vocab
from llmquant.pipeline import preflight

Q = gguf.GGMLQuantizationType
# --outtype → (general.file_type, the type of weight matrices)
OUTTYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}
# tensors llama.cpp keeps in F32 whatever the file type (convert_hf_to_gguf.py prepare_tensors)
_ALWAYS_F32 = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.POS_EMBD, gguf.MODEL_TENSOR.TOKEN_TYPES)


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    architecture: str
    n_tensors: int
    n_params: int
    n_bytes: int
    seconds: float


def resolve_source(model: str) -> Path:
    """MODEL as a local folder: a path, the demo model, or a Hub id downloaded when the network allows."""
    if model == DEMO_MODEL_NAME:
        return demo_model_folder()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{path}: is a file; convert expects a Hugging Face model folder (config.json, weights, "
                         "tokenizer)")
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return _download_from_hub(model)
    raise InputError(f"{path}: no such folder (or use the built-in demo model '{DEMO_MODEL_NAME}')")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise InputError(f"'{repo_id}' is not a local folder, and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "README.md"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise InputError(f"'{repo_id}': not a local folder, and the Hugging Face Hub cannot be reached (offline?); "
                         "download the model and pass its folder") from None
    except HfHubHTTPError as exc:
        raise InputError(f"'{repo_id}': the Hugging Face Hub refused the download ({exc}); "
                         "check the id, or log in for gated models") from None


def tensor_type(plan: TensorPlan, matrix_type: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The ggml type of one tensor, by llama.cpp's converter's rules."""
    if len(plan.shape) <= 1 or plan.name.endswith("_norm.weight") or not plan.name.endswith(".weight"):
        return Q.F32
    if plan.kind in _ALWAYS_F32:
        return Q.F32
    if matrix_type == Q.Q8_0 and plan.shape[-1] % 32:
        return Q.F16  # as llama.cpp: rows that are not whole Q8_0 blocks fall back to F16
    return matrix_type


def encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """A float tensor as the bytes ggml stores for ``qtype``."""
    if qtype == Q.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if qtype == Q.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    if qtype == Q.Q8_0:
        from llmquant.formats import quantize

        return quantize(tensor.reshape(-1, tensor.shape[-1]), "Q8_0")
    raise ValueError(f"no encoder for {qtype.name}")


def default_output_name(model: str | Path, outtype: str) -> str:
    """The file name convert writes into a folder given as ``-o``: the model's name and the type, as llama.cpp's
    converter names its output (``Llama-3.2-1B-F16.gguf``)."""
    stem = DEMO_MODEL_NAME if str(model) == DEMO_MODEL_NAME else Path(str(model).rstrip("/")).name
    return f"{stem}-{outtype.upper()}.gguf"


def convert_model(model: str | Path, output: str | Path, outtype: str = "f16", allow_pickle: bool = False,
                  progress: bool = False) -> ConvertResult:
    """Convert ``model`` (folder, demo name or Hub id) to ``output`` (a file, or a folder to write the file into);
    nothing is left at ``output`` on failure."""
    start = time.perf_counter()
    if outtype.lower() not in OUTTYPES:
        raise InputError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    file_type, matrix_type = OUTTYPES[outtype.lower()]
    target = preflight.output_file(output, default_output_name(model, outtype))
    preflight.check_output(target)  # before a download or the demo model's first build
    folder = resolve_source(str(model))
    preflight.check_not_input(target, [folder])
    config = read_config(folder)
    arch = find_architecture(config)
    weights = preflight.check_model_folder(folder, allow_pickle)
    vocab = export_vocab(folder, config.vocab_size, arch.name, arch.add_space_prefix)
    plans = plan_tensors(arch, config, weights, n_vocab_tokens=vocab.n_tokens)
    types = [tensor_type(plan, matrix_type) for plan in plans]
    preflight.check_room(target, sum(tensor_nbytes(plan.shape, qtype) for plan, qtype in zip(plans, types,
                                                                                            strict=True)))
    with preflight.writing(target):
        return _write_gguf(target, folder, config, arch, weights, vocab, plans, types, file_type, progress, start)


def _write_gguf(target: Path, folder: Path, config: ModelConfig, arch: Architecture, weights: WeightSource,
                vocab: Any, plans: list[TensorPlan], types: list[gguf.GGMLQuantizationType],
                file_type: gguf.LlamaFileType, progress: bool, start: float) -> ConvertResult:
    with StreamingGGUFWriter(target, arch.gguf_name) as writer:
        for plan, qtype in zip(plans, types, strict=True):
            writer.declare(plan.name, plan.shape, qtype)
        _write_metadata(writer, folder, config, arch.hparams(config), file_type)
        for key, value in vocab.values.items():
            writer.add(key, value)
        vocab.special.add_to_gguf(writer.writer, quiet=True)
        for key, value in vocab.after_special.items():
            writer.add(key, value)
        writer.begin()
        n_params = 0
        for plan, qtype in _progress(list(zip(plans, types, strict=True)), progress):
            loaded = [weights.load(name) for name in plan.sources]
            for name, values in zip(plan.sources, loaded, strict=True):
                preflight.check_finite(f"{name} in {folder}", values)  # llama.cpp would run on NaNs
            tensor = plan.build(loaded)
            del loaded
            if tuple(tensor.shape) != plan.shape:
                raise InputError(f"tensor {plan.name} from {plan.sources[:1]} came out {list(tensor.shape)}, "
                                 f"expected {list(plan.shape)}")
            writer.write(plan.name, encode(tensor, qtype))
            n_params += tensor.numel()
            del tensor
        path = writer.finish()
    return ConvertResult(path=path, architecture=arch.gguf_name, n_tensors=len(plans), n_params=n_params,
                         n_bytes=path.stat().st_size, seconds=time.perf_counter() - start)


def _write_metadata(writer: StreamingGGUFWriter, folder: Path, config: ModelConfig, hparams: dict,
                    file_type: gguf.LlamaFileType) -> None:
    """general.* from the model card and folder name (gguf.Metadata, as llama.cpp), then the hyper-parameters."""
    total, shared, expert, n_experts = writer.writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, folder, None, total)
    if metadata.name is None:
        metadata.name = folder.name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, n_experts)
    writer.writer.add_type(gguf.GGUFType.MODEL)
    metadata.set_gguf_meta_model(writer.writer)
    for key, value in hparams.items():
        writer.add(key, value)
    writer.add("file_type", int(file_type))
    writer.add("quantization_version", gguf.GGML_QUANT_VERSION)


def _progress(items: list, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="convert", unit="tensor")
