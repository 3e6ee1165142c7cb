"""Logits producers: a model file in, one chunk's logits at the scored positions out.

* ``TorchBackend``: a Hugging Face model in PyTorch (CPU or GPU). From a GGUF, every tensor is dequantized with
  our own ``llmquant.formats.dequantize``, renamed back to its Hugging Face name through gguf's tensor-name map,
  and llama's q/k rows are put back in Hugging Face order (llama.cpp's converter permutes them for its rope).
  So the figures measure our formats' decoding, not llama.cpp's kernels.
* ``LlamaCppBackend``: llama.cpp itself through llama-cpp-python (``logits_all``), as llama-perplexity runs it,
  including its activation quantization (e.g. Q8_0 activations against Q8_0/Q4_0 weights on CPU).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from llmquant.errors import InputError
from llmquant.evaluate.chunks import first_scored, model_input


class LogitsBackend(Protocol):
    name: str
    n_vocab: int
    bos_token_id: int | None  # put first in every chunk; None where the vocab adds no BOS (llama_vocab_get_add_bos)

    def tokenize(self, text: str) -> list[int]:
        """The whole text as llama.cpp's common_tokenize(add_special=true, parse_special=false) makes it."""
        ...

    def scored_logits(self, chunk: np.ndarray) -> torch.Tensor:
        """float32 [n_ctx - 1 - n_ctx/2, n_vocab]: the logits at one chunk's scored positions."""
        ...

    def close(self) -> None: ...


def _add_bos_from_gguf(metadata: dict[str, Any]) -> bool:
    """llama.cpp's add_bos: the file's tokenizer.ggml.add_bos_token, else its default for the vocab type."""
    value = metadata.get("tokenizer.ggml.add_bos_token")
    if value is not None:
        return bool(value)
    return metadata.get("tokenizer.ggml.model") in ("llama", "t5")  # llama-vocab.cpp: SPM adds BOS by default


# ---------------------------------------------------------------------------------------------------------------
# PyTorch


class TorchBackend:
    """A Hugging Face causal LM in PyTorch, float32."""

    name = "torch"

    def __init__(self, model: Any, tokenize: Any, bos_token_id: int | None, n_vocab: int, device: str) -> None:
        self.model = model
        self._tokenize = tokenize
        self.bos_token_id = bos_token_id
        self.n_vocab = n_vocab
        self.device = device

    @classmethod
    def from_hf_folder(cls, folder: Path, device: str = "cpu") -> TorchBackend:
        from transformers import AutoModelForCausalLM

        from llmquant.calibration.chunking import load_tokenizer, tokenize_like_llama_cpp, tokenizer_adds_bos

        tokenizer = load_tokenizer(folder)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        except Exception as exc:  # transformers raises many kinds for a broken folder
            raise InputError(f"{folder}: could not load the model ({type(exc).__name__}: {exc})") from None
        add_bos = tokenizer_adds_bos(tokenizer)
        model = model.to(device).eval()
        return cls(model, lambda text: tokenize_like_llama_cpp(tokenizer, text, add_bos=add_bos),
                   tokenizer.bos_token_id if add_bos else None, int(model.config.vocab_size), device)

    @classmethod
    def from_gguf(cls, path: Path, device: str = "cpu") -> TorchBackend:
        from llmquant.gguf_io.reader import open_gguf

        reader = open_gguf(path)
        metadata = {key: field.contents() for key, field in reader.fields.items()
                    if not key.startswith("GGUF.") and key not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                                                   "tokenizer.ggml.token_type")}
        model = gguf_to_torch_model(path, reader, metadata, device)
        add_bos = _add_bos_from_gguf(metadata)
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        return cls(model, _gguf_tokenizer(path), int(bos) if add_bos and bos is not None else None,
                   int(model.config.vocab_size), device)

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenize(text))

    @torch.inference_mode()
    def scored_logits(self, chunk: np.ndarray) -> torch.Tensor:
        n_ctx = len(chunk)
        ids = torch.from_numpy(model_input(chunk, self.bos_token_id)).unsqueeze(0).to(self.device)
        # keep the logits from the first scored position on; the last position predicts past the chunk
        out = self.model(input_ids=ids, logits_to_keep=n_ctx - first_scored(n_ctx), use_cache=False)
        return out.logits[0, :-1, : self.n_vocab].float().cpu()

    def close(self) -> None:
        self.model = None


def _gguf_tokenizer(path: Path):
    """llama.cpp's own tokenizer for the file (vocab only, fast); transformers' GGUF tokenizer without it."""
    try:
        import llama_cpp  # noqa: F401 (only whether it is installed)
    except ImportError:
        from transformers import AutoTokenizer

        from llmquant.calibration.chunking import tokenize_like_llama_cpp

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return lambda text: tokenize_like_llama_cpp(tokenizer, text)
    from llmquant.evaluate.llama_runtime import open_llama

    vocab = open_llama(path, vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False)


# GGUF architecture → (transformers model_type, llama.cpp's converter permutes q/k rows)
_TORCH_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}


