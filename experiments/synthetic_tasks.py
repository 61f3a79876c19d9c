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
a CPU (:data:`DEVIATIONS` lists every change; the results file repeats it): hidden 64 as 4 heads
x 16 for both mixers, training length 64, at most 3000 steps, learning rates 5e-4, 1e-3, 3e-3
(shorter runs need larger steps), MQAR with 8 pairs over 64 tokens, palindrome over 16 symbols,
stack of 16 values.

The MLA-only model rotates its rope slice (RoPE, as in Kimi K2); the hybrid's MLA layer is NoPE
as in Kimi Linear. :data:`SETUP_HISTORY` records how the CPU profile got here (the results file
repeats it): the MLA-only sanity gate failed until two causes were removed -- a 1000-step cap,
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

The committed results (``experiments/results/synthetic_tasks.*``) are never replaced unless
``--overwrite`` is given: a run that would write them stops before any work (``--quick`` writes
to the git-ignored ``results/quick/``, ``--out-dir`` elsewhere; ``--runs-dir`` reads and saves
the runs in another folder than ``OUT_DIR/runs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from kimi_linear.lightning.data import SyntheticDataModule, make_task
from kimi_linear.lightning.module import KimiLinearLitModule
from kimi_linear.ops.options import KDA_BACKENDS

MODELS: dict[str, dict[str, Any]] = {
    "kda": {"num_hidden_layers": 2, "layer_types": ["kda"] * 2},
    "gdn": {"num_hidden_layers": 2, "layer_types": ["kda"] * 2, "kda_gate": "head"},
    # RoPE: a NoPE attention-only stack has no position signal (Kimi Linear's MLA layers get
    # theirs from the KDA layers), so it cannot form the previous-token heads MQAR needs.
    "mla": {"num_hidden_layers": 2, "layer_types": ["mla"] * 2, "mla_use_nope": False},
    # the only model with 4 layers: a 3:1 pattern needs them (the MLP widths match parameters)
    "hybrid": {"num_hidden_layers": 4, "layer_types": ["kda", "kda", "kda", "mla"]},
}
PROFILES: dict[str, dict[str, Any]] = {
    "paper": {
        "base": dict(hidden_size=256, num_experts=0, kda_num_heads=2,
                     kda_head_dim=128, num_attention_heads=2, qk_nope_head_dim=64,
                     qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=256),
        "reference_width": 1024,
        "tasks": {"mqar": {"num_kv_pairs": 16, "num_tokens": 256},
                  "palindrome": {"num_symbols": 64},
                  "stack": {"num_stacks": 64, "num_values": 64}},
        "train_lengths": [256, 512, 1024, 2048], "max_steps": 20_000, "eval_every": 500,
        "lrs": [5e-5, 1e-4, 5e-4, 1e-3], "batch_size": 32, "num_val": 256,
    },
    "cpu": {
        "base": dict(hidden_size=64, num_experts=0, kda_num_heads=4,
                     kda_head_dim=16, num_attention_heads=4, qk_nope_head_dim=16,
                     qk_rope_head_dim=16, v_head_dim=16, kv_lora_rank=64),
        "reference_width": 256,
        "tasks": {"mqar": {"num_kv_pairs": 8, "num_tokens": 64},
                  "palindrome": {"num_symbols": 16},
                  "stack": {"num_stacks": 64, "num_values": 16}},
        "train_lengths": [64], "max_steps": 3000, "eval_every": 100,
        "lrs": [5e-4, 1e-3, 3e-3], "batch_size": 32, "num_val": 256,
    },
}  # fmt: skip
#: What each profile changes from the paper's synthetic-task setup (Kimi Linear paper, 5.1).
DEVIATIONS: dict[str, list[str]] = {
    "paper": [
        "the hybrid has 4 layers (3 KDA + 1 MLA; a 3:1 pattern needs them), the others the "
        "paper's 2",
        "task options the paper does not state: Zoology's MQAR generator defaults (16 pairs, 256 "
        "tokens), palindrome over 64 symbols, 64 stacks of 64 values",
        "the MLA-only model uses RoPE (NoPE attention alone has no position signal)",
    ],
    "cpu": [
        "the hybrid has 4 layers (3 KDA + 1 MLA; a 3:1 pattern needs them), the others the "
        "paper's 2",
        "hidden 64 as 4 heads x 16 (KDA) / 4 heads with 16 + 16 query-key and 16 value dims "
        "(MLA) instead of 2 heads x 128",
        "one training length, 64 tokens, evaluated at 64 and 128, instead of 256 to 2048",
        "a cap of 3000 steps (batch 32) instead of up to 20K",
        "learning rates 5e-4, 1e-3, 3e-3 instead of 5e-5, 1e-4, 5e-4, 1e-3",
        "MQAR with 8 pairs over a 64-token vocabulary, palindrome over 16 symbols, 64 stacks of "
        "16 values",
        "the MLA-only model uses RoPE (NoPE attention alone has no position signal; measured in "
        "the module docstring)",
    ],
}
#: How the CPU profile was chosen (MQAR, 8 pairs over 64 tokens, length 64; answer accuracy):
#: the MLA-only sanity gate failed at every step until MQAR followed Zoology's layout (answers not
#: fed back) and the cap went from 1000 to 3000 steps. The "plain loop" and GPT figures come from
#: hand-run diagnostic loops on the same data (AdamW, batch 32, seed 0 unless stated), not from
#: this script; the others are runs of this script.
SETUP_HISTORY: list[str] = [
    "4 layers, 2 heads x 32, MLA-only NoPE, cap 1500, seed 0: MLA-only 0.30 / 0.29 / 0.25 at "
    "learning rates 5e-4 / 1e-3 / 3e-3. NoPE attention alone has no position signal for the "
    "previous-token head recall needs: a plain two-layer NoPE GPT fails too (0.18 after 1500 "
    "steps) where the same GPT with learned positions reaches 1.00 after 500",
    "the same with RoPE: 0.36 / 0.40 / 0.26",
    "4 layers, 4 heads x 16, RoPE, cap 1000 (25 of 60 runs, then stopped): MLA-only 0.28 / "
    "0.40 / 0.35; KDA 0.24 / 0.30 / 0.96",
    "a plain training loop (no Lightning; AdamW betas (0.9, 0.999), constant lr 1e-3, MLP width "
    "256): a 2-layer 4-head RoPE MLA-only model reached 0.99 by step 750; with 4 layers 0.37 at step 750",
    "2 layers for KDA, GDN-like and MLA-only, 4 for the hybrid, 4 heads x 16, cap 1000 (this "
    "profile; MQAR finished, 20 runs): MLA-only 0.33 / 0.40 / 0.37 (seeds 1, 2 at 1e-3: 0.40, "
    "0.39): the gate fails",
    "plain-loop checks at the study's MLP width (614): betas (0.9, 0.95) with a constant lr 1e-3: "
    "0.38 after 1000 steps; betas (0.9, 0.999) with the study's warmup + cosine: 0.39. The one "
    "success (width 256, constant lr) was not reproduced at the matched width: the transition "
    "to recall is slow and seed- and width-sensitive at this size. Next: a longer cap (several "
    "thousand steps) or the paper-size profile on a GPU",
    "a first cause: the learning rate follows warmup + cosine over the cap, so a 1000-step cap "
    "decays it early. This script, MLA-only, lr 1e-3, seed 0: cap 1000 (commit 1062ab6): 0.28 / "
    "0.40 at steps 500 / 1000; cap 3000: 0.992 at step 1400. Plain loop (the study's model, "
    "data, AdamW and schedule, no Lightning): 0.36 / 0.39 at steps 500 / 1000 with the cosine "
    "over 1000 steps, 0.77 / 0.97 / 0.993 at steps 500 / 1000 / 1250 with it over 3000. (The "
    "earlier plain-loop figures came from a loop that was not kept; this one did not reproduce "
    "them.) But at cap 3000 seeds 1 and 2 stayed at 0.388 / 0.391 (lr 5e-4 and 3e-3, seed 0: "
    "0.392 / 0.389): the gate still failed (0.590)",
    "the second cause, in the data: the MQAR generator fed each answer back into the input, "
    "unlike Zoology's, so an answer already given tells which values are still unqueried. The "
    "0.39 plateau is that elimination, not recall: a stuck model (plain loop, step 600, 0.32 "
    "overall) scores 0.24 on the first query of a sequence and 0.68 on the last. Changing the "
    "model did not leave the plateau (plain loop, lr 1e-3, seeds 1 and 2, 1000 steps): rope "
    "dims 32: 0.39 / 0.37; rope theta 500: 0.39 / 0.36; MLP width 256: 0.38 / 0.98",
    "Zoology's layout (this profile): answer slots hold filler in the input, values are "
    "distinct (kimi_linear.lightning.data.MQARTask). Cap 3000, MLA-only: lr 5e-4: 0.765 / "
    "0.981 / 0.993 (seeds 0 / 1 / 2; recall starts after about 1800 steps on seed 0), lr 1e-3 "
    "and 3e-3 (seed 0): 0.155 / 0.160, at the loss of a uniform guess among the 8 values in "
    "context (ln 8). The gate passes (0.913). Learned absolute positions added to the MLA-only "
    "model (plain loop, lr 1e-3, seeds 1 and 2) stay at that plateau too (0.17 / 0.16 after "
    "1500 steps): its slow start is not for lack of a position signal",
]
#: The CPU profile's task options (also used by benchmarks/train_profile.py).
TASKS: dict[str, dict[str, Any]] = PROFILES["cpu"]["tasks"]
BASE = PROFILES["cpu"]["base"]
SANITY_THRESHOLD = 0.9


def count_parameters(overrides: dict[str, Any], vocab_size: int) -> int:
    module = KimiLinearLitModule(preset="tiny", overrides=overrides, vocab_size=vocab_size)
    return module.model.num_parameters()


def matched_overrides(
    vocab_size: int, backend: str, profile: str = "cpu"
) -> dict[str, tuple[dict[str, Any], int]]:
    """Per model: overrides whose MLP width brings its parameter count to the hybrid's."""
    base = {**PROFILES[profile]["base"], "kda_backend": backend}
    ref = PROFILES[profile]["reference_width"]
    target = count_parameters({**base, **MODELS["hybrid"], "intermediate_size": ref}, vocab_size)
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


# ---------------------------------------------------------------------------------- summary
def _stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def _verdict(
    margin: float,
    a: dict[str, float],
    b: dict[str, float],
    resolution: float = 0.0,
    stopped: bool = False,
) -> str:
    """``margin`` (positive: the paper's way) against the noise: a difference within one
    standard deviation over seeds (the larger of the two) or the measurement's resolution is a
    tie, not a reproduction or a contradiction; so is any difference when the convergence rule
    stopped every run of both cells (``stopped``)."""
    if stopped or abs(margin) <= max(a["std"], b["std"], resolution):
        return "tie"
    return "reproduced" if margin > 0 else "not reproduced"


def summarize(runs: list[dict[str, Any]], chosen: dict[str, float], args: Any) -> dict[str, Any]:
    """Mean and spread per (task, train length, model, eval length) at the chosen lr; the
    sanity gate; the paper's orderings."""
    cells: dict[str, Any] = {}
    for r in runs:
        if r["lr"] != chosen.get(f"{r['task']}/{r['model']}") or r["seed"] not in args.seeds:
            continue
        for Le, ev in r["eval"].items():
            key = f"{r['task']}/{r['train_length']}/{r['model']}/{Le}"
            cells.setdefault(key, {"acc": [], "exact_match": [], "steps": [], "converged": []})
            cells[key]["converged"].append(bool(r.get("converged")))
            cells[key]["acc"].append(ev["acc"])
            cells[key]["exact_match"].append(ev["exact_match"])
            cells[key]["steps"].append(r["steps"])
    table = {
        k: {
            **{m: _stats(v[m]) for m in ("acc", "exact_match", "steps")},
            "complete": len(v["acc"]) == len(args.seeds),
            "all_converged": all(v["converged"]),
        }
        for k, v in cells.items()
    }
    # Comparisons use complete cells only (every seed finished): a partial mean is not a result.
    full = {k: c for k, c in table.items() if c["complete"]}

    def both_stopped(a: dict[str, Any], b: dict[str, Any], L: str, Le: str) -> bool:
        """At the training length a run stops once it reaches the target, so when every run
        of both cells did, their accuracies differ only by where each crossed it."""
        return Le == L and a["all_converged"] and b["all_converged"]

    L0 = min(args.train_lengths)
    gate_cell = full.get(f"mqar/{L0}/mla/{L0}")
    gate = None
    if gate_cell is not None:
        gate = {
            "acc": gate_cell["acc"]["mean"],
            "passed": gate_cell["acc"]["mean"] > SANITY_THRESHOLD,
        }
    orderings = []
    for key, cell in full.items():
        task, L, model, Le = key.split("/")
        if model != "kda":
            continue
        other = full.get(f"{task}/{L}/gdn/{Le}")
        if other is not None:
            a, b = cell["acc"]["mean"], other["acc"]["mean"]
            orderings.append({
                "task": task, "train_length": int(L), "eval_length": int(Le),
                "claim": "KDA >= GDN-like (answer accuracy)", "kda": a, "gdn": b,
                "reproduced": a >= b,
                "verdict": _verdict(
                    a - b, cell["acc"], other["acc"], stopped=both_stopped(cell, other, L, Le)
                ),
            })  # fmt: skip
            # the paper's convergence claim is for palindrome and MQAR (not stack)
            if Le == L and task in ("palindrome", "mqar"):
                sa, sb = cell["steps"]["mean"], other["steps"]["mean"]
                # steps are known to the evaluation interval only
                res = getattr(args, "eval_every", 0)
                orderings.append({
                    "task": task, "train_length": int(L), "eval_length": int(Le),
                    "claim": "KDA converges in no more steps than GDN-like", "kda": sa, "gdn": sb,
                    "reproduced": sa <= sb,
                    "verdict": _verdict(sb - sa, cell["steps"], other["steps"], res),
                })  # fmt: skip
    for key, cell in full.items():
        task, L, model, Le = key.split("/")
        if model != "kda":
            continue
        rivals = {
            m: full[f"{task}/{L}/{m}/{Le}"]["acc"]["mean"]
            for m in MODELS
            if m != "kda" and f"{task}/{L}/{m}/{Le}" in full
        }
        # "best of the four" needs all four
        if len(rivals) == len(MODELS) - 1:
            best_rival = max(rivals, key=lambda m: rivals[m])
            rival_cell = full[f"{task}/{L}/{best_rival}/{Le}"]
            rival = rival_cell["acc"]
            stopped = both_stopped(cell, rival_cell, L, Le)
            orderings.append({
                "task": task, "train_length": int(L), "eval_length": int(Le),
                "claim": f"KDA is the best model (answer accuracy; best rival {best_rival})",
                "kda": cell["acc"]["mean"], best_rival: rivals[best_rival],
                "reproduced": cell["acc"]["mean"] >= rivals[best_rival],
                "verdict": _verdict(
                    cell["acc"]["mean"] - rival["mean"], cell["acc"], rival, stopped=stopped
                ),
            })  # fmt: skip
    return {"cells": table, "sanity_gate": gate, "orderings": orderings}


def write_markdown(path: Path, meta: dict[str, Any], summary: dict[str, Any]) -> None:
    gate = summary["sanity_gate"]
    lines = [
        "# Synthetic tasks: KDA vs GDN-like vs MLA vs 3:1 hybrid",
        "",
        f"Generated by `{' '.join(['python -m experiments.synthetic_tasks', *meta['argv']])}` on "
        f"{meta['date']} ({meta['device_name']}, torch {meta['torch']}).",
        "",
        "## Protocol",
        "",
        f"- Profile `{meta['profile']}`: {json.dumps(meta['base'])}; MLP widths matched to the "
        "hybrid's parameter count (below). Task options: "
        + "; ".join(f"{t} {json.dumps(kw)}" for t, kw in meta["tasks"].items())
        + ".",
        f"- Learning-rate sweep over {meta['lrs']} (same grid for every model) at training length "
        f"{min(meta['train_lengths'])}, seed 0; chosen: best final answer accuracy at the "
        "training length.",
        f"- Seeds {meta['seeds']} at the chosen learning rate; training lengths "
        f"{meta['train_lengths']}, evaluated at the training length and {meta['eval_factor']}x it.",
        f"- Each run stops when the validation answer accuracy reaches {meta['target']} (checked "
        f"every {meta['eval_every']} steps) or at the cap of {meta['max_steps']} steps; batch "
        f"{meta['batch_size']}, {meta['optimizer']}, {meta['num_val']} validation examples.",
        f"- Sanity gate: MLA-only answer accuracy on MQAR at length {min(meta['train_lengths'])} "
        f"> {SANITY_THRESHOLD}.",
        "",
        "Changed from the paper's setup (Kimi Linear paper, 5.1):",
        "",
        *[f"- {d}" for d in DEVIATIONS[meta["profile"]]],
        "",
        "Chosen learning rates: "
        + ", ".join(f"{k} {v:g}" for k, v in meta["chosen_lr"].items())
        + ".",
        "",
        "Parameters (MLP width): "
        + "; ".join(
            f"{t}: " + ", ".join(f"{m} {p:,} ({meta['mlp_width'][t][m]})" for m, p in ps.items())
            for t, ps in meta["parameters"].items()
        ),
        "",
        "## Sanity gate",
        "",
    ]
    if gate is None:
        lines.append(
            "Not evaluated (MQAR or the MLA model was not part of this run, or not every seed "
            "has finished)."
        )
    else:
        verdict = "passed" if gate["passed"] else "FAILED: the setup is wrong; no comparison below"
        lines.append(f"MLA-only MQAR answer accuracy {gate['acc']:.3f}: {verdict}.")
    if meta["profile"] == "cpu":
        lines += [
            "",
            "How the CPU profile was chosen (MQAR, answer accuracy; the plain-loop and GPT "
            "figures are hand-run diagnostic loops on the same data, not runs of this script):",
            "",
        ]
        lines += [f"- {h}" for h in SETUP_HISTORY]
    lines += [
        "",
        "## Results (mean +- std over seeds, at the chosen learning rate)",
        "",
        "| task | train length | eval length | model | answer accuracy | exact match | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, c in summary["cells"].items():
        task, L, model, Le = key.split("/")
        a, e, s = c["acc"], c["exact_match"], c["steps"]
        lines.append(
            f"| {task} | {L} | {Le} | {model} | {a['mean']:.3f} +- {a['std']:.3f} | "
            f"{e['mean']:.3f} +- {e['std']:.3f} | {s['mean']:.0f} (n={a['n']}"
            + ("" if c["complete"] else ", partial: seeds unfinished")
            + ") |"
        )
    lines += ["", "## The paper's orderings", ""]
    if gate is not None and not gate["passed"]:
        lines.append("Withheld: the sanity gate failed.")
    elif not summary["orderings"]:
        lines.append("Not evaluated (needs complete kda and gdn cells).")
    else:
        n = {v: sum(o["verdict"] == v for o in summary["orderings"])
             for v in ("reproduced", "tie", "not reproduced")}  # fmt: skip
        lines += [
            f"Of {len(summary['orderings'])} comparisons: {n['reproduced']} reproduce the "
            f"paper's ordering, {n['tie']} are ties and {n['not reproduced']} contradict it. A "
            "tie is a difference within one standard deviation over seeds (the larger of the "
            f"two), for steps within the evaluation interval ({meta['eval_every']} steps), and "
            "for accuracy at the training length any difference between two models whose runs "
            "all reached the target (the rule stopped them there). The paper's claims: KDA is "
            "the best at every length, and converges faster than GDN on palindrome and MQAR.",
            "",
        ]
        for o in summary["orderings"]:
            other = next(k for k in o if k not in ("task", "train_length", "eval_length", "claim",
                                                   "kda", "reproduced", "verdict"))  # fmt: skip
            fmt = ".0f" if "steps" in o["claim"] or "converges" in o["claim"] else ".3f"
            lines.append(
                f"- {o['task']}, trained at {o['train_length']}, evaluated at {o['eval_length']}: "
                f"{o['claim']}: KDA {o['kda']:{fmt}} vs {other} {o[other]:{fmt}}: "
                + {"reproduced": "reproduced", "tie": "tie", "not reproduced": "NOT reproduced"}[
                    o["verdict"]
                ]
            )
    if meta["missing_runs"]:
        lines += [
            "",
            "## Not yet run",
            "",
            f"{len(meta['missing_runs'])} runs of the protocol are not saved yet (a rerun without "
            "`--report-only` trains them, resuming; their keys are in the JSON file). Orderings "
            "and the sanity gate use complete cells only (every seed finished); a (task, model) "
            "whose sweep is unfinished has no chosen learning rate and no cell.",
            "",
            "| task | model | runs missing |",
            "|---|---|---|",
        ]
        counts: dict[tuple[str, str], int] = {}
        for k in meta["missing_runs"]:
            task, _, model = k.split("_")[:3]
            counts[task, model] = counts.get((task, model), 0) + 1
        lines += [f"| {t} | {m} | {n} |" for (t, m), n in counts.items()]
    lines += [
        "",
        f"Training + evaluation time of all {meta['num_runs']} runs: "
        f"{meta['runs_wall_s'] / 60:.0f} min (summed per run).",
        "",
    ]
    path.write_text("\n".join(lines))


def plot(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(k.split("/")[0] for k in summary["cells"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    colors = {"kda": "C0", "gdn": "C1", "mla": "C2", "hybrid": "C3"}
    for ax, task in zip(axes[0], tasks):
        series: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
        for key, c in summary["cells"].items():
            t, L, model, Le = key.split("/")
            if t == task and c["complete"]:
                series.setdefault((model, L), []).append(
                    (int(Le), c["acc"]["mean"], c["acc"]["std"])
                )
        for (model, L), pts in series.items():
            pts.sort()
            ax.errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                color=colors.get(model), marker="o", capsize=3, label=f"{model} (trained at {L})",
            )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.02)
        ax.set_title(task)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_ylabel("answer accuracy (mean +- std)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
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
