"""``llmquant inspect``: a GGUF file's tensors, types, size and key metadata, as text or JSON."""

from __future__ import annotations

import json
import os

from llmquant.gguf_io.reader import GGUFSummary, summarize_gguf
from llmquant.models.demo import resolve_gguf

# the keys a quantizer writes about how it made the file (llama-quantize's quantize.imatrix.*, and ours)
QUANTIZE_PREFIX = "quantize."


def inspect_gguf(name_or_path: str | os.PathLike) -> GGUFSummary:
    return summarize_gguf(resolve_gguf(name_or_path))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def made_with(summary: GGUFSummary) -> dict[str, object]:
    """The ``quantize.*`` keys, under their own names: llama-quantize's ``quantize.imatrix.file``, ``.dataset``,
    ``.entries_count``, ``.chunks_count`` (where the importance matrix came from) and ours
    (``quantize.llmquant.method``)."""
    return {key: value for key, value in summary.metadata.items() if key.startswith(QUANTIZE_PREFIX)}


def format_summary(summary: GGUFSummary, show_tensors: bool = True) -> str:
    lines = [f"{summary.path}  ({human_bytes(summary.file_size)}, GGUF v{summary.version})", ""]
    width = max(len(k) for k in summary.key_metadata)
    for key, value in summary.key_metadata.items():
        if value is not None:
            lines.append(f"  {key:<{width}}  {value}")
    made = made_with(summary)
    if made:
        lines += ["", "  how it was quantized:"]
        made_width = max(len(k) for k in made)
        lines += [f"  {key:<{made_width}}  {value}" for key, value in made.items()]
    if show_tensors:
        name_w = max((len(t.name) for t in summary.tensors), default=4)
        shape_w = max((len(" x ".join(map(str, t.shape))) for t in summary.tensors), default=5)
        lines += ["", f"  {'#':>4}  {'name':<{name_w}}  {'shape (ne0 first)':<{max(shape_w, 17)}}  {'type':<6}  bytes"]
        for i, t in enumerate(summary.tensors):
            shape = " x ".join(map(str, t.shape))
            shape_col = f"{shape:<{max(shape_w, 17)}}"
            lines.append(f"  {i:>4}  {t.name:<{name_w}}  {shape_col}  {t.type_name:<6}  {t.n_bytes:>12,}")
    lines += ["", f"  {'type':<6}  {'tensors':>7}  {'weights':>14}  {'bytes':>14}  {'bits/weight':>11}"]
    for type_name, tot in summary.totals_by_type().items():
        bpw = 8.0 * tot["bytes"] / tot["elements"] if tot["elements"] else 0.0
        lines.append(
            f"  {type_name:<6}  {tot['tensors']:>7}  {tot['elements']:>14,}  {tot['bytes']:>14,}  {bpw:>11.3f}"
        )
    lines += [
        "",
        f"  {len(summary.tensors)} tensors, {summary.n_elements:,} weights, {human_bytes(summary.tensor_bytes)} of "
        f"tensor data, {summary.bits_per_weight:.3f} bits per weight",
    ]
    return "\n".join(lines)


def summary_json(summary: GGUFSummary) -> str:
    return json.dumps(summary.to_json(), indent=2, default=str)
