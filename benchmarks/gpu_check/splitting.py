"""In-device sequence splitting (:mod:`kimi_linear.kernels.split`) in the suite: which path a call
takes, the automatic choice at the anchor shapes, and the per-step latency of the sequential
state passes against the cost model's assumed constant.

Shapes: B batch, T tokens, H heads, K key dim, V value dim; a *step* is one 64-token chunk of a
sequential (state) pass, which runs ``T / 64`` dependent steps per sequence-head.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks import timing
from benchmarks.gpu_check.kda import kda_inputs, shape_str
from benchmarks.gpu_check.run import ItemContext

#: The anchor shapes of issue 21 (B, T, H, K, V) whose automatic choice every run records.
SPLIT_ANCHORS = (
    (2, 8192, 64, 128, 128),
    (1, 65536, 16, 128, 128),
    (1, 1 << 20, 32, 128, 128),
)
#: The sequential kernels whose per-launch device time the step-latency item reads.
STATE_KERNELS = ("_chunk_fwd_state_kernel", "_chunk_bwd_state_kernel")
CHUNK = 64


def describe_path(
    offsets: Sequence[int], H: int, V: int, device: torch.device, segment_chunks: int | None
) -> str:
    """The path ``chunk_kda(segment_chunks=...)`` takes on a packed batch with sequence
    ``offsets`` (host ints) and ``H`` value heads: ``"unsplit"`` or ``"split: n chunks/segment,
    S segments"`` (S: the most of one sequence), with ``auto`` / ``forced`` in front."""
    from kimi_linear.kernels.split import plan_for

    plan = plan_for(tuple(int(o) for o in offsets), H, V, device, segment_chunks)
    how = "auto" if segment_chunks is None else "forced" if segment_chunks else "never"
    if plan is None:
        return "unsplit" if how == "never" else f"{how}: unsplit"
    return f"{how}: split, {plan.segment_chunks} chunks/segment, {plan.max_segments} segments"


def dense_offsets(B: int, T: int) -> list[int]:
    """The packed offsets of a dense ``[B, T]`` batch."""
    return [b * T for b in range(B + 1)]


