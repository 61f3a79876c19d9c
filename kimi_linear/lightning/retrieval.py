"""``kimi-linear retrieval``: long-context retrieval by context length and needle depth, with the
decode-cache bytes and decode time per token of the model and of its all-MLA twin.

Tasks (RULER-style, generated offline from a seed; RULER: Hsieh et al. 2024, arXiv 2404.06654;
passkey: Mohtashami & Jaggi 2023, arXiv 2305.16300):

* ``passkey``: a 5-digit pass key hidden in repeated filler text (``"The pass key is 12345.
  Remember it. 12345 is the pass key."``), asked for at the end;
* ``niah_single``: RULER's ``niah_single_1``: one needle ``"One of the special magic numbers for
  <key> is: <7 digits>."`` in RULER's noise haystack, asked for by its key;
* ``niah_multikey``: RULER's ``niah_multikey_1``: the same with three distractor needles of other
  keys placed at random depths; only the asked-for key's number counts.

Each prompt is sized in tokens of the model's own tokenizer so that prompt + answer fill exactly
the cell's context length (up to one filler sentence), and the needle sits after
``round(depth * n)`` of the ``n`` filler sentences (depth 0: first, 1: just before the question).

Scoring is teacher-forced, one forward pass per batch (no sampling, no parsing of free text): a
sample is *retrieved* when the greedy next token equals the answer token at every answer
position, i.e. when greedy decoding would produce exactly the answer right after the prompt
(RULER's string match also accepts the answer anywhere in a longer generation; this is the strict
form).  Each cell also reports the mean fraction of answer tokens predicted and the mean answer
log-probability, which still move for models too small to retrieve whole answers.

Why not lm-eval's ``ruler`` tasks (``kimi-linear evaluate --tasks niah_single_1`` runs them where
the network is reachable): they download Paul Graham essays from GitHub and NLTK's ``punkt``,
load the tokenizer by Hub name, need the ``wonderwords`` package, generate 500 samples per length
at fixed lengths from 4K up, and report one score per length, with no depth axis.  Here everything
is generated offline with the model's own tokenizer at any length and depth; the templates and
noise haystack are RULER's.

Beside accuracy, every length gets the analytic decode-cache bytes
(:meth:`KimiLinearConfig.kv_cache_bytes`, in the model's dtype, batch 1) and the measured decode
time per token (median of ``decode_steps`` cached steps after a prefill of that length) of the
model and of its all-MLA twin (:meth:`KimiLinearConfig.all_mla_twin`): a trained twin checkpoint
(``--twin PATH``, accuracy too) or, by default, the twin with random weights (time and bytes
only: timing does not depend on trained weights).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kimi_linear.errors import PROG, UsageError, did_you_mean
from kimi_linear.lightning.retrieval_report import markdown_report, plot_heatmaps

#: RULER's noise haystack (``scripts/data/synthetic/niah.py``), one filler "sentence" per repeat.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
#: The haystack is filled sentence by sentence (RULER repeats the whole block), so depth and
#: length are placed to one short sentence.
FILLER = tuple(part if part.endswith(".") else part + "." for part in NOISE.split(". "))
#: Keys of the NIAH needles (RULER draws adjective-noun words; a fixed list keeps this offline).
WORDS = (
    "amber-falcon ancient-harbor bold-meadow brave-lantern bright-canyon calm-orchard "
    "clever-river cosmic-garden crimson-valley curious-tower daring-island dusty-compass "
    "eager-glacier electric-forest faded-mirror fierce-dragon gentle-breeze golden-bridge "
    "hidden-castle hollow-willow icy-summit jolly-pirate keen-arrow lively-harvest lucky-pebble "
    "mellow-thunder misty-lagoon noble-engine odd-cabinet olive-parrot proud-mountain quiet-ember "
    "rapid-comet royal-feather rusty-anchor silent-violin silver-tulip sleepy-walrus smooth-marble "
    "solar-kettle swift-otter tender-cactus tiny-volcano urban-meadow vast-prairie velvet-rocket "
    "vivid-lantern wandering-cloud wild-saffron windy-harbor young-sparrow zesty-lemon"
).split()

TASKS: dict[str, dict[str, str]] = {
    "passkey": {
        "intro": "There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there.\n",
        "needle": "The pass key is {value}. Remember it. {value} is the pass key.",
        "question": "\nWhat is the pass key? The pass key is",
    },
    "niah_single": {
        "intro": "Some special magic numbers are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the numbers afterwards.\n",
        "needle": "One of the special magic numbers for {key} is: {value}.",
        "question": "\nWhat is the special magic number for {key} mentioned in the provided text? "
        "The special magic number for {key} mentioned in the provided text is",
    },
    "niah_multikey": {
        "intro": "Some special magic numbers are hidden within the following text. Make sure to "
        "memorize it. I will quiz you about the numbers afterwards.\n",
        "needle": "One of the special magic numbers for {key} is: {value}.",
        "question": "\nWhat is the special magic number for {key} mentioned in the provided text? "
        "The special magic number for {key} mentioned in the provided text is",
    },
}
DISTRACTORS = {"niah_multikey": 3}
DIGITS = {"passkey": 5, "niah_single": 7, "niah_multikey": 7}


@dataclass(frozen=True)
class Sample:
    """One prompt of a cell: ``prompt_ids + answer_ids`` has at most ``length`` tokens."""

    task: str
    length: int
    depth: float
    prompt: str
    answer: str
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]


def _encode_pair(tok: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Prompt and answer ids as lm-eval splits a (context, continuation) pair: the answer is
    the tail of the whole text's encoding, so merges across the boundary are kept."""
    whole = tok.encode(prompt + answer)
    ctx = tok.encode(prompt)
    return ctx, whole[len(ctx) :]


