"""CPU time of the pure-PyTorch KDA ops: the chunked form against the token-by-token recurrence.

At each sequence length ``T`` (default 1K, 4K, 16K; ``B=1, H=4, K=V=64``, fp32) this times, on
the same inputs (q, k L2-normalised, gates and beta distributed as the KDA layer's at
initialisation, see :func:`make_inputs`):

* ``kda_chunk``: :func:`kimi_linear.ops.kda_chunk` (chunked WY form, chunk 64);
* ``kda_recurrent``: :func:`kimi_linear.ops.kda_recurrent` (token by token);
* ``fla_naive_recurrent`` / ``fla_naive_chunk``: fla's ``naive_recurrent_kda`` and
  ``naive_chunk_kda`` (``fla.ops.kda.naive``; the chunked one needs ``T % 64 == 0``),

each for the forward alone (under ``torch.no_grad``) and forward + backward (autograd; loss
``sum(o * do)`` with a fixed random ``do``). Each time is the best of ``--reps`` runs after a
warm-up; a configuration whose single run exceeds ``--slow-s`` is timed once, and one that a
power-law extrapolation from the previous lengths (at least linear) puts above ``--skip-above-s``
is skipped (said
so in the table and the JSON). For fwd+bwd the bytes autograd saves for the backward are
recorded too (``saved_tensors_hooks``, each storage counted once), and ``max_err`` is the
largest difference of each output from ``kda_recurrent``'s (from ``kda_chunk``'s where the
recurrence is skipped).

Writes ``kda_cpu.json``, ``.md`` and ``.png`` (log-log time vs ``T``) under
``benchmarks/results/cpu/`` (or ``--out-dir``).

Examples::

    python benchmarks/kda_cpu.py                   # 1K, 4K, 16K (a few minutes)
    python benchmarks/kda_cpu.py --T 2K,8K --reps 5
    python benchmarks/kda_cpu.py --quick --out-dir /tmp/kda   # seconds, for CI
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from kimi_linear.ops import kda_chunk, kda_recurrent  # noqa: E402

NAME = "kda_cpu"
DEFAULT_T = [1 << 10, 4 << 10, 16 << 10]
PASSES = ("fwd", "fwd+bwd")


FLA_IMPLS = ("fla_naive_recurrent", "fla_naive_chunk")


def load_impls(chunk_size: int, with_fla: bool = True) -> dict[str, Callable[..., Any]]:
    """Implementations by name; fla's references when asked for and fla imports."""
    impls: dict[str, Callable[..., Any]] = {
        "kda_chunk": lambda *a: kda_chunk(*a, chunk_size=chunk_size),
        "kda_recurrent": kda_recurrent,
    }
    if not with_fla:  # importing fla takes seconds
        return impls
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fla warns that Triton falls back to the CPU
            from fla.ops.kda.naive import naive_chunk_kda, naive_recurrent_kda
    except Exception as e:  # fla is optional for this script
        print(
            f"note: fla's reference ops unavailable ({e}); timing the kit's ops only",
            file=sys.stderr,
        )
        return impls
    impls["fla_naive_recurrent"] = naive_recurrent_kda
    impls["fla_naive_chunk"] = naive_chunk_kda
    return impls


def make_inputs(B: int, T: int, H: int, K: int, V: int, seed: int = 0) -> list[torch.Tensor]:
    """fp32 ``q, k, v, g, beta`` as the KDA layer produces them at initialisation.

    ``g = -A_h softplus(dt_bias + x)`` with ``A_h ~ U[1, 16]`` per head, ``softplus(dt_bias)``
    log-uniform in ``[1e-3, 1e-1]`` per channel (the layer's init) and ``x ~ N(0, 0.3^2)`` (the
    scale of the low-rank gate projection of unit-variance activations); so ``g`` ranges
    from about ``-0.001`` to ``-3`` per step. q, k L2-normalised; ``beta = sigmoid(N(0, 1))``.
    """
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    A = 1.0 + 15.0 * torch.rand(H, 1, generator=gen)
    dt = torch.exp(math.log(1e-3) + math.log(100.0) * torch.rand(H, K, generator=gen))
    dt_bias = dt + torch.log(-torch.expm1(-dt))  # softplus(dt_bias) == dt
    g = -A * F.softplus(dt_bias + 0.3 * torch.randn(B, T, H, K, generator=gen))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    return [q, k, v, g, beta]


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``fn`` (a forward) and count the bytes autograd saves for its backward."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def time_once_or_best(
    fn: Callable[[], Any], reps: int, slow_s: float, warmup: Callable[[], Any] | None = None
) -> tuple[float, float, int]:
    """Best of ``reps`` runs of ``fn`` after one warm-up (``warmup``, default ``fn``, also
    timed); a warm-up slower than ``slow_s`` is the single measurement.

    Returns ``(wall seconds, process CPU seconds, runs timed)``, each the minimum over the runs.
    On a shared machine with one thread, CPU time is the steadier measure of the work done.
    """
    times = [_timed(warmup or fn)]
    if times[0][0] <= slow_s:
        times += [_timed(fn) for _ in range(reps)]
    return min(w for w, _ in times), min(c for _, c in times), len(times)


