"""``kimi-linear evaluate``: lm-evaluation-harness tasks on a checkpoint, an export or a
released folder.

The model runs through lm-eval's own model interface implemented on the kit's model
(:class:`kimi_linear.lightning.lm_eval_model.KimiLinearLM`, registered with lm-eval as
``kimi-linear``), with the tokenizer the model was trained with; lm-eval does the rest (task
loading, prompts, few-shot, metrics, stderr).  Results are written as JSON (lm-eval's results
dict plus a ``kimi_linear`` block saying what ran) and Markdown (lm-eval's table) into
``<run>/eval/<checkpoint>/`` beside a Lightning run, ``<folder>/eval/`` for a model folder, or
``--output``; existing files are kept unless ``--overwrite``.

``lm_eval`` is an optional dependency (``pip install -e ".[eval]"``); without it the command
stops with one line saying so.  lm-eval's stock tasks download their datasets from the Hugging
Face Hub on first use; ``--include_path`` adds local task YAMLs (``tests/fixtures/lm_eval_tasks``
has three that run offline).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from kimi_linear.errors import PROG, UsageError, did_you_mean, import_failure

INSTALL = 'pip install "lm-eval>=0.4.5", or pip install -e ".[eval]"'


def require_lm_eval() -> Any:
    """Import ``lm_eval`` or raise a one-line :class:`UsageError` saying how to install it."""
    try:
        import lm_eval
    except ImportError as e:
        raise UsageError(
            f"evaluate needs lm-evaluation-harness: {import_failure(e, 'lm_eval', INSTALL)}"
        ) from None
    return lm_eval


def default_output_dir(ckpt_path: str | os.PathLike) -> Path:
    """Where results go without ``--output``: ``<run>/eval/<checkpoint stem>`` for a checkpoint
    in a Lightning run's ``checkpoints/`` folder, ``<folder>/eval/<stem>`` for another
    checkpoint file, ``<folder>/eval`` for a model folder."""
    p = Path(ckpt_path)
    if p.parent.name == "checkpoints":
        return p.parent.parent / "eval" / p.stem
    if p.is_file():
        return p.parent / "eval" / p.stem
    return p / "eval"


def task_manager(tasks: list[str], include_path: list[str] | None, metadata: dict | None) -> Any:
    """An ``lm_eval`` ``TaskManager`` that knows every name of ``tasks``.

    With ``include_path``, the local folders are indexed alone first (a second instead of
    lm-eval's ~15K stock tasks) and the stock index is added only when a name is not found
    there.  An unknown name is a :class:`UsageError` with the closest known name.
    """
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False, metadata=metadata)
        if any(t not in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path, metadata=metadata)
    for name in tasks:
        if name not in manager.all_tasks:
            raise UsageError(
                f"--tasks: unknown lm-eval task {name!r}{did_you_mean(name, manager.all_tasks)} "
                "(`lm_eval ls tasks` lists them; --include_path adds a folder of task YAMLs)"
            )
    return manager


def _task_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--tasks: expected comma-separated task names, got {text!r}")
    return names


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} evaluate",
        description="Run lm-evaluation-harness tasks on a kimi-linear model (a Lightning .ckpt, a "
        "sharded checkpoint folder, an exported or released folder) with its own tokenizer; "
        "write the results as JSON + Markdown beside the run (or --output). Needs lm_eval "
        f"({INSTALL}).",
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint file or model folder")
    p.add_argument(
        "--tasks", required=True, help="comma-separated lm-eval task / group names, e.g. hellaswag"
    )
    p.add_argument(
        "--include_path",
        action="append",
        default=None,
        help="a folder of extra task YAMLs (repeatable)",
    )
    p.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument(
        "--limit", type=float, default=None, help="documents per task (a fraction if < 1)"
    )
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: stored)")
    p.add_argument(
        "--max_length",
        type=int,
        default=None,
        help="longest input in tokens (default and maximum: the model's max_position_embeddings)",
    )
    p.add_argument("--max_gen_toks", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metadata", default=None, help="JSON passed to the tasks (e.g. RULER lengths)")
    p.add_argument("--log_samples", action="store_true", help="keep every document's outputs")
    p.add_argument("--output", default=None, help="results folder (default: beside the run)")
    p.add_argument("--overwrite", action="store_true", help="replace existing result files")
    return p


def _stem(tasks: list[str]) -> str:
    text = re.sub(r"[^A-Za-z0-9_.+-]+", "-", "+".join(tasks))
    return "lm_eval_" + (text if len(text) <= 80 else text[:80] + f"-and-{len(tasks)}-tasks")


def write_results(results: dict[str, Any], out_dir: Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.json`` (the whole results dict, JSON-safe) and ``<stem>.md`` (lm-eval's tables)
    in ``out_dir``."""
    from lm_eval.utils import handle_non_serializable, make_table

    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    json_path.write_text(text + "\n")
    info = results.get("kimi_linear", {})
    lines = [
        f"# lm-eval: {info.get('ckpt_path', '')}",
        "",
        f"`{info.get('command', '')}`",
        "",
        f"Model {info.get('model', {}).get('model_name', '?')} "
        f"({info.get('model', {}).get('layer_kinds', '')}), tokenizer "
        f"{info.get('model', {}).get('tokenizer', '?')}, dtype {info.get('model', {}).get('model_dtype')}, "
        f"device {info.get('device')}, max_length {info.get('model', {}).get('max_length')}, "
        f"{info.get('truncated_requests', 0)} request(s) cut from the left, "
        f"{info.get('seconds', 0):.1f} s.",
        "",
        make_table(results),
    ]
    if results.get("groups"):
        lines += ["", make_table(results, "groups")]
    md_path.write_text("\n".join(lines))
    return json_path, md_path


def evaluate_main(argv: list[str]) -> int:
    """``kimi-linear evaluate``: see :func:`_build_parser`."""
    args = _build_parser().parse_args(argv)
    tasks = _task_list(args.tasks)
    for name in ("batch_size", "max_gen_toks"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UsageError(f"--num_fewshot must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be > 0, got {args.limit}")
    metadata = None
    if args.metadata is not None:
        try:
            metadata = json.loads(args.metadata)
        except json.JSONDecodeError as e:
            raise UsageError(f"--metadata: not valid JSON ({e})") from None
        if not isinstance(metadata, dict):
            raise UsageError(f"--metadata: expected a JSON object, got {args.metadata!r}")
    if args.include_path:
        for folder in args.include_path:
            if not Path(folder).is_dir():
                raise UsageError(f"--include_path: {folder!r} is not a folder")
    out_dir = Path(args.output) if args.output else default_output_dir(args.ckpt_path)
    stem = _stem(tasks)
    existing = [out_dir / f"{stem}.{ext}" for ext in ("json", "md")]
    if not args.overwrite and any(p.exists() for p in existing):
        raise UsageError(
            f"--output: {os.fspath(existing[0])} exists; pass --overwrite to replace it or "
            "--output for another folder"
        )
    if not Path(args.ckpt_path).exists():
        raise UsageError(f"--ckpt_path: {args.ckpt_path!r} does not exist")

    lm_eval = require_lm_eval()
    from kimi_linear.lightning.lm_eval_model import KimiLinearLM

    manager = task_manager(tasks, args.include_path, metadata)
    lm = KimiLinearLM(
        args.ckpt_path,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        max_length=args.max_length,
        max_gen_toks=args.max_gen_toks,
        seed=args.seed,
    )
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=manager,
        log_samples=args.log_samples,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
        metadata=metadata,
    )
    if results is None:  # another rank
        return 0
    results["kimi_linear"] = {
        "ckpt_path": os.fspath(args.ckpt_path),
        "command": " ".join([PROG, "evaluate", *argv]),
        "device": args.device,
        "model": lm.get_model_info(),
        "truncated_requests": lm.truncated,
        "seconds": time.perf_counter() - start,
        "lm_eval_version": getattr(lm_eval, "__version__", "?"),
    }
    json_path, md_path = write_results(results, out_dir, stem)
    from lm_eval.utils import make_table

    print(make_table(results))
    if lm.truncated:
        print(
            f"{PROG} evaluate: note: {lm.truncated} request(s) were longer than max_length="
            f"{lm.max_length} and were cut from the left",
            file=sys.stderr,
        )
    print(f"results: {json_path} and {md_path}")
    return 0


__all__ = ["default_output_dir", "evaluate_main", "require_lm_eval", "task_manager"]
