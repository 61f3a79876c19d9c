"""Benchmark outputs: Markdown tables, progress bars and the result files.

Each script saves ``<name>.json``, ``<name>.md`` and ``<name>.png`` under
``benchmarks/results/<device>/`` (a ``--quick`` run under its git-ignored ``quick/`` subfolder).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import fail
from benchmarks.hardware import device_slug, env_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run, for its result files: ``python -m <module> <args>``
    (``argv`` as ``main`` got it; ``None``: this process's own arguments)."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def save_results(
    name: str,
    device: torch.device,
    payload: dict[str, Any],
    markdown: str,
    plot: Callable[[Any], None] | None = None,
    out_dir: str | os.PathLike | None = None,
    quick: bool = False,
) -> dict[str, Path]:
    """Write ``name``.json / .md (/ .png when ``plot(ax_or_fig)`` is given); return the paths.

    ``plot`` receives a matplotlib Figure and draws on it.  Without ``out_dir`` the files go to
    ``benchmarks/results/<device>/``, or for a ``quick`` smoke run to its git-ignored ``quick/``
    subfolder, so a smoke run never overwrites the published results.
    """
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR / device_slug(device)
    if out_dir is None and quick:
        folder = folder / "quick"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{name}.json", "md": folder / f"{name}.md"}
    payload = {"benchmark": name, "env": env_info(device), **payload}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown)
    if plot is not None:
        try:
            import matplotlib
        except ImportError:  # the figure is optional; the numbers are already written
            print(
                f'note: matplotlib is not installed, so no {name}.png (pip install -e ".[bench]")',
                file=sys.stderr,
            )
            return paths
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(7, 4.5))
        plot(fig)
        fig.tight_layout()
        paths["png"] = folder / f"{name}.png"
        fig.savefig(paths["png"], dpi=120)
        plt.close(fig)
    return paths


def refuse_overwrite(
    name: str,
    device: torch.device,
    out_dir: str | os.PathLike | None = None,
    quick: bool = False,
    overwrite: bool = False,
) -> None:
    """Stop (:func:`fail`) before any work when a run would replace committed results: the
    default folder (``benchmarks/results/<device>/``, where :func:`save_results` writes without
    ``out_dir`` / ``quick``) already holds ``name``.json / .md / .png.  ``--out-dir``,
    ``--quick`` (its git-ignored ``quick/`` subfolder) or ``--overwrite`` (asked for) pass."""
    if out_dir is not None or quick or overwrite:
        return
    folder = RESULTS_DIR / device_slug(device)
    existing = [folder / f"{name}.{ext}" for ext in ("json", "md", "png")]
    existing = [p for p in existing if p.exists()]
    if existing:
        fail(
            f"{existing[0]} exists (committed results); pass --overwrite to replace them, "
            "--out-dir DIR to write elsewhere, or --quick for a smoke run"
        )


def progress(iterable: Any, desc: str, total: int | None = None, enabled: bool = True) -> Any:
    """``tqdm`` progress bar on stderr when available (and ``enabled``); else the iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)
