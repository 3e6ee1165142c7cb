"""Whole-model quantize: ours (llmquant.pipeline.quantize) against llama.cpp's llama_model_quantize, same input.

    python benchmarks/bench_quantize.py                         # SmolLM2-135M F32, a few types, 2 threads
    python benchmarks/bench_quantize.py --types Q4_K_M,IQ4_XS --threads 2 --imatrix
    python benchmarks/bench_quantize.py --model 1b --types Q4_K_M --fresh   # a 1.17e9-weight llama

Both read the same F32 GGUF (the demo model's Q4_1 weights dequantized; read once first, so that both find it in
the page cache) and write to a temporary folder; both get the same thread count and, with --imatrix, the same
random importance matrix. Prints seconds for each and the ratio ours/llama.cpp (target: at most 1.0 on CPU), and
whether the two files are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmquant.errors import InputError  # noqa: E402
from llmquant.models.demo import demo_gguf_path  # noqa: E402
from llmquant.oracles.llama_quantize import llama_quantize  # noqa: E402
from llmquant.pipeline.quantize import quantize_model  # noqa: E402
from tests.gguf_fixtures import smollm2_gguf_as  # noqa: E402
from tests.pipeline.test_quantize import random_imatrix, write_imatrix_file  # noqa: E402
from tests.recipes.conftest import TinyConfig, write_tiny_llama_gguf  # noqa: E402

BENCH_1B = TinyConfig("bench-llama-1b", n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M,Q5_K_M,Q6_K,IQ4_XS")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--imatrix", action="store_true", help="give both the same random importance matrix")
    parser.add_argument("--model", default=None,
                        help="an F32/F16 GGUF, or '1b': a random F32 llama of TinyLlama-1.1B's shape (22 layers, "
                             "hidden 2048, ffn 5632, GQA 8; 4.7 GB, written once to tests/.cache), where "
                             "a process's start is spread over a realistic job (default: SmolLM2-135M as F32)")
    parser.add_argument("--fresh", action="store_true",
                        help="run each type's two runs of ours in a new process, as the CLI does (default: all in "
                             "this one, so only the first type pays for the imports and numba's cache loads)")
    args = parser.parse_args()

    cache = Path(__file__).resolve().parents[1] / "tests" / ".cache"
    smollm2 = smollm2_gguf_as(demo_gguf_path(), cache, "F32")
    if args.model == "1b":
        print("writing the 1B model (once)...", flush=True)
        model = write_tiny_llama_gguf(BENCH_1B, smollm2, cache / f"{BENCH_1B.name}.gguf")
    else:
        model = Path(args.model) if args.model else smollm2
    _read_once(model)  # into the page cache: else the first run (ours) alone pays for the disk
    print(f"model {model.name}, threads {args.threads}, imatrix {'yes' if args.imatrix else 'no'}")
    if args.fresh:
        print("ours 1st: the type's first run, in a new process (timed around quantize_model: it loads numba's")
        print("cached searches from __pycache__, or compiles them on a machine's first use); ours: the same job")
        print("again in that process")
    else:
        print("ours 1st: the first run in this process (the first type loads numba's cached searches, or compiles")
        print("them on a machine's first use); ours: the same job again in this process")
    print(f"{'type':<8} {'ours 1st s':>10} {'ours s':>8} {'llama.cpp s':>12} {'ratio 1st':>10} {'ratio':>7}  identical")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        imatrix = random_imatrix(model) if args.imatrix else None
        imatrix_file = write_imatrix_file(imatrix, tmp_path / "imatrix.gguf") if imatrix is not None else None
        for file_type in args.types.split(","):
            ours = tmp_path / f"ours-{file_type}.gguf"
            try:
                if args.fresh:
                    first_s, ours_s = _two_runs_in_a_new_process(model, ours, file_type, imatrix_file, args)
                else:
                    first_s, ours_s = _two_runs(model, ours, file_type, imatrix_file, args.threads)
            except InputError as refused:  # e.g. Q2_K_S and the i-quants without --imatrix, as llama.cpp
                print(f"{file_type:<8} not run: {refused}")
                continue
            theirs = llama_quantize(model, tmp_path / f"llama-{file_type}.gguf", file_type, nthread=args.threads,
                                    imatrix=imatrix)
            same = np.array_equal(np.fromfile(ours, np.uint8), np.fromfile(theirs.output, np.uint8))
            print(f"{file_type:<8} {first_s:>10.2f} {ours_s:>8.2f} {theirs.seconds:>12.2f} "
                  f"{first_s / theirs.seconds:>10.2f} {ours_s / theirs.seconds:>7.2f}  {same}")
            ours.unlink()
            theirs.output.unlink()


def _read_once(path: Path) -> None:
    with path.open("rb", buffering=0) as file:
        while file.read(64 << 20):
            pass


def _two_runs(model: Path, ours: Path, file_type: str, imatrix_file: Path | None, threads: int) -> list[float]:
    times = []
    for _ in range(2):
        ours.unlink(missing_ok=True)  # a fresh path each run, as llama.cpp's: renaming over it would also delete
        start = time.perf_counter()
        quantize_model(model, ours, file_type, imatrix_file=imatrix_file, threads=threads)
        times.append(time.perf_counter() - start)
    return times


def _two_runs_in_a_new_process(model: Path, ours: Path, file_type: str, imatrix_file: Path | None,
                               args: argparse.Namespace) -> list[float]:
    script = ("import json, sys; from pathlib import Path; from benchmarks.bench_quantize import _two_runs; "
              "print(json.dumps(_two_runs(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], "
              "Path(sys.argv[4]) if sys.argv[4] else None, int(sys.argv[5]))))")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, str(model), str(ours), file_type, str(imatrix_file or ""),
                           str(args.threads)], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)})
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        if "InputError" in last_line:
            raise InputError(last_line.split(": ", 1)[-1])
        raise RuntimeError(f"ours failed on {file_type}:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
