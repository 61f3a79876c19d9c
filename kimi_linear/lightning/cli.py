"""The training subcommands of ``kimi-linear``: fit, validate, test, predict, generate, export.

They are dispatched by :mod:`kimi_linear.cli` (the one subcommand table).

``fit`` / ``validate`` / ``test`` / ``predict`` are Lightning's :class:`LightningCLI`
subcommands over :class:`~kimi_linear.lightning.module.KimiLinearLitModule` and any
``LightningDataModule`` (``--data SyntheticDataModule`` / ``TextDataModule``; text by default),
with ``--config FILE.yaml``, ``--print_config`` and ``--ckpt_path`` (resume).  The data's
vocabulary size is linked into the model (``data.vocab_size -> model.vocab_size``).

Two more subcommands have their own small argparse parsers:

* ``generate --ckpt_path CKPT_OR_DIR --prompt TEXT`` samples a continuation from a Lightning
  checkpoint or an exported folder, with the tokenizer the model was trained with (the data
  module records it in the checkpoint; an exported folder carries its files) or ``--tokenizer``;
* ``export --ckpt_path CKPT --output_dir DIR`` writes a trained checkpoint in the released
  Kimi-Linear Hugging Face layout (``config.json`` + safetensors under the release names) via
  :meth:`KimiLinearForCausalLM.save_pretrained`, with the files of a Hugging Face tokenizer.

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

from kimi_linear.cli import PROG
from kimi_linear.errors import UsageError, did_you_mean
from kimi_linear.lightning.data import (  # noqa: F401  (short names for --data)
    SyntheticDataModule,
    TextDataModule,
    TokenDataModule,
)
from kimi_linear.lightning.module import KimiLinearLitModule
from kimi_linear.lightning.tokenizer import ByteTokenizer

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
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


#: ``model.*`` hyper-parameters a resumed ``fit`` may change: they only set the optimisation
#: (re-applied after the optimizer state is restored); everything else is refused.
RESUMABLE_HPARAMS = frozenset(
    {
        "lr",
        "weight_decay",
        "betas",
        "warmup_steps",
        "max_steps",
        "min_lr_ratio",
        "qk_clip_tau",
        "moe_bias_update_rate",
        "log_max_logits",
        "activation_checkpointing",
        "compile",
    }
)


def _plain(value: Any) -> Any:
    """A comparable plain value (Namespaces and tuples as dicts and lists)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` file (``None`` when it looks complete).

    A ``torch.save`` file is a zip archive whose directory sits at its end, so an empty or
    truncated file (a write killed half-way, a full disk) is caught without loading it.
    """
    import zipfile

    p = Path(path)
    if p.is_dir():
        return None  # sharded (distributed) checkpoints are folders; Lightning checks them
    size = p.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(p):
        return (
            f"is truncated or not a checkpoint ({size:,} bytes, not a complete torch.save archive)"
        )
    return None


def _other_checkpoints(path: str | os.PathLike) -> str:
    """``"; other checkpoints in DIR: a.ckpt, b.ckpt"`` (complete ones, newest first) or a note."""
    p = Path(path)
    folder = p.parent
    others = [
        q
        for q in sorted(folder.glob("*.ckpt"), key=lambda q: q.stat().st_mtime, reverse=True)
        if q.resolve() != p.resolve() and _checkpoint_problem(q) is None
    ]
    if not others:
        return f"; no other complete checkpoint in {os.fspath(folder)!r}"
    return f"; other checkpoints in {os.fspath(folder)!r}: " + ", ".join(q.name for q in others)


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise a one-line :class:`UsageError` naming ``path`` and listing the other checkpoints of
    its folder when it is empty or truncated."""
    problem = _checkpoint_problem(path)
    if problem is not None:
        raise UsageError(f"--ckpt_path: {os.fspath(path)!r} {problem}{_other_checkpoints(path)}")


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
        ):
            if not os.path.exists(ckpt):
                raise UsageError(f"--ckpt_path: {os.fspath(ckpt)!r} does not exist")
            check_checkpoint_file(ckpt)
        self._cli_args = [a for a in (args or []) if isinstance(a, str)]

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces every ``model.*`` value by the checkpoint's; instead, compare them.

        For ``fit``, a value set for this run (in a ``--config`` file or on the command line)
        that differs from the checkpoint's is kept when it is an optimisation setting
        (:data:`RESUMABLE_HPARAMS`, re-applied after the optimizer state is restored by
        :class:`~kimi_linear.lightning.callbacks.ResumeOverrides`) and refused otherwise (the
        model's architecture, the optimizer type).  ``validate`` / ``test`` / ``predict``
        evaluate the checkpoint's model: any differing value is refused.  The error names every
        differing argument on one line.
        """
        self._resume_changes: dict[str, tuple[Any, Any]] = {}
        sub = self.config.get("subcommand")
        if not sub:
            return
        ckpt_path = self.config[sub].get("ckpt_path")
        if not ckpt_path:
            return
        # a sharded checkpoint (folder) keeps its hyper-parameters in Lightning's meta.pt
        source = Path(ckpt_path) / "meta.pt" if Path(ckpt_path).is_dir() else Path(ckpt_path)
        if not source.is_file():
            return super()._parse_ckpt_path()
        try:
            ckpt = torch.load(source, weights_only=True, map_location="cpu", mmap=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a usage error here
            raise UsageError(
                f"--ckpt_path: {os.fspath(ckpt_path)!r} could not be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}){_other_checkpoints(ckpt_path)}"
            ) from None
        saved = {
            k: v
            for k, v in dict(ckpt.get("hyper_parameters") or {}).items()
            if not k.startswith("_")
        }
        del ckpt
        if not saved:
            return
        current = self.config[sub].get("model")
        defaults = self.parser._subcommands_action._name_parser_map[sub].get_defaults().get("model")
        explicit = {
            a.split("=")[0][len("--model.") :].split(".")[0]
            for a in self._cli_args
            if a.startswith("--model.")
        }
        differing = {}
        for key, old in saved.items():
            if current is None or key not in current:
                continue
            new = _plain(current.get(key))
            default = _plain(defaults.get(key)) if defaults is not None else None
            old = _plain(old)
            if key == "vocab_size" and new is None:
                continue  # linked from the data at instantiation
            if new != old and (new != default or key in explicit):
                differing[key] = (old, new)
        refused = {k: v for k, v in differing.items() if sub != "fit" or k not in RESUMABLE_HPARAMS}
        if refused:
            what = "resuming" if sub == "fit" else f"{sub} of a checkpoint"
            listed = "; ".join(
                f"model.{k}={new!r} (checkpoint: {old!r})" for k, (old, new) in refused.items()
            )
            raise UsageError(
                f"--ckpt_path: {what} cannot change {listed}; drop these arguments"
                + (" or start a new run without --ckpt_path" if sub == "fit" else "")
            )
        self._resume_changes = differing
        model_cfg = {k: v for k, v in saved.items() if k not in differing}
        self.config = self.parser.parse_object({sub: {"model": model_cfg}}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Lightning's trainer, plus checkpoint hygiene: every plain ``ModelCheckpoint`` becomes a
        :class:`~kimi_linear.lightning.callbacks.KimiModelCheckpoint` (final step saved), files
        are written atomically, and a resumed ``fit`` re-applies its changed hyper-parameters."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        from kimi_linear.lightning.callbacks import (
            KimiModelCheckpoint,
            ResumeOverrides,
            use_atomic_checkpoint_io,
        )

        trainer = super().instantiate_trainer(**kwargs)
        for cb in trainer.callbacks:
            if type(cb) is ModelCheckpoint:  # same state, one extra hook: safe to upgrade
                cb.__class__ = KimiModelCheckpoint
        use_atomic_checkpoint_io(trainer)
        changes = getattr(self, "_resume_changes", {})
        if self.subcommand == "fit" and changes:
            trainer.callbacks.append(ResumeOverrides(changes))
        return trainer

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
            hint = did_you_mean(".".join(parts[:i]), keys, cutoff=0.75)
            if hint:
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
    """The :class:`KimiLinearForCausalLM` of a Lightning checkpoint file, a sharded (FSDP2,
    distributed-checkpoint) checkpoint folder, or an exported folder."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--ckpt_path: {os.fspath(path)!r} does not exist")
    from kimi_linear.lightning.parallel import is_sharded_checkpoint, load_sharded_checkpoint

    if is_sharded_checkpoint(p):  # consolidated tensor by tensor in this process
        return load_sharded_checkpoint(p).to(device)
    if p.is_dir():
        from kimi_linear.model import KimiLinearForCausalLM

        try:
            return KimiLinearForCausalLM.from_pretrained(p, device=device)
        except ValueError as e:
            raise UsageError(f"--ckpt_path: {e}") from e
    check_checkpoint_file(p)  # empty / truncated: name it and the folder's other checkpoints
    try:
        module = KimiLinearLitModule.load_from_checkpoint(
            p, map_location=device, weights_only=False
        )
    except (KeyError, RuntimeError, EOFError) as e:
        raise UsageError(
            f"--ckpt_path: {os.fspath(path)!r} is not a kimi-linear Lightning checkpoint ({e})"
        ) from e
    return module.model


_TOKENIZER_HELP = (
    "the tokenizer: 'byte', a tokenizer.json, a Hugging Face tokenizer folder, or a JSON "
    'load_tokenizer spec such as \'{"kind": "tiktoken", "path": "FILE", "pattern": '
    "\"gpt2\"}'; default: the one recorded in the checkpoint (the training data's), the "
    "folder's tokenizer files, else the byte tokenizer"
)


_MISMATCH_HELP = (
    "use --tokenizer even when it differs from the tokenizer the model was trained with "
    "(recorded in the checkpoint, or the folder's tokenizer files); a warning instead of an error"
)


def _recorded_tokenizer_spec(path: Path) -> dict[str, Any] | None:
    """The tokenizer spec a Lightning checkpoint (file, or sharded folder's ``meta.pt``)
    recorded from its data module (``None`` when it recorded none)."""
    from kimi_linear.lightning.tokenizer import find_tokenizer_spec

    source = path / "meta.pt" if path.is_dir() else path
    if not source.is_file():
        return None
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a usage error here
        raise UsageError(
            f"--ckpt_path: {os.fspath(path)!r} could not be read ({type(e).__name__})"
        ) from None
    return find_tokenizer_spec(ckpt) if isinstance(ckpt, dict) else None


def _check_trained_tokenizer(tok: Any, ckpt_path: Path, allow_mismatch: bool) -> None:
    """``--tokenizer`` (loaded as ``tok``) must be the tokenizer the model at ``ckpt_path`` was
    trained with when that is known (recorded in the checkpoint, or the folder's tokenizer
    files): the same ids for the same text (compared by behaviour, so a copy or an exported
    form agrees), or, when the recorded files are gone or changed, files with the recorded
    sha256.  Otherwise a :class:`UsageError`, or with ``allow_mismatch`` a warning on stderr."""
    from kimi_linear.lightning.tokenizer import (
        has_tokenizer_files,
        holds_recorded_files,
        load_tokenizer,
        tokenizer_difference,
    )

    spec: Any
    if ckpt_path.is_dir() and not (ckpt_path / "meta.pt").is_file():
        if not has_tokenizer_files(ckpt_path):
            return
        where, spec = f"the tokenizer files of {os.fspath(ckpt_path)!r}", os.fspath(ckpt_path)
    else:
        spec = _recorded_tokenizer_spec(ckpt_path)
        where = f"the tokenizer recorded in {os.fspath(ckpt_path)!r}"
    if spec is None:  # e.g. a synthetic-task model: nothing to compare with
        return
    try:
        ref = load_tokenizer(spec)
    except (ValueError, TypeError, OSError):  # moved or changed since: compare the files
        ref = None
    if ref is not None:
        why = tokenizer_difference(tok, ref)
    elif holds_recorded_files(spec, tok.spec.get("path", "")):
        why = None
    else:
        why = "it cannot be loaded and --tokenizer's files do not have its sha256"
    if why is None:
        return
    message = (
        f"--tokenizer is not {where} ({why}); the model would read other token ids than it was "
        "trained on"
    )
    if not allow_mismatch:
        raise UsageError(f"{message}; pass --allow_tokenizer_mismatch to use it anyway")
    print(f"warning: {message} (--allow_tokenizer_mismatch)", file=sys.stderr)


def resolve_tokenizer(
    tokenizer: str | None,
    ckpt_path: str | os.PathLike,
    model_vocab_size: int,
    byte_fallback: bool = True,
    allow_mismatch: bool = False,
) -> Any:
    """The tokenizer for ``generate`` / ``export`` of the model at ``ckpt_path``.

    In order: ``tokenizer`` (the ``--tokenizer`` value, see :func:`parse_tokenizer_spec`); the
    spec a Lightning checkpoint recorded from its data module
    (:data:`~kimi_linear.lightning.tokenizer.TOKENIZER_STATE_KEY`, e.g. a
    :class:`TokenDataModule`'s dataset tokenizer, checked against its sha256); a model folder's
    own tokenizer files (``tokenizer.json`` / ``tokenizer_config.json``); else the byte tokenizer
    (``byte_fallback``, for ``generate``) or ``None`` (``export``: no tokenizer files to write).

    Raises :class:`UsageError` when the tokenizer cannot be loaded or its vocabulary does not
    fit the model's: more ids than ``model_vocab_size`` (ids the model cannot embed), or, for the
    byte tokenizer taken by default, a different size (the model was not trained on bytes); and
    when ``tokenizer`` is not the one the model was trained with, where that is known, unless
    ``allow_mismatch`` (then a warning; see :func:`_check_trained_tokenizer`).
    """
    from kimi_linear.lightning.tokenizer import (
        has_tokenizer_files,
        load_tokenizer,
        parse_tokenizer_spec,
    )

    p = Path(ckpt_path)
    if tokenizer is not None:
        what = "--tokenizer"
        spec: Any = parse_tokenizer_spec(tokenizer)
    elif p.is_dir() and not (p / "meta.pt").is_file() and has_tokenizer_files(p):
        what, spec = f"the tokenizer files of {os.fspath(p)!r}", os.fspath(p)
    else:
        spec = _recorded_tokenizer_spec(p)
        what = f"the tokenizer recorded in {os.fspath(p)!r}"
    if spec is None:
        if not byte_fallback:
            return None
        tok = ByteTokenizer()
        if tok.vocab_size != model_vocab_size:
            raise UsageError(
                f"--ckpt_path: the model's vocabulary has {model_vocab_size} tokens, but no "
                f"tokenizer is recorded with it and the byte tokenizer has {tok.vocab_size}; "
                "give the one it was trained with as --tokenizer (a synthetic-task model has none)"
            )
        return tok
    try:
        tok = load_tokenizer(spec)
    except (ValueError, TypeError, OSError) as e:  # UsageError is a ValueError
        hint = (
            ""
            if tokenizer is not None
            else "; pass the tokenizer the model was trained with as --tokenizer"
        )
        raise UsageError(f"{what}: {str(e).removeprefix('tokenizer: ')}{hint}") from None
    if tok.vocab_size > model_vocab_size:
        raise UsageError(
            f"{what}: the tokenizer has {tok.vocab_size} token ids, more than the model's "
            f"vocabulary ({model_vocab_size}); it is not the tokenizer the model was trained with"
        )
    if tokenizer is not None:
        _check_trained_tokenizer(tok, p, allow_mismatch)
    return tok


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} generate",
        description="Sample a continuation of --prompt from a checkpoint (a Lightning .ckpt or an "
        "exported folder) with the tokenizer it was trained with (recorded in the checkpoint, or "
        "the folder's tokenizer files; the byte tokenizer otherwise) or --tokenizer.",
    )
    p.add_argument(
        "--ckpt_path", required=True, help="Lightning checkpoint file or exported model folder"
    )
    p.add_argument("--tokenizer", default=None, help=_TOKENIZER_HELP)
    p.add_argument("--allow_tokenizer_mismatch", action="store_true", help=_MISMATCH_HELP)
    p.add_argument(
        "--prompt",
        required=True,
        action="append",
        help="prompt text (the tokenizer's <bos> token, if it has one, is prepended); repeat the "
        "flag for several prompts, "
        "generated together as one left-padded batch",
    )
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--device", default="cpu")
    return p


def generate_main(argv: list[str]) -> int:
    """``kimi-linear generate``: print ``--num_samples`` continuations of each ``--prompt``
    (prompts of different lengths run as one batch, left-padded with an attention mask)."""
    args = _generate_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise UsageError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples must be >= 1, got {args.num_samples}")
    model = load_model(args.ckpt_path, args.device).eval()
    tok = resolve_tokenizer(
        args.tokenizer,
        args.ckpt_path,
        model.config.vocab_size,
        allow_mismatch=args.allow_tokenizer_mismatch,
    )
    prompts = [text for text in args.prompt for _ in range(args.num_samples)]
    rows = [tok.encode(text, add_bos=tok.bos_id is not None) for text in prompts]
    for text, row in zip(prompts, rows):
        if not row:
            raise UsageError(
                f"--prompt {text!r} has no tokens (the tokenizer has no <bos> to start from)"
            )
    width = max(len(r) for r in rows)
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id  # masked out either way
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
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
            attention_mask=mask,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    new_ids = out[:, width:]
    beyond = new_ids >= tok.vocab_size  # embedding rows past the tokenizer (a padded vocabulary)
    if bool(beyond.any()):
        print(
            f"{PROG} generate: note: dropped {int(beyond.sum())} sampled id(s) >= "
            f"{tok.vocab_size}, outside the tokenizer's vocabulary",
            file=sys.stderr,
        )
    for i, (text, row) in enumerate(zip(prompts, new_ids)):
        if len(args.prompt) > 1:
            print(f"--- prompt {i // args.num_samples} sample {i % args.num_samples}")
        elif args.num_samples > 1:
            print(f"--- sample {i}")
        print(text + tok.decode(row[row < tok.vocab_size]))
    return 0


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Write a trained Lightning checkpoint in the released Kimi-Linear Hugging Face "
        "layout (config.json + safetensors under the release parameter names).",
    )
    p.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning checkpoint written by `kimi-linear fit`, or a checkpoint folder "
        "(config.json + safetensors: release, exported or transformers-saved)",
    )
    p.add_argument("--output_dir", required=True, help="folder to write (created if missing)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow a non-empty --output_dir (its checkpoint files are replaced)",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPES),
        default=None,
        help="cast the weights (A_log and dt_bias stay float32); default: as trained",
    )
    p.add_argument(
        "--max_shard_size", type=int, default=None, help="shard the weights (bytes per file)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help=_TOKENIZER_HELP + "; a Hugging Face tokenizer is copied into --output_dir",
    )
    p.add_argument("--allow_tokenizer_mismatch", action="store_true", help=_MISMATCH_HELP)
    return p


def export_main(argv: list[str]) -> int:
    """``kimi-linear export``: checkpoint -> ``save_pretrained`` folder."""
    args = _export_parser().parse_args(argv)
    from kimi_linear.hf import check_output_dir

    try:  # refuse to replace a user's files unless asked to
        check_output_dir(args.output_dir, overwrite=args.overwrite)
    except ValueError as e:
        raise UsageError(f"--output_dir: {e}") from e
    from kimi_linear.lightning.parallel import is_sharded_checkpoint, load_sharded_checkpoint

    if is_sharded_checkpoint(args.ckpt_path):  # FSDP2: consolidated tensor by tensor, on disk
        dtype = None if args.dtype is None else _DTYPES[args.dtype]
        model = load_sharded_checkpoint(args.ckpt_path, dtype, offload_dir=args.output_dir)
    else:
        model = load_model(args.ckpt_path, "cpu")
    tok = resolve_tokenizer(
        args.tokenizer,
        args.ckpt_path,
        model.config.vocab_size,
        byte_fallback=False,
        allow_mismatch=args.allow_tokenizer_mismatch,
    )
    if args.dtype is not None:
        from kimi_linear.model import cast_model_

        cast_model_(model, _DTYPES[args.dtype])
    try:
        model.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size)
    except ValueError as e:
        raise UsageError(str(e)) from e
    from kimi_linear.lightning.tokenizer import save_tokenizer_files

    same_folder = Path(args.ckpt_path).resolve() == Path(args.output_dir).resolve()
    written = [] if same_folder or tok is None else save_tokenizer_files(tok, args.output_dir)
    n = model.num_parameters()
    print(f"exported {n:,} parameters ({model.dtype}) of {args.ckpt_path} to {args.output_dir}")
    if written:
        print(f"with its tokenizer: {', '.join(written)}")
    elif tok is not None and not isinstance(tok, ByteTokenizer):
        print(f"note: the tokenizer ({tok.spec['kind']}) was not copied; pass it to generate "
              "as --tokenizer")  # fmt: skip
    return 0


# ------------------------------------------------------------------------------------ entry
def lightning_main(argv: list[str]) -> int:
    """Run a LightningCLI subcommand, ``argv = [fit|validate|test|predict, *options]``.

    Called by :func:`kimi_linear.cli.main` (the one subcommand table); usage errors propagate
    as :class:`UsageError` / ``argparse.ArgumentError`` (also wrapped by jsonargparse) and are
    printed there as one line.
    """
    argv = list(argv)
    if not argv or argv[0] not in LIGHTNING_SUBCOMMANDS:
        got = argv[0] if argv else None
        raise UsageError(
            f"lightning_main needs one of {list(LIGHTNING_SUBCOMMANDS)} first, got {got!r}"
        )
    build_cli(argv)
    return 0


__all__ = [
    "KimiLinearCLI",
    "build_cli",
    "default_loggers",
    "export_main",
    "generate_main",
    "lightning_main",
    "load_model",
    "resolve_tokenizer",
]