def unpermute_qk(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute: rows back from rope's interleaved to HF's halves order."""
    rows = weights.shape[0]
    return weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def gguf_to_torch_model(path: Path, reader: Any, metadata: dict[str, Any], device: str = "cpu") -> Any:
    """A transformers model whose weights are the GGUF's tensors dequantized by ``llmquant.formats``."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmquant.formats import dequantize

    arch = metadata.get("general.architecture")
    if arch not in _TORCH_ARCHITECTURES:
        supported = ", ".join(sorted(_TORCH_ARCHITECTURES))
        raise InputError(f"{path}: the torch backend does not run GGUF architecture '{arch}' yet (it runs "
                         f"{supported}); use --backend llama.cpp")
    model_type, permuted = _TORCH_ARCHITECTURES[arch]
    tensors = {t.name: t for t in reader.tensors}
    n_layers = int(metadata[f"{arch}.block_count"])
    hidden = int(metadata[f"{arch}.embedding_length"])
    n_head = int(metadata[f"{arch}.attention.head_count"])
    n_head_kv = int(metadata.get(f"{arch}.attention.head_count_kv") or n_head)
    config_values: dict[str, Any] = {
        "num_hidden_layers": n_layers,
        "hidden_size": hidden,
        "intermediate_size": int(metadata[f"{arch}.feed_forward_length"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": int(metadata.get(f"{arch}.attention.key_length") or hidden // n_head),
        "rms_norm_eps": float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(metadata.get(f"{arch}.context_length", 4096)),
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "rope_theta": float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
    }
    if model_type == "llama":
        config_values["attention_bias"] = "blk.0.attn_q.bias" in tensors
    config = AutoConfig.for_model(model_type, **config_values)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)

    state = {}
    used: set[str] = set()
    for hf_name, param in model.state_dict().items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in tensors:
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied to the embeddings, as llama.cpp uses token_embd when output.weight is absent
            raise InputError(f"{path}: no tensor for the model's '{hf_name}' (looked for '{gguf_name}')")
        tensor = tensors[gguf_name]
        shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists the row length first
        values = dequantize(np.array(tensor.data), tensor.tensor_type.name, shape)  # a writable copy of the map
        values = torch.from_numpy(np.asarray(values, dtype=np.float32))
        if permuted and gguf_name.endswith("attn_q.weight"):
            values = unpermute_qk(values, n_head)
        elif permuted and gguf_name.endswith("attn_k.weight"):
            values = unpermute_qk(values, n_head_kv)
        if tuple(values.shape) != tuple(param.shape):
            raise InputError(f"{path}: tensor '{gguf_name}' has shape {tuple(values.shape)} but the model's "
                             f"'{hf_name}' needs {tuple(param.shape)}")
        state[hf_name] = values
        used.add(gguf_name)
    unused = sorted(set(tensors) - used - {"rope_freqs.weight"})
    if unused:
        raise InputError(f"{path}: {len(unused)} tensors the torch backend does not know where to put "
                         f"({', '.join(unused[:4])}…); use --backend llama.cpp")
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp


class LlamaCppBackend:
    """A GGUF run by llama.cpp through llama-cpp-python with every position's logits kept."""

    name = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise InputError("the llama.cpp backend needs llama-cpp-python: pip install 'llmquant[llamacpp]' "
                             "(or use --backend torch)") from None
        from llmquant.evaluate.llama_runtime import open_llama

        self._llama_cpp = llama_cpp
        self.path = path
        self.n_ctx = n_ctx
        threads = threads or os.cpu_count() or 1
        try:
            self.llm = open_llama(path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                 logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
        except Exception as exc:  # llama-cpp-python raises ValueError/RuntimeError for files llama.cpp refuses
            raise InputError(f"{path}: llama.cpp could not load it ({type(exc).__name__}: {exc})") from None
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = int(self.llm.n_vocab())
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self.bos_token_id = int(self.llm.token_bos()) if add_bos else None

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def scored_logits(self, chunk: np.ndarray) -> torch.Tensor:
        n_ctx = len(chunk)
        if n_ctx > self.n_ctx:
            raise ValueError(f"chunk of {n_ctx} tokens in a context of {self.n_ctx}")
        self.llm.reset()  # perplexity.cpp clears the KV cache before each chunk
        self.llm.eval(model_input(chunk, self.bos_token_id).tolist())
        scores = np.asarray(self.llm.scores[first_scored(n_ctx): n_ctx - 1], dtype=np.float32)
        return torch.from_numpy(scores.copy())

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


def open_backend(model: Path, backend: str, n_ctx: int, device: str = "cpu") -> LogitsBackend:
    """The logits producer for ``model``: a Hugging Face folder always runs in PyTorch; a GGUF as asked."""
    if model.is_dir():
        return TorchBackend.from_hf_folder(model, device)
    if backend == "llama.cpp":
        return LlamaCppBackend(model, n_ctx)
    if backend == "torch":
        return TorchBackend.from_gguf(model, device)
    raise InputError(f"unknown backend '{backend}': use llama.cpp or torch")


__all__ = ["LlamaCppBackend", "LogitsBackend", "TorchBackend", "gguf_to_torch_model", "open_backend",
           "unpermute_qk"]