def measure(
    op: Callable[..., Any],
    pas: str,
    base: list[torch.Tensor],
    do: torch.Tensor,
    args: argparse.Namespace,
) -> tuple[float, int, float | None, torch.Tensor | None]:
    """Time one implementation and pass.

    Returns ``(wall s, CPU s, runs timed, MB saved for backward (fwd+bwd only), output (fwd
    only))``.
    """
    if pas == "fwd":
        result: dict[str, Any] = {}

        def run() -> None:
            with torch.no_grad():
                result["o"] = op(*base)[0]

        wall, cpu, runs = time_once_or_best(run, args.reps, args.slow_s)
        return wall, cpu, runs, None, result["o"]

    leaves = [x.clone().requires_grad_() for x in base]
    saved: dict[str, int] = {}

    def run_bwd(count_saved: bool = False) -> None:
        for x in leaves:
            x.grad = None
        if count_saved:  # the warm-up also measures what autograd keeps
            o, saved["bytes"] = saved_bytes(lambda: op(*leaves)[0])
        else:
            o = op(*leaves)[0]
        (o * do).sum().backward()

    wall, cpu, runs = time_once_or_best(run_bwd, args.reps, args.slow_s, lambda: run_bwd(True))
    return wall, cpu, runs, saved["bytes"] / 1e6, None


def estimate_seconds(history: list[tuple[int, float]], T: int) -> float | None:
    """Time at length ``T`` extrapolated from ``(T, seconds)`` measured at shorter lengths: a
    power law through the last two points (exponent at least 1), else linear from the last."""
    if not history:
        return None
    T1, t1 = history[-1]
    p = 1.0
    if len(history) >= 2:
        T0, t0 = history[-2]
        if T1 > T0 and t1 > 0 and t0 > 0:
            p = max(1.0, math.log(t1 / t0) / math.log(T1 / T0))
    return t1 * (T / T1) ** p


def bench_length(
    T: int,
    args: argparse.Namespace,
    impls: dict[str, Callable[..., Any]],
    previous: dict[tuple[str, str], list[tuple[int, float]]],
) -> list[dict[str, Any]]:
    """All implementations and passes at one length; ``previous`` maps (impl, pass) to the
    ``(T, seconds)`` measured at the previous lengths (for the skip estimate) and is updated."""
    base = make_inputs(args.batch, T, args.heads, args.head_dim, args.head_dim)
    do = torch.randn(
        args.batch, T, args.heads, args.head_dim, generator=torch.Generator().manual_seed(1)
    )
    rows: list[dict[str, Any]] = []
    outputs: dict[str, torch.Tensor] = {}
    for impl, op in impls.items():
        for pas in PASSES:
            row: dict[str, Any] = {
                "T": T,
                "impl": impl,
                "pass": pas,
                "ms": None,
                "cpu_ms": None,
                "runs": 0,
                "tokens_per_s": None,
                "saved_MB": None,
                "max_err": None,
            }
            if impl == "fla_naive_chunk" and T % 64:
                row["status"] = "skipped: needs T % 64 == 0"
                rows.append(row)
                continue
            estimate = estimate_seconds(previous.get((impl, pas), []), T)
            if estimate is not None and estimate > args.skip_above_s:
                row["status"] = (
                    f"skipped: ~{estimate:.0f} s estimated (> --skip-above-s {args.skip_above_s:g})"
                )
                rows.append(row)
                continue
            seconds, cpu, runs, saved, out = measure(op, pas, base, do, args)
            if out is not None:
                outputs[impl] = out
            previous.setdefault((impl, pas), []).append((T, seconds))
            row.update(
                ms=seconds * 1e3,
                cpu_ms=cpu * 1e3,
                runs=runs,
                tokens_per_s=args.batch * T / seconds,
                saved_MB=saved,
                status="ok",
            )
            rows.append(row)
            print(
                f"  T={common.fmt_tokens(T):>5} {impl:<20} {pas:<8} {seconds * 1e3:12.1f} ms wall"
                f" {cpu * 1e3:12.1f} ms CPU",
                flush=True,
            )
    ref = outputs.get("kda_recurrent", outputs.get("kda_chunk"))
    for row in rows:
        if row["pass"] == "fwd" and row["impl"] in outputs and ref is not None:
            row["max_err"] = (outputs[row["impl"]].double() - ref.double()).abs().max().item()
    return rows


