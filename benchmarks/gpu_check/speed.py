"""Part 2, speed: our kernels against fla's on the same inputs, interleaved, and one decode step
per layer against its bytes floor."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import kernel_speed, timing
from benchmarks.gpu_check.kda import fla_ops, kda_inputs, shape_str, try_fla
from benchmarks.gpu_check.run import Item, ItemContext, Run
from benchmarks.gpu_check.splitting import auto_choices, describe_path, step_latency
from kimi_linear.ops.isolation import nonfinite_isolation


def speed_items(run: Run) -> list[Item]:
    """The anchor shapes (forward, forward + backward, ours against fla; at the first anchor
    also the safe-gate fast path, on the same inputs; at the long anchor also ours unsplit and
    split into fixed segments beside the automatic choice), one decode step per layer against
    its bytes floor, and the sequential state passes' time per 64-token step."""
    s = run.sizes
    keys = ("speed B=2 T=8K H=64", "speed B=1 T=64K H=16")
    items = []
    for i, shape in enumerate(s.speed_shapes):
        split = s.split_speed_chunks if i == len(s.speed_shapes) - 1 else ()
        extra = [f"safe gate (gate_lower_bound={s.safe_gate_bound:g})"] if i == 0 else []
        if split:
            extra.append(
                "unsplit vs automatic vs " + ", ".join(f"{n} chunks/segment" for n in split)
            )
        items.append(
            Item(
                f"chunk_kda bf16 {shape_str(*shape)}" + "".join(f", {e}" for e in extra),
                keys[min(i, 1)],
                _speed_chunk(shape, safe_gate=i == 0, kernels_alone=i == 0, split=split),
            )
        )
    items.append(
        Item("decode step per layer (fused_recurrent_kda) vs floor", "speed_decode", _speed_decode)
    )
    # last: it runs the first autotune config, and switching spaces drops the tuned ones
    items.append(
        Item(
            "state pass time per 64-token step (B=1 H=1) vs the cost model",
            "step latency",
            step_latency,
        )
    )
    return items


