"""Quality of --method gptq|awq|awq+gptq against llama.cpp's own imatrix pipeline, at equal file size.

    python benchmarks/bench_methods.py                                  # SmolLM2-135M, Q4_K_M and Q3_K_M
    python benchmarks/bench_methods.py --types Q4_K_M --methods gptq --calib-chunks 32 --eval-chunks 20

For each file type: llama.cpp's pipeline (our importance matrix from the calibration text, then llama.cpp's own
llama_model_quantize with it) and each method of ours on the same model and the same calibration text. Every
file is then scored by llama.cpp's KL-divergence (``llmquant eval --backend llama.cpp``) against the F32 model on
the built-in held-out text, which calibration never sees. Prints each file's size, mean KLD, its ratio to
llama.cpp's at the same type, PPL ratio, same-top-token rate and the seconds each took; also whether our
``--method rtn`` file is byte-identical to llama.cpp's (it must be).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmquant.calibration.chunking import chunk_text, load_tokenizer  # noqa: E402
from llmquant.calibration.sources import join_sources, load_text_sources  # noqa: E402
from llmquant.gguf_io.imatrix import importance_vectors  # noqa: E402
from llmquant.models.demo import DEMO_MODEL_NAME, resolve_model  # noqa: E402
from llmquant.oracles.llama_quantize import llama_quantize  # noqa: E402
from llmquant.pipeline.convert import convert_model  # noqa: E402
from llmquant.pipeline.evaluate import evaluate_against, reference_logits  # noqa: E402
from llmquant.pipeline.imatrix import compute_imatrix, load_causal_lm, resolve_device  # noqa: E402
from llmquant.pipeline.quantize import quantize_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL_NAME, help="a Hugging Face folder (default: the demo model)")
    parser.add_argument("--types", default="Q4_K_M,Q3_K_M")
    parser.add_argument("--methods", default="gptq,awq,awq+gptq")
    parser.add_argument("--calib", default="builtin", help="calibration text (default: the built-in one)")
    parser.add_argument("--calib-chunks", type=int, default=64)
    parser.add_argument("--eval", default="heldout", help="evaluation text (default: the built-in held-out one)")
    parser.add_argument("--eval-chunks", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--act-order", action="store_true", help="GPTQ's columns by decreasing diag(H)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the files in this folder")
    args = parser.parse_args()

    folder = resolve_model(args.model) if args.model == DEMO_MODEL_NAME else Path(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        source = work / "source-F32.gguf"
        if not source.is_file():
            convert_model(folder, source, outtype="f32")

        start = time.perf_counter()
        chunks = chunk_text(load_tokenizer(folder), join_sources(load_text_sources([args.calib])), args.ctx,
                            args.calib_chunks)
        model = load_causal_lm(folder, resolve_device("cpu"))
        imatrix = importance_vectors(compute_imatrix(model, chunks, [args.calib]).data)
        del model
        print(f"importance matrix: {args.calib_chunks} chunks of {args.calib}, {time.perf_counter() - start:.1f} s",
              flush=True)

        rows = []
        with reference_logits(str(source), [args.eval], args.ctx, args.eval_chunks, "llama.cpp", "cpu",
                              None, False) as ref:
            def score(path: Path):
                return evaluate_against(str(path), ref, "llama.cpp", "cpu", args.eval_chunks, False)

            for type_name in args.types.split(","):
                reference_file = work / f"llama.cpp-{type_name}.gguf"
                done = llama_quantize(source, reference_file, type_name, nthread=args.threads, imatrix=imatrix)
                base = score(reference_file)
                rows.append((type_name, "llama.cpp imatrix", reference_file.stat().st_size, base, 1.0, done.seconds))
                print(_row(*rows[-1], base), flush=True)
                for method in ["rtn", *args.methods.split(",")]:
                    target = work / f"ours-{method}-{type_name}.gguf"
                    start = time.perf_counter()
                    quantize_model(folder, target, type_name, calib=[args.calib], calib_chunks=args.calib_chunks,
                                   calib_ctx=args.ctx, threads=args.threads, method=method,
                                   act_order=args.act_order)
                    seconds = time.perf_counter() - start
                    if method == "rtn":
                        same = filecmp.cmp(target, reference_file, shallow=False)
                        print(f"  ours --method rtn byte-identical to llama.cpp's: {same}", flush=True)
                        continue
                    result = score(target)
                    rows.append((type_name, method, target.stat().st_size, result,
                                 result.figures.kld_mean / base.figures.kld_mean, seconds))
                    print(_row(*rows[-1], base), flush=True)

    print(f"\nKLD on {args.eval_chunks} chunks of {args.eval} (ctx {args.ctx}) against the F32 model; "
          f"calibration: {args.calib_chunks} chunks of {args.calib}")
    print("| type | pipeline | bytes | mean KLD | KLD / llama.cpp | PPL ratio | same top | s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(*row, None, markdown=True))


def _row(type_name, pipeline, n_bytes, result, ratio, seconds, _base, markdown=False) -> str:
    f = result.figures
    cells = [type_name, pipeline, f"{n_bytes}", f"{f.kld_mean:.5f} ± {f.kld_mean_err:.5f}", f"{ratio:.3f}",
             f"{f.ppl_ratio:.4f}", f"{100 * f.top1_agreement:.2f}%", f"{seconds:.1f}"]
    return "| " + " | ".join(cells) + " |" if markdown else "  ".join(cells)


if __name__ == "__main__":
    main()
