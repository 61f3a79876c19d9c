"""Decode speed of a Kimi Linear model against its all-MLA twin at long context.

Measures the time per output token (TPOT) of ``model(next_ids, cache=cache)`` steps, after the
cache has been filled synthetically to the context length (random latents in the MLA caches
with their length set, random fp32 states in the KDA layers, ``cache.seq_len`` set:
:func:`workload.fill_cache_`), so a 1M-token context needs no 1M-token prefill. Each measurement
runs ``--warmup`` untimed repetitions, then ``--reps`` timed ones of ``--steps`` greedy decode
steps each (the cache is rewound between repetitions; the device is synchronised), and reports
the median TPOT with its min / max.

Beside each measurement is the bytes floor of one step: bytes it must read (active weights:
dense weights, the routed experts the batch is expected to hit, embedding rows; plus the whole
MLA cache and the KDA states) divided by the memory bandwidth (:func:`timing.bandwidth`:
nominal for known GPUs, a measured copy on CPU), and the ratio measured / floor.

Two figures:

(a) TPOT against context at equal batch (``--batch-sizes``), floors dotted;
(b) decode throughput (tokens/s) at the largest batch each model fits in ``--memory-budget-gb``
    (weights + caches; capped at ``--max-batch``): the hybrid's smaller cache admits a larger
    batch, the paper's "up to 6x decoding throughput" setting.

Models: the preset with optional size overrides. Defaults: on CPU the ``small`` preset in fp32;
on a GPU the Kimi-Linear-48B-A3B layout reduced to 16 routed experts (``--preset
kimi-linear-48b-a3b --experts 16``: all 27 layers at full width, so cache, attention and the
per-token active weights are the released model's; only the expert pool is smaller) in bf16.

Example::

    python -m benchmarks.decode --preset small --contexts 4K,16K,64K,128K --batch-sizes 1,4
"""

from __future__ import annotations

import argparse
import gc
from typing import Any

import torch

from benchmarks import common, hardware, report, timing, workload
from kimi_linear.config import KimiLinearConfig
from kimi_linear.model import KimiLinearForCausalLM, cast_model_

MODEL_LABELS = {"hybrid": "hybrid (KDA + MLA)", "all_mla": "all-MLA"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description="Decode time per output token and throughput vs context: Kimi Linear hybrid "
        "vs its all-MLA twin, with the bytes-moved floor beside each measurement.",
        formatter_class=common.HelpFormatter,
    )
    workload.add_model_args(p, default_preset=None)
    p.add_argument(
        "--contexts",
        type=common.size_list(1),
        default=None,
        help="context lengths (tokens; K/M suffixes). Default: CPU 4K,16K,64K,128K; "
        "GPU 4K,32K,128K,512K,1M; quick 256,1K",
    )
    p.add_argument(
        "--batch-sizes",
        type=common.size_list(1),
        default=None,
        help="batch sizes of the equal-batch comparison (default 1,4; quick 1,2)",
    )
    p.add_argument(
        "--steps",
        type=common.positive_int,
        default=None,
        help="decode steps per timed repetition (default: CPU 2, GPU 16)",
    )
    p.add_argument(
        "--reps",
        type=common.positive_int,
        default=None,
        help="timed repetitions (default: CPU 3, GPU 5)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions before timing")
    p.add_argument(
        "--memory-budget-gb",
        type=common.positive_float,
        default=None,
        help="weights + caches budget (GB, decimal) for the throughput figure; default: "
        "CPU 4, GPU 85%% of free memory",
    )
    p.add_argument(
        "--max-batch",
        type=common.positive_int,
        default=None,
        help="largest batch tried in the throughput figure (default: CPU 16, GPU 256)",
    )
    p.add_argument("--no-throughput", action="store_true", help="skip figure (b)")
    common.add_timed_run_args(
        p,
        quick_help="tiny preset and contexts (smoke test, seconds)",
        seed_help="seed of weights, cache contents and tokens",
    )
    args = p.parse_args(argv)
    args.explicit = common.explicit_dests(p, argv)
    if args.warmup < 0:
        p.error(f"argument --warmup: must be >= 0, got {args.warmup}")
    return args


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the device-dependent defaults in place."""
    gpu = device.type == "cuda"
    workload.default_preset_(args, gpu)
    if args.contexts is None:
        args.contexts = (
            [256, 1024]
            if args.quick
            else (
                [4 << 10, 32 << 10, 128 << 10, 512 << 10, 1 << 20]
                if gpu
                else [4 << 10, 16 << 10, 64 << 10, 128 << 10]
            )
        )
    if args.batch_sizes is None:
        args.batch_sizes = [1, 2] if args.quick else [1, 4]
    if args.steps is None:
        args.steps = 2 if args.quick or not gpu else 16
    if args.reps is None:
        args.reps = 2 if args.quick else (5 if gpu else 3)
    if args.quick:  # an explicit --warmup is honoured
        common.apply_quick(args, getattr(args, "explicit", set()), warmup=min(args.warmup, 1))
    if args.dtype is None:
        args.dtype = "bf16" if gpu else "fp32"
    if args.max_batch is None:
        args.max_batch = 4 if args.quick else (256 if gpu else 16)


def working_bytes(config: KimiLinearConfig, context: int, batch: int, dtype_bytes: int) -> int:
    """Upper estimate of one decode step's temporaries: fp32 scores / softmax over the cached
    tokens (``[B, H, 1, L]``, a few copies) and one contiguous copy of a layer's latents."""
    if not config.mla_layers:
        return 64 << 20
    per_token = batch * (
        config.num_attention_heads * 16
        + 2 * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype_bytes
    )
    return context * per_token + (64 << 20)


