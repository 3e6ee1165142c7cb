"""--type auto against llama.cpp's own mixes at their file sizes, and the time the sensitivities take.

    python benchmarks/bench_auto.py                                   # SmolLM2-135M at Q4_K_M's and Q3_K_M's sizes
    python benchmarks/bench_auto.py --types Q4_K_M --calib-chunks 8 --eval-chunks 20 --kld-layers 0,15,29

1. The proxy sensitivities of every tensor in every candidate type (timed): the runner's full-H output error on the
   calibration text, quantized with the importance matrix from the same text.
2. For a sample of tensors (the layers in ``--kld-layers`` and the embedding) the measured ``kld`` sensitivities
   (timed; the time for every tensor is extrapolated from it), and the Spearman rank correlation of the proxy with
   them: over every (tensor, type) pair, and across tensors at each type (what the allocation weighs).
3. For each llama.cpp file type: llama.cpp's pipeline (its own llama_model_quantize with our importance matrix) and
   our ``--type auto`` with the same importance matrix, plain rounding (rtn), at llama.cpp's file size or smaller.
   Both are scored by llama.cpp's KL divergence against the F32 model on the built-in held-out text.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmquant.calibration.chunking import chunk_text, load_tokenizer  # noqa: E402
from llmquant.calibration.sources import join_sources, load_text_sources  # noqa: E402
from llmquant.gguf_io.imatrix import importance_vectors  # noqa: E402
from llmquant.models.demo import DEMO_MODEL_NAME, resolve_model  # noqa: E402
from llmquant.oracles.llama_quantize import llama_quantize  # noqa: E402
from llmquant.pipeline.convert import convert_model  # noqa: E402
from llmquant.pipeline.evaluate import evaluate_against, reference_logits  # noqa: E402
from llmquant.pipeline.imatrix import compute_imatrix, load_causal_lm, resolve_device  # noqa: E402
from llmquant.pipeline.quantize import GGUFSource, quantize_gguf  # noqa: E402
from llmquant.pipeline.sensitivity import (  # noqa: E402
    Sensitivities,
    auto_plan,
    default_candidates,
    measure_kld,
    measure_proxy,
    quantizable_tensors,
)
from llmquant.recipes.mixes import layer_of  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL_NAME, help="a Hugging Face folder (default: the demo model)")
    parser.add_argument("--types", default="Q4_K_M,Q3_K_M")
    parser.add_argument("--calib", default="builtin")
    parser.add_argument("--calib-chunks", type=int, default=8)
    parser.add_argument("--eval", default="heldout")
    parser.add_argument("--eval-chunks", type=int, default=20)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kld-layers", default="0,15,29", help="layers whose tensors get the kld sensitivities")
    parser.add_argument("--kld-types", default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K")
    parser.add_argument("--kld-chunks", type=int, default=1)
    parser.add_argument("--kld-ctx", type=int, default=256, help="tokens of each chunk the kld estimator runs")
    parser.add_argument("--candidate-sets", default="all",
                        help="';'-separated candidate lists for --type auto, 'all' for the default, e.g. "
                             "'all;Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0'")
    parser.add_argument("--sensitivities", type=Path, default=None, help="reuse this sensitivity.json (no timing)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the files in this folder")
    args = parser.parse_args()

    folder = resolve_model(args.model) if args.model == DEMO_MODEL_NAME else Path(args.model)
    with tempfile.TemporaryDirectory(prefix="bench-auto-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        source_path = work / "source-F32.gguf"
        if not source_path.is_file():
            convert_model(folder, source_path, outtype="f32")
        source = GGUFSource.open(source_path)

        start = time.perf_counter()
        chunks = chunk_text(load_tokenizer(folder), join_sources(load_text_sources([args.calib])), args.ctx,
                            args.calib_chunks)
        model = load_causal_lm(folder, resolve_device("cpu"))
        imatrix = importance_vectors(compute_imatrix(model, chunks, [args.calib]).data)
        del model
        print(f"importance matrix: {args.calib_chunks} chunks of {args.calib}, {time.perf_counter() - start:.1f} s",
              flush=True)

        candidates = default_candidates(has_imatrix=True)
        tensors = quantizable_tensors(source, candidates)
        if args.sensitivities:
            proxy = Sensitivities.load(args.sensitivities)
            proxy.shapes = proxy.shapes or {t.name: t.shape for t in tensors}
        else:
            proxy = measure_proxy(source, tensors, imatrix, folder=folder, token_ids=chunks.token_ids,
                                  threads=args.threads, progress=True)
            proxy.save(work / "sensitivity-proxy.json")
        print(f"proxy sensitivities: {len(tensors)} tensors x {len(candidates)} types on {args.calib_chunks} chunks, "
              f"{proxy.seconds:.1f} s", flush=True)

        if args.kld_layers:
            layers = {int(x) for x in args.kld_layers.split(",")}
            kld_types = args.kld_types.split(",")
            sample = [t for t in quantizable_tensors(source, kld_types)
                      if layer_of(t.name) in layers or t.name == "token_embd.weight"]
            kld = measure_kld(folder, sample, chunks.token_ids[: args.kld_chunks, : args.kld_ctx], imatrix,
                              threads=args.threads, progress=True)
            per_pair = kld.seconds / sum(len(t.candidates) for t in sample)
            every = per_pair * len(tensors) * len(candidates)
            pairs = [(proxy.costs[n][t], c) for n, by_type in kld.costs.items() for t, c in by_type.items()]
            a, b = np.array(pairs).T
            print(f"kld sensitivities: {len(sample)} tensors x {len(kld_types)} types on {args.kld_chunks} chunks, "
                  f"of {args.kld_ctx} tokens, {kld.seconds:.1f} s ({per_pair:.2f} s per tensor and type; every tensor "
                  f"and type would take ~{every / 60:.0f} min)", flush=True)
            print(f"Spearman(proxy, kld) over {len(pairs)} (tensor, type) pairs: {spearman(a, b):.3f}")
            for type_name in kld_types:  # a 576-wide tensor's "Q4_K" is llama.cpp's fallback for it (Q5_0)
                names = list(kld.costs)
                rho = spearman(np.array([proxy.cost(n, type_name) for n in names]),
                               np.array([kld.cost(n, type_name) for n in names]))
                print(f"  across {len(names)} tensors at {type_name} (or its fallback): {rho:.3f}")
            kld.save(work / "sensitivity-kld-sample.json")

        rows = []
        with reference_logits(str(source_path), [args.eval], args.ctx, args.eval_chunks, "llama.cpp", "cpu",
                              None, False) as ref:
            def score(path: Path):
                return evaluate_against(str(path), ref, "llama.cpp", "cpu", args.eval_chunks, False)

            for type_name in args.types.split(","):
                reference_file = work / f"llama.cpp-{type_name}.gguf"
                llama_quantize(source_path, reference_file, type_name, nthread=args.threads, imatrix=imatrix)
                size = reference_file.stat().st_size
                base = score(reference_file)
                rows.append((type_name, "llama.cpp imatrix", size, base, 1.0))
                print(_row(*rows[-1]), flush=True)
                for label in args.candidate_sets.split(";"):
                    names = candidates if label == "all" else label.split(",")
                    made = auto_plan(source, proxy, size, names, has_imatrix=True)
                    target = work / f"auto-at-{type_name}-{len(names)}.gguf"
                    quantize_gguf(source, target, made.plan.file_type, imatrix=imatrix, plan=made.plan,
                                  threads=args.threads)
                    result = score(target)
                    counts = Counter(made.allocation.types.values())
                    what = "every type" if label == "all" else label
                    mix = ", ".join(f"{n} {t}" for t, n in counts.most_common())
                    rows.append((type_name, f"auto rtn from {what} ({mix})",
                                 target.stat().st_size, result, result.figures.kld_mean / base.figures.kld_mean))
                    print(_row(*rows[-1]), flush=True)

    print(f"\nKLD on {args.eval_chunks} chunks of {args.eval} (ctx {args.ctx}) against the F32 model; "
          f"calibration: {args.calib_chunks} chunks of {args.calib}")
    print("| at the size of | pipeline | bytes | mean KLD | KLD / llama.cpp | PPL ratio | same top |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(_row(*row, markdown=True))


def _row(type_name, pipeline, n_bytes, result, ratio, markdown=False) -> str:
    f = result.figures
    cells = [type_name, pipeline, f"{n_bytes}", f"{f.kld_mean:.5f} ± {f.kld_mean_err:.5f}", f"{ratio:.3f}",
             f"{f.ppl_ratio:.4f}", f"{100 * f.top1_agreement:.2f}%"]
    return "| " + " | ".join(cells) + " |" if markdown else "  ".join(cells)


if __name__ == "__main__":
    main()
