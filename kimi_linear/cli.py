"""The ``kimi-linear`` console script: every subcommand is dispatched here, from one table.

:data:`SUBCOMMANDS` maps each subcommand to its entry point (``"module:function"``, imported only
when that subcommand runs, so ``kimi-linear info`` never loads Lightning) and a one-line
summary, from which the overview (``kimi-linear --help``) is built:

* ``fit`` / ``validate`` / ``test`` / ``predict``: Lightning's ``LightningCLI``
  (:func:`kimi_linear.lightning.cli.lightning_main`, which receives the subcommand name too);
* ``generate`` / ``export``: :mod:`kimi_linear.lightning.generate` and
  :mod:`kimi_linear.lightning.export`;
* ``prepare``: :mod:`kimi_linear.lightning.data.preparation` (tokenise a corpus);
* ``evaluate`` / ``retrieval``: :mod:`kimi_linear.lightning.evaluate` (lm-eval tasks) and
  :mod:`kimi_linear.lightning.retrieval` (long-context retrieval grid);
* ``plot``: :mod:`kimi_linear.plot` (training curves of runs);
* ``info``: :mod:`kimi_linear.info`.

Adding a subcommand is one entry in :data:`SUBCOMMANDS`.  An entry point takes the arguments
after the subcommand name and returns the exit status; a :class:`UsageError` (or an
``argparse.ArgumentError``) raised anywhere below it, also wrapped in another exception, is
printed as one ``kimi-linear: error: ...`` line with exit status 2.  An unknown subcommand is
the same kind of line, with the closest known name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kimi_linear.errors import PROG, UsageError, did_you_mean


@dataclass(frozen=True)
class Subcommand:
    """One ``kimi-linear`` subcommand.

    Attributes:
        entry: ``"package.module:function"``; the function takes ``argv: list[str]`` and
            returns the exit status.
        summary: one line for the overview.
        pass_name: give the entry point the subcommand name as ``argv[0]`` (the LightningCLI
            subcommands share one entry point).
    """

    entry: str
    summary: str
    pass_name: bool = False

    def load(self) -> Callable[[list[str]], int]:
        module, _, func = self.entry.partition(":")
        return getattr(importlib.import_module(module), func)


_LIGHTNING = "kimi_linear.lightning.cli:lightning_main"

#: Every subcommand of the ``kimi-linear`` command, in the order the overview lists them.
SUBCOMMANDS: dict[str, Subcommand] = {
    "fit": Subcommand(
        _LIGHTNING,
        "train (LightningCLI; --config FILE.yaml, --print_config, --ckpt_path to resume)",
        pass_name=True,
    ),
    "validate": Subcommand(_LIGHTNING, "evaluate on the validation split", pass_name=True),
    "test": Subcommand(_LIGHTNING, "evaluate on the test split", pass_name=True),
    "predict": Subcommand(_LIGHTNING, "greedy next-token predictions", pass_name=True),
    "generate": Subcommand(
        "kimi_linear.lightning.generate:generate_main",
        "stream a continuation of a prompt from a checkpoint or exported folder "
        "(its own tokenizer)",
    ),
    "export": Subcommand(
        "kimi_linear.lightning.export:export_main",
        "write a checkpoint in the released Kimi-Linear Hugging Face layout",
    ),
    "prepare": Subcommand(
        "kimi_linear.lightning.data.preparation:prepare_main",
        "tokenize local text / JSONL / parquet into a token dataset (TokenDataModule)",
    ),
    "plot": Subcommand(
        "kimi_linear.plot:plot_main",
        "draw loss, learning rate, tokens/s and QK max logits of runs to a PNG (matplotlib)",
    ),
    "evaluate": Subcommand(
        "kimi_linear.lightning.evaluate:evaluate_main",
        "lm-evaluation-harness tasks on a checkpoint or model folder (needs lm_eval)",
    ),
    "retrieval": Subcommand(
        "kimi_linear.lightning.retrieval:retrieval_main",
        "needle / passkey retrieval by context length and depth, with cache bytes and decode "
        "time beside the all-MLA twin",
    ),
    "info": Subcommand(
        "kimi_linear.info:info_main",
        "parameter counts, layer kinds and cache sizes of a preset",
    ),
}


def overview() -> str:
    """The text of ``kimi-linear --help``: every subcommand of :data:`SUBCOMMANDS`."""
    width = max(len(name) for name in SUBCOMMANDS) + 3
    lines = [
        f"usage: {PROG} <subcommand> [options]",
        "",
        "Build, train and profile Kimi Linear (KDA + MLA + MoE) models.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}{sub.summary}" for name, sub in SUBCOMMANDS.items()),
        "",
        f"`{PROG} <subcommand> --help` documents each one; e.g.",
        f"  {PROG} fit --config configs/tiny.yaml",
        "",
    ]
    return "\n".join(lines)


def _usage_error_in(exc: BaseException) -> BaseException | None:
    """The first user-facing error (``UsageError`` / ``argparse.ArgumentError``) in the cause /
    context chain of ``exc`` (jsonargparse wraps errors raised while instantiating classes)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (UsageError, argparse.ArgumentError)):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kimi-linear <subcommand> ...``; returns the exit status (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview(), end="", file=sys.stdout if argv else sys.stderr)
        if not argv:
            print(f"{PROG}: error: a subcommand is required", file=sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    sub = SUBCOMMANDS.get(name)
    if sub is None:
        print(
            f"{PROG}: error: unknown subcommand {name!r}{did_you_mean(name, SUBCOMMANDS)}; "
            f"choose from {', '.join(SUBCOMMANDS)} (`{PROG} --help`)",
            file=sys.stderr,
        )
        return 2
    try:
        return int(sub.load()([name, *rest] if sub.pass_name else rest) or 0)
    except SystemExit as e:  # argparse / jsonargparse: --help (0) or a reported error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except Exception as e:
        cause = _usage_error_in(e)
        if cause is None:
            raise
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        return 2


__all__ = ["PROG", "SUBCOMMANDS", "Subcommand", "main", "overview"]


if __name__ == "__main__":
    raise SystemExit(main())
