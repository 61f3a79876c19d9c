"""KV-cache size of a Kimi Linear model against full-attention baselines, analytic and measured.

For one preset (default: the Kimi-Linear-48B-A3B layout) this script compares, at each context
length, the decode cache of three models with the same depth and width:

* **hybrid**: the preset itself (KDA layers keep a constant fp32 state and three short-conv
  tails, MLA layers keep ``kv_lora_rank + qk_rope_head_dim`` values per token);
* **all-MLA**: ``config.all_mla_twin()``, every layer MLA (the paper's full-attention baseline);
* **GQA**: a conventional grouped-query attention model of equal width, defined as: the same
  number of layers, all full attention, ``num_attention_heads`` query heads sharing
  ``--gqa-kv-heads`` (default 8, capped at the query heads) key/value heads, keys of the MLA
  query/key head dim (``qk_nope + qk_rope``) and values of ``v_head_dim``, both cached. For the
  48B layout: 27 layers x 8 x (192 + 128) = 2560 values per token per layer (MLA: 576).

"analytic" is :meth:`KimiLinearConfig.kv_cache_bytes`. "measured" allocates the kit's own cache
objects (``HybridCache.from_config(..., capacity=context)``), fills them as after ``context``
tokens (random latents, fp32 states; :func:`workload.fill_cache_`) and sums the bytes of their
tensors (``HybridCache.nbytes``), as long as the allocation fits in ``--measure-budget-gb`` (and
free memory); longer contexts are analytic only. Measured must equal analytic to the byte: the
script exits 1 otherwise. The allocator's view (resident-set growth on CPU,
``torch.cuda.memory_allocated`` growth on GPU) is recorded beside it.

A second table is the bytes floor of one decode step (active weights + cache or state, read
once) for the hybrid and the all-MLA model at several batch sizes, with the time it implies on
an H100 (3.35 TB/s) and an H200 (4.8 TB/s). Active weights are counted on a ``meta``-device
model: every dense weight, the routed experts a batch is expected to hit under uniform routing,
and the embedding rows looked up.

Example::

    python -m benchmarks.kv_cache --preset kimi-linear-48b-a3b --measure-budget-gb 6
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks import common, hardware, report, timing, workload
from kimi_linear.cache import HybridCache
from kimi_linear.config import KimiLinearConfig

DEFAULT_CONTEXTS = [4 << 10, 32 << 10, 128 << 10, 512 << 10, 1 << 20]
QUICK_CONTEXTS = [1 << 10, 2 << 10, 4 << 10]
FLOOR_DEVICES = {"H100": timing.NOMINAL_BANDWIDTH["H100"], "H200": timing.NOMINAL_BANDWIDTH["H200"]}


@dataclass(frozen=True)
class GQABaseline:
    """A full-attention GQA model of the same depth and width: K and V cached explicitly."""

    num_layers: int
    num_kv_heads: int
    k_head_dim: int
    v_head_dim: int

    @classmethod
    def from_config(cls, config: KimiLinearConfig, kv_heads: int) -> GQABaseline:
        return cls(
            config.num_hidden_layers,
            min(kv_heads, config.num_attention_heads),
            config.qk_head_dim,
            config.v_head_dim,
        )

    @property
    def values_per_token_layer(self) -> int:
        return self.num_kv_heads * (self.k_head_dim + self.v_head_dim)

    def cache_bytes(self, seq_len: int, batch_size: int, dtype_bytes: int) -> int:
        return batch_size * seq_len * self.num_layers * self.values_per_token_layer * dtype_bytes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description="KV-cache bytes of a Kimi Linear preset vs its all-MLA twin and a GQA "
        "baseline: analytic, and measured on the kit's cache objects.",
        formatter_class=common.HelpFormatter,
    )
    workload.add_model_args(p, default_preset="kimi-linear-48b-a3b")
    p.add_argument(
        "--contexts",
        type=common.size_list(1),
        default=None,
        help="context lengths (tokens; K/M suffixes); default 4K,32K,128K,512K,1M "
        "(quick: 1K,2K,4K)",
    )
    p.add_argument("--batch-size", type=common.positive_int, default=1, help="sequences per cache")
    p.add_argument(
        "--dtype", default="bf16", help="dtype of latents and conv tails (KDA states are fp32)"
    )
    p.add_argument(
        "--device", default="cpu", help="where measured caches are allocated: cpu, cuda, auto"
    )
    p.add_argument(
        "--gqa-kv-heads",
        type=common.positive_int,
        default=8,
        help="KV heads of the GQA baseline (capped at num_attention_heads)",
    )
    p.add_argument(
        "--measure-budget-gb",
        type=common.positive_float,
        default=None,
        help="largest cache to allocate for measurement (GB, decimal); default: half "
        "the free memory. Larger caches are reported analytically.",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="every context must be measured: exit 3 if one does not fit",
    )
    p.add_argument(
        "--floor-batch-sizes",
        type=common.size_list(1),
        default=[1, 8, 64],
        help="batch sizes of the analytic decode-floor table",
    )
    p.add_argument("--no-floor", action="store_true", help="skip the analytic decode-floor table")
    p.add_argument("--quick", action="store_true", help="short contexts only (smoke test, seconds)")
    p.add_argument(
        "--out-dir", default=None, help="output folder (default: benchmarks/results/<device>/)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic cache contents")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.contexts is None:
        args.contexts = QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS
    return args


def measure_cache(
    config: KimiLinearConfig,
    context: int,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> dict[str, int | None]:
    """Allocate and fill the kit's cache for ``context`` tokens; return its byte counts.

    ``nbytes``: summed from the cache's tensors. ``allocator``: growth of resident memory (CPU)
    or of ``torch.cuda.memory_allocated`` (GPU) while the cache exists, or ``None``.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = hardware.process_resident_bytes()
    cache = HybridCache.from_config(
        config, batch_size, capacity=context, device=device, dtype=dtype
    )
    workload.fill_cache_(cache, context, seed=seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        after: int | None = torch.cuda.memory_allocated(device)
    else:
        after = hardware.process_resident_bytes()
    nbytes = cache.nbytes()
    if cache.seq_len != context:
        raise RuntimeError(f"filled cache reports seq_len {cache.seq_len}, expected {context}")
    del cache  # freed here: nothing else refers to it
    return {
        "nbytes": nbytes,
        "allocator": None if before is None or after is None else after - before,
    }


def decode_floor(
    configs: dict[str, KimiLinearConfig],
    contexts: list[int],
    batch_sizes: list[int],
    dtype_bytes: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Bytes floor of one decode step for each model, context and batch (meta-device models)."""
    from kimi_linear.model import KimiLinearForCausalLM

    weights: dict[str, dict[int, dict[str, float]]] = {}
    for name, cfg in configs.items():
        with torch.device("meta"):
            model = KimiLinearForCausalLM(cfg)
        weights[name] = {
            b: workload.active_weight_bytes(model, b, dtype_bytes) for b in batch_sizes
        }
        del model
    rows = []
    for ctx in contexts:
        for b in batch_sizes:
            row: dict[str, Any] = {"context": ctx, "batch_size": b}
            for name, cfg in configs.items():
                w = weights[name][b]["total"]
                c = workload.cache_read_bytes(cfg, ctx, b, dtype_bytes)
                row[f"{name}_weight_bytes"] = w
                row[f"{name}_cache_bytes"] = c
                row[f"{name}_step_bytes"] = w + c
                for dev, bw in FLOOR_DEVICES.items():
                    row[f"{name}_floor_ms_{dev}"] = (w + c) / bw * 1e3
            row["floor_ratio"] = row["all_mla_step_bytes"] / row["hybrid_step_bytes"]
            rows.append(row)
    info = {
        name: {
            "all_params_bytes": weights[name][batch_sizes[0]]["all_params"],
            "active_weight_bytes": {str(b): weights[name][b]["total"] for b in batch_sizes},
        }
        for name in configs
    }
    return rows, info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = common.parse_dtype(args.dtype)
    device = hardware.resolve_device(args.device)
    config = workload.config_from_args(args)
    twin = config.all_mla_twin()
    gqa = GQABaseline.from_config(config, args.gqa_kv_heads)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    free = hardware.available_memory(device)
    budget = int(args.measure_budget_gb * 1e9) if args.measure_budget_gb else free // 2
    budget = min(budget, int(0.85 * free))
    models = {"hybrid": config, "all_mla": twin}

    print(
        f"kv_cache: {config.name} ({len(config.kda_layers)} KDA + {len(config.mla_layers)} MLA layers), "
        f"batch {args.batch_size}, {args.dtype} latents, fp32 KDA states; measuring on "
        f"{hardware.device_name(device)} up to {common.fmt_bytes(budget)} per cache"
    )

    todo = [(ctx, name) for ctx in args.contexts for name in models]
    measured: dict[tuple[int, str], dict[str, int | None]] = {}
    for ctx, name in report.progress(todo, "allocating caches", enabled=not args.no_progress):
        need = models[name].kv_cache_bytes(ctx, args.batch_size, cache_dtype_bytes=dtype_bytes)[
            "total"
        ]
        if need > budget:
            if args.strict:
                common.fail(
                    f"the {name} cache at context {ctx} (batch {args.batch_size}) needs "
                    f"{common.fmt_bytes(need)}, more than the {common.fmt_bytes(budget)} this run "
                    f"may allocate on {hardware.device_name(device)} ({common.fmt_bytes(free)} free)",
                    code=3,
                )
            continue
        measured[(ctx, name)] = measure_cache(
            models[name], ctx, args.batch_size, dtype, device, args.seed
        )

    rows: list[dict[str, Any]] = []
    mismatches = []
    for ctx in args.contexts:
        row: dict[str, Any] = {"context": ctx}
        for name, cfg in models.items():
            analytic = cfg.kv_cache_bytes(ctx, args.batch_size, cache_dtype_bytes=dtype_bytes)
            m = measured.get((ctx, name))
            row[f"{name}_analytic_bytes"] = analytic["total"]
            row[f"{name}_mla_bytes"] = analytic["mla"]
            row[f"{name}_kda_bytes"] = analytic["kda_state"] + analytic["kda_conv"]
            row[f"{name}_measured_bytes"] = None if m is None else m["nbytes"]
            row[f"{name}_allocator_bytes"] = None if m is None else m["allocator"]
            if m is not None and m["nbytes"] != analytic["total"]:
                mismatches.append((ctx, name, m["nbytes"], analytic["total"]))
        row["gqa_analytic_bytes"] = gqa.cache_bytes(ctx, args.batch_size, dtype_bytes)
        row["hybrid_over_all_mla"] = row["hybrid_analytic_bytes"] / row["all_mla_analytic_bytes"]
        row["reduction_vs_all_mla_pct"] = 100.0 * (1.0 - row["hybrid_over_all_mla"])
        row["reduction_vs_gqa_pct"] = (
            100.0 * (1.0 - row["hybrid_analytic_bytes"] / row["gqa_analytic_bytes"])
            if row["gqa_analytic_bytes"]
            else None
        )
        rows.append(row)

    floor_rows: list[dict[str, Any]] = []
    floor_info: dict[str, Any] = {}
    floor_note = None
    if not args.no_floor:
        try:
            floor_rows, floor_info = decode_floor(
                models, args.contexts, args.floor_batch_sizes, dtype_bytes
            )
        except ImportError as e:
            floor_note = f"decode floor skipped: the model is not importable ({e})"
            print(floor_note, file=sys.stderr)

    last = rows[-1]
    summary = {
        "context": last["context"],
        "hybrid_bytes": last["hybrid_analytic_bytes"],
        "all_mla_bytes": last["all_mla_analytic_bytes"],
        "gqa_bytes": last["gqa_analytic_bytes"],
        "reduction_vs_all_mla_pct": last["reduction_vs_all_mla_pct"],
        "reduction_vs_gqa_pct": last["reduction_vs_gqa_pct"],
        "largest_measured_context": {
            name: max((c for (c, n) in measured if n == name), default=None) for name in models
        },
        "measured_equals_analytic": not mismatches,
        "num_measured": len(measured),
    }
    if floor_rows:
        b1 = [
            r
            for r in floor_rows
            if r["context"] == last["context"] and r["batch_size"] == args.floor_batch_sizes[0]
        ][0]
        bn = [
            r
            for r in floor_rows
            if r["context"] == last["context"] and r["batch_size"] == args.floor_batch_sizes[-1]
        ][0]
        summary["floor_ratio_first_batch"] = b1["floor_ratio"]
        summary["floor_ratio_last_batch"] = bn["floor_ratio"]
        summary["floor_ratio_cache_only_limit"] = len(twin.mla_layers) / max(
            len(config.mla_layers), 1
        )

    payload = {
        "args": {k: v for k, v in vars(args).items()},
        "config": config.to_dict(),
        "models": {
            "hybrid": {
                "name": config.name,
                "kda_layers": len(config.kda_layers),
                "mla_layers": len(config.mla_layers),
            },
            "all_mla": {"name": twin.name, "kda_layers": 0, "mla_layers": len(twin.mla_layers)},
            "gqa": {
                "layers": gqa.num_layers,
                "kv_heads": gqa.num_kv_heads,
                "k_head_dim": gqa.k_head_dim,
                "v_head_dim": gqa.v_head_dim,
                "values_per_token_layer": gqa.values_per_token_layer,
            },
        },
        "dtype_bytes": dtype_bytes,
        "measure_budget_bytes": budget,
        "rows": rows,
        "floor_rows": floor_rows,
        "floor_models": floor_info,
        "floor_bandwidths": FLOOR_DEVICES,
        "floor_note": floor_note,
        "summary": summary,
    }
    md = render_markdown(args, config, twin, gqa, rows, floor_rows, floor_info, budget, device)
    paths = report.save_results(
        "kv_cache",
        device,
        payload,
        md,
        plot=lambda fig: plot(fig, rows, floor_rows, args),
        out_dir=args.out_dir,
        quick=args.quick,
    )

    print(render_console(rows))
    if floor_rows:
        print(
            f"decode floor at {common.fmt_tokens(last['context'])}: all-MLA / hybrid bytes per step "
            f"{summary['floor_ratio_first_batch']:.2f}x at batch {args.floor_batch_sizes[0]}, "
            f"{summary['floor_ratio_last_batch']:.2f}x at batch {args.floor_batch_sizes[-1]} "
            f"(cache-only limit {summary['floor_ratio_cache_only_limit']:.2f}x)"
        )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if mismatches:
        for ctx, name, got, want in mismatches:
            print(
                f"error: {name} cache at context {ctx}: measured {got} bytes != analytic {want}",
                file=sys.stderr,
            )
        return 1
    return 0


def render_console(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'context':>8} {'hybrid':>10} {'all-MLA':>10} {'GQA':>10} {'Δ vs MLA':>8} {'Δ vs GQA':>8}  measured"
    ]
    for r in rows:
        meas = (
            "/".join(n for n in ("hybrid", "all_mla") if r[f"{n}_measured_bytes"] is not None)
            or "-"
        )
        lines.append(
            f"{common.fmt_tokens(r['context']):>8} {common.fmt_bytes(r['hybrid_analytic_bytes']):>10} "
            f"{common.fmt_bytes(r['all_mla_analytic_bytes']):>10} {common.fmt_bytes(r['gqa_analytic_bytes']):>10} "
            f"{-r['reduction_vs_all_mla_pct']:>7.1f}% {-(r['reduction_vs_gqa_pct'] or 0):>7.1f}%  {meas}"
        )
    return "\n".join(lines)


def render_markdown(
    args: argparse.Namespace,
    config: KimiLinearConfig,
    twin: KimiLinearConfig,
    gqa: GQABaseline,
    rows: list[dict[str, Any]],
    floor_rows: list[dict[str, Any]],
    floor_info: dict[str, Any],
    budget: int,
    device: torch.device,
) -> str:
    n_mla, n_kda = len(config.mla_layers), len(config.kda_layers)
    out = [
        f"# KV cache: {config.name} vs all-MLA vs GQA\n\n",
        f"Batch {args.batch_size}, {args.dtype} latents / K / V, fp32 KDA states. Hybrid: {n_kda} KDA + "
        f"{n_mla} MLA layers; all-MLA: {len(twin.mla_layers)} MLA layers "
        f"({config.kv_lora_rank} + {config.qk_rope_head_dim} values per token per layer); GQA: "
        f"{gqa.num_layers} layers x {gqa.num_kv_heads} KV heads x ({gqa.k_head_dim} + {gqa.v_head_dim}) "
        f"= {gqa.values_per_token_layer} values per token per layer. Measured = bytes of the kit's "
        f"filled `HybridCache` tensors on {hardware.device_name(device)} (caches up to "
        f"{common.fmt_bytes(budget)}); `-` = analytic only. Decimal units (1 GB = 1e9 B).\n\n",
    ]
    table = []
    for r in rows:
        table.append(
            {
                "context": common.fmt_tokens(r["context"]),
                "hybrid (analytic)": common.fmt_bytes(r["hybrid_analytic_bytes"]),
                "hybrid (measured)": common.fmt_bytes(r["hybrid_measured_bytes"]),
                "all-MLA (analytic)": common.fmt_bytes(r["all_mla_analytic_bytes"]),
                "all-MLA (measured)": common.fmt_bytes(r["all_mla_measured_bytes"]),
                "GQA (analytic)": common.fmt_bytes(r["gqa_analytic_bytes"]),
                "hybrid / all-MLA": f"{r['hybrid_over_all_mla']:.3f}",
                "reduction vs all-MLA": f"{r['reduction_vs_all_mla_pct']:.1f}%",
                "reduction vs GQA": f"{r['reduction_vs_gqa_pct']:.1f}%",
            }
        )
    out.append(report.markdown_table(table))
    measured_any = [
        r
        for r in rows
        if r["hybrid_measured_bytes"] is not None or r["all_mla_measured_bytes"] is not None
    ]
    if measured_any:
        ok = all(
            r[f"{n}_measured_bytes"] in (None, r[f"{n}_analytic_bytes"])
            for r in rows
            for n in ("hybrid", "all_mla")
        )
        out.append(
            f"\nMeasured equals analytic to the byte: **{'yes' if ok else 'NO'}** "
            f"({sum((r['hybrid_measured_bytes'] is not None) + (r['all_mla_measured_bytes'] is not None) for r in rows)} caches).\n"
        )
    if floor_rows:
        out.append("\n## Decode bytes floor (analytic)\n\n")
        out.append(
            "Bytes one decode step must read: active weights (dense weights, expected distinct routed "
            "experts under uniform routing, looked-up embedding rows) + the whole cache or state, at "
            f"{args.dtype} weights and latents. Floor time = bytes / bandwidth (H100 3.35 TB/s, H200 "
            "4.8 TB/s). Ratio = all-MLA bytes / hybrid bytes; it tends to "
            f"{len(twin.mla_layers)}/{n_mla} = {len(twin.mla_layers) / max(n_mla, 1):.2f} when the cache dominates.\n"
        )
        info = floor_info
        out.append(
            f"\nAll weights: hybrid {common.fmt_bytes(info['hybrid']['all_params_bytes'])}, all-MLA "
            f"{common.fmt_bytes(info['all_mla']['all_params_bytes'])}.\n\n"
        )
        table = []
        for r in floor_rows:
            table.append(
                {
                    "context": common.fmt_tokens(r["context"]),
                    "batch": r["batch_size"],
                    "hybrid weights": common.fmt_bytes(r["hybrid_weight_bytes"]),
                    "all-MLA weights": common.fmt_bytes(r["all_mla_weight_bytes"]),
                    "hybrid cache": common.fmt_bytes(r["hybrid_cache_bytes"]),
                    "all-MLA cache": common.fmt_bytes(r["all_mla_cache_bytes"]),
                    "hybrid floor H100 (ms)": f"{r['hybrid_floor_ms_H100']:.3g}",
                    "all-MLA floor H100 (ms)": f"{r['all_mla_floor_ms_H100']:.3g}",
                    "hybrid floor H200 (ms)": f"{r['hybrid_floor_ms_H200']:.3g}",
                    "all-MLA floor H200 (ms)": f"{r['all_mla_floor_ms_H200']:.3g}",
                    "ratio": f"{r['floor_ratio']:.2f}x",
                }
            )
        out.append(report.markdown_table(table))
    return "".join(out)


def plot(
    fig: Any, rows: list[dict[str, Any]], floor_rows: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    ctx = [r["context"] for r in rows]
    axes = fig.subplots(1, 2 if floor_rows else 1)
    ax = axes[0] if floor_rows else axes
    styles = {
        "hybrid": ("tab:blue", "hybrid (KDA + MLA)"),
        "all_mla": ("tab:red", "all-MLA"),
        "gqa": ("tab:gray", "GQA baseline"),
    }
    for name, (color, label) in styles.items():
        ax.plot(
            ctx,
            [r[f"{name}_analytic_bytes"] / 1e9 for r in rows],
            color=color,
            label=label,
            linestyle="--" if name == "gqa" else "-",
        )
        if name != "gqa":
            pts = [
                (r["context"], r[f"{name}_measured_bytes"] / 1e9)
                for r in rows
                if r[f"{name}_measured_bytes"]
            ]
            if pts:
                ax.scatter(
                    *zip(*pts),
                    color=color,
                    marker="o",
                    zorder=3,
                    label="dots: measured (kit cache objects)" if name == "hybrid" else None,
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"cache per batch of {args.batch_size} (GB)")
    ax.set_title("decode cache size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if floor_rows:
        ax2 = axes[1]
        for b in args.floor_batch_sizes:
            pts = [(r["context"], r["floor_ratio"]) for r in floor_rows if r["batch_size"] == b]
            ax2.plot(*zip(*pts), marker="o", label=f"batch {b}")
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("context (tokens)")
        ax2.set_ylabel("all-MLA / hybrid bytes per step")
        ax2.set_title("decode bytes-floor ratio")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
    fig.set_size_inches(11, 4.5)


if __name__ == "__main__":
    common.run_main(main, "lower --measure-budget-gb")
