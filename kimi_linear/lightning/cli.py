"""The training command line: ``kimi-linear {fit,validate,test,predict,generate,export}``.

``fit`` / ``validate`` / ``test`` / ``predict`` are Lightning's :class:`LightningCLI`
subcommands over :class:`~kimi_linear.lightning.module.KimiLinearLitModule` and any
``LightningDataModule`` (``--data SyntheticDataModule`` / ``TextDataModule``; text by default),
with ``--config FILE.yaml``, ``--print_config`` and ``--ckpt_path`` (resume).  The data's
vocabulary size is linked into the model (``data.vocab_size -> model.vocab_size``).

Two more subcommands are dispatched before Lightning's parser sees the arguments:

* ``generate --ckpt_path CKPT_OR_DIR --prompt TEXT`` samples a continuation with the byte
  tokenizer from a Lightning checkpoint or an exported folder;
* ``export --ckpt_path CKPT --output_dir DIR`` writes a trained checkpoint in the released
  Kimi-Linear Hugging Face layout (``config.json`` + safetensors under the release names) via
  :meth:`KimiLinearForCausalLM.save_pretrained`.

Configuration mistakes (an unknown key, task, preset or path; a sequence longer than the
data) are reported as one ``kimi-linear: error: ...`` line with exit status 2, before training.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from kimi_linear.lightning.data import SyntheticDataModule, TextDataModule, UsageError  # noqa: F401
from kimi_linear.lightning.module import KimiLinearLitModule
from kimi_linear.lightning.tokenizer import ByteTokenizer

PROG = "kimi-linear"
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
EXTRA_SUBCOMMANDS = ("generate", "export")
DEFAULT_ROOT_DIR = "runs"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_loggers(
    save_dir: str = DEFAULT_ROOT_DIR, name: str = "kimi-linear"
) -> list[dict[str, Any]]:
    """A CSVLogger under ``save_dir`` and, when ``tensorboard`` is installed, a TensorBoardLogger
    under ``save_dir/tensorboard`` (as ``class_path`` dicts, so ``--print_config`` shows them)."""
    loggers: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": save_dir, "name": name},
        }
    ]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return loggers
    loggers.append(
        {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": os.path.join(save_dir, "tensorboard"), "name": name},
        }
    )
    return loggers


class KimiLinearCLI(LightningCLI):
    """:class:`LightningCLI` for Kimi Linear: our module, any data module (text by default),
    the data vocabulary linked into the model, local logging and checkpointing by default."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse like Lightning, but turn a parse error into a one-line :class:`UsageError`
        with a "did you mean" hint for a misspelt key."""
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as e:
            raise UsageError(_explain_parse_error(parser, args, str(e))) from None
        sub = self.config.get("subcommand")
        ckpt = self.config.get(f"{sub}.ckpt_path") if sub else None
        # Lightning's own keywords ("last", "best", ...) and remote URLs are left to Lightning;
        # a folder is accepted (sharded FSDP checkpoints are folders).
        if (
            isinstance(ckpt, (str, os.PathLike))
            and os.fspath(ckpt) not in ("last", "best", "hpc", "registry")
            and "://" not in os.fspath(ckpt)
            and not os.path.exists(ckpt)
        ):
            raise UsageError(f"--ckpt_path: {os.fspath(ckpt)!r} does not exist")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.set_defaults({"data": {"class_path": "kimi_linear.lightning.data.TextDataModule"}})


def _option_keys(parser: Any, args: Any) -> list[str]:
    """Dotted option keys (``model.lr``, ``trainer.max_steps``...) of the subcommand in ``args``."""
    sub = parser
    action = getattr(parser, "_subcommands_action", None)
    if action is not None and isinstance(args, (list, tuple)):
        name = next((a for a in args if a in action._name_parser_map), None)
        if name is not None:
            sub = action._name_parser_map[name]
    keys = []
    for act in getattr(sub, "_actions", []):
        keys += [o[2:] for o in act.option_strings if o.startswith("--")]
    return keys


def _explain_parse_error(parser: Any, args: Any, message: str) -> str:
    """``message`` plus, for an unknown key, the closest known one."""
    import difflib
    import re

    match = (
        re.search(r"unrecognized arguments: --?(\S+)", message)
        or re.search(r"does not accept option '([^']+)'", message)
        or re.search(r"[Kk]ey '?\"?([\w.]+)", message)
    )
    hint = ""
    if match:
        keys = _option_keys(parser, args)
        parts = match.group(1).split("=")[0].split(".")
        for i in range(len(parts), 0, -1):
            close = difflib.get_close_matches(".".join(parts[:i]), keys, n=1, cutoff=0.75)
            if close and close[0] != ".".join(parts[:i]):
                hint = f" (did you mean {close[0]!r}?)"
                break
    return f"{message.strip()}{hint}"


def build_cli(args: list[str], run: bool = True) -> KimiLinearCLI:
    """The :class:`KimiLinearCLI` for ``args`` (``run=False``: parse and instantiate only)."""
    # ``args`` usually *is* sys.argv[1:] (the console script); Lightning warns about that case.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    return KimiLinearCLI(
        KimiLinearLitModule,
        None,
        subclass_mode_data=True,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        trainer_defaults={
            "default_root_dir": DEFAULT_ROOT_DIR,
            "logger": default_loggers(),
            "gradient_clip_val": 1.0,
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": PROG, "exit_on_error": False},
        args=args,
        run=run,
    )


# -------------------------------------------------------------------------- generate / export
def load_model(path: str | os.PathLike, device: str = "cpu") -> Any:
    """The :class:`KimiLinearForCausalLM` of a Lightning checkpoint file or an exported folder."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--ckpt_path: {os.fspath(path)!r} does not exist")
    if p.is_dir():
        from kimi_linear.model import KimiLinearForCausalLM

        try:
            return KimiLinearForCausalLM.from_pretrained(p, device=device)
        except ValueError as e:
            raise UsageError(f"--ckpt_path: {e}") from e
    try:
        module = KimiLinearLitModule.load_from_checkpoint(
            p, map_location=device, weights_only=False
        )
    except (KeyError, RuntimeError, EOFError) as e:
        raise UsageError(
            f"--ckpt_path: {os.fspath(path)!r} is not a kimi-linear Lightning checkpoint ({e})"
        ) from e
    return module.model


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} generate",
        description="Sample a continuation of --prompt with the byte tokenizer from a checkpoint "
        "(a Lightning .ckpt of a model trained on byte-level text, or an exported folder).",
    )
    p.add_argument(
        "--ckpt_path", required=True, help="Lightning checkpoint file or exported model folder"
    )
    p.add_argument("--prompt", required=True, help="prompt text (a <bos> token is prepended)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--device", default="cpu")
    return p


