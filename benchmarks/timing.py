"""Timing of benchmarked calls: repeated runs, interleaved rounds, memory bandwidth.

On CUDA ``triton.testing.do_bench`` or a synchronised loop; on the CPU
``torch.utils.benchmark.Timer`` at the run's thread count (every timed call follows an untimed
one). Compared implementations run in interleaved rounds, so a ratio comes from one run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.hardware import synchronize

# Nominal HBM bandwidth (bytes/s) of known GPUs, for the bytes-moved floor.
NOMINAL_BANDWIDTH = {
    "H100": 3.35e12,
    "H200": 4.8e12,
    "A100": 2.0e12,
    "L40S": 0.864e12,
    "A10": 0.6e12,
}


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
