"""The synthetic-task study's runs: one training run to convergence or the step cap, resumable on disk.

Every finished run is saved as ``runs/<key>.json`` with the settings it ran under
(:func:`run_or_load`); :class:`Progress` prints the runs done and the time left.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from kimi_linear.lightning.data import SyntheticDataModule, make_task
from kimi_linear.lightning.module import KimiLinearLitModule


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


class Converged(pl.Callback):
    """Stops training once the validation answer accuracy reaches ``target``."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        acc = trainer.callback_metrics.get("val/acc")
        if not trainer.sanity_checking and acc is not None and float(acc) >= self.target:
            trainer.should_stop = True


# ------------------------------------------------------------------------------------- runs
def run_key(task: str, L: int, model: str, lr: float, seed: int) -> str:
    return f"{task}_L{L}_{model}_lr{lr:g}_seed{seed}"


def settings(args: argparse.Namespace, task: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Everything a run's result depends on besides (task, length, model, lr, seed)."""
    return {
        "profile": args.profile, "overrides": overrides, "task_kwargs": args.tasks_kwargs[task],
        # every option of the task, defaults included: a changed default reruns the runs
        "task_options": dataclasses.asdict(make_task(task, **args.tasks_kwargs[task])),
        "max_steps": args.max_steps, "eval_every": args.eval_every, "target": args.target,
        "batch_size": args.batch_size, "num_val": args.num_val, "optimizer": args.optimizer,
        "eval_factor": args.eval_factor, "precision": args.precision, "device": args.device,
    }  # fmt: skip


def evaluate(
    trainer: pl.Trainer, module: KimiLinearLitModule, task: str, L: int, seed: int, args: Any
) -> dict[str, float]:
    dm = SyntheticDataModule(
        task=task, seq_len=L, batch_size=args.batch_size, num_train=1, num_val=args.num_val,
        seed=seed, task_kwargs=args.tasks_kwargs[task],
    )  # fmt: skip
    if dm.vocab_size != module.model.config.vocab_size:
        raise RuntimeError(f"{task}: the vocabulary changes with the length ({L}); cannot evaluate")
    trainer.validate(module, datamodule=dm, verbose=False)
    m = trainer.callback_metrics
    return {"acc": float(m["val/acc"]), "exact_match": float(m["val/exact_match"])}


def run_one(
    task: str, L: int, model: str, lr: float, seed: int, overrides: dict[str, Any], args: Any
) -> dict[str, Any]:
    """Train one model until the convergence rule or the step cap; evaluate at L and longer."""
    pl.seed_everything(seed, verbose=False)
    dm = SyntheticDataModule(
        task=task, seq_len=L, batch_size=args.batch_size,
        num_train=args.max_steps * args.batch_size, num_val=args.num_val, seed=seed,
        task_kwargs=args.tasks_kwargs[task],
    )  # fmt: skip
    module = KimiLinearLitModule(
        preset="tiny", overrides=overrides, vocab_size=dm.vocab_size, optimizer=args.optimizer,
        lr=lr, weight_decay=0.0, warmup_steps=max(1, min(100, args.max_steps // 20)),
        max_steps=args.max_steps,
    )  # fmt: skip
    history = EvalHistory()
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_steps=args.max_steps,
        precision=args.precision,
        val_check_interval=min(args.eval_every, args.max_steps),
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[history, Converged(args.target)],
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    steps = trainer.global_step
    converged = bool(history.history) and history.history[-1].get("acc", 0.0) >= args.target
    evals = {
        str(Le): evaluate(trainer, module, task, Le, seed, args) for Le in (L, L * args.eval_factor)
    }
    return {
        "task": task, "train_length": L, "model": model, "lr": lr, "seed": seed,
        "steps": steps, "converged": converged, "wall_s": round(wall, 2),
        "parameters": module.model.num_parameters(),
        "mlp_width": overrides["intermediate_size"], "eval": evals, "history": history.history,
    }  # fmt: skip


class Progress:
    """One line per finished run: a bar, runs done, and the time left estimated from the mean
    wall time of the runs trained in this session (runs loaded from disk take no time)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.trained: list[float] = []

    def update(self, label: str, seconds: float | None) -> str:
        self.done += 1
        if seconds is not None:
            self.trained.append(seconds)
        left = self.total - self.done
        eta = (
            f"~{statistics.mean(self.trained) * left / 60:.1f} min left"
            if self.trained
            else "time left: not yet estimated"
        )
        bar = "#" * round(20 * self.done / self.total)
        line = f"[{bar:<20}] {self.done}/{self.total} runs, {eta} | {label}"
        if self.enabled:
            print(line, flush=True)
        return line


def run_or_load(
    folder: Path, key: str, config: dict[str, Any], run: Any
) -> tuple[dict[str, Any] | None, float | None]:
    """The saved result of ``key`` if it ran under ``config``; else run it now and save it (with
    ``run=None``, report only: ``(None, None)``)."""
    path = folder / f"{key}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == config:
            return saved["result"], None
        if run is None:
            return None, None
        print(f"note: {path.name} was saved under other settings; running it again", flush=True)
    elif run is None:
        return None, None
    t0 = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - t0
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": config, "result": result}, indent=1) + "\n")
    tmp.replace(path)  # atomic: an interrupted run leaves no half-written result
    return result, seconds