METRICS = {"wall": "ms", "cpu": "cpu_ms"}


def summarize(rows: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """Speed-ups of kda_chunk over the other ops and its cost scaling in T, for wall and CPU time."""
    out: dict[str, Any] = {
        "speedup": {},
        "chunk_ms_per_1k_tokens": {},
        "chunk_scaling_exponent": {},
    }
    for metric, key in METRICS.items():
        ms = {(r["T"], r["impl"], r["pass"]): r[key] for r in rows if r[key] is not None}
        speedup, per_1k, exponent = {}, {}, {}
        for T in lengths:
            for base in ("kda_recurrent", *FLA_IMPLS):
                for pas in PASSES:
                    a, b = ms.get((T, base, pas)), ms.get((T, "kda_chunk", pas))
                    if a is not None and b is not None:
                        speedup[f"{base}/{pas}/T={T}"] = a / b
        for pas in PASSES:
            pts = [(T, ms[(T, "kda_chunk", pas)]) for T in lengths if (T, "kda_chunk", pas) in ms]
            per_1k[pas] = {str(T): t * 1024 / T for T, t in pts}
            if len(pts) >= 2:  # least-squares slope of log(time) against log(T)
                xs = [math.log(T) for T, _ in pts]
                ys = [math.log(t) for _, t in pts]
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                num = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
                exponent[pas] = num / sum((x - mx) ** 2 for x in xs)
        out["speedup"][metric] = speedup
        out["chunk_ms_per_1k_tokens"][metric] = per_1k
        out["chunk_scaling_exponent"][metric] = exponent
    return out


def to_markdown(
    rows: list[dict[str, Any]], summary: dict[str, Any], config: dict[str, Any], env: dict[str, Any]
) -> str:
    lines = [
        "# KDA ops on CPU: chunked form vs recurrence",
        "",
        f"Device: {env['device']}, torch {env['torch']}, {config['threads']} thread(s), "
        f"fla {env.get('fla')}. B={config['batch']}, H={config['heads']}, "
        f"K=V={config['head_dim']}, fp32, chunk {config['chunk_size']}. Best of up to "
        f"{config['reps'] + 1} runs (one run when slower than {config['slow_s']:g} s). 1-min load "
        f"average {config['load_average_start']:.1f} at the start, {config['load_average_end']:.1f} "
        "at the end (a shared machine: with one thread, process CPU time is the steadier measure). "
        "fwd runs under no_grad; fwd+bwd is autograd with loss sum(o * do). saved MB: bytes "
        "autograd keeps for the backward. max_err: max |o - o_kda_recurrent| (fwd).",
        "",
        f"Command: `{config['command']}`",
        "",
    ]
    shown = []
    for r in rows:
        shown.append({
            "T": common.fmt_tokens(r["T"]), "impl": r["impl"], "pass": r["pass"],
            "wall ms": r["ms"], "CPU ms": r["cpu_ms"], "tokens/s (wall)": r["tokens_per_s"],
            "saved MB": r["saved_MB"], "max_err": r["max_err"], "status": r["status"],
        })  # fmt: skip
    lines.append(common.markdown_table(shown))
    wall, cpu = summary["speedup"]["wall"], summary["speedup"]["cpu"]
    if wall:
        lines += ["", "Speed-up of kda_chunk (time of the other op / time of kda_chunk):", ""]
        table = []
        for name, x in wall.items():
            base, pas, T = name.split("/")
            table.append({"T": common.fmt_tokens(int(T[2:])), "vs": base, "pass": pas,
                          "wall": f"{x:.1f}x", "CPU": f"{cpu[name]:.1f}x" if name in cpu else ""})  # fmt: skip
        lines.append(common.markdown_table(table))
    exps = summary["chunk_scaling_exponent"]
    if exps["wall"]:
        lines += ["", "kda_chunk time ~ T^p (log-log least squares over the lengths run): "
                  + ", ".join(f"{pas} p = {exps['wall'][pas]:.2f} (wall), {exps['cpu'][pas]:.2f} (CPU)"
                              for pas in exps["wall"])]  # fmt: skip
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        lines += ["", "Skipped:", ""]
        lines += [
            f"- T={common.fmt_tokens(r['T'])} {r['impl']} {r['pass']}: {r['status']}"
            for r in skipped
        ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], key: str) -> Callable[[Any], None]:
    """Log-log time vs T of every implementation; ``key`` is ``"ms"`` or ``"cpu_ms"``."""

    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        for i, impl in enumerate(dict.fromkeys(r["impl"] for r in rows)):
            for pas, style in zip(PASSES, ("-", "--")):
                pts = [
                    (r["T"], r[key])
                    for r in rows
                    if r["impl"] == impl and r["pass"] == pas and r[key]
                ]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{impl} {pas}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel(("process CPU" if key == "cpu_ms" else "wall") + " time (ms), best of runs")
        ax.set_title("KDA on CPU: chunked vs recurrent (B=1, H=4, K=V=64, fp32)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    return draw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--T",
        type=common.size_list(1),
        default=None,
        help="comma-separated sequence lengths, e.g. 1K,4K,16K (default: 1K,4K,16K)",
    )
    p.add_argument("--batch", type=common.positive_int, default=1, help="batch size B (default 1)")
    p.add_argument("--heads", type=common.positive_int, default=4, help="heads H (default 4)")
    p.add_argument("--head-dim", type=common.positive_int, default=64, help="K = V (default 64)")
    p.add_argument(
        "--chunk-size", type=common.positive_int, default=64, help="kda_chunk's chunk (default 64)"
    )
    p.add_argument("--reps", type=int, default=3, help="timed runs after the warm-up (default 3)")
    p.add_argument(
        "--slow-s",
        type=common.positive_float,
        default=5.0,
        help="a warm-up slower than this many seconds is the single measurement (default 5)",
    )
    p.add_argument(
        "--skip-above-s",
        type=common.positive_float,
        default=90.0,
        help="skip a run estimated (from the previous T) above this many seconds (default 90)",
    )
    p.add_argument(
        "--impls",
        default=None,
        help="comma-separated subset of kda_chunk,kda_recurrent,fla_naive_recurrent,fla_naive_chunk",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (default 0: torch's default, all cores)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (T=64,128, H=2, K=16, one thread, one timed run), for CI",
    )
    p.add_argument("--out-dir", default=None, help="output folder (default benchmarks/results/cpu)")
    args = p.parse_args(argv)
    if args.reps < 0:
        p.error(f"--reps must be >= 0, got {args.reps}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    if args.quick:
        args.T = args.T or [64, 128]
        args.heads, args.head_dim, args.reps, args.threads = 2, 16, 1, 1
    args.T = args.T or DEFAULT_T
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [s.strip() for s in (args.impls or "").split(",") if s.strip()]
    impls = load_impls(args.chunk_size, with_fla=not wanted or any(w in FLA_IMPLS for w in wanted))
    if wanted:
        unknown = [s for s in wanted if s not in impls]
        if unknown:
            known = ["kda_chunk", "kda_recurrent", *FLA_IMPLS]
            common.fail(f"--impls: unknown or unavailable {unknown}; choose from {known}")
        impls = {k: impls[k] for k in wanted}
    config = {
        "T": args.T, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
        "chunk_size": args.chunk_size, "dtype": "float32", "reps": args.reps, "slow_s": args.slow_s,
        "skip_above_s": args.skip_above_s, "threads": torch.get_num_threads(), "quick": args.quick,
        "impls": list(impls),
        "load_average_start": os.getloadavg()[0],
        "command": "python benchmarks/kda_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }  # fmt: skip
    print(f"KDA CPU benchmark: {config}", flush=True)
    rows: list[dict[str, Any]] = []
    previous: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for T in sorted(args.T):
        rows += bench_length(T, args, impls, previous)
    summary = summarize(rows, sorted(args.T))
    config["load_average_end"] = os.getloadavg()[0]
    env = common.env_info(device)
    md = to_markdown(rows, summary, config, env)
    print()
    print(md)
    paths = common.save_results(
        NAME,
        device,
        {"config": config, "rows": rows, "summary": summary},
        md,
        plot(rows, "cpu_ms" if torch.get_num_threads() == 1 else "ms"),
        args.out_dir,
        quick=args.quick,
    )
    print("saved: " + ", ".join(str(p) for p in paths.values()))
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
