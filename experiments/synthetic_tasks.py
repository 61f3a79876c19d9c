"""Synthetic-task study: KDA vs a GDN-like gate vs MLA vs the 3:1 hybrid (Kimi Linear paper, 5.1).

Trains four token mixers at (nearly) equal parameter count on the synthetic tasks of
:mod:`kimi_linear.lightning.data` -- multi-query associative recall (MQAR), palindrome and
stack -- at two sequence lengths, with the training stack the ``kimi-linear`` CLI uses
(:class:`~kimi_linear.lightning.module.KimiLinearLitModule`,
:class:`~kimi_linear.lightning.data.SyntheticDataModule`, a Lightning ``Trainer``):

* ``kda``     every layer Kimi Delta Attention (per-channel decay gate)
* ``gdn``     every layer KDA with ``kda_gate="head"`` (one decay per head: Gated DeltaNet-like)
* ``mla``     every layer multi-head latent attention (full softmax attention, NoPE)
* ``hybrid``  three KDA layers then one MLA layer (Kimi Linear's 3:1 pattern)

Every model has 4 layers, hidden 64, 2 heads (KDA head dim 32) and a dense SwiGLU MLP whose width
is set per variant so the total parameter count matches the hybrid's to within one MLP unit.
The paper's own setting is larger (2 layers x 2 heads of 128, up to 20K steps, lengths
256-2048); the defaults here fit a CPU in about 30 minutes, so read the numbers as a smoke-scale
replication.  Outputs (under ``--out_dir``, default ``experiments/results/``):
``synthetic_tasks.json`` (every run: seed, steps, wall time, parameters, final and per-eval
metrics), ``synthetic_tasks.md`` (the table) and ``synthetic_tasks.png`` (validation exact-match
curves).

    python experiments/synthetic_tasks.py              # full default study (~30 min CPU)
    python experiments/synthetic_tasks.py --quick      # seconds: a smoke test of the pipeline
    python experiments/synthetic_tasks.py --accelerator gpu --steps 2000 --lengths 256 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from kimi_linear.lightning.data import SyntheticDataModule
from kimi_linear.lightning.module import KimiLinearLitModule

MODELS: dict[str, dict[str, Any]] = {
    "kda": {"layer_types": ["kda"] * 4},
    "gdn": {"layer_types": ["kda"] * 4, "kda_gate": "head"},
    "mla": {"layer_types": ["mla"] * 4},
    "hybrid": {"layer_types": ["kda", "kda", "kda", "mla"]},
}
TASKS: dict[str, dict[str, Any]] = {
    "mqar": {"num_kv_pairs": 8, "num_tokens": 64},
    "palindrome": {"num_symbols": 16},
    "stack": {"num_stacks": 64, "num_values": 16},
}
BASE = dict(
    num_hidden_layers=4,
    hidden_size=64,
    num_experts=0,
    kda_num_heads=2,
    kda_head_dim=32,
    num_attention_heads=2,
)
REFERENCE_WIDTH = 256  # MLP width of the hybrid; the others are matched to its parameter count


def count_parameters(overrides: dict[str, Any], vocab_size: int) -> int:
    module = KimiLinearLitModule(preset="tiny", overrides=overrides, vocab_size=vocab_size)
    return module.model.num_parameters()


def matched_overrides(vocab_size: int, backend: str) -> dict[str, tuple[dict[str, Any], int]]:
    """Per model: overrides whose MLP width brings its parameter count to the hybrid's."""
    base = {**BASE, "kda_backend": backend}
    target = count_parameters(
        {**base, **MODELS["hybrid"], "intermediate_size": REFERENCE_WIDTH}, vocab_size
    )
    out = {}
    for name, kinds in MODELS.items():
        p1 = count_parameters({**base, **kinds, "intermediate_size": 64}, vocab_size)
        p2 = count_parameters({**base, **kinds, "intermediate_size": 128}, vocab_size)
        per_unit = (p2 - p1) / 64
        width = max(8, round(64 + (target - p1) / per_unit))
        ov = {**base, **kinds, "intermediate_size": width}
        out[name] = (ov, count_parameters(ov, vocab_size))
    return out


