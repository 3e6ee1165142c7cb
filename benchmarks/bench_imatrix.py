"""Throughput of ``llmquant imatrix`` against llama.cpp's forward passes, measured in the same run.

llama-cpp-python does not expose llama-imatrix, so the reference is llama.cpp evaluating the same chunks
(same context, same threads, logits for every token as llama-imatrix requests them) with nothing collected:
the upper bound of llama-imatrix's speed. Ours includes the hooks and the perplexity.

    python benchmarks/bench_imatrix.py [--ctx 512] [--chunks 4] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def reference_gguf(cache: Path) -> tuple[Path, str]:
    """An F32 GGUF of the demo model when the test helpers can make one, else the shipped Q4_1 file."""
    from llmquant.models.demo import demo_gguf_path

    shipped = demo_gguf_path()
    try:
        sys.path.insert(0, str(REPO))
        from tests.gguf_fixtures import smollm2_gguf_as

        return smollm2_gguf_as(shipped, cache, "F32"), "F32 (the shipped Q4_1 dequantized: the HF folder's weights)"
    except Exception as exc:  # the helpers need the ggml oracle; the shipped file always exists
        return shipped, f"Q4_1 (shipped file; no F32 GGUF: {type(exc).__name__})"


def bench_ours(model_dir: Path, chunks, device: str) -> float:
    from llmquant.pipeline.imatrix import compute_imatrix, load_causal_lm

    model = load_causal_lm(model_dir, torch.device(device))
    compute_imatrix(model, chunks.__class__(chunks.token_ids[:1], chunks.targets[:1], 0, chunks.add_bos), ["warm"])
    run = compute_imatrix(model, chunks, ["bench"])
    return run.tokens_per_second


def bench_llama_cpp(gguf_path: Path, chunks, threads: int) -> float:
    import llama_cpp

    from llmquant.evaluate.llama_runtime import open_llama

    n_ctx = chunks.n_ctx
    llm = open_llama(gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=True, verbose=False)

    def run_chunk(ids: list[int]) -> None:
        llm.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)  # as compute_imatrix per chunk
        llm.eval(ids)

    run_chunk(chunks.token_ids[0].tolist())  # warm-up
    started = time.perf_counter()
    for row in chunks.token_ids:
        run_chunk(row.tolist())
    return chunks.n_chunks * n_ctx / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    from llmquant.calibration.builtin import builtin_text
    from llmquant.calibration.chunking import chunk_text, load_tokenizer
    from llmquant.models.demo import cache_root, demo_model_folder

    torch.set_num_threads(args.threads)
    model_dir = demo_model_folder()
    chunks = chunk_text(load_tokenizer(model_dir), builtin_text(), args.ctx, args.chunks)
    gguf_path, gguf_kind = reference_gguf(cache_root())
    print(f"model: SmolLM2-135M-Instruct; {chunks.n_chunks} chunks of {args.ctx} tokens; {args.threads} threads")
    print(f"llama.cpp GGUF: {gguf_kind}; ours: transformers float32")

    reference = bench_llama_cpp(gguf_path, chunks, args.threads)
    print(f"llama.cpp forward (llama-cpp-python), cpu: {reference:8.1f} tokens/s")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        ours = bench_ours(model_dir, chunks, device)
        print(f"llmquant imatrix, {device:4s}:                  {ours:8.1f} tokens/s   "
              f"ratio ours/llama.cpp = {ours / reference:.2f}")


if __name__ == "__main__":
    main()