def cache_bytes(config: KimiLinearConfig, capacity: int, batch: int, dtype_bytes: int) -> int:
    return config.kv_cache_bytes(capacity, batch, cache_dtype_bytes=dtype_bytes)["total"]


def time_decode(
    model: KimiLinearForCausalLM,
    context: int,
    batch: int,
    args: argparse.Namespace,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, float]:
    """TPOT statistics (seconds) of ``args.steps`` greedy steps after a synthetic ``context``."""
    cache = model.new_cache(batch, capacity=context + args.steps, dtype=dtype, device=device)
    workload.fill_cache_(cache, context, seed=args.seed)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen).to(device)

    def run() -> None:
        workload.rewind_cache_(cache, context)
        x = ids
        for _ in range(args.steps):
            x = model(x, cache=cache)[:, -1:].argmax(dim=-1)

    with torch.inference_mode():
        t = timing.timeit(run, device, warmup=args.warmup, reps=args.reps)
    return {k: v / args.steps for k, v in t.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = hardware.resolve_device(args.device)
    resolve_defaults(args, device)
    threads = hardware.set_threads(args.threads) if device.type == "cpu" else None
    dtype = common.parse_dtype(args.dtype)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    config = workload.config_from_args(args)
    models = {"hybrid": config, "all_mla": config.all_mla_twin()}

    # ---- sizes on the meta device, before anything real is allocated --------------------
    weights: dict[str, dict[str, Any]] = {}
    metas: dict[str, KimiLinearForCausalLM] = {}
    for name, cfg in models.items():
        with torch.device("meta"):
            meta = KimiLinearForCausalLM(cfg)
        build_bytes = workload.active_weight_bytes(meta, 1, dtype_bytes=4)[
            "all_params"
        ]  # built in fp32
        metas[name] = cast_model_(meta, dtype)
        weights[name] = {
            "bytes": workload.active_weight_bytes(meta, 1)["all_params"],
            "build_bytes": build_bytes,
        }

    free = hardware.available_memory(device)
    if args.memory_budget_gb is not None:
        budget = int(args.memory_budget_gb * 1e9)
    else:
        budget = int(0.85 * free) if device.type == "cuda" else min(int(4e9), int(0.5 * free))
    if budget > 0.85 * free:
        common.fail(
            f"--memory-budget-gb {budget / 1e9:g} exceeds the memory free on "
            f"{hardware.device_name(device)} ({common.fmt_bytes(free)}, of which 85% may be used)",
            code=3,
        )

    # ---- the plan: equal-batch runs and, per context, the largest batch under the budget --
    runs: list[tuple[str, int, int, str]] = []  # (model, context, batch, figure)
    for ctx in args.contexts:
        for b in args.batch_sizes:
            for name in models:
                runs.append((name, ctx, b, "equal_batch"))
    max_batches: dict[tuple[str, int], int] = {}
    if not args.no_throughput:
        for ctx in args.contexts:
            for name, cfg in models.items():
                per_seq = cache_bytes(cfg, ctx + args.steps, 1, dtype_bytes)
                fit = (
                    int((budget - weights[name]["bytes"]) // per_seq)
                    if budget > weights[name]["bytes"]
                    else 0
                )
                max_batches[(name, ctx)] = min(fit, args.max_batch)
                if max_batches[(name, ctx)] >= 1:
                    runs.append((name, ctx, max_batches[(name, ctx)], "throughput"))
    for name, ctx, b, _ in runs:  # fail before allocating anything if a run cannot fit
        need = (
            weights[name]["bytes"]
            + cache_bytes(models[name], ctx + args.steps, b, dtype_bytes)
            + working_bytes(models[name], ctx, b, dtype_bytes)
        )
        need = max(need, weights[name]["build_bytes"])
        if need > 0.85 * free:
            common.fail(
                f"decoding the {MODEL_LABELS[name]} model at context {ctx} with batch {b} needs about "
                f"{common.fmt_bytes(need)} (weights {common.fmt_bytes(weights[name]['bytes'])} + cache "
                f"{common.fmt_bytes(cache_bytes(models[name], ctx + args.steps, b, dtype_bytes))} + working "
                f"memory), but only {common.fmt_bytes(free)} is free on {hardware.device_name(device)}; "
                "use shorter --contexts, smaller --batch-sizes or a smaller model",
                code=3,
            )

    bw, bw_source = timing.bandwidth(device, nbytes=1 << 25 if args.quick else 1 << 28)
    print(
        f"decode: {config.name} ({len(config.kda_layers)} KDA + {len(config.mla_layers)} MLA layers, "
        f"{config.num_experts} experts) vs all-MLA twin, {args.dtype}, on {hardware.device_name(device)}"
        + (f", {threads} thread(s)" if threads else "")
        + f"; bandwidth {bw / 1e9:.1f} GB/s ({bw_source}); {len(runs)} measurements"
    )

    rows: list[dict[str, Any]] = []
    bar = report.progress(range(len(runs)), "decode", enabled=not args.no_progress)
    bar_iter = iter(bar)
    for name, cfg in models.items():
        model = workload.build_model(cfg, dtype, device, args.seed)
        for run_name, ctx, b, figure in runs:
            if run_name != name:
                continue
            next(bar_iter, None)
            need = cache_bytes(cfg, ctx + args.steps, b, dtype_bytes) + working_bytes(
                cfg, ctx, b, dtype_bytes
            )
            hardware.require_memory(
                need, device, f"the {MODEL_LABELS[name]} cache at context {ctx}, batch {b}"
            )
            t = time_decode(model, ctx, b, args, dtype, device)
            gc.collect()  # the cache of that measurement is gone now
            if device.type == "cuda":
                torch.cuda.empty_cache()
            w = workload.active_weight_bytes(metas[name], b)["total"]
            c = workload.cache_read_bytes(cfg, ctx, b, dtype_bytes)
            floor = (w + c) / bw
            rows.append(
                {
                    "figure": figure,
                    "model": name,
                    "context": ctx,
                    "batch_size": b,
                    "tpot_ms": t["median"] * 1e3,
                    "tpot_min_ms": t["min"] * 1e3,
                    "tpot_max_ms": t["max"] * 1e3,
                    "tpot_stdev_ms": t["stdev"] * 1e3,
                    "tokens_per_s": b / t["median"],
                    "weight_bytes": w,
                    "cache_bytes": c,
                    "step_bytes": w + c,
                    "floor_ms": floor * 1e3,
                    "measured_over_floor": t["median"] / floor,
                }
            )
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for _ in bar_iter:
        pass
    if hasattr(bar, "close"):
        bar.close()

    summary = summarize(rows, args)
    payload = {
        "args": vars(args),
        "config": config.to_dict(),
        "threads": threads,
        "bandwidth_bytes_per_s": bw,
        "bandwidth_source": bw_source,
        "memory_budget_bytes": budget,
        "weights_bytes": {n: w["bytes"] for n, w in weights.items()},
        "max_batch_under_budget": {f"{n}@{c}": b for (n, c), b in max_batches.items()},
        "rows": rows,
        "summary": summary,
    }
    md = render_markdown(
        rows, summary, args, config, device, bw, bw_source, budget, weights, threads
    )
    paths = report.save_results(
        "decode",
        device,
        payload,
        md,
        plot=lambda fig: plot(fig, rows, args),
        out_dir=args.out_dir,
        quick=args.quick,
    )
    print(render_console(rows))
    for line in summary_lines(summary):
        print(line)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _find(rows: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r[k] == v for k, v in kw.items()):
            return r
    return None


def summarize(rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Speed-ups at the longest context: TPOT ratio per batch, throughput ratio under budget."""
    ctx = max(args.contexts)
    out: dict[str, Any] = {"context": ctx, "tpot_speedup": {}, "floor_ratio": {}}
    for b in args.batch_sizes:
        h = _find(rows, figure="equal_batch", model="hybrid", context=ctx, batch_size=b)
        m = _find(rows, figure="equal_batch", model="all_mla", context=ctx, batch_size=b)
        if h and m:
            out["tpot_speedup"][str(b)] = m["tpot_ms"] / h["tpot_ms"]
            out["floor_ratio"][str(b)] = m["floor_ms"] / h["floor_ms"]
    h = _find(rows, figure="throughput", model="hybrid", context=ctx)
    m = _find(rows, figure="throughput", model="all_mla", context=ctx)
    if h:
        out["throughput_hybrid"] = {
            "batch_size": h["batch_size"],
            "tokens_per_s": h["tokens_per_s"],
        }
    if m:
        out["throughput_all_mla"] = {
            "batch_size": m["batch_size"],
            "tokens_per_s": m["tokens_per_s"],
        }
    if h and m:
        out["throughput_ratio"] = h["tokens_per_s"] / m["tokens_per_s"]
        out["tpot_ratio_at_max_batch"] = m["tpot_ms"] / h["tpot_ms"]
    return out


def summary_lines(s: dict[str, Any]) -> list[str]:
    ctx = common.fmt_tokens(s["context"])
    lines = [
        f"at {ctx}: all-MLA TPOT / hybrid TPOT = {v:.2f}x at batch {b} (bytes floor {s['floor_ratio'][b]:.2f}x)"
        for b, v in s["tpot_speedup"].items()
    ]
    if "throughput_ratio" in s:
        lines.append(
            f"at {ctx} under the memory budget: hybrid batch {s['throughput_hybrid']['batch_size']} "
            f"{s['throughput_hybrid']['tokens_per_s']:.3g} tok/s vs all-MLA batch "
            f"{s['throughput_all_mla']['batch_size']} {s['throughput_all_mla']['tokens_per_s']:.3g} tok/s: "
            f"{s['throughput_ratio']:.2f}x throughput"
        )
    elif "throughput_hybrid" in s:
        lines.append(
            f"at {ctx} under the memory budget only the hybrid fits "
            f"(batch {s['throughput_hybrid']['batch_size']})"
        )
    return lines


def render_console(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'figure':>11} {'model':>8} {'context':>8} {'batch':>5} {'TPOT ms':>9} {'tok/s':>9} "
        f"{'floor ms':>9} {'x floor':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['figure']:>11} {r['model']:>8} {common.fmt_tokens(r['context']):>8} {r['batch_size']:>5} "
            f"{r['tpot_ms']:>9.3g} {r['tokens_per_s']:>9.3g} {r['floor_ms']:>9.3g} {r['measured_over_floor']:>8.3g}"
        )
    return "\n".join(lines)


def render_markdown(
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    args: argparse.Namespace,
    config: KimiLinearConfig,
    device: torch.device,
    bw: float,
    bw_source: str,
    budget: int,
    weights: dict[str, dict[str, Any]],
    threads: int | None,
) -> str:
    out = [
        f"# Decode: {config.name} hybrid vs all-MLA\n\n",
        f"{hardware.device_name(device)}"
        + (f", {threads} thread(s)" if threads else "")
        + f", {args.dtype} weights and caches; model: {workload.model_flags(args)}"
        + f" ({len(config.kda_layers)} KDA + {len(config.mla_layers)} MLA layers; weights "
        f"{common.fmt_bytes(weights['hybrid']['bytes'])} hybrid, {common.fmt_bytes(weights['all_mla']['bytes'])} "
        f"all-MLA). Synthetic cache fill; {args.steps} greedy steps x {args.reps} repetitions after "
        f"{args.warmup} warm-up; TPOT = median [min, max]. Floor = (active weights + cache) / "
        f"{bw / 1e9:.1f} GB/s ({bw_source}).\n\n",
        "## (a) Equal batch\n\n",
    ]
    table = []
    for r in rows:
        if r["figure"] != "equal_batch":
            continue
        other = _find(
            rows,
            figure="equal_batch",
            model="all_mla",
            context=r["context"],
            batch_size=r["batch_size"],
        )
        table.append(
            {
                "context": common.fmt_tokens(r["context"]),
                "batch": r["batch_size"],
                "model": MODEL_LABELS[r["model"]],
                "TPOT (ms)": f"{r['tpot_ms']:.3g} [{r['tpot_min_ms']:.3g}, {r['tpot_max_ms']:.3g}]",
                "tokens/s": f"{r['tokens_per_s']:.3g}",
                "bytes/step": common.fmt_bytes(r["step_bytes"]),
                "floor (ms)": f"{r['floor_ms']:.3g}",
                "measured / floor": f"{r['measured_over_floor']:.2f}",
                "all-MLA / hybrid TPOT": f"{other['tpot_ms'] / r['tpot_ms']:.2f}x"
                if other and r["model"] == "hybrid"
                else "",
            }
        )
    out.append(report.markdown_table(table))
    thr = [r for r in rows if r["figure"] == "throughput"]
    if thr:
        out.append(
            f"\n## (b) Throughput at the largest batch within {common.fmt_bytes(budget)} "
            f"(weights + caches, batch <= {args.max_batch})\n\n"
        )
        table = []
        for ctx in args.contexts:
            h = _find(thr, model="hybrid", context=ctx)
            m = _find(thr, model="all_mla", context=ctx)
            table.append(
                {
                    "context": common.fmt_tokens(ctx),
                    "hybrid batch": h["batch_size"] if h else "does not fit",
                    "hybrid tokens/s": f"{h['tokens_per_s']:.3g}" if h else "-",
                    "all-MLA batch": m["batch_size"] if m else "does not fit",
                    "all-MLA tokens/s": f"{m['tokens_per_s']:.3g}" if m else "-",
                    "throughput ratio": f"{h['tokens_per_s'] / m['tokens_per_s']:.2f}x"
                    if h and m
                    else "-",
                }
            )
        out.append(report.markdown_table(table))
    out.append("\n" + "\n".join(f"- {line}" for line in summary_lines(summary)) + "\n")
    return "".join(out)


def plot(fig: Any, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    thr = [r for r in rows if r["figure"] == "throughput"]
    axes = fig.subplots(1, 2 if thr else 1)
    ax = axes[0] if thr else axes
    colors = {"hybrid": "tab:blue", "all_mla": "tab:red"}
    markers = ["o", "s", "^", "D"]
    for i, b in enumerate(args.batch_sizes):
        for name, color in colors.items():
            pts = sorted(
                (r["context"], r["tpot_ms"], r["floor_ms"])
                for r in rows
                if r["figure"] == "equal_batch" and r["model"] == name and r["batch_size"] == b
            )
            if not pts:
                continue
            x, y, f = zip(*pts)
            ax.plot(
                x,
                y,
                color=color,
                marker=markers[i % len(markers)],
                label=f"{MODEL_LABELS[name]}, batch {b}",
            )
            ax.plot(
                x,
                f,
                color=color,
                linestyle=":",
                alpha=0.7,
                label="bytes floor" if i == 0 and name == "hybrid" else None,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time per output token (ms)")
    ax.set_title("(a) TPOT at equal batch (dotted: floor)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if thr:
        ax2 = axes[1]
        for name, color in colors.items():
            pts = sorted(
                (r["context"], r["tokens_per_s"], r["batch_size"])
                for r in thr
                if r["model"] == name
            )
            if not pts:
                continue
            x, y, bs = zip(*pts)
            ax2.plot(x, y, color=color, marker="o", label=MODEL_LABELS[name])
            for xi, yi, bi in pts:
                ax2.annotate(
                    f"B={bi}",
                    (xi, yi),
                    textcoords="offset points",
                    xytext=(3, 4),
                    fontsize=7,
                    color=color,
                )
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xlabel("context (tokens)")
        ax2.set_ylabel("decode throughput (tokens/s)")
        ax2.set_title("(b) largest batch within the memory budget")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=7)
    fig.set_size_inches(12 if thr else 7, 4.8)


if __name__ == "__main__":
    common.run_main(main, "use shorter --contexts or smaller --batch-sizes")
