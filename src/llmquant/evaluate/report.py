"""Figures for people and scripts: the eval table, the compare report (Markdown, JSON) and the size–KLD plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from llmquant.errors import InputError
from llmquant.evaluate.metrics import Figures


class Measured(Protocol):
    """What the report needs of one evaluated model (``pipeline.evaluate.EvalResult``)."""

    model: str
    backend: str
    n_ctx: int
    n_chunks: int
    figures: Figures
    size_bytes: int | None
    bits_per_weight: float | None
    file_type: str | None

    def to_json(self) -> dict[str, Any]: ...


def format_figures(result: Measured) -> str:
    """The eval summary: llama-perplexity --kl-divergence's final statistics, in its units."""
    f = result.figures
    rows = [
        ("model", result.model),
        ("reference", getattr(result, "reference", "")),
        ("backend", result.backend),
        ("tokens scored", f"{f.n_tokens} ({result.n_chunks} chunks of {result.n_ctx}, second half of each)"),
        ("PPL(Q)", f"{f.ppl:.4f} ± {f.ppl_err:.4f}"),
        ("PPL(base)", f"{f.ppl_base:.4f} ± {f.ppl_base_err:.4f}"),
        ("PPL(Q)/PPL(base)", f"{f.ppl_ratio:.5f} ± {f.ppl_ratio_err:.5f}"),
        ("mean KLD", f"{f.kld_mean:.6f} ± {f.kld_mean_err:.6f}"),
        ("median KLD", f"{f.kld_median:.6f}"),
        ("99.0% KLD", f"{f.kld_p99:.6f}"),
        ("99.9% KLD", f"{f.kld_p999:.6f}"),
        ("max KLD", f"{f.kld_max:.6f}"),
        ("same top token", f"{100 * f.top1_agreement:.3f} ± {100 * f.top1_agreement_err:.3f} %"),
        ("RMS Δp", f"{100 * f.rms_dp:.3f} ± {100 * f.rms_dp_err:.3f} %"),
    ]
    if result.size_bytes is not None:
        size = f"{result.size_bytes / 2**20:.2f} MiB"
        if result.bits_per_weight:
            size += f", {result.bits_per_weight:.3f} bits per weight"
        rows.insert(3, ("size", size))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def pareto_best(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (size, KLD) points: True where no other point is at least as small and as close, and better in one."""
    best = []
    for i, (size_i, kld_i) in enumerate(points):
        dominated = any(
            size_j <= size_i and kld_j <= kld_i and (size_j < size_i or kld_j < kld_i)
            for j, (size_j, kld_j) in enumerate(points) if j != i
        )
        best.append(not dominated)
    return best


def _label(result: Measured) -> str:
    return Path(result.model).name


def report_json(results: Sequence[Measured], reference: str) -> dict[str, Any]:
    best = pareto_best([(r.size_bytes or 0, r.figures.kld_mean) for r in results])
    return {
        "reference": reference,
        "n_ctx": results[0].n_ctx if results else None,
        "n_chunks": results[0].n_chunks if results else None,
        "models": [{"name": _label(r), **r.to_json(), "pareto_best": b} for r, b in zip(results, best, strict=True)],
    }


def report_markdown(results: Sequence[Measured], reference: str) -> str:
    best = pareto_best([(r.size_bytes or 0, r.figures.kld_mean) for r in results])
    first = results[0]
    lines = [
        "# Quantization report",
        "",
        f"Reference: `{reference}`. {first.figures.n_tokens} tokens scored per model ({first.n_chunks} chunks of "
        f"{first.n_ctx} tokens, the second half of each), as `llama-perplexity --kl-divergence` scores them.",
        "",
        "| model | type | size (MiB) | bits/weight | PPL | PPL ratio | mean KLD | median KLD | 99.9% KLD | max KLD "
        "| same top | RMS Δp | Pareto |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|",
    ]
    for r, b in sorted(zip(results, best, strict=True), key=lambda rb: rb[0].size_bytes or 0):
        f = r.figures
        size = f"{r.size_bytes / 2**20:.1f}" if r.size_bytes is not None else "–"
        bpw = f"{r.bits_per_weight:.3f}" if r.bits_per_weight else "–"
        lines.append(
            f"| {_label(r)} | {r.file_type or '–'} | {size} | {bpw} | {f.ppl:.4f} ± {f.ppl_err:.4f} "
            f"| {f.ppl_ratio:.4f} ± {f.ppl_ratio_err:.4f} | {f.kld_mean:.5f} ± {f.kld_mean_err:.5f} "
            f"| {f.kld_median:.5f} | {f.kld_p999:.5f} | {f.kld_max:.4f} "
            f"| {100 * f.top1_agreement:.2f}% | {100 * f.rms_dp:.2f}% | {'★' if b else ''} |"
        )
    lines += [
        "",
        f"PPL of the reference on the same tokens: {first.figures.ppl_base:.4f} ± {first.figures.ppl_base_err:.4f}.",
        "KLD: mean over tokens of KL(reference ‖ model) in nats. Same top: how often both put the same token first. "
        "RMS Δp: root mean square change of the probability of the actual next token. ★: Pareto-best (no other "
        "file is both smaller and closer to the reference).",
        "",
        "![size against KLD](frontier.png)",
        "",
    ]
    return "\n".join(lines)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("the plot needs matplotlib: pip install 'llmquant[plot]'") from None


def plot_frontier(results: Sequence[Measured], path: Path, reference: str) -> Path:
    """frontier.png: file size against mean KLD, one labelled point per file, the Pareto-best ones marked."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    sizes = [(r.size_bytes or 0) / 2**20 for r in results]
    klds = [r.figures.kld_mean for r in results]
    errors = [r.figures.kld_mean_err for r in results]
    best = pareto_best(list(zip(sizes, klds, strict=True)))
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    frontier = sorted((s, k) for s, k, b in zip(sizes, klds, best, strict=True) if b)
    if len(frontier) > 1:
        ax.plot([s for s, _ in frontier], [k for _, k in frontier], "-", color="tab:green", alpha=0.6, zorder=1,
                label="Pareto frontier")
    for size, kld, err, is_best, result in zip(sizes, klds, errors, best, results, strict=True):
        ax.errorbar(size, kld, yerr=err, fmt="*" if is_best else "o", markersize=13 if is_best else 7,
                    color="tab:green" if is_best else "tab:gray", ecolor="0.6", capsize=3, zorder=2)
        ax.annotate(_label(result), (size, kld), textcoords="offset points", xytext=(7, 6), fontsize=8)
    if all(k > 0 for k in klds) and max(klds) / min(klds) > 20:
        ax.set_yscale("log")
    ax.scatter([], [], marker="*", s=120, color="tab:green", label="Pareto-best")
    ax.scatter([], [], marker="o", color="tab:gray", label="dominated")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence from the reference (nats)")
    ax.set_title(f"size against accuracy, reference {Path(reference).name}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(results: Sequence[Measured], output_dir: Path, reference: str) -> dict[str, Path]:
    """Write report.md, report.json and frontier.png into ``output_dir``; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": output_dir / "report.md", "json": output_dir / "report.json",
             "plot": output_dir / "frontier.png"}
    paths["json"].write_text(json.dumps(report_json(results, reference), indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(report_markdown(results, reference), encoding="utf-8")
    plot_frontier(results, paths["plot"], reference)
    return paths


__all__ = ["format_figures", "pareto_best", "plot_frontier", "report_json", "report_markdown", "require_matplotlib",
           "write_report"]