def make_sample(task: str, tokenizer: Any, length: int, depth: float, seed: str) -> Sample:
    """A ``task`` prompt of ``length`` tokens (prompt + answer, up to one filler sentence less)
    with its needle after ``round(depth * n)`` of the ``n`` filler sentences (:data:`FILLER`,
    cycled); ``seed`` (any
    string) fixes the key, the value and the distractors."""
    if task not in TASKS:
        raise UsageError(f"unknown retrieval task {task!r}{did_you_mean(task, TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise UsageError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"{task}/{seed}")
    spec = TASKS[task]
    keys = rng.sample(WORDS, 1 + DISTRACTORS.get(task, 0))
    digits = DIGITS[task]
    values = [str(rng.randrange(10 ** (digits - 1), 10**digits)) for _ in keys]
    needle = spec["needle"].format(key=keys[0], value=values[0])
    others = [spec["needle"].format(key=k, value=v) for k, v in zip(keys[1:], values[1:])]
    other_depths = [rng.random() for _ in others]
    question = spec["question"].format(key=keys[0])
    answer = " " + values[0]

    def build(n: int) -> str:
        sentences = [FILLER[i % len(FILLER)] for i in range(n)]
        placed = [(round(d * n), s) for d, s in zip(other_depths, others)]
        placed.append((round(depth * n), needle))
        for pos, text in sorted(placed, key=lambda p: p[0], reverse=True):
            sentences.insert(pos, text)
        return spec["intro"] + " ".join(sentences) + question

    def size(n: int) -> int:
        ctx, ans = _encode_pair(tokenizer, build(n), answer)
        return len(ctx) + len(ans)

    if size(0) > length:
        raise UsageError(
            f"--lengths: {length} tokens cannot hold a {task} prompt (it needs {size(0)} without "
            "any filler); use longer lengths"
        )
    lo, hi = 0, max(1, length)  # every filler sentence is at least one token
    while lo < hi:  # the most filler that fits
        mid = (lo + hi + 1) // 2
        if size(mid) <= length:
            lo = mid
        else:
            hi = mid - 1
    prompt = build(lo)
    ctx, ans = _encode_pair(tokenizer, prompt, answer)
    return Sample(task, length, depth, prompt, answer, tuple(ctx), tuple(ans))


def make_cell(
    task: str, tokenizer: Any, length: int, depth: float, samples: int, seed: int
) -> list[Sample]:
    """The ``samples`` prompts of one (task, length, depth) cell, each seeded from
    ``(seed, length, depth, index)``."""
    return [
        make_sample(task, tokenizer, length, depth, f"{seed}/{length}/{depth:.4f}/{i}")
        for i in range(samples)
    ]


# ---------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_samples(model: Any, samples: list[Sample], batch_size: int = 1) -> list[dict[str, Any]]:
    """Teacher-forced scores of each sample: ``retrieved`` (greedy decoding would produce the
    answer exactly), ``token_accuracy`` (fraction of answer tokens that are the greedy choice)
    and ``logprob`` (sum of the answer's log-probabilities).

    Rows of a batch are ``prompt + answer[:-1]``, left-padded with an attention mask, so every
    row's answer positions are the last ones (``logits_to_keep``): the LM head runs on the
    answer positions only, ``[B, A, V]`` with ``A`` the longest answer.
    """
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        rows = [list(s.prompt_ids) + list(s.answer_ids[:-1]) for s in chunk]
        width = max(len(r) for r in rows)
        keep = max(len(s.answer_ids) for s in chunk)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=device)
        mask = None
        if any(len(r) < width for r in rows):
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            mask = mask.to(device)
        logits = model(ids, logits_to_keep=keep, attention_mask=mask)
        logp = logits.float().log_softmax(-1)
        for sample, lp in zip(chunk, logp):
            answer = torch.tensor(sample.answer_ids, device=device)
            lp = lp[keep - len(answer) :]
            hits = lp.argmax(-1) == answer
            out.append(
                {
                    "retrieved": bool(hits.all()),
                    "token_accuracy": float(hits.float().mean()),
                    "logprob": float(lp.gather(1, answer[:, None]).sum()),
                }
            )
    return out


