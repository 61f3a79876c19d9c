"""Peak memory of one prefill forward by prompt length: the hybrid against its all-MLA twin.

A prefill is ``model(ids, logits_to_keep=1)`` over the whole prompt at once (no chunking, no
gradient), as ``generate`` runs it.  Each (model, length) runs in a fresh subprocess, so every
peak is its own: on CPU the figure is the process's peak resident set (``ru_maxrss``) minus its
resident set just before the forward (weights, ids and the interpreter excluded); on CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocation before the forward.

Memory linear in the length T shows as a constant ``bytes / token`` column and a growth
exponent near 1 (``log(m2 / m1) / log(T2 / T1)`` between consecutive lengths); attention that
materialises ``T x T`` scores shows an exponent near 2.  The preset's
``max_position_embeddings`` is raised to the longest length.

Results go to ``benchmarks/results/<device>/prefill_memory.{json,md}`` only when those files do
not exist yet (a finished run is never overwritten) or when ``--out DIR`` is given; ``--quick``
runs short lengths and writes to the git-ignored ``quick/`` subfolder.

Example::

    python -m benchmarks.prefill_memory                      # 8K..64K, CPU, ~10-30 minutes
    python -m benchmarks.prefill_memory --quick              # 1K, 2K: seconds
    python -m benchmarks.prefill_memory --seq-lens 8K,16K --out /tmp/pm
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common, hardware, report, workload

NAME = "prefill_memory"
ROOT = Path(__file__).resolve().parents[1]
MODEL_LABELS = {"hybrid": "hybrid (KDA + MLA)", "all_mla": "all-MLA twin"}
DEFAULT_LENGTHS = [8 << 10, 16 << 10, 32 << 10, 64 << 10]
QUICK_LENGTHS = [1 << 10, 2 << 10]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description="Peak memory of one whole-prompt prefill vs prompt length, for a preset "
        "(default tiny) and its all-MLA twin; one subprocess per measurement.",
        formatter_class=common.HelpFormatter,
    )
    workload.add_model_args(p, default_preset="tiny")
    p.add_argument(
        "--seq-lens",
        type=common.size_list(),
        default=None,
        help="comma-separated prompt lengths, e.g. 8K,16K "
        "(default: 8K,16K,32K,64K; --quick: 1K,2K)",
    )
    p.add_argument(
        "--batch-size", type=common.positive_int, default=1, help="prompts prefilled together"
    )
    p.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODEL_LABELS),
        default=["hybrid", "all_mla"],
        help="which models to measure",
    )
    p.add_argument("--dtype", default="fp32", help="weights dtype (fp32, bf16, fp16)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU intra-op threads of each measurement"
    )
    p.add_argument("--quick", action="store_true", help="short lengths (smoke test, seconds)")
    p.add_argument(
        "--out",
        default=None,
        help="output folder, written even if it holds results (default: "
        "benchmarks/results/<device>/, written only if absent; --quick: .../quick/)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights and tokens")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one measurement (JSON)
    args = p.parse_args(argv)
    if args.seq_lens is None:
        args.seq_lens = QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS
    args.seq_lens = sorted(set(args.seq_lens))
    return args


def model_config(args: argparse.Namespace, which: str) -> Any:
    """The preset (with the size overrides) or its all-MLA twin, with room for every length."""
    config = workload.config_from_args(args)
    longest = max(args.seq_lens)
    if config.max_position_embeddings < longest:
        config = config.replace(max_position_embeddings=longest)
    return config.all_mla_twin() if which == "all_mla" else config


def _peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB (macOS in bytes)
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(args: argparse.Namespace, which: str, length: int) -> dict[str, Any]:
    """One prefill of ``length`` tokens on ``which`` model, in this process (the child)."""
    from kimi_linear.model import KimiLinearForCausalLM

    hardware.set_threads(args.threads)
    device = hardware.resolve_device(args.device)
    dtype = common.parse_dtype(args.dtype)
    torch.manual_seed(args.seed)
    config = model_config(args, which)
    model = KimiLinearForCausalLM(config).to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch_size, length), device=device)
    with torch.inference_mode():  # warm-up at a short length: kernels and lazy buffers
        model(ids[:, : min(length, 64)], logits_to_keep=1)
    hardware.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = hardware.process_resident_bytes() or 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(ids, logits_to_keep=1)
    hardware.synchronize(device)
    seconds = time.perf_counter() - t0
    if not bool(torch.isfinite(logits).all()):
        raise RuntimeError(f"{which} at {length} tokens gave non-finite logits")
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_rss_bytes()
    return {
        "model": which,
        "length": length,
        "batch_size": args.batch_size,
        "baseline_bytes": before,
        "peak_bytes": peak,
        "prefill_bytes": max(peak - before, 0),
        "seconds": seconds,
        "mla_layers": len(config.mla_layers),
        "layers": config.num_hidden_layers,
    }


def run_child(args: argparse.Namespace, which: str, length: int) -> dict[str, Any]:
    """``measure`` in a fresh interpreter (its own peak RSS); an error or kill is a row too."""
    cmd = [sys.executable, "-m", "benchmarks.prefill_memory", "--child", f"{which}:{length}"]
    cmd += ["--preset", args.preset, "--batch-size", str(args.batch_size)]
    cmd += ["--dtype", args.dtype, "--device", args.device, "--threads", str(args.threads)]
    cmd += ["--seed", str(args.seed), "--seq-lens", ",".join(map(str, args.seq_lens))]
    for flag in ("layers", "experts", "hidden_size", "vocab_size"):
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"model": which, "length": length, "error": last[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, env: dict[str, Any]) -> str:
    lines = [
        "# Prefill peak memory vs prompt length\n",
        f"`python -m benchmarks.prefill_memory{' --quick' if args.quick else ''}` : one "
        f"whole-prompt prefill (`model(ids, logits_to_keep=1)`, inference mode) of the "
        f"`{args.preset}` preset and its all-MLA twin, batch {args.batch_size}, {args.dtype}, "
        f"{args.threads} thread(s), on {env.get('device', args.device)}; each measurement in a "
        "fresh process. *Prefill memory* is the peak resident set during the forward minus the "
        "resident set just before it (CPU), or the peak CUDA allocation above the one before "
        "it. *Exponent*: `log(m2 / m1) / log(T2 / T1)` against the previous length: 1 is "
        "linear in T, 2 quadratic.\n",
    ]
    table = []
    for which in args.models:
        prev = None
        for r in (r for r in rows if r["model"] == which):
            if "error" in r:
                table.append({"model": MODEL_LABELS[which], "T": common.fmt_tokens(r["length"]),
                              "prefill memory": f"failed: {r['error']}"})  # fmt: skip
                prev = None
                continue
            b = r["prefill_bytes"]
            table.append(
                {
                    "model": MODEL_LABELS[which],
                    "T": common.fmt_tokens(r["length"]),
                    "prefill memory": common.fmt_bytes(b),
                    "bytes / token": f"{b / (r['length'] * r['batch_size']):,.0f}",
                    "exponent": f"{math.log(b / prev[1]) / math.log(r['length'] / prev[0]):.2f}"
                    if prev and b > 0 and prev[1] > 0
                    else "",
                    "peak RSS" if args.device == "cpu" else "peak allocated": common.fmt_bytes(
                        r["peak_bytes"]
                    ),
                    "seconds": f"{r['seconds']:.1f}",
                }
            )
            prev = (r["length"], b)
    lines.append(report.markdown_table(table))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        which, length = args.child.split(":")
        print(json.dumps(measure(args, which, int(length))))
        return 0
    device = hardware.resolve_device(args.device)
    rows = []
    for which in args.models:
        for length in args.seq_lens:
            print(f"{MODEL_LABELS[which]}, T={common.fmt_tokens(length)} ...", flush=True)
            row = run_child(args, which, length)
            rows.append(row)
            if "error" in row:
                print(f"  failed: {row['error']}", flush=True)
            else:
                print(
                    f"  prefill memory {common.fmt_bytes(row['prefill_bytes'])} "
                    f"({row['prefill_bytes'] / length:,.0f} B/token), {row['seconds']:.1f} s",
                    flush=True,
                )
    env = hardware.env_info(device)
    md = markdown(rows, args, env)
    print(md)
    folder = (
        Path(args.out)
        if args.out is not None
        else report.RESULTS_DIR / hardware.device_slug(device) / ("quick" if args.quick else "")
    )
    if args.out is None and not args.quick and (folder / f"{NAME}.json").exists():
        print(f"not written: {folder / NAME}.json exists (give --out DIR to write elsewhere)")
        return 0
    payload = {"args": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows}
    paths = report.save_results(NAME, device, payload, md, out_dir=folder)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
