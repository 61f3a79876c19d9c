"""Prefill speed of a Kimi Linear model against its all-MLA twin, by prompt length.

A prompt of ``L`` tokens is prefilled through the decode cache in chunks of ``--chunk-size``
tokens (chunked prefill, as serving engines do, which bounds the activation memory): each chunk
runs the trunk (``model.model(chunk, cache=cache)``), continuing from the tokens already cached,
and only the last position goes through the LM head (the next-token logits a server needs; the
``[B, L, V]`` logits of every position are never materialised). KDA layers carry their state
from chunk to chunk; MLA layers attend over every cached token, so their cost per chunk grows
with the position and the total is quadratic in ``L``.

Reported: seconds per prefill (median [min, max] over ``--reps`` after ``--warmup``), prompt
tokens/s, and the all-MLA / hybrid time ratio (the paper: 2.3x at 512K, 2.9x at 1M on GPU).

Defaults: on CPU the ``small`` preset in fp32 at 1K, 4K and 16K tokens (chunks of 1024); on a
GPU the Kimi-Linear-48B-A3B layout with 16 routed experts (``--preset kimi-linear-48b-a3b
--experts 16``) in bf16 at 4K to 1M tokens (chunks of 16K).

Example::

    python -m benchmarks.prefill --preset small --lengths 1K,4K,16K --threads 1
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
        description="Chunked-prefill throughput vs prompt length: Kimi Linear hybrid vs its "
        "all-MLA twin.",
        formatter_class=common.HelpFormatter,
    )
    workload.add_model_args(p, default_preset=None)
    p.add_argument(
        "--lengths",
        type=common.size_list(1),
        default=None,
        help="prompt lengths (tokens; K/M suffixes). Default: CPU 1K,4K,16K; GPU "
        "4K,32K,128K,512K,1M; quick 128,512",
    )
    p.add_argument(
        "--chunk-size",
        type=common.positive_int,
        default=None,
        help="tokens per prefill chunk (default: CPU 1024, GPU 16K, quick 128)",
    )
    p.add_argument(
        "--batch-size", type=common.positive_int, default=1, help="prompts prefilled together"
    )
    p.add_argument(
        "--reps",
        type=common.positive_int,
        default=None,
        help="timed repetitions (default: CPU 1, GPU 3)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed warm-up prefills of one chunk before each model's first length",
    )
    common.add_timed_run_args(
        p,
        quick_help="tiny preset and lengths (smoke test, seconds)",
        seed_help="seed of weights and tokens",
    )
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error(f"argument --warmup: must be >= 0, got {args.warmup}")
    return args


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    gpu = device.type == "cuda"
    workload.default_preset_(args, gpu)
    if args.lengths is None:
        args.lengths = (
            [128, 512]
            if args.quick
            else (
                [4 << 10, 32 << 10, 128 << 10, 512 << 10, 1 << 20]
                if gpu
                else [1 << 10, 4 << 10, 16 << 10]
            )
        )
    if args.chunk_size is None:
        args.chunk_size = 128 if args.quick else (16 << 10 if gpu else 1024)
    if args.reps is None:
        args.reps = 1 if args.quick or not gpu else 3
    if args.dtype is None:
        args.dtype = "bf16" if gpu else "fp32"


def working_bytes(
    config: KimiLinearConfig, length: int, chunk: int, batch: int, dtype_bytes: int
) -> int:
    """Upper estimate of one chunk's temporaries: hidden states and MoE / MLP activations of the
    chunk, per-head K / V of every cached token (MLA's plain path) and, should attention fall
    back to the unfused math, its fp32 ``[B, H, chunk, L]`` scores."""
    c = min(chunk, length)
    act = (
        batch
        * c
        * (
            8 * config.hidden_size
            + 3
            * max(
                config.intermediate_size,
                config.moe_intermediate_size * config.num_experts_per_token,
            )
        )
        * 4
    )
    kda = batch * c * config.kda_num_heads * config.kda_head_dim * 16 * 4
    if not config.mla_layers:
        return act + kda + (64 << 20)
    kv = (
        batch
        * length
        * config.num_attention_heads
        * (config.qk_head_dim + config.v_head_dim)
        * dtype_bytes
        * 2
    )
    scores = batch * config.num_attention_heads * c * length * 4 * 2
    return act + kda + kv + scores + (64 << 20)


def prefill(
    model: KimiLinearForCausalLM, ids: torch.Tensor, chunk: int, dtype: torch.dtype
) -> torch.Tensor:
    """Prefill ``ids: [B, L]`` chunk by chunk into a fresh cache; next-token logits ``[B, V]``."""
    B, L = ids.shape
    cache = model.new_cache(B, capacity=L, dtype=dtype)
    hidden = None
    for start in range(0, L, chunk):
        hidden = model.model(ids[:, start : start + chunk], cache=cache)
    if hidden is None or cache.seq_len != L:
        raise RuntimeError(f"prefill left the cache at {cache.seq_len} tokens, expected {L}")
    return model.lm_head(hidden[:, -1])


def measure_model(
    name: str,
    config: KimiLinearConfig,
    prompt: torch.Tensor,
    args: argparse.Namespace,
    dtype: torch.dtype,
    device: torch.device,
    tick: Any = None,
) -> list[dict[str, Any]]:
    """Build one model and time its chunked prefill at every ``args.lengths``."""
    model = workload.build_model(config, dtype, device, args.seed)
    rows = []
    with torch.inference_mode():
        for _ in range(args.warmup):
            prefill(
                model, prompt[:, : min(args.chunk_size, max(args.lengths))], args.chunk_size, dtype
            )
        for L in args.lengths:
            if tick is not None:
                tick()
            ids = prompt[:, :L]
            t = timing.timeit(
                lambda ids=ids: prefill(model, ids, args.chunk_size, dtype),
                device,
                warmup=0,
                reps=args.reps,
            )
            rows.append(
                {
                    "model": name,
                    "length": L,
                    "batch_size": args.batch_size,
                    "seconds": t["median"],
                    "seconds_min": t["min"],
                    "seconds_max": t["max"],
                    "tokens_per_s": args.batch_size * L / t["median"],
                }
            )
            gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = hardware.resolve_device(args.device)
    resolve_defaults(args, device)
    threads = hardware.set_threads(args.threads) if device.type == "cpu" else None
    dtype = common.parse_dtype(args.dtype)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    config = workload.config_from_args(args)
    models = {"hybrid": config, "all_mla": config.all_mla_twin()}

    free = hardware.available_memory(device)
    weights: dict[str, int] = {}
    for name, cfg in models.items():
        with torch.device("meta"):
            meta = KimiLinearForCausalLM(cfg)
        build = workload.active_weight_bytes(meta, 1, dtype_bytes=4)["all_params"]
        weights[name] = int(workload.active_weight_bytes(cast_model_(meta, dtype), 1)["all_params"])
        del meta
        for L in args.lengths:  # fail before allocating anything if a length cannot fit
            cache = cfg.kv_cache_bytes(L, args.batch_size, cache_dtype_bytes=dtype_bytes)["total"]
            need = max(
                build,
                weights[name]
                + cache
                + working_bytes(cfg, L, args.chunk_size, args.batch_size, dtype_bytes),
            )
            if need > 0.85 * free:
                common.fail(
                    f"prefilling {L} tokens (batch {args.batch_size}) with the {MODEL_LABELS[name]} model "
                    f"needs about {common.fmt_bytes(need)} (weights {common.fmt_bytes(weights[name])} + cache "
                    f"{common.fmt_bytes(cache)} + working memory), but only {common.fmt_bytes(free)} is free "
                    f"on {hardware.device_name(device)}; use shorter --lengths, a smaller --chunk-size or model",
                    code=3,
                )

    print(
        f"prefill: {config.name} ({len(config.kda_layers)} KDA + {len(config.mla_layers)} MLA layers) vs "
        f"all-MLA twin, {args.dtype}, batch {args.batch_size}, chunks of {args.chunk_size}, on "
        f"{hardware.device_name(device)}" + (f", {threads} thread(s)" if threads else "")
    )
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    prompt = torch.randint(
        0, config.vocab_size, (args.batch_size, max(args.lengths)), generator=gen
    ).to(device)

    rows: list[dict[str, Any]] = []
    bar = report.progress(
        range(len(models) * len(args.lengths)), "prefill", enabled=not args.no_progress
    )
    ticks = iter(bar)
    for name, cfg in models.items():
        rows += measure_model(
            name, cfg, prompt, args, dtype, device, tick=lambda: next(ticks, None)
        )
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for _ in ticks:
        pass

    for r in rows:
        if r["model"] == "hybrid":
            m = next(x for x in rows if x["model"] == "all_mla" and x["length"] == r["length"])
            r["all_mla_over_hybrid"] = m["seconds"] / r["seconds"]
    longest = max(args.lengths)
    h = next(r for r in rows if r["model"] == "hybrid" and r["length"] == longest)
    summary = {
        "length": longest,
        "hybrid_tokens_per_s": h["tokens_per_s"],
        "all_mla_tokens_per_s": next(
            r for r in rows if r["model"] == "all_mla" and r["length"] == longest
        )["tokens_per_s"],
        "speedup": h["all_mla_over_hybrid"],
    }
    payload = {
        "args": vars(args),
        "config": config.to_dict(),
        "threads": threads,
        "weights_bytes": weights,
        "rows": rows,
        "summary": summary,
    }
    md = render_markdown(rows, summary, args, config, device, threads)
    paths = report.save_results(
        "prefill",
        device,
        payload,
        md,
        plot=lambda fig: plot(fig, rows),
        out_dir=args.out_dir,
        quick=args.quick,
    )
    print(f"{'model':>8} {'length':>7} {'seconds':>9} {'tok/s':>9} {'MLA/hybrid':>10}")
    for r in rows:
        ratio = f"{r['all_mla_over_hybrid']:.2f}x" if "all_mla_over_hybrid" in r else ""
        print(
            f"{r['model']:>8} {common.fmt_tokens(r['length']):>7} {r['seconds']:>9.3g} {r['tokens_per_s']:>9.3g} {ratio:>10}"
        )
    print(
        f"at {common.fmt_tokens(longest)}: all-MLA prefill time / hybrid = {summary['speedup']:.2f}x"
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def render_markdown(
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    args: argparse.Namespace,
    config: KimiLinearConfig,
    device: torch.device,
    threads: int | None,
) -> str:
    out = [
        f"# Prefill: {config.name} hybrid vs all-MLA\n\n",
        f"{hardware.device_name(device)}"
        + (f", {threads} thread(s)" if threads else "")
        + f", {args.dtype}; model {workload.model_flags(args)}"
        + f" ({len(config.kda_layers)} KDA + {len(config.mla_layers)} MLA layers); batch {args.batch_size}; "
        f"chunked prefill through the cache, {args.chunk_size} tokens per chunk; time = median "
        f"[min, max] of {args.reps} run(s).\n\n",
    ]
    table = []
    for L in args.lengths:
        h = next(r for r in rows if r["model"] == "hybrid" and r["length"] == L)
        m = next(r for r in rows if r["model"] == "all_mla" and r["length"] == L)
        table.append(
            {
                "length": common.fmt_tokens(L),
                "hybrid (s)": f"{h['seconds']:.3g} [{h['seconds_min']:.3g}, {h['seconds_max']:.3g}]",
                "hybrid tokens/s": f"{h['tokens_per_s']:.3g}",
                "all-MLA (s)": f"{m['seconds']:.3g} [{m['seconds_min']:.3g}, {m['seconds_max']:.3g}]",
                "all-MLA tokens/s": f"{m['tokens_per_s']:.3g}",
                "all-MLA / hybrid time": f"{h['all_mla_over_hybrid']:.2f}x",
            }
        )
    out.append(report.markdown_table(table))
    out.append(
        f"\nAt {common.fmt_tokens(summary['length'])} tokens the hybrid prefills "
        f"{summary['speedup']:.2f}x faster than the all-MLA twin.\n"
    )
    return "".join(out)


def plot(fig: Any, rows: list[dict[str, Any]]) -> None:
    ax = fig.subplots()
    for name, color in (("hybrid", "tab:blue"), ("all_mla", "tab:red")):
        pts = sorted((r["length"], r["tokens_per_s"]) for r in rows if r["model"] == name)
        ax.plot(*zip(*pts), color=color, marker="o", label=MODEL_LABELS[name])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("prefill throughput (tokens/s)")
    ax.set_title("chunked prefill")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


if __name__ == "__main__":
    common.run_main(main, "use shorter --lengths or a smaller --chunk-size")