def generate_main(argv: list[str]) -> int:
    """``kimi-linear generate``: print ``--num_samples`` continuations of ``--prompt``."""
    args = _generate_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1, got {args.num_samples}")
    tok = ByteTokenizer()
    model = load_model(args.ckpt_path, args.device).eval()
    if model.config.vocab_size != tok.vocab_size:
        raise UsageError(
            f"--ckpt_path: the model's vocabulary has {model.config.vocab_size} tokens, but generate "
            f"uses the byte tokenizer ({tok.vocab_size}); was it trained on a synthetic task?"
        )
    ids = torch.tensor(
        [tok.encode(args.prompt, add_bos=True)] * args.num_samples, device=model.device
    )
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    try:
        out = model.generate(
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=tok.eos_id,
            generator=gen,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    for i, row in enumerate(out):
        if args.num_samples > 1:
            print(f"--- sample {i}")
        print(args.prompt + tok.decode(row[ids.shape[1] :]))
    return 0


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Write a trained Lightning checkpoint in the released Kimi-Linear Hugging Face "
        "layout (config.json + safetensors under the release parameter names).",
    )
    p.add_argument(
        "--ckpt_path", required=True, help="Lightning checkpoint written by `kimi-linear fit`"
    )
    p.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="cast the weights (A_log and dt_bias stay float32); default: as trained",
    )
    p.add_argument(
        "--max_shard_size", type=int, default=None, help="shard the weights (bytes per file)"
    )
    return p


def export_main(argv: list[str]) -> int:
    """``kimi-linear export``: checkpoint -> ``save_pretrained`` folder."""
    args = _export_parser().parse_args(argv)
    if Path(args.ckpt_path).is_dir():
        raise UsageError(
            f"--ckpt_path: {args.ckpt_path!r} is a folder; export takes a Lightning .ckpt file"
        )
    model = load_model(args.ckpt_path, "cpu")
    if args.dtype is not None:
        from kimi_linear.model import cast_model_

        cast_model_(model, _DTYPES[args.dtype])
    try:
        model.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size)
    except ValueError as e:
        raise UsageError(str(e)) from e
    n = model.num_parameters()
    print(f"exported {n:,} parameters ({model.dtype}) of {args.ckpt_path} to {args.output_dir}")
    return 0


# ------------------------------------------------------------------------------------ entry
_OVERVIEW = f"""usage: {PROG} <subcommand> [options]

Build, train and profile Kimi Linear (KDA + MLA + MoE) models.

subcommands:
  fit        train (LightningCLI; --config FILE.yaml, --print_config, --ckpt_path to resume)
  validate   evaluate on the validation split
  test       evaluate on the test split
  predict    greedy next-token predictions
  generate   sample text from a checkpoint with the byte tokenizer
  export     write a checkpoint in the released Kimi-Linear Hugging Face layout
  info       parameter counts, layer kinds and cache sizes of a preset

`{PROG} <subcommand> --help` documents each one; e.g.
  {PROG} fit --config configs/tiny.yaml
"""


def _find_usage_error(exc: BaseException) -> UsageError | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, UsageError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def lightning_main(argv: list[str]) -> int:
    """Run one ``kimi-linear`` subcommand (all but ``info``); returns the exit status."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_OVERVIEW, end="")
        return 0 if argv else 2
    cmd = argv[0]
    try:
        if cmd == "generate":
            return generate_main(argv[1:])
        if cmd == "export":
            return export_main(argv[1:])
        if cmd not in LIGHTNING_SUBCOMMANDS:
            print(_OVERVIEW, end="", file=sys.stderr)
            print(f"{PROG}: error: unknown subcommand {cmd!r}", file=sys.stderr)
            return 2
        build_cli(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except argparse.ArgumentError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # jsonargparse wraps errors raised while instantiating the data module / model.
        cause = _find_usage_error(e)
        if cause is None:
            raise
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse / jsonargparse: --help (0) or a reported error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return 0


__all__ = [
    "KimiLinearCLI",
    "build_cli",
    "default_loggers",
    "export_main",
    "generate_main",
    "lightning_main",
    "load_model",
]
