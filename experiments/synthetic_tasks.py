"""Synthetic-task study: KDA vs a GDN-like gate vs MLA vs the 3:1 hybrid (Kimi Linear paper, 5.1).

Trains four token mixers at (nearly) equal parameter count on the synthetic tasks of
:mod:`kimi_linear.lightning.data` -- multi-query associative recall (MQAR), palindrome and
stack -- with the training stack the ``kimi-linear`` CLI uses
(:class:`~kimi_linear.lightning.module.KimiLinearLitModule`,
:class:`~kimi_linear.lightning.data.SyntheticDataModule`, a Lightning ``Trainer``):

* ``kda``     every layer Kimi Delta Attention (per-channel decay gate)
* ``gdn``     every layer KDA with ``kda_gate="head"`` (one decay per head: Gated DeltaNet-like)
* ``mla``     every layer multi-head latent attention (full softmax attention, RoPE)
* ``hybrid``  three KDA layers then one MLA layer (Kimi Linear's 3:1 pattern)

KDA, GDN-like and MLA-only have 2 layers (the paper's depth), the hybrid 4 (a 3:1 pattern needs
them); each has a dense SwiGLU MLP whose width is set per model so that the parameter count
matches the hybrid's to within one MLP unit.

Protocol (one script runs all of it):

1. **Learning-rate sweep**: every (task, model) at the shortest training length, seed 0, for
   every learning rate of ``--lrs`` (the same grid for all models); the learning rate with the
   best final answer accuracy at the training length is chosen (ties: the smaller one).
2. **Seeds**: every (task, training length, model) at its chosen learning rate for every seed of
   ``--seeds`` (seed 0 at the shortest length is the sweep's run).
3. Each run trains until the **convergence rule** -- answer accuracy on the validation set
   ``>= --target`` at an evaluation (every ``--eval-every`` steps) -- or the **step cap**
   ``--max-steps``, the same for all models; it is then evaluated at its training length and at
   ``--eval-factor`` times it (the same task and vocabulary, longer sequences).
4. **Sanity gate**: the MLA-only model must solve MQAR at the shortest training length (mean
   answer accuracy ``> 0.9``); if it does not, the setup is wrong and the results file says so
   instead of comparing the models.

Settings (``--profile``): ``paper`` follows the paper where it states them (2 heads x 128, so
hidden 256; training lengths 256, 512, 1024, 2048; up to 20K steps; learning rates 5e-5, 1e-4,
5e-4, 1e-3); the task options the paper does not state are the data module's defaults
(Zoology's MQAR: 16 key-value pairs, 256 tokens; palindrome over 64 symbols; stack: 64 stacks of
64 values). It is meant for ``--device cuda``. ``cpu`` (the CPU default) changes, so that it fits
a CPU (``DEVIATIONS`` in :mod:`experiments.synthetic_setup` lists every change; the results file
repeats it): hidden 64 as 4 heads x 16 for both mixers, training length 64, at most 3000 steps,
learning rates 5e-4, 1e-3, 3e-3 (shorter runs need larger steps), MQAR with 8 pairs over 64
tokens, palindrome over 16 symbols, stack of 16 values.

The MLA-only model rotates its rope slice (RoPE, as in Kimi K2); the hybrid's MLA layer is NoPE
as in Kimi Linear. ``SETUP_HISTORY`` (same module) records how the CPU profile got here (the
results file repeats it): the MLA-only sanity gate failed until two causes were removed -- a 1000-step cap,
over which the learning rate decays too early, and an MQAR layout that fed the answers back into
the input, which lets a model score 0.39 by elimination instead of recall.

Resumable: every finished run is saved as ``runs/<key>.json`` under the output folder with the
settings it ran under; a rerun skips the runs already saved with the same settings (changed
settings rerun them). A progress line after each run gives the runs done and an estimate of the
time left. Outputs (``--out-dir``, default ``experiments/results/``): ``synthetic_tasks.json``
(protocol, chosen learning rates, every run), ``synthetic_tasks.md`` (protocol, sanity gate,
mean and spread per cell, which of the paper's orderings are reproduced) and
``synthetic_tasks.png`` (answer accuracy vs length per task, error bars: one standard deviation
over seeds).

    python -m experiments.synthetic_tasks                    # the CPU study (hours on 2 cores)
    python -m experiments.synthetic_tasks --device cuda      # the paper-size study
    python -m experiments.synthetic_tasks --quick            # a smoke run (under a minute)
    python -m experiments.synthetic_tasks --report-only --out-dir /tmp/report \
        --runs-dir experiments/results/runs                   # the report of the saved runs

This module is the command (its arguments and the protocol's order); the study's pieces live
beside it by job: :mod:`experiments.synthetic_setup` (models, profiles, deviations),
:mod:`experiments.synthetic_runs` (one run, resumable) and :mod:`experiments.synthetic_report`
(statistics, Markdown, plot).

The committed results (``experiments/results/synthetic_tasks.*``) are never replaced unless
``--overwrite`` is given: a run that would write them stops before any work (``--quick`` writes
to the git-ignored ``results/quick/``, ``--out-dir`` elsewhere; ``--runs-dir`` reads and saves
the runs in another folder than ``OUT_DIR/runs``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from experiments.synthetic_report import plot, summarize, write_markdown
from experiments.synthetic_runs import Progress, run_key, run_one, run_or_load, settings
from experiments.synthetic_setup import MODELS, PROFILES, SANITY_THRESHOLD, matched_overrides
from kimi_linear.lightning.data import SyntheticDataModule
from kimi_linear.ops.options import KDA_BACKENDS


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {__spec__.name}",
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for the protocol and the two profiles.",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--profile", default=None, choices=list(PROFILES),
                   help="settings (default: cpu on CPU, paper on CUDA)")  # fmt: skip
    p.add_argument("--tasks", nargs="+", default=["mqar", "palindrome", "stack"],
                   choices=["mqar", "palindrome", "stack"])  # fmt: skip
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--train-lengths", nargs="+", type=int, default=None)
    p.add_argument("--eval-factor", type=int, default=2, help="longer evaluation length / train")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="learning-rate grid")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-steps", type=int, default=None, help="step cap (same for all)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations")
    p.add_argument("--target", type=float, default=0.99, help="convergence: answer accuracy")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-val", type=int, default=None)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muonclip"])
    p.add_argument("--precision", default=None, help="default: 32-true on CPU, bf16-mixed on CUDA")
    p.add_argument("--kda-backend", default=None, choices=KDA_BACKENDS,
                   help="default: torch on CPU, auto on CUDA")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--out-dir", default=None,
                   help="output folder (default experiments/results; --quick: .../quick)")  # fmt: skip
    p.add_argument("--runs-dir", default=None,
                   help="folder of the saved runs (read and written; default OUT_DIR/runs)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace the committed results (experiments/results/synthetic_tasks.*); "
                        "without it, a run that would replace them stops before any work")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the results from the runs saved under these "
                        "settings and list the runs still missing")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: MQAR at length 32, 4 steps, 2 learning rates, 2 seeds")  # fmt: skip
    args = p.parse_args(argv)
    args.profile = args.profile or ("paper" if args.device == "cuda" else "cpu")
    prof = PROFILES[args.profile]
    for name in ("train_lengths", "lrs", "max_steps", "eval_every", "batch_size", "num_val"):
        if getattr(args, name) is None:
            setattr(args, name, prof[name])
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    args.kda_backend = args.kda_backend or ("auto" if args.device == "cuda" else "torch")
    args.tasks_kwargs = dict(prof["tasks"])
    if args.quick:
        args.tasks, args.train_lengths, args.lrs, args.seeds = ["mqar"], [32], [1e-3, 3e-3], [0, 1]
        args.max_steps, args.eval_every, args.batch_size, args.num_val = 4, 2, 8, 16
        args.tasks_kwargs["mqar"] = {"num_kv_pairs": 4, "num_tokens": 64}
    for name in ("max_steps", "eval_every", "batch_size", "num_val", "threads", "eval_factor"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(L < 1 for L in args.train_lengths):
        p.error(f"--train-lengths must be positive, got {args.train_lengths}")
    if any(not (lr > 0 and math.isfinite(lr)) for lr in args.lrs):
        p.error(f"--lrs must be positive, got {args.lrs}")
    if not 0 < args.target <= 1:
        p.error(f"--target must be in (0, 1], got {args.target}")
    if 0 not in args.seeds:
        p.error(f"--seeds must include 0 (the sweep's seed), got {args.seeds}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    # one progress line per run instead of Lightning's per-fit banners
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    root = Path(__file__).resolve().parent / "results"
    out = Path(args.out_dir) if args.out_dir is not None else root / ("quick" if args.quick else "")
    committed = [out / f"synthetic_tasks.{ext}" for ext in ("json", "md", "png")]
    committed = [f for f in committed if f.exists()]
    if args.out_dir is None and not args.quick and committed and not args.overwrite:
        print(
            f"error: {committed[0]} exists (committed results); pass --overwrite to replace "
            "them, or --out-dir DIR to write elsewhere (with --runs-dir "
            f"{root / 'runs'} to read the saved runs from here)",
            file=sys.stderr,
        )
        return 2
    folder = Path(args.runs_dir) if args.runs_dir is not None else out / "runs"
    if args.report_only and not folder.is_dir():
        print(f"error: --report-only: no saved runs in {folder} (see --runs-dir)", file=sys.stderr)
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    print(f"runs: {folder}; results: {out}", flush=True)

    matched, meta_params, meta_width = {}, {}, {}
    for task in args.tasks:
        vocab = SyntheticDataModule(
            task=task, seq_len=max(args.train_lengths), task_kwargs=args.tasks_kwargs[task]
        ).vocab_size
        matched[task] = matched_overrides(vocab, args.kda_backend, args.profile)
        meta_params[task] = {m: matched[task][m][1] for m in args.models}
        meta_width[task] = {m: matched[task][m][0]["intermediate_size"] for m in args.models}

    L0 = min(args.train_lengths)
    sweep = [(t, L0, m, lr, 0) for t in args.tasks for m in args.models for lr in args.lrs]
    n_final = len(args.tasks) * len(args.models) * (len(args.train_lengths) * len(args.seeds) - 1)
    progress = Progress(len(sweep) + n_final, enabled=not args.no_progress)
    runs: list[dict[str, Any]] = []
    missing: list[str] = []
    t_start = time.perf_counter()

    def do(task: str, L: int, model: str, lr: float, seed: int) -> dict[str, Any] | None:
        ov = matched[task][model][0]
        key = run_key(task, L, model, lr, seed)
        result, seconds = run_or_load(
            folder, key, settings(args, task, ov),
            None if args.report_only else lambda: run_one(task, L, model, lr, seed, ov, args),
        )  # fmt: skip
        if result is None:
            missing.append(key)
            return None
        acc = result["eval"][str(L)]["acc"]
        progress.update(
            f"{key}: acc {acc:.3f}, {result['steps']} steps"
            + (" (saved)" if seconds is None else f" ({seconds:.0f} s)"),
            seconds,
        )
        runs.append(result)
        return result

    chosen: dict[str, float] = {}
    for task in args.tasks:
        for model in args.models:
            results = [do(task, L0, model, lr, 0) for lr in args.lrs]
            if None in results:  # report only: the sweep is unfinished, so no rate is chosen
                continue
            best = max(results, key=lambda r: (r["eval"][str(L0)]["acc"], -r["lr"]))
            chosen[f"{task}/{model}"] = best["lr"]
    for task in args.tasks:
        for L in args.train_lengths:
            for model in args.models:
                for seed in args.seeds:
                    if (L, seed) == (L0, 0):
                        continue
                    if f"{task}/{model}" in chosen:
                        do(task, L, model, chosen[f"{task}/{model}"], seed)
                    else:
                        missing.append(f"{task}_L{L}_{model}_lr?_seed{seed}")

    summary = summarize(runs, chosen, args)
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))"
    )
    meta = {
        "argv": argv, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device_name": device_name, "torch": torch.__version__, "profile": args.profile,
        "base": PROFILES[args.profile]["base"], "tasks": {t: args.tasks_kwargs[t] for t in args.tasks},
        "train_lengths": args.train_lengths, "eval_factor": args.eval_factor, "lrs": args.lrs,
        "seeds": args.seeds, "max_steps": args.max_steps, "eval_every": args.eval_every,
        "target": args.target, "batch_size": args.batch_size, "num_val": args.num_val,
        "optimizer": args.optimizer, "precision": args.precision, "kda_backend": args.kda_backend,
        "chosen_lr": chosen, "parameters": meta_params, "mlp_width": meta_width,
        "session_s": round(time.perf_counter() - t_start, 1), "num_runs": len(runs),
        "runs_wall_s": round(sum(r["wall_s"] for r in runs), 1), "missing_runs": missing,
    }  # fmt: skip
    (out / "synthetic_tasks.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1) + "\n"
    )
    write_markdown(out / "synthetic_tasks.md", meta, summary)
    if runs:
        plot(out / "synthetic_tasks.png", summary)
    else:  # nothing to draw yet
        print("no run saved yet: no synthetic_tasks.png")
    gate = summary["sanity_gate"]
    if gate is not None:
        print(f"sanity gate (MLA-only MQAR accuracy > {SANITY_THRESHOLD}): "
              f"{'passed' if gate['passed'] else 'FAILED'} ({gate['acc']:.3f})")  # fmt: skip
    if missing:
        print(f"{len(missing)} runs not saved yet (see the results file)")
    print(f"wrote {out / 'synthetic_tasks.json'}, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
