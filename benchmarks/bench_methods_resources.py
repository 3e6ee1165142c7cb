"""Time and peak memory of each --method, as a user runs it (one `llmquant quantize` process per method).

    python benchmarks/bench_methods_resources.py                        # SmolLM2-135M, Q4_K_M, every method
    python benchmarks/bench_methods_resources.py --model 1b --methods awq+gptq --calib-chunks 8

``--model 1b`` is a random llama of TinyLlama-1.1B's shape (22 layers, hidden 2048, ffn 5632, 4 KV heads),
saved once as an F32 Hugging Face folder under tests/.cache (4.4 GB of weights); ``--layers 2`` the same shape
with 2 decoder layers, whose peak is the 22-layer model's (the runner holds one layer at a time, and a method's
tensors wait on disk), measured in minutes rather than an hour, and compared with the 22-layer size.

Peak RSS is the process's own high-water mark (``VmHWM``, read by the child as it exits: ``wait4``'s ru_maxrss
would also count the parent's memory, which a forked child starts with); its growth is over a process that only
imports the same modules. The target: growth at most a third of the model's weight files.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmquant.models.demo import DEMO_MODEL_NAME, resolve_model  # noqa: E402
from tests.fixtures import build_random_model  # noqa: E402

IMPORTS = "import llmquant.cli, llmquant.pipeline.quantize, llmquant.pipeline.calibrated, transformers, torch"
# run in the child: report its own peak RSS (kB) on stderr's last line as it exits
PEAK_AT_EXIT = ("import atexit, re; atexit.register(lambda: print('VmHWM', re.search(r'VmHWM:\\s+(\\d+)', "
                "open('/proc/self/status').read()).group(1), file=__import__('sys').stderr, flush=True)); ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEMO_MODEL_NAME, help="a Hugging Face folder, the demo model, or '1b'")
    parser.add_argument("--type", default="Q4_K_M")
    parser.add_argument("--methods", default="rtn,gptq,awq,awq+gptq")
    parser.add_argument("--calib-chunks", type=int, default=32)
    parser.add_argument("--layers", type=int, default=22,
                        help="decoder layers of the random 1.1B llama (fewer: the same per-layer peak, sooner)")
    args = parser.parse_args()

    if args.model == "1b":
        name = "bench-llama-1b-hf" if args.layers == 22 else f"bench-llama-1b-{args.layers}-layers-hf"
        folder = _random_1b(ROOT / "tests" / ".cache" / name, args.layers)
    elif args.model == DEMO_MODEL_NAME:
        folder = resolve_model(DEMO_MODEL_NAME)
    else:
        folder = Path(args.model)
    model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if args.model == "1b" and args.layers != 22:
        model_bytes = _bytes_with_layers(folder, 22)
    base_rss, _ = _run([sys.executable, "-c", PEAK_AT_EXIT + IMPORTS])
    print(f"{folder.name}: {model_bytes / 2**30:.2f} GiB of weights (growth compared with that); a process with "
          f"the imports only: {base_rss / 2**20:.0f} MiB peak RSS", flush=True)
    print("| method | seconds | peak RSS MiB | growth MiB | growth / model |")
    print("|---|---|---|---|---|")
    for method in args.methods.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-resources-") as scratch:
            command = [sys.executable, "-c", PEAK_AT_EXIT + "import runpy; runpy.run_module('llmquant', "
                       "run_name='__main__')", "quantize", str(folder), "-o", f"{scratch}/out.gguf",
                       "--type", args.type, "--calib", "builtin", "--calib-chunks", str(args.calib_chunks),
                       "--method", method]
            rss, seconds = _run(command)
        growth = rss - base_rss
        print(f"| {method} | {seconds:.1f} | {rss / 2**20:.0f} | {growth / 2**20:.0f} | {growth / model_bytes:.3f} |",
              flush=True)


def _run(command: list[str]) -> tuple[int, float]:
    """Peak RSS in bytes and wall seconds of one child process (which must succeed)."""
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return int(stderr.strip().splitlines()[-1].split()[1]) * 1024, seconds


def _bytes_with_layers(folder: Path, n_layers: int) -> int:
    """The weight bytes the model in ``folder`` would have with ``n_layers`` decoder layers like its own."""
    from safetensors import safe_open

    outside, inside, layers = 0, 0, set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                size = 4  # F32
                for dim in f.get_slice(name).get_shape():
                    size *= dim
                if ".layers." in name:
                    inside += size
                    layers.add(name.split(".layers.")[1].split(".")[0])
                else:
                    outside += size
    return outside + inside * n_layers // len(layers)


def _random_1b(target: Path, n_layers: int = 22) -> Path:
    """A random llama of TinyLlama-1.1B's shape (``n_layers`` decoder layers) with the demo model's tokenizer, F32
    safetensors (written once)."""
    if not (target / "config.json").is_file():
        print("writing the random 1.1B llama (once)...", flush=True)
    shape = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=n_layers, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)
    return build_random_model("LlamaConfig", shape, target, resolve_model(DEMO_MODEL_NAME))


if __name__ == "__main__":
    main()
