"""The report of ``kimi-linear retrieval``: a Markdown table (accuracy, cache bytes and decode
time per context length, then depth x length accuracy grids) and accuracy heatmaps (PNG)."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

from kimi_linear.errors import PROG

__all__ = ["markdown_report", "plot_heatmaps"]


def _grid(cells: list[dict], model: str, task: str, lengths: list[int], depths: list[float]):
    table = {
        (c["length"], c["depth"]): c for c in cells if c["model"] == model and c["task"] == task
    }
    return [[table.get((n, d)) for n in lengths] for d in depths]


def markdown_report(result: dict[str, Any]) -> str:
    """The side-by-side table (accuracy per length, cache bytes, decode time) and one
    depth x length accuracy grid per model and task."""
    s = result["settings"]
    models, lengths, depths, tasks = s["models"], s["lengths"], s["depths"], s["tasks"]
    scored = [m for m in models if s["scored"].get(m)]
    lines = [
        f"# Long-context retrieval: {s['ckpt_path']}",
        "",
        f"`{s['command']}`",
        "",
        f"Tasks {', '.join(tasks)}; {s['samples']} sample(s) per cell, depths "
        f"{', '.join(f'{d:g}' for d in depths)}, seed {s['seed']}; device {s['device']}, dtype "
        f"{s['dtype']}; tokenizer {s['tokenizer']}. Accuracy: the greedy continuation is exactly "
        "the answer (teacher-forced); answer tokens: the fraction of answer tokens that are the "
        "greedy choice. Cache: analytic decode-cache bytes, batch 1. Decode: median time per "
        f"cached decode step at that context ({s['decode_steps']} steps).",
        "",
    ]
    for name in models:
        lines.append(f"- **{name}**: {s['model_info'][name]}")
    lines.append("")
    header = ["length"]
    for name in models:
        if name in scored:
            header += [f"{name} accuracy", f"{name} answer tokens"]
        header += [f"{name} cache", f"{name} ms/token"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for row in result["lengths"]:
        n = row["length"]
        cells = [str(n)]
        for name in models:
            if name in scored:
                mine = [c for c in result["cells"] if c["model"] == name and c["length"] == n]
                cells.append(f"{statistics.fmean(c['accuracy'] for c in mine):.3f}")
                cells.append(f"{statistics.fmean(c['token_accuracy'] for c in mine):.3f}")
            cells.append(_fmt_bytes(row[name]["cache_bytes"]))
            t = row[name]["decode_s_per_token"]
            cells.append("n/a" if t is None else f"{t * 1e3:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    for name in scored:
        for task in tasks:
            lines += ["", f"### {name}: {task} (accuracy / answer tokens; rows: depth)", ""]
            lines.append("| depth | " + " | ".join(str(n) for n in lengths) + " |")
            lines.append("|---:|" + "---:|" * len(lengths))
            for d, row in zip(depths, _grid(result["cells"], name, task, lengths, depths)):
                text = [
                    "" if c is None else f"{c['accuracy']:.2f} / {c['token_accuracy']:.2f}"
                    for c in row
                ]
                lines.append(f"| {d:g} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def plot_heatmaps(result: dict[str, Any], path: Path) -> Path | None:
    """One accuracy heatmap (depth x length) per scored model and task, saved to ``path``;
    ``None`` (with a note) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{PROG} retrieval: note: no heatmap (pip install matplotlib)", file=sys.stderr)
        return None
    s = result["settings"]
    scored = [m for m in s["models"] if s["scored"].get(m)]
    lengths, depths, tasks = s["lengths"], s["depths"], s["tasks"]
    fig, axes = plt.subplots(
        len(tasks),
        len(scored),
        figsize=(1.2 + 0.9 * len(lengths) * len(scored), 0.9 + 0.55 * len(depths) * len(tasks)),
        squeeze=False,
    )
    for i, task in enumerate(tasks):
        for j, name in enumerate(scored):
            ax = axes[i][j]
            grid = _grid(result["cells"], name, task, lengths, depths)
            values = [[math.nan if c is None else c["accuracy"] for c in row] for row in grid]
            ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for r, row in enumerate(values):
                for c, v in enumerate(row):
                    ax.text(
                        c,
                        r,
                        "" if math.isnan(v) else f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                    )
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
            ax.set_title(f"{name}: {task}", fontsize=8)
            if i == len(tasks) - 1:
                ax.set_xlabel("context length (tokens)", fontsize=7)
            if j == 0:
                ax.set_ylabel("needle depth", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