def decode_time_per_token(
    model: Any, length: int, steps: int = 8, warmup: int = 2, seed: int = 0
) -> float:
    """Median seconds of one cached decode step (batch 1) at a context of ``length`` tokens:
    a prefill of ``length - warmup - steps`` random tokens, ``warmup`` untimed steps, then
    ``steps`` timed ones (CUDA synchronised around each)."""
    device = next(model.parameters()).device
    prefill = max(1, length - warmup - steps)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, prefill), generator=gen).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        cache = model.new_cache(1, capacity=prefill + warmup + steps)
        logits = model(ids, cache=cache, logits_to_keep=1)
        for i in range(warmup + steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t0 = time.perf_counter()
            logits = model(token, cache=cache, logits_to_keep=1)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cache_bytes(config: Any, length: int, dtype: torch.dtype) -> int:
    """Analytic decode-cache bytes of one sequence of ``length`` tokens (latents / conv tails
    in ``dtype``, KDA states fp32)."""
    size = torch.tensor([], dtype=dtype).element_size()
    return int(config.kv_cache_bytes(length, 1, cache_dtype_bytes=size)["total"])


# ---------------------------------------------------------------------------------- the grid
def run_grid(
    models: dict[str, Any],
    tokenizer: Any,
    tasks: list[str],
    lengths: list[int],
    depths: list[float],
    samples: int = 4,
    seed: int = 0,
    batch_size: int = 1,
    decode_steps: int = 8,
    score: dict[str, bool] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy per (task, length, depth) cell for each model of ``models`` whose ``score`` is
    true, and cache bytes + decode time per token per length for every model.

    Returns ``{"cells": [...], "lengths": [...]}``: a cell is ``{"model", "task", "length",
    "depth", "accuracy", "token_accuracy", "logprob", "samples", "prompt_tokens"}``; a length
    row is ``{"length", "<model>": {"cache_bytes", "decode_s_per_token"}}``.
    """
    score = score or dict.fromkeys(models, True)
    limit = min(m.config.max_position_embeddings for m in models.values())
    for n in lengths:
        if n > limit:
            raise UsageError(
                f"--lengths: {n} is above the model's limit (max_position_embeddings={limit})"
            )
    grid = {  # every prompt first: a length too short for a task fails before any work
        (task, length, depth): make_cell(task, tokenizer, length, depth, samples, seed)
        for task in tasks
        for length in lengths
        for depth in depths
    }
    cells = []
    for task in tasks:
        for length in lengths:
            for depth in depths:
                batch = grid[task, length, depth]
                for name, model in models.items():
                    if not score.get(name):
                        continue
                    t0 = time.perf_counter()
                    scores = score_samples(model, batch, batch_size)
                    cells.append(
                        {
                            "model": name,
                            "task": task,
                            "length": length,
                            "depth": depth,
                            "accuracy": statistics.fmean(s["retrieved"] for s in scores),
                            "token_accuracy": statistics.fmean(s["token_accuracy"] for s in scores),
                            "logprob": statistics.fmean(s["logprob"] for s in scores),
                            "samples": len(scores),
                            "prompt_tokens": statistics.fmean(len(s.prompt_ids) for s in batch),
                            "seconds": time.perf_counter() - t0,
                        }
                    )
                    if progress:
                        c = cells[-1]
                        print(
                            f"  {name:>8} {task:<14} length {length:>7} depth {depth:4.2f}: "
                            f"accuracy {c['accuracy']:.2f}, answer tokens {c['token_accuracy']:.2f} "
                            f"({c['seconds']:.1f} s)",
                            file=sys.stderr,
                        )
    rows = []
    for length in lengths:
        row: dict[str, Any] = {"length": length}
        for name, model in models.items():
            row[name] = {
                "cache_bytes": cache_bytes(model.config, length, next(model.parameters()).dtype),
                "decode_s_per_token": decode_time_per_token(model, length, decode_steps, seed=seed)
                if decode_steps
                else None,
            }
        rows.append(row)
        if progress:
            parts = [
                f"{name} {row[name]['cache_bytes'] / 2**20:.2f} MiB"
                + (
                    f", {row[name]['decode_s_per_token'] * 1e3:.2f} ms/token"
                    if row[name]["decode_s_per_token"] is not None
                    else ""
                )
                for name in models
            ]
            print(f"  length {length:>7}: " + "; ".join(parts), file=sys.stderr)
    return {"cells": cells, "lengths": rows}


# ---------------------------------------------------------------------------------- command
def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{flag}: expected positive integers, got {text!r}")
    return sorted(set(values))


def _depths(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--depths: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise UsageError(f"--depths: every depth must be in [0, 1], got {text!r}")
    return sorted(set(values))


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} retrieval",
        description="Needle-in-a-haystack / passkey / multi-key retrieval over context lengths "
        "and needle depths (RULER-style prompts generated offline, seeded), scored per cell, "
        "with the decode-cache bytes and decode time per token of the model and its all-MLA "
        "twin at the same lengths; writes retrieval.json / .md / .png beside the run.",
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint file or model folder")
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    p.add_argument(
        "--twin",
        default="random",
        help="the all-MLA twin: a trained checkpoint (accuracy, bytes and time), 'random' (its "
        "config with random weights: bytes and time; default) or 'none'",
    )
    p.add_argument("--tasks", default=",".join(TASKS), help=f"from {', '.join(TASKS)}")
    p.add_argument("--lengths", default="256,512,1024", help="context lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=4, help="prompts per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--decode_steps", type=int, default=8, help="timed decode steps (0: no timing)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: stored)")
    p.add_argument("--output", default=None, help="results folder (default: beside the run)")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    return p


def _describe(model: Any) -> str:
    cfg = model.config
    kinds = "".join("K" if k == "kda" else "M" for k in cfg.layer_kinds)
    params = sum(p.numel() for p in model.parameters())
    return f"{cfg.name}, {params / 1e6:.2f}M parameters, layers {kinds}"


def retrieval_main(argv: list[str]) -> int:
    """``kimi-linear retrieval``: see :func:`_build_parser`."""
    args = _build_parser().parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            raise UsageError(
                f"--tasks: unknown retrieval task {t!r}{did_you_mean(t, TASKS)}; "
                f"choose from {', '.join(TASKS)}"
            )
    lengths, depths = _ints(args.lengths, "--lengths"), _depths(args.depths)
    for flag in ("samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.decode_steps < 0:
        raise UsageError(f"--decode_steps must be >= 0, got {args.decode_steps}")
    from kimi_linear.lightning.evaluate import default_output_dir

    out_dir = Path(args.output) if args.output else default_output_dir(args.ckpt_path)
    targets = [out_dir / f"retrieval.{ext}" for ext in ("json", "md", "png")]
    if not args.overwrite and any(p.exists() for p in targets):
        raise UsageError(
            f"--output: {os.fspath(targets[0])} exists; pass --overwrite to replace it or "
            "--output for another folder"
        )
    dtype = _dtype(args.dtype)
    from kimi_linear.lightning.load import load_model, resolve_tokenizer
    from kimi_linear.model import KimiLinearForCausalLM, cast_model_

    model = load_model(args.ckpt_path, args.device).eval()
    if dtype is not None:
        cast_model_(model, dtype)
    limit = model.config.max_position_embeddings
    if max(lengths) > limit:
        raise UsageError(
            f"--lengths: {max(lengths)} is above the model's limit (max_position_embeddings={limit})"
        )
    tok = resolve_tokenizer(args.tokenizer, args.ckpt_path, model.config.vocab_size)
    models, scored = {"hybrid": model}, {"hybrid": True}
    if all(k == "mla" for k in model.config.layer_kinds):
        models, scored = {"model": model}, {"model": True}
    elif args.twin == "random":
        with torch.device(args.device):
            twin = KimiLinearForCausalLM(model.config.all_mla_twin())
        cast_model_(twin, next(model.parameters()).dtype)
        models["all-mla"], scored["all-mla"] = twin.eval(), False
    elif args.twin != "none":
        twin = load_model(args.twin, args.device).eval()
        cast_model_(twin, next(model.parameters()).dtype)
        if any(k != "mla" for k in twin.config.layer_kinds):
            raise UsageError(
                f"--twin: {args.twin!r} has KDA layers ({twin.config.layer_kinds}); expected an "
                "all-MLA model"
            )
        if twin.config.vocab_size != model.config.vocab_size:
            raise UsageError(
                f"--twin: vocabulary {twin.config.vocab_size} differs from the model's "
                f"{model.config.vocab_size}; it must be trained with the same tokenizer"
            )
        models["all-mla"], scored["all-mla"] = twin, True
    print(f"{PROG} retrieval: {', '.join(tasks)} at {lengths} x depths {depths}", file=sys.stderr)
    t0 = time.perf_counter()
    result = run_grid(
        models,
        tok,
        tasks,
        lengths,
        depths,
        args.samples,
        args.seed,
        args.batch_size,
        args.decode_steps,
        scored,
    )
    result["settings"] = {
        "ckpt_path": os.fspath(args.ckpt_path),
        "twin": args.twin,
        "command": " ".join([PROG, "retrieval", *argv]),
        "models": list(models),
        "scored": scored,
        "model_info": {name: _describe(m) for name, m in models.items()},
        "tasks": tasks,
        "lengths": lengths,
        "depths": depths,
        "samples": args.samples,
        "seed": args.seed,
        "decode_steps": args.decode_steps,
        "device": args.device,
        "dtype": str(next(model.parameters()).dtype),
        "tokenizer": repr(tok),
        "torch": torch.__version__,
        "seconds": time.perf_counter() - t0,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    targets[0].write_text(json.dumps(result, indent=2) + "\n")
    report = markdown_report(result)
    targets[1].write_text(report)
    png = plot_heatmaps(result, targets[2])
    print(report)
    print(f"results: {targets[0]}, {targets[1]}" + (f", {png}" if png else ""))
    return 0


def _dtype(text: str | None) -> torch.dtype | None:
    names = {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
    }
    if text is None or text == "auto":
        return None
    if text not in names:
        raise UsageError(f"--dtype: expected float32, bfloat16 or float16, got {text!r}")
    return names[text]


__all__ = [
    "NOISE",
    "TASKS",
    "Sample",
    "cache_bytes",
    "decode_time_per_token",
    "make_cell",
    "make_sample",
    "markdown_report",
    "plot_heatmaps",
    "retrieval_main",
    "run_grid",
    "score_samples",
]
