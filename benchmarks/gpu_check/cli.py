"""The command line of ``python -m benchmarks.gpu_check``: arguments, device, result folder, and
the parts run in order under one budget."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks import hardware, report
from benchmarks.gpu_check.plan import part_items
from benchmarks.gpu_check.records import CompileLog, fla_backends, fla_dispatch
from benchmarks.gpu_check.results import write_summary
from benchmarks.gpu_check.run import Budget, Run, run_part
from benchmarks.gpu_check.sizes import (
    DEFAULT_BUDGET_MIN,
    DEFAULT_PARTS,
    PART_SPACE,
    PARTS,
    dry_run_sizes,
    gpu_sizes,
)
from benchmarks.gpu_check.splitting import auto_choices


def _positive_minutes(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes as a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number of minutes > 0, got {text!r}")
    return v


def _parts(text: str) -> tuple[str, ...]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(PARTS)}, got {text!r}"
        )
    return tuple(p for p in PARTS if p in names)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="Validate the Triton KDA kernels on one GPU and measure every GPU figure "
        "of the kit (correctness, kernel speed vs fla, model decode / prefill / training) "
        "within a time budget.",
    )
    p.add_argument(
        "--budget",
        type=_positive_minutes,
        default=DEFAULT_BUDGET_MIN,
        metavar="MINUTES",
        help=f"wall-clock budget in minutes (default {DEFAULT_BUDGET_MIN:g}, from a cold Triton "
        "cache); items that would not fit are skipped with the reason, the item in flight is "
        "stopped when it runs out",
    )
    p.add_argument(
        "--parts",
        type=_parts,
        default=DEFAULT_PARTS,
        help="comma-separated subset of correctness,speed,model,extra (default: "
        "correctness,speed,model, in that order; extra: packed-batch speed, prefill, training)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="output folder (default benchmarks/results/<gpu-name>/; dry run: .../cpu/quick/)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="toy sizes on the CPU under the Triton interpreter: proves the script works",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every input (default 0)")
    return p.parse_args(argv)


def _prepare_triton(dry_run: bool) -> None:
    """The dry run needs the Triton interpreter, chosen before ``triton`` is first imported."""
    if not dry_run or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise SystemExit(
            "error: --dry-run runs the kernels under the Triton interpreter, which must be chosen "
            "before triton is imported: set TRITON_INTERPRET=1 in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _prepare_triton(args.dry_run)
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "error: no CUDA device: the GPU check needs one (use --dry-run to exercise the "
            "script on the CPU at toy sizes)",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    budget = Budget(args.budget * 60)
    if args.out_dir is not None:
        folder = Path(args.out_dir)
    else:
        folder = report.RESULTS_DIR / hardware.device_slug(device)
        if args.dry_run:
            folder = folder / "quick"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out-dir {str(folder)!r} cannot be used as a folder ({e})", file=sys.stderr)
        return 2
    env = hardware.env_info(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["arch"] = f"sm_{major}{minor}"
        env["capability"] = [major, minor]
    else:
        env["arch"] = "cpu (Triton interpreter)"
    env["fla_backends"] = fla_backends()
    env["auto_segment_chunks"] = auto_choices(device)  # the split's choice at the anchors
    header = {
        "env": env,
        "args": {"budget_min": args.budget, "parts": list(args.parts), "seed": args.seed},
        "dry_run": args.dry_run,
    }
    run = Run(
        device=device,
        dtypes=(torch.bfloat16, torch.float32),
        sizes=dry_run_sizes() if args.dry_run else gpu_sizes(),
        budget=budget,
        folder=folder,
        dry_run=args.dry_run,
        seed=args.seed,
        header=header,
        fla_second_opinion="always" if args.dry_run else "on miss",
    )
    print(
        f"gpu_check on {env['device']} ({env['arch']}), budget {args.budget:g} min, parts "
        f"{', '.join(args.parts)}{' (dry run)' if args.dry_run else ''}; writing to {folder}"
    )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    from kimi_linear.kernels import utils as kernel_utils

    compile_log = CompileLog()
    compile_log.install()
    reports = []
    budget.start_timer()
    try:
        for part in args.parts:
            kernel_utils.set_autotune_space(PART_SPACE[part])
            header["autotune_space"] = PART_SPACE[part]
            mark = compile_log.mark()
            part_report = run_part(run, part, part_items(run, part))
            part_report.data["compile"] = compile_log.since(mark)
            part_report.data["fla_dispatch"] = fla_dispatch()
            part_report.save()
            reports.append(part_report)
    finally:
        budget.stop_timer()
        compile_log.uninstall()
        kernel_utils.set_autotune_space(None)
    summary = write_summary(folder)
    verdict = summary["verdict"]
    validated = "yes" if verdict["kernels_validated"] else "no"
    print(f"verdict: kernels validated on this GPU: {validated} ({verdict['reason']})")
    print(
        f"wrote {folder / 'gpu_check.md'} and the part files beside it ({budget.elapsed():.0f} s)"
    )
    not_passed = [
        f"{r.part}: {i['name']} ({i['status']})"
        for r in reports
        for i in r.items
        if i["status"] not in ("pass", "ok")
    ]
    if not_passed:
        print(
            f"exit 1: {len(not_passed)} item(s) did not pass: " + "; ".join(not_passed[:10]),
            file=sys.stderr,
        )
        return 1
    return 0
