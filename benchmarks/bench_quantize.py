"""Whole-model quantize: ours (llmquant.pipeline.quantize) against llama.cpp's llama_model_quantize, same input.

    python benchmarks/bench_quantize.py                         # SmolLM2-135M F32, a few types, 2 threads
    python benchmarks/bench_quantize.py --types Q4_K_M,IQ4_XS --threads 2 --imatrix

Both read the same F32 GGUF (the demo model's Q4_1 weights dequantized) and write to a temporary folder; both get
the same thread count and, with --imatrix, the same random importance matrix. Prints seconds for each and the ratio
ours/llama.cpp (target: at most 1.0 on CPU), and whether the two files are byte-identical.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmquant.formats import compiled  # noqa: E402
from llmquant.models.demo import demo_gguf_path  # noqa: E402
from llmquant.oracles.llama_quantize import llama_quantize  # noqa: E402
from llmquant.pipeline.quantize import quantize_model  # noqa: E402
from tests.gguf_fixtures import smollm2_gguf_as  # noqa: E402
from tests.pipeline.test_quantize import random_imatrix, write_imatrix_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M,Q5_K_M,Q6_K,IQ4_XS")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--imatrix", action="store_true", help="give both the same random importance matrix")
    parser.add_argument("--model", default=None, help="an F32/F16 GGUF (default: SmolLM2-135M as F32)")
    parser.add_argument("--compile", choices=["on", "off", "auto"], default="on",
                        help="our fused CPU kernels: on (default here), off (eager), or auto (on for models of "
                             "1e9+ weights only, as the CLI does)")
    args = parser.parse_args()
    compiled.set_mode(args.compile)

    cache = Path(__file__).resolve().parents[1] / "tests" / ".cache"
    model = Path(args.model) if args.model else smollm2_gguf_as(demo_gguf_path(), cache, "F32")
    print(f"model {model.name}, threads {args.threads}, imatrix {'yes' if args.imatrix else 'no'}, "
          f"fused kernels {args.compile}")
    print("ours 1st: the first run in this process (it traces and compiles the fused kernels, from inductor's disk")
    print("cache after the first ever run); ours: the same job again, as in a process that quantizes more than once")
    print(f"{'type':<8} {'ours 1st s':>10} {'ours s':>8} {'llama.cpp s':>12} {'ratio 1st':>10} {'ratio':>7}  identical")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        imatrix = random_imatrix(model) if args.imatrix else None
        imatrix_file = write_imatrix_file(imatrix, tmp_path / "imatrix.gguf") if imatrix is not None else None
        for file_type in args.types.split(","):
            times = []
            for _ in range(2):
                # a fresh path each run, as llama.cpp's: renaming over the last file would also pay for deleting it
                (tmp_path / f"ours-{file_type}.gguf").unlink(missing_ok=True)
                start = time.perf_counter()
                ours = quantize_model(model, tmp_path / f"ours-{file_type}.gguf", file_type, imatrix_file=imatrix_file,
                                      threads=args.threads)[0].path
                times.append(time.perf_counter() - start)
            first_s, ours_s = times
            theirs = llama_quantize(model, tmp_path / f"llama-{file_type}.gguf", file_type, nthread=args.threads,
                                    imatrix=imatrix)
            same = np.array_equal(np.fromfile(ours, np.uint8), np.fromfile(theirs.output, np.uint8))
            print(f"{file_type:<8} {first_s:>10.2f} {ours_s:>8.2f} {theirs.seconds:>12.2f} "
                  f"{first_s / theirs.seconds:>10.2f} {ours_s / theirs.seconds:>7.2f}  {same}")
            ours.unlink()
            theirs.output.unlink()


if __name__ == "__main__":
    main()
