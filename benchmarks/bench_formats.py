"""Quantization speed of every format: ours against ggml's own quantizer, measured in the same process.

    python benchmarks/bench_formats.py                    # CPU, torch on 1 thread, and again on all cores
    python benchmarks/bench_formats.py --formats Q4_K IQ4_XS --rows 4096
    python benchmarks/bench_formats.py --device cuda      # our formats on the GPU (ggml stays on the CPU)

For each format, tensor (SmolLM2's real down_proj and a random heavy-tailed one) and imatrix setting, it times
one call of ``llmquant.formats.quantize`` and one of ``ggml_quantize_chunk`` (single-threaded by design), and
prints elements per second for both, the ratio ours/ggml and the share of blocks whose bytes are identical.
Formats not registered yet are listed as missing. Targets: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.formats.compare

from llmquant.formats import FORMATS, quantize  # noqa: E402
from llmquant.oracles.ggml import ggml_quantize, ggml_requires_imatrix  # noqa: E402
from tests.formats.compare import ALL_FORMATS, heavy_tailed, random_imatrix  # noqa: E402

DOWN_PROJ = "model.layers.14.mlp.down_proj.weight"  # [576, 1536]: rows a multiple of 256


def real_down_proj() -> np.ndarray:
    """SmolLM2-135M's layer-14 down_proj (bf16 widened to float32), from the cached demo model folder."""
    from safetensors import safe_open

    from llmquant.models.demo import demo_model_folder

    for shard in sorted(demo_model_folder().glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            if DOWN_PROJ in f.keys():
                return f.get_tensor(DOWN_PROJ).float().numpy()
    raise SystemExit(f"{DOWN_PROJ} not found in the demo model folder")


def timed(call: Callable[..., np.ndarray], *call_args, repeat: int = 1,
          synchronize: Callable[[], None] = lambda: None) -> tuple[np.ndarray, float]:
    """The result of ``call(*call_args)`` and the best wall time of ``repeat`` single calls."""
    best, result = float("inf"), None
    for _ in range(repeat):
        synchronize()
        start = time.perf_counter()
        result = call(*call_args)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return result, best


def format_rate(elements_per_second: float) -> str:
    return f"{elements_per_second / 1e6:9.2f} M/s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=ALL_FORMATS, help="formats to measure (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for ours (default 1, as ggml)")
    parser.add_argument("--no-all-cores", action="store_true", help="skip the extra run of ours on all cores")
    parser.add_argument("--device", default="cpu", help="where our formats run: cpu or cuda")
    parser.add_argument("--rows", type=int, default=1024, help="rows of the random [rows, 1536] tensor")
    parser.add_argument("--repeat", type=int, default=3, help="single calls per measurement; the fastest is kept")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available to torch")
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    all_cores = os.cpu_count() or 1
    thread_counts = [args.threads]
    if device.type == "cpu" and not args.no_all_cores and all_cores != args.threads:
        thread_counts.append(all_cores)

    tensors = {"down_proj": real_down_proj(), "random": heavy_tailed(args.rows, 1536, seed=0)}
    requested = [name.upper() for name in args.formats]
    missing = [name for name in requested if name not in FORMATS]
    present = [name for name in requested if name in FORMATS]

    ours_columns = "".join(f"{f'ours {n}t':>14}" for n in thread_counts)
    ratio_columns = "".join(f"{f'ratio {n}t':>10}" for n in thread_counts)
    print(f"torch {torch.__version__}, ours on {device}; ggml_quantize_chunk single-threaded; {all_cores} cores")
    print(f"{'format':8}{'imatrix':>8}{'tensor':>11}{ours_columns}{'ggml':>14}{ratio_columns}{'identical':>11}")
    for type_name in present:
        for tensor_name, weights in tensors.items():
            if weights.shape[1] % FORMATS[type_name].block_size:
                continue
            on_device = torch.from_numpy(weights).to(device)
            for with_imatrix in (False, True):
                if not with_imatrix and ggml_requires_imatrix(type_name):
                    continue  # ggml aborts without one (and ours refuses)
                imatrix = random_imatrix(weights.shape[1], seed=1) if with_imatrix else None
                imatrix_on_device = None if imatrix is None else torch.from_numpy(imatrix).to(device)
                # warm-up: first-call costs (numba's compile or cache load, tables, the oracle's library) stay out
                # of the timings
                quantize(on_device[:8], type_name, imatrix_on_device)
                ggml_quantize(weights[:8], type_name, imatrix)
                rates, ours_bytes = [], None
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    ours_bytes, seconds = timed(quantize, on_device, type_name, imatrix_on_device,
                                                repeat=args.repeat, synchronize=synchronize)
                    rates.append(weights.size / seconds)
                torch.set_num_threads(args.threads)
                ggml_bytes, seconds = timed(ggml_quantize, weights, type_name, imatrix, repeat=args.repeat)
                ggml_rate = weights.size / seconds
                block_bytes = FORMATS[type_name].bytes_per_block
                identical = (ours_bytes.reshape(-1, block_bytes) == ggml_bytes.reshape(-1, block_bytes)).all(1)
                print(f"{type_name:8}{'yes' if with_imatrix else 'no':>8}{tensor_name:>11}"
                      + "".join(f"{format_rate(rate):>14}" for rate in rates)
                      + f"{format_rate(ggml_rate):>14}"
                      + "".join(f"{rate / ggml_rate:>10.2f}" for rate in rates)
                      + f"{identical.mean():>10.2%}", flush=True)
    if missing:
        print(f"missing (not registered in llmquant.formats): {', '.join(missing)}")


if __name__ == "__main__":
    main()