def _timed_providers(
    ctx: ItemContext,
    x: dict[str, torch.Tensor],
    flops: float,
    what: str,
    cu_seqlens: torch.Tensor | None = None,
    safe_gate: float | None = None,
    kernels_alone: bool = False,
    split: tuple[int, ...] = (),
) -> None:
    """Forward and forward + backward of ours and fla's chunk kernel, interleaved (and, with
    ``safe_gate``, ours on the safe-gate fast path, ``gate_lower_bound=safe_gate``; with
    ``kernels_alone``, ours with the NaN isolation off too: fla isolates no NaN, so the
    kernels compare like with like, and the isolation's cost is measured beside them; with
    ``split``, ours unsplit, ``segment_chunks=0``, and split into segments of each of these
    numbers of chunks, beside ``ours``, the automatic choice: ``unsplit_over_<name>`` is the
    split's speed-up, :mod:`kimi_linear.kernels.split`).

    fla's ``chunk_kda`` may modify ``g`` and ``v`` in place, so every timed call (ours too, for
    an equal cost) first restores its own copies of g and v; that restore is timed alone in the
    same rounds and subtracted (``net``)."""
    from functools import partial

    from kimi_linear.kernels import chunk_kda

    dev, rounds = ctx.run.device, ctx.run.sizes.speed_rounds
    impls: dict[str, Callable[..., Any]] = {"ours": chunk_kda}
    if kernels_alone:
        impls["ours_no_isolation"] = _without_isolation(chunk_kda)
    if safe_gate is not None:
        impls["ours_safe_gate"] = partial(chunk_kda, gate_lower_bound=safe_gate)
    if split:
        impls["ours_unsplit"] = partial(chunk_kda, segment_chunks=0)
        for n in split:
            impls[f"ours_split{n}"] = partial(chunk_kda, segment_chunks=n)
        B, T, H, V = x["v"].shape
        offsets = cu_seqlens.tolist() if cu_seqlens is not None else [b * T for b in range(B + 1)]
        ctx.record["paths"] = {
            "ours": describe_path(offsets, H, V, dev, None),
            **{f"ours_split{n}": describe_path(offsets, H, V, dev, n) for n in split},
        }
        ctx.record["auto_segment_chunks"] = auto_choices(dev)["summary"]
    fla = try_fla(ctx, fla_ops, dev)  # fla missing or broken: ours are timed alone
    if fla is not None:
        impls["fla"] = fla.chunk
    kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    names = ("q", "k", "v", "g", "beta")
    results: dict[str, Any] = {}
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        fns: dict[str, Callable[[], Any]] = {}
        leaves: dict[str, list[torch.Tensor]] = {}
        for name, fn in impls.items():
            xs = [x[n].detach().clone().requires_grad_(grad) for n in names]
            leaves[name] = xs

            def call(fn=fn, xs=xs, grad=grad) -> None:
                with torch.no_grad():
                    xs[2].copy_(x["v"])
                    xs[3].copy_(x["g"])
                if grad:
                    fn(*xs, **kw)[0].backward(x["do"])
                else:
                    with torch.no_grad():
                        fn(*xs, **kw)

            fns[name] = call
        if "fla" in impls and not probe_fla(ctx, fns["fla"]):
            del impls["fla"], fns["fla"]
        scratch = [x["v"].clone(), x["g"].clone()]

        def restore(scratch: list[torch.Tensor] = scratch) -> None:
            scratch[0].copy_(x["v"])
            scratch[1].copy_(x["g"])

        fns["restore g, v"] = restore
        t = timing.bench_interleaved(
            fns, dev, rounds=rounds, grad_to_none={n: leaves[n] for n in impls}
        )
        net = {n: t[n]["median"] - t["restore g, v"]["median"] for n in impls}
        row: dict[str, Any] = {"mode": mode}
        for n in impls:
            row[f"{n}_ms"] = net[n] * 1e3
            row[f"{n}_min_ms"] = (t[n]["min"] - t["restore g, v"]["median"]) * 1e3
            row[f"{n}_max_ms"] = (t[n]["max"] - t["restore g, v"]["median"]) * 1e3
            row[f"{n}_tflops"] = (3 if grad else 1) * flops / net[n] / 1e12 if net[n] > 0 else None
        row["restore_ms"] = t["restore g, v"]["median"] * 1e3
        row["samples"] = t["ours"]["n"]
        if "fla" in net:
            row["fla_over_ours"] = net["fla"] / net["ours"] if net["ours"] > 0 else None
        if "ours_no_isolation" in net and net["ours_no_isolation"] > 0:
            row["isolation_overhead"] = net["ours"] / net["ours_no_isolation"]
            if "fla" in net:
                row["fla_over_ours_kernels"] = net["fla"] / net["ours_no_isolation"]
        if "ours_safe_gate" in net:
            row["safe_gate_speedup"] = (
                net["ours"] / net["ours_safe_gate"] if net["ours_safe_gate"] > 0 else None
            )
        if "ours_unsplit" in net:
            for n in ["ours", *(f"ours_split{c}" for c in split)]:
                row[f"unsplit_over_{n}"] = net["ours_unsplit"] / net[n] if net[n] > 0 else None
        results[mode] = row
        ctx.add_row(row)
    summary = "fla / ours: fwd {:.2f}x, fwd+bwd {:.2f}x".format(
        results["fwd"].get("fla_over_ours") or math.nan,
        results["fwd+bwd"].get("fla_over_ours") or math.nan,
    )
    if "ours_no_isolation" in impls:
        summary += "; kernels alone (NaN isolation off): fwd {:.2f}x, fwd+bwd {:.2f}x".format(
            results["fwd"].get("fla_over_ours_kernels") or math.nan,
            results["fwd+bwd"].get("fla_over_ours_kernels") or math.nan,
        )
    if safe_gate is not None:
        summary += "; ours / ours safe gate: fwd {:.2f}x, fwd+bwd {:.2f}x".format(
            results["fwd"].get("safe_gate_speedup") or math.nan,
            results["fwd+bwd"].get("safe_gate_speedup") or math.nan,
        )
    if split:
        summary += "; unsplit / " + ", ".join(
            "{} {:.2f}x fwd, {:.2f}x fwd+bwd".format(
                "auto" if n == "ours" else n.removeprefix("ours_"),
                results["fwd"].get(f"unsplit_over_{n}") or math.nan,
                results["fwd+bwd"].get(f"unsplit_over_{n}") or math.nan,
            )
            for n in ["ours", *(f"ours_split{c}" for c in split)]
        )
        auto = [results[m].get("unsplit_over_ours") or 0.0 for m in ("fwd", "fwd+bwd")]
        path = ctx.record["paths"]["ours"]
        ctx.record["split_verdict"] = f"the automatic choice ({path}) " + (
            "runs unsplit here: nothing to compare"
            if "unsplit" in path
            else "is faster than unsplit in both modes: keep it automatic"
            if min(auto) > 1.0
            else "is not faster than unsplit in both modes: revisit auto_segment_chunks"
        )
    ctx.record.update(
        shape=what,
        dtype="bf16",
        timer="triton.testing.do_bench" if dev.type == "cuda" else "perf_counter (CPU dry run)",
        rounds=rounds,
        fla=None if fla is None else "fla " + fla.chunk_name,
        gate_lower_bound=safe_gate,
        summary=summary,
    )


