"""CPU cost of the NaN isolation (issue 25): the same ops with it on and off, interleaved.

The chunked KDA ops and the MLA layer isolate non-finite tokens on every call, without a device
sync (:mod:`kimi_linear.ops.isolation`): they clean their inputs (``nan_to_num``), flag the bad
tokens (``(x * 0).sum(-1)``), run, and set the poisoned outputs to NaN (``torch.where``).
``KIMI_LINEAR_ISOLATE_NONFINITE=0`` turns it off. This script times, at each ``T``, on finite
inputs (the case that pays for it):

* ``torch_chunk_kda``: :func:`kimi_linear.ops.torch_chunk_kda` on the inputs of ``benchmarks/kda_cpu.py``
  (``B=1, H=4, K=V=64`` fp32 by default), forward (``no_grad``) and forward + backward;
* ``mla_prefill``: one MLA layer of the ``small`` preset (hidden 512, 4 heads, latent 256) on
  ``[1, T, 512]``, forward and forward + backward;
* ``mla_block``: the same layer continuing a cache of ``T`` tokens with a block of 4 (the
  absorbed path, ``no_grad``; the isolation then cleans the whole cached latent: its worst
  case). A single decode token (``T == 1``) adds no work at all and is not timed.

each with the isolation on and off, in interleaved rounds (every runner once per round, in a
rotating order, after a warm-up round), so that load from other processes hits both alike.
Rows give the minimum, median and maximum process CPU time (one thread: the ops' own cost,
little disturbed by other processes) and wall time; the overhead is ``on / off - 1`` of the
minima and medians of the same run.

Writes ``isolation_cpu.json`` and ``.md`` under ``benchmarks/results/cpu/`` (refused if they
exist, unless ``--overwrite``), or under ``--out-dir``.

Examples::

    python -m benchmarks.isolation_cpu                      # T = 1K, 4K; a minute or two
    python -m benchmarks.isolation_cpu --T 16K --reps 5 --out-dir /tmp/iso
    python -m benchmarks.isolation_cpu --quick --out-dir /tmp/iso   # seconds, for CI
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import common, hardware, report
from benchmarks.kda_cpu import Runner, make_inputs, time_interleaved
from kimi_linear.cache import LatentKVCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.mla import MLAttention
from kimi_linear.ops import torch_chunk_kda
from kimi_linear.ops.isolation import ISOLATION_ENV

NAME = "isolation_cpu"
DEFAULT_T = [1 << 10, 4 << 10]
CASES = ("torch_chunk_kda", "mla_prefill", "mla_block")
BLOCK = 4  # tokens of the mla_block case


def switched(op: Callable[..., Any], on: bool) -> Callable[..., Any]:
    """``op`` run with the isolation on or off (the switch is read on every call)."""

    def run(*args: Any) -> Any:
        os.environ[ISOLATION_ENV] = "1" if on else "0"
        return op(*args)

    return run


class BlockRunner:
    """``mla_block``: a block of :data:`BLOCK` tokens over a cache of ``T`` tokens, no grad
    (the cache is rewound after each call, so every call sees the same ``T``)."""

    def __init__(self, layer: MLAttention, prefix: torch.Tensor, x: torch.Tensor, on: bool):
        self.layer, self.x, self.on = layer, x, on
        self.cache = LatentKVCache(1, layer.kv_lora_rank, layer.rope_dim)
        self.T = prefix.shape[1]
        with torch.no_grad():
            layer(prefix, self.cache, 0)
        self.saved_MB = None

    def __call__(self) -> None:
        os.environ[ISOLATION_ENV] = "1" if self.on else "0"
        with torch.no_grad():
            self.layer(self.x, self.cache, self.T, absorb=True)
        self.cache.length = self.T  # rewind: the next call sees the same cache

    warmup = __call__


def runners_at(T: int, args: argparse.Namespace) -> dict[tuple[str, str, bool], Any]:
    """Every (case, pass, isolation) runner at length ``T``."""
    runners: dict[tuple[str, str, bool], Any] = {}
    gen = torch.Generator().manual_seed(1)
    if "torch_chunk_kda" in args.cases:
        base = make_inputs(1, T, args.heads, args.head_dim, args.head_dim)
        do = torch.randn(1, T, args.heads, args.head_dim, generator=gen)
        for pas in ("fwd", "fwd+bwd"):
            for on in (True, False):
                runners[("torch_chunk_kda", pas, on)] = Runner(
                    switched(torch_chunk_kda, on), pas, base, do
                )
    if "mla_prefill" in args.cases or "mla_block" in args.cases:
        cfg = KimiLinearConfig.from_preset(args.mla_preset)
        torch.manual_seed(0)
        layer = MLAttention(cfg)
        x = torch.randn(1, T, cfg.hidden_size, generator=gen)
        if "mla_prefill" in args.cases:
            do = torch.randn(1, T, cfg.hidden_size, generator=gen)
            mla = lambda h: (layer(h),)
            for pas in ("fwd", "fwd+bwd"):
                for on in (True, False):
                    runners[("mla_prefill", pas, on)] = Runner(switched(mla, on), pas, [x], do)
        if "mla_block" in args.cases:
            block = torch.randn(1, BLOCK, cfg.hidden_size, generator=gen)
            for on in (True, False):
                runners[("mla_block", "fwd", on)] = BlockRunner(layer, x, block, on)
    return runners


def bench_length(T: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    runners = runners_at(T, args)
    try:
        samples = time_interleaved(runners, args.reps, slow_s=float("inf"))
    finally:
        os.environ.pop(ISOLATION_ENV, None)
    rows = []
    for (case, pas, on), ts in samples.items():
        walls, cpus = [w for w, _ in ts], [c for _, c in ts]
        rows.append({
            "T": T, "case": case, "pass": pas, "isolation": on, "runs": len(walls),
            "ms": statistics.median(walls) * 1e3, "ms_min": min(walls) * 1e3,
            "ms_max": max(walls) * 1e3, "cpu_ms": statistics.median(cpus) * 1e3,
            "cpu_ms_min": min(cpus) * 1e3, "cpu_ms_max": max(cpus) * 1e3,
        })  # fmt: skip
        r = rows[-1]
        print(
            f"  T={common.fmt_tokens(T):>5} {case:<12} {pas:<8} isolation {'on ' if on else 'off'}"
            f" CPU ms min/median/max {r['cpu_ms_min']:.2f}/{r['cpu_ms']:.2f}/{r['cpu_ms_max']:.2f}"
            f", wall median {r['ms']:.2f}",
            flush=True,
        )
    return rows


def overheads(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``on / off - 1`` per (T, case, pass), of the process CPU time's medians and minima
    (one thread: what the ops cost, less disturbed by other processes than wall time) and of
    the wall medians."""
    by_key = {(r["T"], r["case"], r["pass"], r["isolation"]): r for r in rows}
    out = []
    for (T, case, pas, on), r in by_key.items():
        off = by_key.get((T, case, pas, False))
        if on and off is not None:
            out.append({
                "T": T, "case": case, "pass": pas,
                "cpu_overhead_median": r["cpu_ms"] / off["cpu_ms"] - 1,
                "cpu_overhead_min": r["cpu_ms_min"] / off["cpu_ms_min"] - 1,
                "wall_overhead_median": r["ms"] / off["ms"] - 1,
                "added_cpu_ms_min": r["cpu_ms_min"] - off["cpu_ms_min"],
            })  # fmt: skip
    return out