class EvalHistory(pl.Callback):
    """Records (step, val/acc, val/exact_match, val/loss) after every validation run."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.history.append(
            {
                "step": trainer.global_step,
                **{
                    k.split("/")[1]: float(m[k])
                    for k in ("val/acc", "val/exact_match", "val/loss")
                    if k in m
                },
            }
        )


def run_one(
    model: str,
    overrides: dict[str, Any],
    task: str,
    seq_len: int,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    dm = SyntheticDataModule(
        task=task,
        seq_len=seq_len,
        batch_size=args.batch_size,
        num_train=args.steps * args.batch_size,
        num_val=args.num_val,
        seed=seed,
        task_kwargs=TASKS[task],
    )
    module = KimiLinearLitModule(
        preset="tiny",
        overrides=overrides,
        vocab_size=dm.vocab_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=0.0,
        warmup_steps=max(1, args.steps // 20),
        max_steps=args.steps,
    )
    history = EvalHistory()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=args.steps,
        precision=args.precision,
        val_check_interval=max(1, args.steps // args.evals),
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[history],
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    if not history.history or history.history[-1]["step"] != args.steps:
        trainer.validate(module, datamodule=dm, verbose=False)
        m = trainer.callback_metrics
        history.history.append(
            {
                "step": args.steps,
                "acc": float(m["val/acc"]),
                "exact_match": float(m["val/exact_match"]),
                "loss": float(m["val/loss"]),
            }
        )
    final = history.history[-1]
    return {
        "model": model,
        "task": task,
        "seq_len": seq_len,
        "seed": seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "parameters": module.model.num_parameters(),
        "mlp_width": overrides["intermediate_size"],
        "wall_s": round(wall, 2),
        "val_acc": final["acc"],
        "val_exact_match": final["exact_match"],
        "val_loss": final["loss"],
        "history": history.history,
    }


def write_markdown(path: Path, meta: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    models = list(dict.fromkeys(r["model"] for r in runs))
    lines = [
        "# Synthetic tasks: KDA vs GDN-like vs MLA vs 3:1 hybrid",
        "",
        f"Generated by `{' '.join(['experiments/synthetic_tasks.py', *meta['argv']])}` on {meta['date']} "
        f"({meta['device']}, torch {meta['torch']}, Python {meta['python']}).",
        f"{meta['steps']} steps x batch {meta['batch_size']}, optimizer {meta['optimizer']} lr {meta['lr']}, "
        f"seeds {meta['seeds']}; validation on {meta['num_val']} held-out examples per task and length.",
        "",
        "Parameters (MLP width) per task vocabulary:",
        "",
        *[
            f"- {t}: "
            + ", ".join(
                f"{m} {meta['parameters'][t][m]:,} ({meta['mlp_width'][t][m]})" for m in models
            )
            for t in meta["parameters"]
        ],
        "",
        "Validation accuracy on the answer tokens / exact match (every answer of a sequence right), "
        "mean over seeds:",
        "",
        "| task | length | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for task in dict.fromkeys(r["task"] for r in runs):
        for L in sorted({r["seq_len"] for r in runs if r["task"] == task}):
            cells = []
            for m in models:
                sel = [r for r in runs if (r["task"], r["seq_len"], r["model"]) == (task, L, m)]
                acc = sum(r["val_acc"] for r in sel) / len(sel)
                em = sum(r["val_exact_match"] for r in sel) / len(sel)
                cells.append(f"{acc:.3f} / {em:.3f}")
            lines.append(f"| {task} | {L} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Wall time per run (s, training + evaluation):",
        "",
        "| task | length | " + " | ".join(models) + " |",
        "|---|---|" + "---|" * len(models),
    ]
    for task in dict.fromkeys(r["task"] for r in runs):
        for L in sorted({r["seq_len"] for r in runs if r["task"] == task}):
            cells = []
            for m in models:
                sel = [
                    r["wall_s"]
                    for r in runs
                    if (r["task"], r["seq_len"], r["model"]) == (task, L, m)
                ]
                cells.append(f"{sum(sel) / len(sel):.1f}")
            lines.append(f"| {task} | {L} | " + " | ".join(cells) + " |")
    lines += ["", f"Total wall time: {meta['total_wall_s']:.0f} s.", ""]
    path.write_text("\n".join(lines))


def plot(path: Path, runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    lengths = sorted({r["seq_len"] for r in runs})
    fig, axes = plt.subplots(
        len(tasks),
        len(lengths),
        figsize=(4.2 * len(lengths), 3.0 * len(tasks)),
        squeeze=False,
        sharey=True,
    )
    colors = {"kda": "C0", "gdn": "C1", "mla": "C2", "hybrid": "C3"}
    for i, task in enumerate(tasks):
        for j, L in enumerate(lengths):
            ax = axes[i][j]
            for m in colors:
                sel = [r for r in runs if (r["task"], r["seq_len"], r["model"]) == (task, L, m)]
                for k, r in enumerate(sel):
                    steps = [h["step"] for h in r["history"]]
                    acc = [h["acc"] for h in r["history"]]
                    ax.plot(
                        steps, acc, color=colors[m], marker="o", ms=3, label=m if k == 0 else None
                    )
            ax.set_title(f"{task}, length {L}")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            if i == len(tasks) - 1:
                ax.set_xlabel("training step")
            if j == 0:
                ax.set_ylabel("val accuracy (answers)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--lengths", nargs="+", type=int, default=[64, 128])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muonclip"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--num_val", type=int, default=128)
    p.add_argument("--evals", type=int, default=4, help="validation runs during training")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--kda_backend", default="torch", choices=["torch", "auto", "triton", "fla"])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument(
        "--out_dir",
        "--out-dir",
        dest="out_dir",
        default=None,
        help="output folder (default experiments/results, quick: experiments/results/quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a few steps of one task at one length (smoke test)"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.tasks, args.lengths, args.steps, args.batch_size = ["mqar"], [32], 4, 8
        args.num_val, args.evals, args.seeds = 8, 2, [0]
        TASKS["mqar"] = {"num_kv_pairs": 4, "num_tokens": 64}
    for name in ("steps", "batch_size", "num_val", "evals", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.accelerator == "cpu":
        torch.set_num_threads(args.threads)
    out = (
        Path(args.out_dir)
        if args.out_dir is not None
        else Path(__file__).resolve().parent / "results"
    )
    if args.out_dir is None and args.quick:  # a smoke run never overwrites the published results
        out = out / "quick"
    out.mkdir(parents=True, exist_ok=True)

    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    meta_params: dict[str, dict[str, int]] = {}
    meta_width: dict[str, dict[str, int]] = {}
    for task in args.tasks:
        vocab = SyntheticDataModule(
            task=task, seq_len=max(args.lengths), task_kwargs=TASKS[task]
        ).vocab_size
        matched = matched_overrides(vocab, args.kda_backend)
        for L in args.lengths:
            for seed in args.seeds:
                for model in args.models:
                    ov, n_params = matched[model]
                    meta_params.setdefault(task, {})[model] = n_params
                    meta_width.setdefault(task, {})[model] = ov["intermediate_size"]
                    r = run_one(model, ov, task, L, seed, args)
                    runs.append(r)
                    print(
                        f"{task:10s} L={L:<5d} seed={seed} {model:7s} params={r['parameters']:,} "
                        f"acc={r['val_acc']:.3f} exact={r['val_exact_match']:.3f} "
                        f"loss={r['val_loss']:.3f} ({r['wall_s']:.1f} s)",
                        flush=True,
                    )
    total = time.perf_counter() - t_start
    device = (
        torch.cuda.get_device_name()
        if args.accelerator == "gpu" and torch.cuda.is_available()
        else (f"CPU ({platform.processor() or platform.machine()}, {args.threads} thread(s))")
    )
    meta = {
        "argv": argv,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "optimizer": args.optimizer,
        "seeds": args.seeds,
        "num_val": args.num_val,
        "lengths": args.lengths,
        "tasks": {t: TASKS[t] for t in args.tasks},
        "models": {m: MODELS[m] for m in args.models},
        "base": BASE,
        "parameters": meta_params,
        "mlp_width": meta_width,
        "total_wall_s": round(total, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    (out / "synthetic_tasks.json").write_text(
        json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n"
    )
    write_markdown(out / "synthetic_tasks.md", meta, runs)
    plot(out / "synthetic_tasks.png", runs)
    print(f"wrote {out / 'synthetic_tasks.json'}, .md and .png in {total:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
