"""CPU time of the pure-PyTorch KDA ops: the chunked form against the token-by-token recurrence.

At each sequence length ``T`` (default 1K, 4K, 16K; ``B=1, H=4, K=V=64``, fp32) this times, on
the same inputs (q, k L2-normalised, gates and beta distributed as the KDA layer's at
initialisation, see :func:`make_inputs`):

* ``torch_chunk_kda``: :func:`kimi_linear.ops.torch_chunk_kda` (chunked WY form, its default chunk unless
  ``--chunk-size``);
* ``naive_recurrent_kda``: :func:`kimi_linear.ops.naive_recurrent_kda` (token by token);
* ``fla_naive_recurrent`` / ``fla_naive_chunk``: fla's ``naive_recurrent_kda`` and
  ``naive_chunk_kda`` (``fla.ops.kda.naive``; the chunked one needs ``T % 64 == 0``),

* ``torch_chunk_kda@REV`` with ``--baseline REV``: ``torch_chunk_kda`` as committed at git revision ``REV``
  (read with ``git show REV:kimi_linear/ops/chunk.py`` into a temporary module), to measure a
  change of the op against the version before it in the same run,

each for the forward alone (under ``torch.no_grad``) and forward + backward (autograd; loss
``sum(o * do)`` with a fixed random ``do``). The repetitions are **interleaved**: each round
runs every implementation and pass once, in a rotating order, so that load from other
processes on a shared machine hits all of them alike; the first round is a warm-up (it also
counts the bytes autograd saves for the backward). Each row gives the minimum, median and
maximum over ``--reps`` rounds, and every speed-up is a ratio of two rows of the same run (of
medians, and of minima). A configuration whose warm-up exceeds ``--slow-s`` is timed once (its
warm-up), and one that a power-law extrapolation from the previous lengths (at least linear)
puts above ``--skip-above-s`` is skipped (said so in the table and the JSON). ``max_err`` is
the largest difference of each forward output from ``naive_recurrent_kda``'s (from ``torch_chunk_kda``'s
where the recurrence is skipped).

Writes ``kda_cpu.json``, ``.md`` and ``.png`` (log-log time vs ``T``) under
``benchmarks/results/cpu/`` (or ``--out-dir``).

Examples::

    python -m benchmarks.kda_cpu                   # 1K, 4K, 16K (a few minutes)
    python -m benchmarks.kda_cpu --T 2K,8K --reps 5
    python -m benchmarks.kda_cpu --T 4K --impls torch_chunk_kda --baseline HEAD --reps 20  # a change
    python -m benchmarks.kda_cpu --quick --out-dir /tmp/kda   # seconds, for CI
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks import common, hardware, report
from kimi_linear.ops import naive_recurrent_kda, torch_chunk_kda

NAME = "kda_cpu"
DEFAULT_T = [1 << 10, 4 << 10, 16 << 10]
PASSES = ("fwd", "fwd+bwd")


FLA_IMPLS = ("fla_naive_recurrent", "fla_naive_chunk")


def load_baseline(rev: str) -> Callable[..., Any]:
    """``torch_chunk_kda`` as committed at git revision ``rev`` (run against today's package).

    The file ``kimi_linear/ops/chunk.py`` of that revision is written to a temporary folder and
    imported under a private module name; its imports (``kimi_linear.ops.checks``, ...) resolve
    to the installed package. Exits with a message when git cannot produce the file.
    """
    root = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(
            ["git", "show", f"{rev}:kimi_linear/ops/chunk.py"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        common.fail(
            f"--baseline {rev!r}: cannot read kimi_linear/ops/chunk.py at it ({detail.strip()})"
        )
    folder = Path(tempfile.mkdtemp(prefix="kda_baseline_"))
    path = folder / "chunk_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"_kda_chunk_baseline_{abs(hash(rev))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        # named kda_chunk before issue 22
        return getattr(module, "torch_chunk_kda", None) or module.kda_chunk
    except Exception as e:  # an old revision may not import against today's package
        common.fail(f"--baseline {rev!r}: its chunk.py does not import here ({e})")


def load_impls(
    chunk_size: int | None, with_fla: bool = True, baseline: str | None = None
) -> dict[str, Callable[..., Any]]:
    """Implementations by name; fla's references when asked for and fla imports; ``torch_chunk_kda``
    at git revision ``baseline`` when given. ``chunk_size`` (None: each op's default) goes to
    both chunked kit ops."""
    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
    impls: dict[str, Callable[..., Any]] = {
        "torch_chunk_kda": lambda *a: torch_chunk_kda(*a, **kw),
        "naive_recurrent_kda": naive_recurrent_kda,
    }
    if baseline is not None:
        old = load_baseline(baseline)
        impls[f"torch_chunk_kda@{baseline}"] = lambda *a: old(*a, **kw)
    if not with_fla:  # importing fla takes seconds
        return impls
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fla warns that Triton falls back to the CPU
            from fla.ops.kda.naive import naive_chunk_kda
            from fla.ops.kda.naive import naive_recurrent_kda as fla_naive_recurrent_kda
    except Exception as e:  # fla is optional for this script
        print(
            f"note: fla's reference ops unavailable ({e}); timing the kit's ops only",
            file=sys.stderr,
        )
        return impls
    impls["fla_naive_recurrent"] = fla_naive_recurrent_kda
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


class Runner:
    """One implementation and pass on fixed inputs: ``warmup()`` (the first call; for fwd+bwd
    it also counts the bytes autograd saves) and ``__call__()`` (a timed call)."""

    def __init__(
        self, op: Callable[..., Any], pas: str, base: list[torch.Tensor], do: torch.Tensor
    ) -> None:
        self.op, self.pas, self.base, self.do = op, pas, base, do
        self.leaves = [x.clone().requires_grad_() for x in base] if pas != "fwd" else []
        self.output: torch.Tensor | None = None
        self.saved_MB: float | None = None

    def warmup(self) -> None:
        if self.pas == "fwd":
            self()
            return
        for x in self.leaves:
            x.grad = None
        o, nbytes = saved_bytes(lambda: self.op(*self.leaves)[0])
        (o * self.do).sum().backward()
        self.saved_MB = nbytes / 1e6

    def __call__(self) -> None:
        if self.pas == "fwd":
            with torch.no_grad():
                self.output = self.op(*self.base)[0]
            return
        for x in self.leaves:
            x.grad = None
        o = self.op(*self.leaves)[0]
        (o * self.do).sum().backward()


def time_interleaved(
    runners: dict[Any, Callable[[], Any]], reps: int, slow_s: float
) -> dict[Any, list[tuple[float, float]]]:
    """``(wall s, CPU s)`` samples of every runner, measured in interleaved rounds.

    Round 0 calls each runner's ``warmup`` (or the runner itself); a runner whose warm-up takes
    more than ``slow_s`` is run once more, and if that run is slow too it keeps the faster of the
    two as its single sample (one slow warm-up on a loaded machine does not exclude a runner).
    Then ``reps`` rounds call every other runner once each, starting one place further along
    the list each round (so no runner always follows the same neighbour); their samples replace
    the warm-up's.
    """
    keys = list(runners)
    warm: dict[Any, tuple[float, float]] = {}
    for key in keys:
        warm[key] = _timed(getattr(runners[key], "warmup", runners[key]))
        if warm[key][0] > slow_s:
            warm[key] = min(warm[key], _timed(runners[key]))
    timed = [key for key in keys if warm[key][0] <= slow_s]
    samples: dict[Any, list[tuple[float, float]]] = {key: [] for key in keys}
    for r in range(reps):
        for j in range(len(timed)):
            key = timed[(j + r) % len(timed)]
            samples[key].append(_timed(runners[key]))
    return {key: samples[key] or [warm[key]] for key in keys}


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
    """All implementations and passes at one length, interleaved; ``previous`` maps (impl,
    pass) to the ``(T, median seconds)`` of the previous lengths (for the skip estimate) and
    is updated."""
    base = make_inputs(args.batch, T, args.heads, args.head_dim, args.head_dim)
    do = torch.randn(
        args.batch, T, args.heads, args.head_dim, generator=torch.Generator().manual_seed(1)
    )
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    runners: dict[tuple[str, str], Runner] = {}
    for impl, op in impls.items():
        for pas in PASSES:
            row: dict[str, Any] = {
                "T": T, "impl": impl, "pass": pas, "ms": None, "ms_min": None, "ms_max": None,
                "cpu_ms": None, "cpu_ms_min": None, "cpu_ms_max": None, "runs": 0,
                "tokens_per_s": None, "saved_MB": None, "max_err": None,
            }  # fmt: skip
            rows[(impl, pas)] = row
            if impl == "fla_naive_chunk" and T % 64:
                row["status"] = "skipped: needs T % 64 == 0"
                continue
            estimate = estimate_seconds(previous.get((impl, pas), []), T)
            if estimate is not None and estimate > args.skip_above_s:
                row["status"] = (
                    f"skipped: ~{estimate:.0f} s estimated (> --skip-above-s {args.skip_above_s:g})"
                )
                continue
            runners[(impl, pas)] = Runner(op, pas, base, do)
    samples = time_interleaved(runners, args.reps, args.slow_s)
    for key, ts in samples.items():
        walls, cpus = [w for w, _ in ts], [c for _, c in ts]
        seconds = statistics.median(walls)
        previous.setdefault(key, []).append((T, seconds))
        rows[key].update(
            ms=seconds * 1e3, ms_min=min(walls) * 1e3, ms_max=max(walls) * 1e3,
            cpu_ms=statistics.median(cpus) * 1e3, cpu_ms_min=min(cpus) * 1e3,
            cpu_ms_max=max(cpus) * 1e3, runs=len(ts), tokens_per_s=args.batch * T / seconds,
            saved_MB=runners[key].saved_MB, status="ok",
        )  # fmt: skip
        print(
            f"  T={common.fmt_tokens(T):>5} {key[0]:<22} {key[1]:<8} wall ms min/median/max "
            f"{min(walls) * 1e3:.1f}/{seconds * 1e3:.1f}/{max(walls) * 1e3:.1f}, CPU ms median "
            f"{rows[key]['cpu_ms']:.1f} ({len(ts)} runs)",
            flush=True,
        )
    outputs = {
        impl: r.output
        for (impl, pas), r in runners.items()
        if pas == "fwd" and r.output is not None
    }
    ref = outputs.get("naive_recurrent_kda", outputs.get("torch_chunk_kda"))
    for (impl, pas), row in rows.items():
        if pas == "fwd" and impl in outputs and ref is not None:
            row["max_err"] = (outputs[impl].double() - ref.double()).abs().max().item()
    return list(rows.values())


#: Speed-ups are ratios of these row fields (medians and minima of the interleaved runs).
METRICS = {"wall": "ms", "cpu": "cpu_ms", "wall_min": "ms_min", "cpu_min": "cpu_ms_min"}


def summarize(rows: list[dict[str, Any]], lengths: list[int]) -> dict[str, Any]:
    """Speed-ups of torch_chunk_kda over every other op (ratios of medians, and of minima, of one
    interleaved run) and its cost scaling in T, for wall and CPU time."""
    out: dict[str, Any] = {
        "speedup": {},
        "chunk_ms_per_1k_tokens": {},
        "chunk_scaling_exponent": {},
    }
    for metric, key in METRICS.items():
        ms = {(r["T"], r["impl"], r["pass"]): r[key] for r in rows if r[key] is not None}
        speedup, per_1k, exponent = {}, {}, {}
        others = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "torch_chunk_kda"]
        for T in lengths:
            for base in others:
                for pas in PASSES:
                    a, b = ms.get((T, base, pas)), ms.get((T, "torch_chunk_kda", pas))
                    if a is not None and b is not None:
                        speedup[f"{base}/{pas}/T={T}"] = a / b
        for pas in PASSES:
            pts = [
                (T, ms[(T, "torch_chunk_kda", pas)])
                for T in lengths
                if (T, "torch_chunk_kda", pas) in ms
            ]
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
        f"K=V={config['head_dim']}, fp32, chunk {config['chunk_size'] or 'default'}. "
        f"{config['reps']} interleaved rounds after a warm-up round (every implementation and "
        "pass once per round, in a rotating order, so load hits all alike); wall ms: median "
        f"(min-max); a run whose warm-up is slower than {config['slow_s']:g} s is timed once. "
        f"1-min load average {config['load_average_start']:.1f} at the start, "
        f"{config['load_average_end']:.1f} at the end. fwd runs under no_grad; fwd+bwd is "
        "autograd with loss sum(o * do). saved MB: bytes autograd keeps for the backward. "
        "max_err: max |o - o_kda_recurrent| (fwd).",
        "",
        f"Command: `{config['command']}`",
        "",
    ]
    shown = []
    for r in rows:
        shown.append({
            "T": common.fmt_tokens(r["T"]), "impl": r["impl"], "pass": r["pass"],
            "wall ms": r["ms"], "wall min-max": _span(r["ms_min"], r["ms_max"]),
            "CPU ms": r["cpu_ms"], "tokens/s (wall)": r["tokens_per_s"],
            "saved MB": r["saved_MB"], "max_err": r["max_err"], "status": r["status"],
        })  # fmt: skip
    lines.append(report.markdown_table(shown))
    sp = summary["speedup"]
    if sp["wall"]:
        lines += ["", "Speed-up of torch_chunk_kda (time of the other op / time of torch_chunk_kda, both from "
                  "this run; of medians, and of minima):", ""]  # fmt: skip
        fmt = lambda m, name: f"{sp[m][name]:.2f}x" if name in sp[m] else ""
        table = []
        for name in sp["wall"]:
            base, pas, T = name.split("/")
            table.append({"T": common.fmt_tokens(int(T[2:])), "vs": base, "pass": pas,
                          "wall (median)": fmt("wall", name), "wall (min)": fmt("wall_min", name),
                          "CPU (median)": fmt("cpu", name), "CPU (min)": fmt("cpu_min", name)})  # fmt: skip
        lines.append(report.markdown_table(table))
    exps = summary["chunk_scaling_exponent"]
    if exps["wall"]:
        lines += ["", "torch_chunk_kda time ~ T^p (log-log least squares over the lengths run): "
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


def _span(lo: float | None, hi: float | None) -> str:
    return "" if lo is None or hi is None else f"{lo:.1f}-{hi:.1f}"


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
        ax.set_ylabel(("process CPU" if key == "cpu_ms" else "wall") + " time (ms), median of runs")
        ax.set_title("KDA on CPU: chunked vs recurrent (B=1, H=4, K=V=64, fp32)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)

    return draw


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
        "--chunk-size",
        type=common.positive_int,
        default=None,
        help="chunk of torch_chunk_kda (and of the --baseline one); default: each op's own default",
    )
    p.add_argument(
        "--reps", type=int, default=3, help="interleaved timed rounds after the warm-up (default 3)"
    )
    p.add_argument(
        "--baseline",
        default=None,
        metavar="REV",
        help="also time torch_chunk_kda as committed at git revision REV (e.g. HEAD), as torch_chunk_kda@REV",
    )
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
        help="comma-separated subset of torch_chunk_kda,naive_recurrent_kda,fla_naive_recurrent,fla_naive_chunk",
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
    if args.quick:  # tiny sizes, except those given explicitly
        args.T = args.T or [64, 128]
        common.apply_quick(
            args, common.explicit_dests(p, argv), heads=2, head_dim=16, reps=1, threads=1
        )
    args.T = args.T or DEFAULT_T
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [s.strip() for s in (args.impls or "").split(",") if s.strip()]
    impls = load_impls(
        args.chunk_size,
        with_fla=not wanted or any(w in FLA_IMPLS for w in wanted),
        baseline=args.baseline,
    )
    if wanted:
        unknown = [s for s in wanted if s not in impls]
        if unknown:
            known = ["torch_chunk_kda", "naive_recurrent_kda", *FLA_IMPLS]
            common.fail(f"--impls: unknown or unavailable {unknown}; choose from {known}")
        impls = {k: v for k, v in impls.items() if k in wanted or k.startswith("torch_chunk_kda@")}
    config = {
        "T": args.T, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
        "chunk_size": args.chunk_size, "dtype": "float32", "reps": args.reps, "slow_s": args.slow_s,
        "skip_above_s": args.skip_above_s, "threads": torch.get_num_threads(), "quick": args.quick,
        "impls": list(impls), "baseline": args.baseline,
        "load_average_start": os.getloadavg()[0],
        "command": report.command_line(__spec__.name, argv),
    }  # fmt: skip
    print(f"KDA CPU benchmark: {config}", flush=True)
    rows: list[dict[str, Any]] = []
    previous: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for T in sorted(args.T):
        rows += bench_length(T, args, impls, previous)
    summary = summarize(rows, sorted(args.T))
    config["load_average_end"] = os.getloadavg()[0]
    env = hardware.env_info(device)
    md = to_markdown(rows, summary, config, env)
    print()
    print(md)
    paths = report.save_results(
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