def to_markdown(
    rows: list[dict[str, Any]], over: list[dict[str, Any]], config: dict[str, Any], env: dict
) -> str:
    lines = [
        "# NaN isolation on CPU: the ops with it on and off",
        "",
        f"Device: {env['device']}, torch {env['torch']}, {config['threads']} thread(s). "
        f"torch_chunk_kda: B=1, H={config['heads']}, K=V={config['head_dim']}, fp32. MLA: one layer "
        f"of the `{config['mla_preset']}` preset, B=1, fp32; mla_block: {BLOCK} tokens over a "
        f"cache of T (absorbed, no_grad). {config['reps']} interleaved rounds after a warm-up "
        "round; process CPU ms and wall ms. Finite inputs (the isolation changes nothing on "
        f"them). 1-min load average {config['load_average_start']:.1f} at the start, "
        f"{config['load_average_end']:.1f} at the end.",
        "",
        f"Command: `{config['command']}`",
        "",
    ]
    shown = [
        {
            "T": common.fmt_tokens(r["T"]), "case": r["case"], "pass": r["pass"],
            "isolation": "on" if r["isolation"] else "off", "CPU ms (median)": r["cpu_ms"],
            "CPU min": r["cpu_ms_min"], "CPU max": r["cpu_ms_max"], "wall ms (median)": r["ms"],
            "wall min-max": f"{r['ms_min']:.1f}-{r['ms_max']:.1f}", "runs": r["runs"],
        }
        for r in rows
    ]  # fmt: skip
    lines += [
        report.markdown_table(shown),
        "",
        "Overhead of the isolation (on / off - 1; process CPU time, one thread, is what the ops "
        "cost; wall time also holds the other processes' load):",
        "",
    ]
    pct = lambda x: f"{x * 100:+.1f}%"
    shown = [
        {
            "T": common.fmt_tokens(o["T"]), "case": o["case"], "pass": o["pass"],
            "CPU (min)": pct(o["cpu_overhead_min"]), "CPU (median)": pct(o["cpu_overhead_median"]),
            "wall (median)": pct(o["wall_overhead_median"]),
            "added CPU ms (min)": o["added_cpu_ms_min"],
        }
        for o in over
    ]  # fmt: skip
    lines.append(report.markdown_table(shown))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--T", type=common.size_list(1), default=None, help="lengths, e.g. 1K,4K (default)"
    )
    p.add_argument("--heads", type=common.positive_int, default=4, help="KDA heads (default 4)")
    p.add_argument("--head-dim", type=common.positive_int, default=64, help="KDA K = V (64)")
    p.add_argument("--mla-preset", default="small", help="preset of the MLA layer (default small)")
    p.add_argument(
        "--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}"
    )
    p.add_argument("--reps", type=int, default=11, help="interleaved timed rounds (default 11)")
    p.add_argument(
        "--threads", type=common.positive_int, default=1, help="torch threads (default 1)"
    )
    p.add_argument("--quick", action="store_true", help="T=64,128, small heads, 2 rounds (CI)")
    p.add_argument("--out-dir", default=None, help="output folder (default benchmarks/results/cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace committed results")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown or not args.cases:
        p.error(f"--cases: unknown {unknown}; choose from {list(CASES)}")
    if args.mla_preset not in KimiLinearConfig.preset_names():
        p.error(
            f"--mla-preset must be one of {KimiLinearConfig.preset_names()}, "
            f"got {args.mla_preset!r}"
        )
    if args.quick:
        args.T = args.T or [64, 128]
        common.apply_quick(
            args, common.explicit_dests(p, argv), heads=2, head_dim=16, reps=2, mla_preset="tiny"
        )
    args.T = args.T or DEFAULT_T
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cpu")
    report.refuse_overwrite(NAME, device, args.out_dir, args.quick, args.overwrite)
    torch.set_num_threads(args.threads)
    config = {
        "T": args.T, "heads": args.heads, "head_dim": args.head_dim, "cases": args.cases,
        "mla_preset": args.mla_preset, "reps": args.reps, "threads": torch.get_num_threads(),
        "quick": args.quick, "load_average_start": os.getloadavg()[0],
        "command": report.command_line(__spec__.name, argv),
    }  # fmt: skip
    print(f"isolation benchmark: {config}", flush=True)
    rows: list[dict[str, Any]] = []
    for T in sorted(args.T):
        rows += bench_length(T, args)
    over = overheads(rows)
    config["load_average_end"] = os.getloadavg()[0]
    md = to_markdown(rows, over, config, hardware.env_info(device))
    print()
    print(md)
    paths = report.save_results(
        NAME,
        device,
        {"config": config, "rows": rows, "overhead": over},
        md,
        None,
        args.out_dir,
        quick=args.quick,
    )
    print("saved: " + ", ".join(str(p) for p in paths.values()))
    return {"rows": rows, "overhead": over}


if __name__ == "__main__":
    main()
