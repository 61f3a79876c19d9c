"""``kimi-linear plot RUN [RUN...]``: training curves of one or several runs in one PNG.

A run is a run folder (``runs/tiny/version_0``, holding the ``metrics.csv`` that
:class:`~kimi_linear.lightning.logs.RunLogger` or Lightning's ``CSVLogger`` writes), the
``metrics.csv`` itself, or an experiment folder (``runs/tiny``: each of its ``version_*``
folders is a run).  Four panels share the step axis: loss (training, and validation dashed),
learning rate, training tokens/s and the largest MLA pre-softmax (QK) logit; a metric a run did
not log leaves its panel empty for that run.  Reads dense and sparse CSVs alike.

Needs matplotlib (``pip install 'kimi-linear[plot]'``); without it the command is a one-line
error.  No Lightning import: the command starts fast.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

from kimi_linear.errors import UsageError

__all__ = ["PANELS", "find_runs", "plot_main", "plot_runs", "read_metrics"]

METRICS_FILE = "metrics.csv"

#: ``(panel title, y label, [(metric name or prefix ending in "*", line style)], log scale)``
PANELS: list[tuple[str, str, list[tuple[str, str]], bool]] = [
    ("loss", "cross-entropy (nats)", [("train/loss", "-"), ("val/loss", "--")], False),
    ("learning rate", "lr", [("lr-*", "-")], False),
    ("throughput", "tokens/s", [("perf/tokens_per_s", "-")], False),
    ("QK max logit", "max pre-softmax logit", [("mla/max_logit/max", "-")], True),
]


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The ``metrics.csv`` files of ``paths`` (run folders, CSV files or experiment folders).

    Raises :class:`UsageError` naming a path that is missing or holds no ``metrics.csv``.
    """
    files: list[Path] = []
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"RUN: {os.fspath(path)!r} does not exist")
        if p.is_file():
            files.append(p)
        elif (p / METRICS_FILE).is_file():
            files.append(p / METRICS_FILE)
        else:
            found = sorted(
                (q / METRICS_FILE for q in p.iterdir() if (q / METRICS_FILE).is_file()),
                key=lambda f: (len(f.parent.name), f.parent.name),
            )
            if not found:
                raise UsageError(
                    f"RUN: {os.fspath(path)!r} has no {METRICS_FILE} (give a run folder such as "
                    "runs/tiny/version_0, its metrics.csv, or an experiment folder of them)"
                )
            files += found
    return files


def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` of a ``metrics.csv`` (empty and non-finite cells
    skipped)."""
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise UsageError(f"RUN: {os.fspath(path)!r} is not a metrics CSV (no 'step' column)")
        for row in reader:
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError):
                continue
            for key, cell in row.items():
                if key in ("step", "epoch") or cell in (None, ""):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    out.setdefault(key, []).append((step, value))
    return out


def _label(path: Path, files: Sequence[Path]) -> str:
    """A short run name: the run folder relative to the common parent of all runs."""
    folders = [f.parent for f in files]
    if len(folders) == 1:
        return os.fspath(folders[0])
    common = Path(os.path.commonpath([os.path.abspath(f) for f in folders]))
    rel = os.path.relpath(os.path.abspath(path.parent), common)
    return rel if rel != "." else path.parent.name


def plot_runs(files: Sequence[Path], out: str | os.PathLike, title: str | None = None) -> Path:
    """Draw :data:`PANELS` for the runs whose ``metrics.csv`` are ``files``; save to ``out``."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "plot needs matplotlib, which is not installed (pip install 'kimi-linear[plot]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(f, read_metrics(f)) for f in files]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, ylabel, series, log) in zip(axes.flat, PANELS):
        drawn = False
        for i, (f, metrics) in enumerate(runs):
            color = colors[i % len(colors)]
            for key, style in series:
                keys = (
                    sorted(k for k in metrics if k.startswith(key[:-1]))
                    if key.endswith("*")
                    else [key]
                )
                for k in keys[:1] if key.endswith("*") else keys:
                    points = metrics.get(k)
                    if not points:
                        continue
                    steps, values = zip(*points)
                    suffix = "" if key.endswith("*") else f" {k.split('/')[0]}"
                    label = _label(f, files) + (suffix if len(series) > 1 else "")
                    ax.plot(steps, values, style, color=color, label=label, lw=1.4)
                    drawn = True
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        if log and drawn:
            ax.set_yscale("log")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title or ", ".join(_label(f, files) for f in files))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kimi-linear plot",
        description="Plot loss, learning rate, tokens/s and the MLA max logit of one or several "
        "runs (their metrics.csv) into one PNG.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN",
        help="run folder (runs/tiny/version_0), its metrics.csv, or an experiment folder "
        "(runs/tiny: every version_* in it)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="PNG to write; default: RUN/curves.png for one run folder, curves.png here otherwise",
    )
    p.add_argument("--title", default=None, help="figure title; default: the run names")
    return p


def plot_main(argv: list[str]) -> int:
    """``kimi-linear plot RUN [RUN...] [--out PNG]``."""
    args = _parser().parse_args(argv)
    files = find_runs(args.runs)
    if args.out is not None:
        out = Path(args.out)
        if out.suffix.lower() != ".png":
            raise UsageError(f"--out: expected a .png file name, got {args.out!r}")
    elif len(files) == 1:
        out = files[0].parent / "curves.png"
    else:
        out = Path("curves.png")
    written = plot_runs(files, out, title=args.title)
    print(f"wrote {written} ({len(files)} run{'s' if len(files) > 1 else ''})")
    return 0