def auto_choices(device: torch.device) -> dict[str, Any]:
    """What :func:`kimi_linear.kernels.split.auto_segment_chunks` chooses on ``device`` at the
    :data:`SPLIT_ANCHORS` (0: no split; on the CPU it never splits), with the SM count."""
    from kimi_linear.kernels.split import SEGMENT_CHUNKS_ENV, auto_segment_chunks

    out: dict[str, Any] = {
        "sms": (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else None
        ),
        "env": os.environ.get(SEGMENT_CHUNKS_ENV),
        "anchors": [],
    }
    for B, T, H, K, V in SPLIT_ANCHORS:
        chunks = -(-T // CHUNK)
        n = auto_segment_chunks(B * H, chunks, V, device)
        out["anchors"].append(
            {
                "shape": shape_str(B, T, H, K, V),
                "seq_heads": B * H,
                "chunks": chunks,
                "segment_chunks": n,
                "segments": -(-chunks // n) if n else 1,
            }
        )
    out["summary"] = auto_summary(out)
    return out


def auto_summary(choices: dict[str, Any]) -> str:
    """One line of :func:`auto_choices`."""
    parts = [
        f"{a['shape']}: "
        + (
            f"{a['segment_chunks']} chunks x {a['segments']} segments"
            if a["segment_chunks"]
            else "0 (unsplit)"
        )
        for a in choices["anchors"]
    ]
    sms = f" on {choices['sms']} SMs" if choices.get("sms") else " (CPU: never splits)"
    env = f"; {choices['env']!r} from the environment overrides it" if choices.get("env") else ""
    return "automatic segment_chunks" + sms + ": " + "; ".join(parts) + env


def model_step_latency_s() -> float:
    """The cost model's assumed latency of one dependent 64-token step,
    :data:`benchmarks.kernel_cost.STEP_LATENCY_S`. ``benchmarks.kernel_cost`` sets
    ``TRITON_INTERPRET=1`` when imported (it counts under the interpreter); the variable is put
    back as it was, so kernels defined later in this process still compile for the GPU."""
    saved = os.environ.get("TRITON_INTERPRET")
    try:
        from benchmarks import kernel_cost
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return float(kernel_cost.STEP_LATENCY_S)


def kernel_launch_us(
    fn: Callable[[], Any], names: Sequence[str], calls: int = 3
) -> dict[str, dict[str, float]]:
    """Device time per launch (microseconds, averaged) of every CUDA kernel whose name contains
    one of ``names``, over ``calls`` calls of ``fn`` under ``torch.profiler`` (after one
    untimed call): ``{name: {"us": ..., "launches": ...}}``; a name never launched is left out."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for evt in prof.key_averages():
        for name in names:
            if name in evt.key:
                t = getattr(evt, "device_time_total", None)
                if t is None:
                    t = getattr(evt, "cuda_time_total", 0.0)
                total[name] = total.get(name, 0.0) + float(t)
                count[name] = count.get(name, 0) + int(evt.count)
    return {
        n: {"us": total[n] / count[n], "launches": count[n]}
        for n in total
        if count.get(n) and total[n] > 0
    }


def step_latency(ctx: ItemContext) -> None:
    """The sequential state passes' time per 64-token step at one sequence-head (B=1, H=1,
    unsplit, the first autotune config, so the programs are a known ``cdiv(V, BV)``), at two
    lengths: on CUDA the device time per launch of the forward and backward state kernels
    (``torch.profiler``), per step and as the slope between the lengths (launch and ramp-up
    cancel out); everywhere the slope of the whole forward's time. Beside it the cost model's
    assumed step latency (:func:`model_step_latency_s`; the model adds each step's own work
    on top of it)."""
    from kimi_linear.kernels import chunk_kda
    from kimi_linear.kernels import utils as kernel_utils

    run, dev = ctx.run, ctx.run.device
    K, V = run.sizes.step_latency_dims
    lengths = run.sizes.step_latency_lengths
    assumed = model_step_latency_s()
    first = {e.name: kernel_utils.config_str(e.full[0]) for e in kernel_utils.autotuned_kernels()}
    ctx.record.update(
        shape=f"B=1 H=1 K={K} V={V} bf16, T = {', '.join(map(str, lengths))}, unsplit",
        autotune_space="first",
        configs={n: first.get(n) for n in STATE_KERNELS},
        model_step_latency_us=assumed * 1e6,
    )
    previous = kernel_utils.autotune_space()
    kernel_utils.set_autotune_space("first")
    try:
        names = ("q", "k", "v", "g", "beta")
        fwd: dict[str, Callable[[], Any]] = {}
        both: dict[int, Callable[[], Any]] = {}
        for T in lengths:
            x = kda_inputs(1, T, 1, K, V, torch.bfloat16, dev, run.seed + T)

            def forward(x: dict[str, torch.Tensor] = x) -> None:
                with torch.no_grad():
                    chunk_kda(*(x[n] for n in names), segment_chunks=0)

            def forward_backward(x: dict[str, torch.Tensor] = x) -> None:
                leaves = [x[n].detach().requires_grad_() for n in names]
                chunk_kda(*leaves, segment_chunks=0)[0].backward(x["do"])

            fwd[f"T={T}"] = forward
            both[T] = forward_backward
        t = timing.bench_interleaved(fwd, dev, rounds=1)  # ~100 calls each: a median is enough
        kernels: dict[int, dict[str, dict[str, float]]] = {}
        if dev.type == "cuda":
            try:
                kernels = {T: kernel_launch_us(both[T], STATE_KERNELS) for T in lengths}
            except Exception as e:  # noqa: BLE001 - the wall-clock slope still stands
                ctx.record["profiler_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        kernel_utils.set_autotune_space(previous)
    for T in lengths:
        row: dict[str, Any] = {
            "T": T,
            "chunks": T // CHUNK,
            "fwd_ms": t[f"T={T}"]["median"] * 1e3,
            "fwd_min_ms": t[f"T={T}"]["min"] * 1e3,
            "fwd_max_ms": t[f"T={T}"]["max"] * 1e3,
        }
        for name, k in kernels.get(T, {}).items():
            row[f"{name}_us"] = k["us"]
            row[f"{name}_us_per_step"] = k["us"] / (T // CHUNK)
        ctx.add_row(row)
    (a, b), (ca, cb) = (lengths[0], lengths[-1]), (lengths[0] // CHUNK, lengths[-1] // CHUNK)
    rows = {r["T"]: r for r in ctx.record["rows"]}
    slopes = {"fwd (whole forward)": (rows[b]["fwd_ms"] - rows[a]["fwd_ms"]) * 1e3 / (cb - ca)}
    for name in STATE_KERNELS:
        if f"{name}_us" in rows[a] and f"{name}_us" in rows[b]:
            slopes[name] = (rows[b][f"{name}_us"] - rows[a][f"{name}_us"]) / (cb - ca)
    ctx.record["step_us"] = slopes
    ctx.record["step_over_model"] = {n: s / (assumed * 1e6) for n, s in slopes.items()}
    best = next((n for n in STATE_KERNELS if n in slopes), "fwd (whole forward)")
    ctx.record["summary"] = (
        f"{best}: {slopes[best]:.3g} us per 64-token step (slope {a}->{b} tokens) vs the cost "
        f"model's {assumed * 1e6:.3g} us step latency ({slopes[best] / (assumed * 1e6):.2g}x)"
    )
