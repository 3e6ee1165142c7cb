"""The imatrix job: calibration text -> chunks -> forward passes with the collector -> llama.cpp's imatrix file."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmquant.calibration.chunking import Chunks, chunk_text, load_tokenizer
from llmquant.calibration.collector import ImatrixCollector
from llmquant.calibration.sources import join_sources, load_text_sources
from llmquant.errors import InputError
from llmquant.gguf_io.imatrix import ImatrixData, imatrix_data_from_sums, importance_vectors, write_imatrix_gguf
from llmquant.models.demo import resolve_model
from llmquant.pipeline import preflight

# llama-imatrix skips matrix products of fewer than 16 rows ("why are small batches ignored (<16 tokens)?"),
# so a shorter chunk would collect nothing there; we refuse it rather than write a different file
MIN_CTX = 16
# the file written into a folder given as ``-o``, as llama-imatrix names its output by default
DEFAULT_OUTPUT_NAME = "imatrix.gguf"


@dataclass
class ImatrixRun:
    """What one run computed: the file contents plus figures for the summary."""

    data: ImatrixData
    n_chunks: int
    n_ctx: int
    n_text_tokens: int
    perplexity: float
    seconds: float
    device: str
    path: Path | None = None  # the file written, when one was

    @property
    def tokens_per_second(self) -> float:
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds > 0 else float("inf")

    def importance(self) -> dict[str, np.ndarray]:
        """Tensor name -> mean squared activation per input column (what a quantizer weighs errors by)."""
        return importance_vectors(self.data)


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked against what this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: this PyTorch sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise InputError(f"--device {device}: expected cpu, cuda or cuda:N")
    return dev


def load_causal_lm(model_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """The model folder as a transformers causal LM in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{model_dir}: could not load the model ({exc})") from None
    return model.to(device).eval()


def compute_imatrix(model: Any, chunks: Chunks, datasets: Sequence[str], batch_size: int = 1,
                    process_output: bool = False, progress: bool = False) -> ImatrixRun:
    """Run every chunk through ``model`` with the collector attached; perplexity as llama-imatrix reports it.

    As compute_imatrix in imatrix.cpp, each chunk is an independent sequence and the perplexity covers the
    second half of every chunk (the first half only gives context).
    """
    if batch_size < 1:
        raise InputError(f"--batch must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    n_ctx = chunks.n_ctx
    first = n_ctx // 2
    # logits are needed only where perplexity is scored, unless the output projection's inputs are collected
    logits_to_keep = 0 if process_output else n_ctx - first
    nll_sum, n_scored = 0.0, 0
    started = time.perf_counter()
    bar = _progress_bar(chunks.n_chunks, enabled=progress)
    with ImatrixCollector(model, process_output=process_output) as collector, torch.inference_mode():
        for start in range(0, chunks.n_chunks, batch_size):
            ids = chunks.token_ids[start:start + batch_size].to(device)
            targets = chunks.targets[start:start + batch_size, first + 1:].to(device)
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=logits_to_keep).logits
            scored = logits[:, -(n_ctx - first):-1] if logits_to_keep else logits[:, first:-1]
            log_probs = torch.log_softmax(scored.float(), dim=-1)
            nll_sum += float(-log_probs.gather(-1, targets.unsqueeze(-1)).sum())
            n_scored += targets.numel()
            bar.update(ids.shape[0])
            bar.set_postfix(ppl=f"{math.exp(nll_sum / n_scored):.4f}")
        sums, counts = collector.sums_and_counts()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    bar.close()
    if not sums:
        raise InputError("the model ran but no weight matrix was recognised: is its architecture supported by gguf?")
    data = imatrix_data_from_sums(sums, counts, datasets, chunk_size=n_ctx)
    return ImatrixRun(data, chunks.n_chunks, n_ctx, chunks.n_text_tokens,
                      math.exp(nll_sum / n_scored) if n_scored else float("nan"), seconds, str(device))


def run_imatrix(model: str | os.PathLike, text_files: Sequence[str] = (), output: str | os.PathLike | None = None,
                n_ctx: int = 512, n_chunks: int | None = None, batch_size: int = 1, device: str = "cpu",
                process_output: bool = False, progress: bool = False, dtype: torch.dtype = torch.float32,
                allow_pickle: bool = False) -> ImatrixRun:
    """The whole job: read the text, chunk it like llama-imatrix, collect, and write ``output`` when given (a
    file, or a folder to write imatrix.gguf into). Everything is checked before the model is loaded: the output
    can be written, the weights are safetensors (or pickles with ``allow_pickle``), the text files exist."""
    if n_ctx < MIN_CTX:
        raise InputError(f"--ctx {n_ctx} is too small: llama-imatrix ignores batches of fewer than {MIN_CTX} tokens")
    if n_chunks is not None and n_chunks < 1:
        raise InputError(f"--chunks must be at least 1, got {n_chunks}")
    target = preflight.output_file(output, DEFAULT_OUTPUT_NAME) if output is not None else None
    if target is not None:
        preflight.check_output(target)  # before the demo model's first build
    model_dir = resolve_model(model)
    dev = resolve_device(device)
    if not model_dir.is_dir():
        raise InputError(f"{model_dir}: imatrix needs a Hugging Face model folder (config.json, safetensors and "
                         "tokenizer), not a single file")
    if not (model_dir / "config.json").is_file():
        raise InputError(f"{model_dir}: no config.json: not a Hugging Face model folder")
    preflight.check_model_folder(model_dir, allow_pickle)
    preflight.check_text_files(text_files)
    if target is not None:
        preflight.check_not_input(target, [model_dir, *(Path(f) for f in text_files)])
    tokenizer = load_tokenizer(model_dir)
    sources = load_text_sources(text_files)
    chunks = chunk_text(tokenizer, join_sources(sources), n_ctx, n_chunks)
    lm = load_causal_lm(model_dir, dev, dtype)
    result = compute_imatrix(lm, chunks, [s.name for s in sources], batch_size, process_output, progress)
    if target is not None:
        with preflight.written_atomically(target) as partial:
            write_imatrix_gguf(partial, result.data)
        result.path = target
    return result


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="chunk", desc="imatrix", disable=not enabled, dynamic_ncols=True)
