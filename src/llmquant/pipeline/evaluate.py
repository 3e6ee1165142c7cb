"""The eval and compare jobs: a reference run, then each model scored against it chunk by chunk.

As llama-perplexity --kl-divergence-base / --kl-divergence: the reference's log-probs are computed once and
stored (in llama.cpp's file format, see ``evaluate.reference``), then every model sees the same tokens.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmquant.calibration.sources import join_sources, load_text_sources
from llmquant.errors import InputError
from llmquant.evaluate.backends import open_backend
from llmquant.evaluate.chunks import scored_targets, split_into_chunks
from llmquant.evaluate.metrics import Figures, TokenScores, figures, score_tokens
from llmquant.evaluate.reference import ReferenceLogits, ReferenceWriter, is_reference_file
from llmquant.models.demo import DEMO_MODEL_NAME, resolve_gguf, resolve_model

DEFAULT_CTX = 512


@dataclass
class EvalResult:
    """One model's figures against the reference, and what they were measured on."""

    model: str
    backend: str
    reference: str
    n_ctx: int
    n_chunks: int
    figures: Figures
    seconds: float
    size_bytes: int | None = None
    bits_per_weight: float | None = None
    file_type: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "backend": self.backend, "reference": self.reference, "n_ctx": self.n_ctx,
                "n_chunks": self.n_chunks, "size_bytes": self.size_bytes, "bits_per_weight": self.bits_per_weight,
                "file_type": self.file_type, **self.figures.to_json(), "seconds": self.seconds}


def resolve_evaluated(model: str) -> Path:
    """The model under test: a GGUF or a Hugging Face folder; ``smollm2-135m`` is the demo's shipped GGUF."""
    if model == DEMO_MODEL_NAME:
        return resolve_gguf(model)
    return resolve_model(model)


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not enabled, leave=True, dynamic_ncols=True)


@contextlib.contextmanager
def reference_logits(reference: str, text_files: Sequence[str] = (), n_ctx: int | None = None,
                     max_chunks: int | None = None, backend: str = "llama.cpp", device: str = "cpu",
                     save_to: str | os.PathLike | None = None, progress: bool = False) -> Iterator[ReferenceLogits]:
    """The reference's log-probs: a saved file as is, or a model run once over the text.

    A model run goes to ``save_to`` when given (kept), otherwise to a temporary file removed afterwards.
    """
    ref_path = Path(reference).expanduser()
    if reference != DEMO_MODEL_NAME and is_reference_file(ref_path):
        if save_to is not None:
            raise InputError(f"{ref_path} already holds saved reference logits; --save-reference needs a model "
                             f"as --reference")
        ref = ReferenceLogits(ref_path)
        if n_ctx is not None and n_ctx != ref.n_ctx:
            raise InputError(f"{ref_path} was computed with --ctx {ref.n_ctx}; drop --ctx or give --ctx {ref.n_ctx}")
        ref.source = str(ref_path)
        yield ref
        return
    model_path = resolve_model(reference)
    n_ctx = n_ctx or DEFAULT_CTX
    temp_dir = None
    if save_to is None:
        temp_dir = tempfile.TemporaryDirectory(prefix="llmquant-reference-")
        target = Path(temp_dir.name) / "reference.logits"
    else:
        target = Path(save_to).expanduser()
    try:
        _run_reference(model_path, text_files, n_ctx, max_chunks, backend, device, target, progress)
        ref = ReferenceLogits(target)
        ref.source = str(model_path)
        yield ref
    finally:
        if temp_dir is not None:
            temp_dir.cleanup()


def _run_reference(model_path: Path, text_files: Sequence[str], n_ctx: int, max_chunks: int | None, backend: str,
                   device: str, target: Path, progress: bool) -> None:
    # by default the held-out text: the calibration default (``builtin``) would score a model on what tuned it
    text = join_sources(load_text_sources(list(text_files) or ["heldout"]))
    runner = open_backend(model_path, backend, n_ctx, device)
    try:
        tokens = runner.tokenize(text)
        chunks = split_into_chunks(tokens, n_ctx, max_chunks)
        writer = ReferenceWriter(target, chunks, runner.n_vocab)
        try:
            with _progress_bar(len(chunks), f"reference {model_path.name}", progress) as bar:
                for chunk in chunks:
                    writer.add_chunk(runner.scored_logits(chunk))
                    bar.update(1)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        runner.close()


