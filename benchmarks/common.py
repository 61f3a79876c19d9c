"""Shared helpers of the benchmark scripts: device naming, timing, and saving results.

Scripts run as ``python -m benchmarks.<name>`` from the repository root and save
``<name>.json``, ``<name>.md`` and ``<name>.png`` under ``benchmarks/results/<device>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}

# Nominal HBM bandwidth (bytes/s) of known GPUs, for the bytes-moved floor.
NOMINAL_BANDWIDTH = {
    "H100": 3.35e12,
    "H200": 4.8e12,
    "A100": 2.0e12,
    "L40S": 0.864e12,
    "A10": 0.6e12,
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where the help text does not already say the default and
    the default is a real value (not ``None`` or a ``store_true`` flag's ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action) or text


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


def _cpu_timer(fn: Callable[[], Any], reset: Sequence[torch.Tensor] = ()) -> Any:
    """A ``torch.utils.benchmark.Timer`` of ``fn()`` on the CPU at the caller's thread count
    (its default would time at one thread), read with ``time.perf_counter`` (its default also
    synchronises any accelerator present); the gradients of ``reset`` are set to ``None``
    before every block of calls, untimed (its ``setup``)."""
    from torch.utils.benchmark import Timer

    def clear() -> None:
        for t in reset:
            t.grad = None

    return Timer(
        stmt="fn()",
        setup="clear()",
        timer=time.perf_counter,
        globals={"fn": fn, "clear": clear},
        num_threads=torch.get_num_threads(),
    )


def _cpu_samples(timer: Any, measurements: int, min_run_time: float) -> list[float]:
    """Seconds per call from ``measurements`` runs of ``timer.blocked_autorange``: each first
    calls ``fn`` untimed (its block-size estimate, a warm-up), then times blocks of calls for at
    least ``min_run_time`` seconds (0: one block of one call)."""
    out: list[float] = []
    for _ in range(measurements):
        out += list(timer.blocked_autorange(min_run_time=min_run_time).times)
    return out


def timeit(
    fn: Callable[[], Any], device: torch.device, warmup: int = 2, reps: int = 5
) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then time ``reps`` runs; seconds: median, min, max, stdev.

    On CUDA a synchronised ``perf_counter`` loop; on the CPU ``torch.utils.benchmark`` (each
    timed call follows an untimed one, its block-size estimate: ``warmup + 2 * reps`` calls)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if device.type == "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t0)
    else:
        times = _cpu_samples(_cpu_timer(fn), reps, 0.0)
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
    }


def _do_bench_samples(
    fn: Callable[[], Any], warmup_ms: int, rep_ms: int, grad_to_none: Sequence[torch.Tensor] | None
) -> list[float]:
    """Per-run times (ms) of ``fn`` from ``triton.testing.do_bench`` (CUDA; L2 flushed per run)."""
    from triton.testing import do_bench

    try:
        out = do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="all"
        )
    except (AssertionError, TypeError, ValueError):  # a Triton without return_mode="all"
        out = do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.0, 0.5, 1.0]
        )
    return [float(t) for t in (out if isinstance(out, (list, tuple)) else [out])]


def bench_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    rounds: int = 3,
    warmup_ms: int = 25,
    rep_ms: int = 100,
    cpu_reps: int = 1,
    grad_to_none: dict[str, Sequence[torch.Tensor]] | None = None,
    cpu_min_run_time: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Time several implementations of one computation in interleaved rounds.

    Each round runs every callable in turn (so clock, temperature and neighbour drift hit all of
    them alike, and a ratio of two comes from one run): on CUDA through
    ``triton.testing.do_bench`` (``warmup_ms`` then ``rep_ms`` of runs, L2 cache flushed between
    runs, ``grad_to_none[name]`` gradients reset before each run), on CPU through
    ``torch.utils.benchmark.Timer.blocked_autorange``, ``cpu_reps`` times per round: an untimed
    call (its block-size estimate, so every timed call is warm, also right after another
    implementation ran), then blocks of calls for at least ``cpu_min_run_time`` seconds (0:
    one call); gradients are reset before every block, untimed.  (``torch.utils.benchmark``
    has no interleaving of several statements: the rounds stay ours.)

    Returns, per name, seconds per call over all samples of all rounds: ``median``, ``min``,
    ``max`` and the sample count ``n``.
    """
    if rounds <= 0:
        raise ValueError(f"rounds must be a positive int, got {rounds}")
    if cpu_reps <= 0:
        raise ValueError(f"cpu_reps must be a positive int, got {cpu_reps}")
    if not (cpu_min_run_time >= 0):
        raise ValueError(f"cpu_min_run_time must be >= 0 seconds, got {cpu_min_run_time}")
    samples: dict[str, list[float]] = {name: [] for name in fns}
    grads = grad_to_none or {}
    timers = (
        {}
        if device.type == "cuda"
        else {n: _cpu_timer(f, grads.get(n, ())) for n, f in fns.items()}
    )
    for _ in range(rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                ms = _do_bench_samples(fn, warmup_ms, rep_ms, grads.get(name))
                samples[name] += [t / 1e3 for t in ms]
            else:
                samples[name] += _cpu_samples(timers[name], cpu_reps, cpu_min_run_time)
    return {
        name: {
            "median": statistics.median(ts),
            "min": min(ts),
            "max": max(ts),
            "n": len(ts),
        }
        for name, ts in samples.items()
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


# ---------------------------------------------------------------------------------------------
# Command-line helpers shared by the model-level benchmarks (kv_cache, decode, prefill).
# ---------------------------------------------------------------------------------------------

_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code`` (no traceback)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def parse_size(text: str) -> int:
    """``"4096"``, ``"4K"`` (4096), ``"1M"`` (1048576) -> int; sizes are powers of two."""
    s = str(text).strip().lower()
    mult = 1
    if s and s[-1] in _SIZE_SUFFIXES:
        mult, s = _SIZE_SUFFIXES[s[-1]], s[:-1]
    try:
        return int(s) * mult
    except ValueError:
        raise ValueError(f"not an integer size: {text!r} (use e.g. 4096, 4K, 1M)") from None


def size_list(minimum: int = 1) -> Callable[[str], list[int]]:
    """An argparse ``type``: comma-separated sizes (``"4K,32K,1M"``), each ``>= minimum``."""
    import argparse

    def parse(text: str) -> list[int]:
        try:
            values = [parse_size(t) for t in text.split(",") if t.strip()]
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if not values:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of sizes, got {text!r}"
            )
        bad = [v for v in values if v < minimum]
        if bad:
            raise argparse.ArgumentTypeError(f"every value must be >= {minimum}, got {bad[0]}")
        return values

    return parse


def positive_int(text: str) -> int:
    """An argparse ``type``: an int > 0."""
    import argparse

    try:
        v = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return v


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float > 0."""
    import argparse
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def fmt_tokens(n: int) -> str:
    """4096 -> ``"4K"``, 1048576 -> ``"1M"``; other values unchanged."""
    for suffix, mult in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def fmt_bytes(n: float | None) -> str:
    """Bytes in decimal units, as papers and vendors quote them (``"9.13 GB"``); ``None`` -> ``"-"``."""
    if n is None:
        return "-"
    for unit, mult in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= mult:
            return f"{n / mult:.3g} {unit}"
    return f"{int(n)} B"


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


def progress(iterable: Any, desc: str, total: int | None = None, enabled: bool = True) -> Any:
    """``tqdm`` progress bar on stderr when available (and ``enabled``); else the iterable."""
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


def expected_distinct_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected number of distinct experts hit by ``num_tokens`` tokens routing top-``k`` of ``E``.

    Uniform routing: an expert is missed by one token with probability ``1 - k/E``, so
    ``E * (1 - (1 - k/E) ** n)`` experts are read at least once (``k`` for one token, all ``E``
    for large batches).
    """
    if num_experts <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


def active_weight_bytes(
    model: torch.nn.Module, num_tokens: int, dtype_bytes: int | None = None
) -> dict[str, float]:
    """Weight bytes one forward step over ``num_tokens`` tokens must read (the decode floor).

    Every parameter counts once, except routed experts (3-D ``experts`` parameters
    ``[E, ...]``: only the expected number of distinct experts hit, see
    :func:`expected_distinct_experts`) and the input embedding (``num_tokens`` rows; the full
    matrix when tied to the LM head, which reads all of it). Works on a ``meta``-device model.
    ``dtype_bytes`` overrides each parameter's own element size (e.g. 2 for a bf16 deployment).

    Returns bytes: ``total``, ``dense`` (always read), ``experts`` (expected routed expert
    bytes), ``embedding``, and ``all_params`` (every weight, the storage footprint).
    """
    config = getattr(model, "config", None)
    n_exp = getattr(config, "num_experts", 0) or 0
    top_k = getattr(config, "num_experts_per_token", 0) or 0
    frac = expected_distinct_experts(n_exp, top_k, num_tokens) / n_exp if n_exp else 0.0
    lm_head = getattr(model, "lm_head", None)
    tied_ptr = None
    if lm_head is not None and getattr(config, "tie_word_embeddings", False):
        tied_ptr = id(lm_head.weight)
    out = {"dense": 0.0, "experts": 0.0, "embedding": 0.0, "all_params": 0.0}
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        size = p.numel() * (dtype_bytes or p.element_size())
        out["all_params"] += size
        if ".experts." in f".{name}" and p.dim() == 3 and n_exp and p.shape[0] == n_exp:
            out["experts"] += size * frac
        elif name.endswith("embed_tokens.weight") and id(p) != tied_ptr:
            out["embedding"] += (
                min(num_tokens, p.shape[0]) * p[0].numel() * (dtype_bytes or p.element_size())
            )
        else:
            out["dense"] += size
    out["total"] = out["dense"] + out["experts"] + out["embedding"]
    return out


def cache_read_bytes(config: Any, context: int, batch_size: int, cache_dtype_bytes: int) -> int:
    """Cache bytes one decode step at ``context`` tokens must read: every MLA latent and rope
    key cached so far, every KDA state (fp32) and conv tail (``config.kv_cache_bytes``)."""
    return config.kv_cache_bytes(
        context, batch_size=batch_size, cache_dtype_bytes=cache_dtype_bytes
    )["total"]


def fill_cache_(cache: Any, length: int, seed: int = 0, pool_size: int = 1 << 20) -> Any:
    """Fill a :class:`~kimi_linear.cache.HybridCache` synthetically, as after ``length`` tokens.

    MLA layers: unit-variance random latents and rope keys in the first ``length`` slots and
    ``length`` set; their capacity must be ``>= length``. KDA layers: random fp32 states of the
    scale a normalised-key delta rule keeps (entries ~ N(0, 1/K)) and random conv tails.
    ``cache.seq_len = length``. Values are tiled from one pool of ``pool_size`` normal samples
    at random offsets, so a 1M-token cache fills at memory-copy speed. Returns the cache.
    """
    from kimi_linear.cache import KDALayerCache, LatentKVCache

    gen = torch.Generator(device="cpu").manual_seed(seed)
    pools: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
    largest = max((t.numel() for layer in cache.layers for t in layer.tensors()), default=0)
    pool_size = max(min(pool_size, 2 * largest), 2)  # small caches need no 1M-sample pool

    def fill(t: torch.Tensor, std: float = 1.0) -> None:
        """Copy pool values (times ``std``) into the contiguous view ``t`` (any shape)."""
        key = (t.device, t.dtype)
        if key not in pools:
            pools[key] = torch.randn(pool_size, generator=gen).to(device=t.device, dtype=t.dtype)
        pool = pools[key]
        flat = t.view(-1)
        pos = 0
        while pos < flat.numel():
            off = int(torch.randint(0, pool_size // 2, (1,), generator=gen))
            n = min(pool_size - off, flat.numel() - pos)
            flat[pos : pos + n].copy_(pool[off : off + n])
            pos += n
        if std != 1.0:
            t.mul_(std)

    for layer in cache.layers:
        if isinstance(layer, LatentKVCache):
            if layer.capacity < length:
                raise ValueError(
                    f"cache capacity {layer.capacity} < length {length}: allocate it with capacity >= length"
                )
            for t in layer.tensors():
                if t.shape[1] == length:
                    fill(t)
                else:  # only the first ``length`` slots are valid; the rest stays as allocated
                    for b in range(t.shape[0]):
                        fill(t[b, :length])
            layer.length = length
        elif isinstance(layer, KDALayerCache):
            fill(layer.state, std=layer.state.shape[-2] ** -0.5)
            for t in (layer.conv_q, layer.conv_k, layer.conv_v):
                fill(t)
        else:
            raise TypeError(f"unknown cache layer type {type(layer).__name__}")
    cache.seq_len = length
    return cache


def rewind_cache_(cache: Any, length: int) -> None:
    """Set every MLA layer's length and ``cache.seq_len`` back to ``length`` (between timed
    repetitions; KDA states are left as they are: their size, not their values, sets the cost)."""
    from kimi_linear.cache import LatentKVCache

    for layer in cache.layers:
        if isinstance(layer, LatentKVCache):
            layer.length = length
    cache.seq_len = length


def add_model_args(parser: Any, default_preset: str | None) -> None:
    """``--preset`` plus the size overrides (``--layers``, ``--experts``, ``--hidden-size``,
    ``--vocab-size``) that shrink a published layout to what a device holds."""
    from kimi_linear.config import KimiLinearConfig

    names = KimiLinearConfig.preset_names()
    parser.add_argument(
        "--preset",
        default=default_preset,
        choices=names,
        metavar="NAME",
        help=f"model preset, one of {', '.join(names)}"
        + (
            " (default: %(default)s)"
            if default_preset
            else " (default: tiny with --quick, else small on CPU and kimi-linear-48b-a3b with --experts 16 on GPU)"
        ),
    )
    parser.add_argument(
        "--layers",
        type=positive_int,
        default=None,
        help="override num_hidden_layers (the preset's KDA/MLA period is kept)",
    )
    parser.add_argument(
        "--experts",
        type=int,
        default=None,
        help="override num_experts (0: dense MLP everywhere); top-k is capped at it",
    )
    parser.add_argument(
        "--hidden-size", type=positive_int, default=None, help="override hidden_size"
    )
    parser.add_argument("--vocab-size", type=positive_int, default=None, help="override vocab_size")


def explicit_dests(parser: Any, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the options given explicitly in ``argv`` (``None``: ``sys.argv``),
    whatever their value: argparse sets a default only on a namespace that lacks the attribute,
    so parsing into a namespace pre-filled with a marker leaves the marker exactly where no
    option was given."""
    import argparse

    marker = object()
    ns = argparse.Namespace(**{a.dest: marker for a in parser._actions if a.dest != "help"})
    parser.parse_known_args(argv, namespace=ns)
    return {k for k, v in vars(ns).items() if v is not marker}


def apply_quick(args: Any, explicit: set[str], **values: Any) -> None:
    """``--quick`` sizes: set each ``args.<name>`` to ``values[name]`` unless the option was
    given explicitly (:func:`explicit_dests`): an explicit size is honoured, never silently
    replaced by the quick one."""
    for name, value in values.items():
        if name not in explicit:
            setattr(args, name, value)


def add_timed_run_args(parser: Any, quick_help: str, seed_help: str) -> None:
    """The run options shared by the timing scripts (decode.py, prefill.py): ``--dtype``,
    ``--device``, ``--threads``, ``--quick``, ``--out-dir``, ``--seed``, ``--no-progress``."""
    parser.add_argument(
        "--dtype", default=None, help="weights and cache dtype (default: CPU fp32, GPU bf16)"
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (default: torch's); 1 on a shared machine",
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--out-dir",
        default=None,
        help="output folder (default: benchmarks/results/<device>/, quick: .../<device>/quick/)",
    )
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: Any) -> Any:
    """The :class:`~kimi_linear.config.KimiLinearConfig` named by :func:`add_model_args`'s
    arguments; a bad combination exits with the config's own message."""
    from kimi_linear.config import KimiLinearConfig

    overrides: dict[str, Any] = {}
    if getattr(args, "layers", None) is not None:
        overrides["num_hidden_layers"] = args.layers
    if getattr(args, "experts", None) is not None:
        if args.experts < 0:
            fail(f"--experts must be >= 0, got {args.experts}")
        overrides["num_experts"] = args.experts
    if getattr(args, "hidden_size", None) is not None:
        overrides["hidden_size"] = args.hidden_size
    if getattr(args, "vocab_size", None) is not None:
        overrides["vocab_size"] = args.vocab_size
    try:
        base = KimiLinearConfig.from_preset(args.preset)
        if overrides.get("num_experts"):
            overrides["num_experts_per_token"] = min(
                base.num_experts_per_token, overrides["num_experts"]
            )
        if "vocab_size" in overrides:  # special token ids of the preset may fall outside
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                tok = getattr(base, key)
                if tok is not None and tok >= overrides["vocab_size"]:
                    overrides[key] = None
        if "num_hidden_layers" in overrides:
            overrides["first_k_dense_replace"] = min(
                base.first_k_dense_replace, overrides["num_hidden_layers"]
            )
        return base.replace(**overrides) if overrides else base
    except ValueError as e:
        fail(f"invalid model settings for --preset {args.preset}: {e}")


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
