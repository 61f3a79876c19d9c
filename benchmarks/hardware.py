"""The machine a benchmark runs on: device choice and name, environment record, threads, memory."""

from __future__ import annotations

import os
import platform
import re
import sys
import time
from typing import Any

import torch

from benchmarks.common import fail, fmt_bytes


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
    # Versions from the installed distributions' metadata: importing fla takes seconds.
    from importlib import metadata

    for key, dist in (("triton", "triton"), ("fla", "flash-linear-attention")):
        try:
            info[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[key] = None
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``.

    GPU: ``torch.cuda.mem_get_info`` (free device memory). CPU: ``psutil``'s available memory
    (Linux: ``MemAvailable``), lowered to the cgroup's remaining allowance when the process
    runs under a cgroup memory limit (containers), which psutil does not know of (hence ours).
    """
    import psutil

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    avail = int(psutil.virtual_memory().available)
    limit = _read_int("/sys/fs/cgroup/memory.max")  # cgroup v2 ("max" -> None)
    used = _read_int("/sys/fs/cgroup/memory.current")
    if limit is None:  # cgroup v1
        limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        used = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    if limit is not None and used is not None and limit < (1 << 60):
        avail = min(avail, max(limit - used, 0))
    return int(avail)


def require_memory(nbytes: int, device: torch.device, what: str, fraction: float = 0.85) -> None:
    """Exit with a clear message (code 3) unless ``nbytes`` fit in ``fraction`` of free memory."""
    free = available_memory(device)
    if nbytes > fraction * free:
        fail(
            f"{what} needs about {fmt_bytes(nbytes)} but only {fmt_bytes(free)} is free on "
            f"{device_name(device)} (limit used: {fraction:.0%} of free memory); use a smaller "
            "context, batch or model",
            code=3,
        )


def process_resident_bytes() -> int:
    """Resident set size of this process (bytes; ``psutil``, any OS)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def set_threads(n: int | None) -> int:
    """Use ``n`` intra-op CPU threads (``None``: keep torch's default); returns the count in use.

    On a CPU shared with other jobs, one thread per process avoids OpenMP workers spinning
    against each other (an order of magnitude slower per step on an oversubscribed machine).
    """
    if n is not None:
        if n <= 0:
            fail(f"--threads must be a positive int, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()