def _without_isolation(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the NaN isolation of the chunked ops off (the kernels alone)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        with nonfinite_isolation(False):
            return fn(*args, **kwargs)

    return call


def probe_fla(ctx: ItemContext, fn: Callable[[], Any]) -> bool:
    """Call fla's timed function once (inside :func:`~benchmarks.gpu_check.kda.try_fla`); on
    failure ``fla_error`` is recorded and ours are timed alone."""
    return try_fla(ctx, lambda: (fn(), True)[1]) is not None


def _speed_chunk(
    shape: tuple[int, int, int, int, int],
    safe_gate: bool = False,
    kernels_alone: bool = False,
    split: tuple[int, ...] = (),
) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        B, T, H, K, V = shape
        bound = ctx.run.sizes.safe_gate_bound if safe_gate else None
        # g in [-1, 0] (within any bound <= -1: the safe gate times on the same inputs)
        gate_low = -1.0 if bound is None else max(bound, -1.0)
        x = kda_inputs(
            B, T, H, K, V, torch.bfloat16, ctx.run.device, ctx.run.seed, gate_low=gate_low
        )
        flops = B * H * kernel_speed.kda_flops(T, K)
        _timed_providers(
            ctx,
            x,
            flops,
            shape_str(*shape),
            safe_gate=bound,
            kernels_alone=kernels_alone,
            split=split,
        )

    return item


def speed_varlen(ctx: ItemContext) -> None:
    n, lo, hi, H = ctx.run.sizes.speed_varlen
    K = V = ctx.run.sizes.speed_decode_heads[1]
    gen = torch.Generator(device="cpu").manual_seed(ctx.run.seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(ctx.run.device)
    TT = int(lengths.sum())
    x = kda_inputs(1, TT, H, K, V, torch.bfloat16, ctx.run.device, ctx.run.seed, N=n)
    flops = H * sum(kernel_speed.kda_flops(int(t), K) for t in lengths)
    _timed_providers(
        ctx, x, flops, f"{n} sequences of {lo}-{hi} tokens ({TT} in all), H={H} K={K} V={V}", cu
    )


def _speed_decode(ctx: ItemContext) -> None:
    """One decode step of one layer (all heads): ours (state updated in place) and fla's."""
    from kimi_linear.kernels import fused_recurrent_kda

    dev = ctx.run.device
    ops = try_fla(ctx, fla_ops, dev)
    fla_step = None if ops is None else ops.recurrent
    bw, bw_source = timing.bandwidth(dev, nbytes=1 << 22 if ctx.run.dry_run else 1 << 28)
    H, K, V = ctx.run.sizes.speed_decode_heads
    ctx.record.update(bandwidth_GBps=bw / 1e9, bandwidth_source=bw_source, heads=[H, K, V])
    for B in ctx.run.sizes.speed_decode_batches:
        x = kda_inputs(B, 1, H, K, V, torch.bfloat16, dev, ctx.run.seed + B)
        q, k, v, g, beta = (x[n] for n in ("q", "k", "v", "g", "beta"))
        state, fla_state = x["h0"].clone(), x["h0"].clone()
        state_bytes, io_bytes = kernel_speed.decode_step_bytes(q, k, v, g, beta)
        floor = (2 * state_bytes + io_bytes) / bw

        xs = (q, k, v, g, beta)

        def ours(xs: tuple[torch.Tensor, ...] = xs, state: torch.Tensor = state) -> None:
            with torch.no_grad():
                fused_recurrent_kda(*xs, initial_state=state, inplace_state=True)

        def fla(xs: tuple[torch.Tensor, ...] = xs, state: torch.Tensor = fla_state) -> None:
            with torch.no_grad():
                fla_step(*xs, initial_state=state, output_final_state=True)

        fns = {"ours": ours}
        if fla_step is not None and probe_fla(ctx, fla):
            fns["fla"] = fla
        t = timing.bench_interleaved(fns, dev, rounds=ctx.run.sizes.speed_rounds)
        fla_net = t["fla"]["median"] if "fla" in t else math.nan
        ctx.add_row(
            {
                "batch": B,
                "ours_us": t["ours"]["median"] * 1e6,
                "ours_min_us": t["ours"]["min"] * 1e6,
                "ours_max_us": t["ours"]["max"] * 1e6,
                "fla_us": fla_net * 1e6 if "fla" in t else None,
                "floor_us": floor * 1e6,
                "ours_floor_fraction": floor / t["ours"]["median"],
                "fla_floor_fraction": floor / fla_net if fla_net > 0 else None,
                "state_bytes": state_bytes,
                "samples": t["ours"]["n"],
            }
        )
    rows = ctx.record["rows"]
    ctx.record["summary"] = ", ".join(
        f"B={r['batch']}: ours {r['ours_us']:.3g} us = {r['ours_floor_fraction']:.0%} "
        "of floor speed"
        for r in rows
    )
