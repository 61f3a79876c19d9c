"""Shared helpers of the benchmark scripts: device naming, timing, and saving results.

Scripts run as ``python benchmarks/<name>.py`` (this folder is then on ``sys.path``) and save
``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``benchmarks/results/<device>/``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}

# Nominal HBM bandwidth (bytes/s) of known GPUs, for the bytes-moved floor.
NOMINAL_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SystemExit(f"error: --dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; errors clearly for an unavailable device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {name!r} is not a torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device must be cpu, cuda or auto, got {name!r}")
    return dev


def device_name(device: torch.device) -> str:
    """A readable device name: the GPU's marketing name or the CPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores)".strip()


def device_slug(device: torch.device) -> str:
    """Folder name under results/: ``cpu`` or the GPU name (e.g. ``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def env_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "unknown")
    except Exception:  # fla import can fail on exotic set-ups; it is optional here
        info["fla"] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, warmup: int = 2, reps: int = 5) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``reps`` runs; seconds: median, min, max, stdev."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
    }


def bandwidth(device: torch.device, nbytes: int = 1 << 28) -> tuple[float, str]:
    """Memory bandwidth in bytes/s: nominal for known GPUs, else measured with a copy."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bw in NOMINAL_BANDWIDTH.items():
            if key in name:
                return bw, f"nominal ({key})"
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, warmup=2, reps=5)["min"]
    return 2 * n * 4 / t, "measured (copy, read + write)"


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
) -> dict[str, Path]:
    """Write ``name``.json / .md (/ .png when ``plot(ax_or_fig)`` is given); return the paths.

    ``plot`` receives a matplotlib Figure and draws on it.
    """
    folder = Path(out_dir) if out_dir is not None else RESULTS_DIR / device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{name}.json", "md": folder / f"{name}.md"}
    payload = {"benchmark": name, "env": env_info(device), **payload}
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown)
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(7, 4.5))
        plot(fig)
        fig.tight_layout()
        paths["png"] = folder / f"{name}.png"
        fig.savefig(paths["png"], dpi=120)
        plt.close(fig)
    return paths