def evaluate_against(model: str, reference: ReferenceLogits, backend: str = "llama.cpp", device: str = "cpu",
                     max_chunks: int | None = None, progress: bool = False) -> EvalResult:
    """Score ``model`` on the reference's chunks, with running figures on the progress bar."""
    model_path = resolve_evaluated(model)
    n_chunks = reference.n_chunks if max_chunks is None else min(max_chunks, reference.n_chunks)
    if n_chunks < 1:
        raise InputError(f"--chunks must be at least 1, got {max_chunks}")
    start = time.perf_counter()
    runner = open_backend(model_path, backend, reference.n_ctx, device)
    try:
        if runner.n_vocab != reference.n_vocab:
            raise InputError(f"{model_path} has {runner.n_vocab} vocabulary entries but the reference "
                             f"({reference.path.name}) has {reference.n_vocab}: compare models with one tokenizer")
        parts: list[TokenScores] = []
        with _progress_bar(n_chunks, model_path.name, progress) as bar:
            for index in range(n_chunks):
                chunk = reference.tokens[index]
                logits = runner.scored_logits(chunk)
                parts.append(score_tokens(logits, reference.chunk_log_probs(index), _tensor(scored_targets(chunk))))
                running = figures(TokenScores.concat(parts))
                bar.set_postfix_str(f"PPL {running.ppl:.3f}  KLD {running.kld_mean:.5f}  "
                                    f"top-1 {100 * running.top1_agreement:.1f}%")
                bar.update(1)
    finally:
        runner.close()
    result = EvalResult(model=str(model_path), backend=backend if model_path.is_file() else "torch",
                        reference=reference.source, n_ctx=reference.n_ctx, n_chunks=n_chunks,
                        figures=figures(TokenScores.concat(parts)), seconds=time.perf_counter() - start)
    _add_file_facts(result, model_path)
    return result


def _tensor(values):
    import torch

    return torch.from_numpy(values)


def _add_file_facts(result: EvalResult, model_path: Path) -> None:
    """Size and bits per weight: the GGUF's, or a Hugging Face folder's weight files."""
    if model_path.is_file():
        from llmquant.gguf_io.reader import summarize_gguf

        summary = summarize_gguf(model_path)
        result.size_bytes = summary.file_size
        result.bits_per_weight = summary.bits_per_weight
        result.file_type = summary.key_metadata.get("file_type")
    else:
        result.size_bytes = sum(p.stat().st_size for p in model_path.glob("*.safetensors"))


def evaluate_model(model: str, reference: str, text_files: Sequence[str] = (), n_ctx: int | None = None,
                   max_chunks: int | None = None, backend: str = "llama.cpp", device: str = "cpu",
                   save_reference: str | os.PathLike | None = None, progress: bool = False) -> EvalResult:
    """``llmquant eval``: one model against a reference model or saved reference logits."""
    with reference_logits(reference, text_files, n_ctx, max_chunks, backend, device, save_reference,
                          progress) as ref:
        return evaluate_against(model, ref, backend, device, max_chunks, progress)


def compare_models(models: Sequence[str], reference: str, output_dir: str | os.PathLike,
                   text_files: Sequence[str] = (), n_ctx: int | None = None, max_chunks: int | None = None,
                   backend: str = "llama.cpp", device: str = "cpu", save_reference: str | os.PathLike | None = None,
                   progress: bool = False) -> tuple[list[EvalResult], dict[str, Path]]:
    """``llmquant compare``: every model against one reference run; writes report.md, report.json, frontier.png."""
    from llmquant.evaluate.report import require_matplotlib, write_report

    require_matplotlib()  # before the long runs, not after them
    if not models:
        raise InputError("give at least one model file to compare")
    paths = [resolve_evaluated(m) for m in models]  # fail on a missing file before the reference run
    with reference_logits(reference, text_files, n_ctx, max_chunks, backend, device, save_reference,
                          progress) as ref:
        results = [evaluate_against(str(p), ref, backend, device, max_chunks, progress) for p in paths]
    written = write_report(results, Path(output_dir), reference=reference)
    return results, written


__all__ = ["DEFAULT_CTX", "EvalResult", "compare_models", "evaluate_against", "evaluate_model",
           "reference_logits", "resolve_evaluated"]
