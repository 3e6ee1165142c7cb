"""The eval and compare jobs: a reference run, then each model scored against it chunk by chunk.

As llama-perplexity --kl-divergence-base / --kl-divergence: the reference's log-probs are computed once and
stored (in llama.cpp's file format, see ``evaluate.reference``), then every model sees the same tokens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmquant.calibration.sources import join_sources, load_text_sources
from llmquant.errors import InputError
from llmquant.evaluate.backends import open_backend
from llmquant.evaluate.chunks import n_scored, scored_targets, split_into_chunks
from llmquant.evaluate.metrics import Figures, TokenScores, figures, score_tokens
from llmquant.evaluate.reference import HEADER_BYTES, ReferenceLogits, ReferenceWriter, is_reference_file, row_stride
from llmquant.models.demo import DEMO_MODEL_NAME, resolve_gguf, resolve_model
from llmquant.pipeline import preflight

DEFAULT_CTX = 512
# the file --save-reference writes into a folder it is given
DEFAULT_REFERENCE_NAME = "reference.logits"
# what compare writes into its -o folder (evaluate.report.write_report)
REPORT_NAMES = ("report.md", "report.json", "frontier.png")


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


def _is_saved_reference(reference: str) -> bool:
    return reference != DEMO_MODEL_NAME and is_reference_file(Path(reference).expanduser())


def _check_reference(reference: str, text_files: Sequence[str], save_to: str | os.PathLike | None,
                     allow_pickle: bool) -> Path:
    """The reference as a path, checked: a saved logits file takes no text and no --save-reference; a model
    folder follows the pickle rule."""
    if _is_saved_reference(reference):
        ref_path = Path(reference).expanduser()
        if save_to is not None:
            raise InputError(f"{ref_path} already holds saved reference logits; --save-reference needs a model "
                             f"as --reference")
        if text_files:
            raise InputError(f"{ref_path} holds saved reference logits with their own tokens, so -f is not used; "
                             "drop -f, or give the reference model to score other text")
        return ref_path
    model_path = resolve_model(reference)
    if model_path.is_dir():
        preflight.check_model_folder(model_path, allow_pickle)
    return model_path


@contextlib.contextmanager
def reference_logits(reference: str, text_files: Sequence[str] = (), n_ctx: int | None = None,
                     max_chunks: int | None = None, backend: str = "llama.cpp", device: str = "cpu",
                     save_to: str | os.PathLike | None = None, progress: bool = False,
                     allow_pickle: bool = False) -> Iterator[ReferenceLogits]:
    """The reference's log-probs: a saved file as is, or a model run once over the text.

    A model run goes to ``save_to`` when given (kept; a folder gets reference.logits), otherwise to a temporary
    file removed afterwards.
    """
    ref_path = _check_reference(reference, text_files, save_to, allow_pickle)
    if _is_saved_reference(reference):
        ref = ReferenceLogits(ref_path)
        if n_ctx is not None and n_ctx != ref.n_ctx:
            raise InputError(f"{ref_path} was computed with --ctx {ref.n_ctx}; drop --ctx or give --ctx {ref.n_ctx}")
        ref.source = str(ref_path)
        yield ref
        return
    model_path = ref_path
    n_ctx = n_ctx or DEFAULT_CTX
    temp_dir = None
    if save_to is None:
        temp_dir = tempfile.TemporaryDirectory(prefix="llmquant-reference-")
        target = Path(temp_dir.name) / "reference.logits"
    else:
        target = preflight.output_file(save_to, DEFAULT_REFERENCE_NAME)
    try:
        with preflight.writing(target):
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
        preflight.check_room(target, reference_file_bytes(len(chunks), n_ctx, runner.n_vocab))
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


def reference_file_bytes(n_chunks: int, n_ctx: int, n_vocab: int) -> int:
    """The size of a reference-logits file (``evaluate.reference``'s layout)."""
    return HEADER_BYTES + 4 * n_chunks * n_ctx + 2 * n_chunks * n_scored(n_ctx) * row_stride(n_vocab)


def evaluate_against(model: str, reference: ReferenceLogits, backend: str = "llama.cpp", device: str = "cpu",
                     max_chunks: int | None = None, progress: bool = False, allow_pickle: bool = False) -> EvalResult:
    """Score ``model`` on the reference's chunks, with running figures on the progress bar."""
    model_path = _check_evaluated(model, allow_pickle)
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


def _check_evaluated(model: str, allow_pickle: bool) -> Path:
    """The model under test as a path; a Hugging Face folder follows the pickle rule."""
    model_path = resolve_evaluated(model)
    if model_path.is_dir():
        preflight.check_model_folder(model_path, allow_pickle)
    else:
        preflight.check_inputs([model_path])
    return model_path


def _preflight(models: Sequence[str], reference: str, text_files: Sequence[str],
               save_reference: str | os.PathLike | None, allow_pickle: bool,
               report_folder: Path | None = None) -> list[Path]:
    """Every check before the first model runs: the outputs can be written and are none of the inputs, the
    models and the reference exist (folders under the pickle rule), the text files exist. Returns the models'
    paths."""
    save_target = preflight.output_file(save_reference, DEFAULT_REFERENCE_NAME) if save_reference else None
    if save_target is not None:
        preflight.check_output(save_target)  # before the demo model's first build
    if report_folder is not None:
        preflight.check_output_folder(report_folder)
    paths = [_check_evaluated(m, allow_pickle) for m in models]
    ref_path = _check_reference(reference, text_files, save_reference, allow_pickle)
    preflight.check_text_files(text_files)
    inputs = [*paths, ref_path, *(Path(f) for f in text_files)]
    if save_target is not None:
        preflight.check_not_input(save_target, inputs)
    if report_folder is not None:
        for name in REPORT_NAMES:
            preflight.check_not_input(report_folder / name, inputs)
    return paths


def evaluate_model(model: str, reference: str, text_files: Sequence[str] = (), n_ctx: int | None = None,
                   max_chunks: int | None = None, backend: str = "llama.cpp", device: str = "cpu",
                   save_reference: str | os.PathLike | None = None, progress: bool = False,
                   allow_pickle: bool = False) -> EvalResult:
    """``llmquant eval``: one model against a reference model or saved reference logits."""
    _preflight([model], reference, text_files, save_reference, allow_pickle)
    with reference_logits(reference, text_files, n_ctx, max_chunks, backend, device, save_reference,
                          progress, allow_pickle) as ref:
        return evaluate_against(model, ref, backend, device, max_chunks, progress, allow_pickle)


def compare_models(models: Sequence[str], reference: str, output_dir: str | os.PathLike,
                   text_files: Sequence[str] = (), n_ctx: int | None = None, max_chunks: int | None = None,
                   backend: str = "llama.cpp", device: str = "cpu", save_reference: str | os.PathLike | None = None,
                   progress: bool = False, allow_pickle: bool = False) -> tuple[list[EvalResult], dict[str, Path]]:
    """``llmquant compare``: every model against one reference run; writes report.md, report.json, frontier.png
    into ``output_dir``, each complete or not at all."""
    from llmquant.evaluate.report import require_matplotlib

    require_matplotlib()  # before the long runs, not after them
    if not models:
        raise InputError("give at least one model file to compare")
    output_dir = Path(output_dir).expanduser()
    paths = _preflight(models, reference, text_files, save_reference, allow_pickle, report_folder=output_dir)
    with reference_logits(reference, text_files, n_ctx, max_chunks, backend, device, save_reference,
                          progress, allow_pickle) as ref:
        results = [evaluate_against(str(p), ref, backend, device, max_chunks, progress, allow_pickle)
                   for p in paths]
    return results, _write_report(results, output_dir, reference)


def _write_report(results: Sequence[EvalResult], output_dir: Path, reference: str) -> dict[str, Path]:
    """The report's files made in a temporary folder inside ``output_dir``, then each renamed into place."""
    from llmquant.evaluate.report import write_report

    created = not output_dir.exists()
    with preflight.writing(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".llmquant-report-", dir=output_dir))
        try:
            made = write_report(results, scratch, reference=reference)
            written = {}
            for key, path in made.items():
                written[key] = output_dir / path.name
                os.replace(path, written[key])
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            if created:
                shutil.rmtree(output_dir, ignore_errors=True)  # the folder made for this report, empty again
            raise
        shutil.rmtree(scratch, ignore_errors=True)
    return written


__all__ = ["DEFAULT_CTX", "EvalResult", "compare_models", "evaluate_against", "evaluate_model",
           "reference_logits", "resolve_evaluated"]
