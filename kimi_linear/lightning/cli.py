"""The training subcommands of ``kimi-linear``: fit, validate, test, predict, generate, export.

They are dispatched by :mod:`kimi_linear.cli` (the one subcommand table).

``fit`` / ``validate`` / ``test`` / ``predict`` are Lightning's :class:`LightningCLI`
subcommands over :class:`~kimi_linear.lightning.module.KimiLinearLitModule` and any
``LightningDataModule`` (``--data SyntheticDataModule`` / ``TextDataModule``; text by default),
with ``--config FILE.yaml``, ``--print_config`` and ``--ckpt_path`` (resume).  The data's
vocabulary size is linked into the model (``data.vocab_size -> model.vocab_size``).

Two more subcommands have their own small argparse parsers:

* ``generate --ckpt_path CKPT_OR_DIR --prompt TEXT`` streams a continuation (greedy with
  ``--temperature 0``, sampled otherwise) from a Lightning checkpoint or an exported folder,
  with the tokenizer the model was trained with (the data module records it in the checkpoint;
  an exported folder carries its files) or ``--tokenizer``, and reports time to first token and
  tokens/s;
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
    """The default logger: a :class:`~kimi_linear.lightning.logs.RunLogger` under ``save_dir``
    (dense ``metrics.csv``, plus TensorBoard events in the same run folder when ``tensorboard``
    is installed), as a ``class_path`` dict so ``--print_config`` shows it."""
    return [
        {
            "class_path": "kimi_linear.lightning.logs.RunLogger",
            "init_args": {"save_dir": save_dir, "name": name},
        }
    ]


def _run_version(ckpt_path: str | os.PathLike, root_dir: str | os.PathLike) -> int | str | None:
    """The version of the run folder ``root_dir/<version>`` that holds ``ckpt_path`` (a file or
    sharded folder in ``<version>/checkpoints/``): ``3`` for ``version_3``, the folder name for
    any other name; ``None`` when the checkpoint is not in a run folder of ``root_dir``."""
    ckpt = Path(ckpt_path).resolve()
    if ckpt.parent.name != "checkpoints":
        return None
    run = ckpt.parent.parent
    if run.parent != Path(root_dir).resolve():
        return None
    name = run.name
    if name.startswith("version_") and name[len("version_") :].isdigit():
        return int(name[len("version_") :])
    return name


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
            _recover_checkpoint(ckpt)
            if not os.path.exists(ckpt):
                raise UsageError(f"--ckpt_path: {os.fspath(ckpt)!r} does not exist")
            check_checkpoint_file(ckpt)
            if os.path.isdir(ckpt):  # sharded: checked without running code from it
                from kimi_linear.lightning.parallel import verify_sharded_checkpoint

                verify_sharded_checkpoint(ckpt)
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
        from kimi_linear.lightning.callbacks import load_checkpoint

        try:  # weights_only, allow-listed: no code from the file runs
            ckpt = load_checkpoint(source)
        except UsageError as e:
            raise UsageError(f"{e}{_other_checkpoints(ckpt_path)}") from None
        saved = {
            k: v
            for k, v in dict(ckpt.get("hyper_parameters") or {}).items()
            if not k.startswith("_")
        }
        saved_data = dict(ckpt.get("datamodule_hyper_parameters") or {})
        step = ckpt.get("global_step")
        self._resume_step = int(step) if isinstance(step, int) else None
        del ckpt
        if saved_data:
            self._data_from_checkpoint(sub, saved_data)
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
        # `compile` (torch.compile arguments, e.g. inductor options naming a compiler binary)
        # is a setting of this run: never taken from a checkpoint file
        model_cfg = {k: v for k, v in saved.items() if k not in differing and k != "compile"}
        self.config = self.parser.parse_object({sub: {"model": model_cfg}}, self.config)

    def _data_from_checkpoint(self, sub: str, saved: dict[str, Any]) -> None:
        """Use the data module a checkpoint was trained with (its class and arguments, saved by
        Lightning as ``datamodule_hyper_parameters``), so a resumed run reads the same data
        (path, and with it the tokenizer) without repeating it.

        A ``--data.<key>`` given on the command line replaces that value, and ``--data CLASS``
        replaces the whole data module; a ``--config`` file's differing data values are not used
        (a note names them and the argument to pass instead).
        """
        class_path = saved.pop("_class_path", None)
        if isinstance(class_path, str) and class_path.rpartition(".")[0] not in sys.modules:
            return  # a checkpoint never makes us import a module (its code would run)
        args = {k: v for k, v in saved.items() if not k.startswith("_")}
        current = self.config[sub].get("data")
        if not class_path or current is None or not hasattr(current, "get"):
            return
        cli = self._cli_args
        if any(a == "--data" or a.startswith("--data=") for a in cli):
            return  # another data module chosen on the command line: new data
        given = {
            a.split("=")[0].removeprefix("--data.").removeprefix("init_args.").split(".")[0]
            for a in cli
            if a.startswith("--data.")
        }
        same_class = current.get("class_path") == class_path
        now = _plain(current.get("init_args")) or {}
        merged = dict(args)
        for key in given:
            if key in now:
                merged[key] = now[key]
        ignored = {
            k: v
            for k, v in now.items()
            if same_class and k not in given and k in args and v != args[k]
        }
        try:
            self.config = self.parser.parse_object(
                {sub: {"data": {"class_path": class_path, "init_args": merged}}}, self.config
            )
        except (argparse.ArgumentError, SystemExit, ValueError, TypeError) as e:
            raise UsageError(
                f"--ckpt_path: the checkpoint's data module {class_path} with {merged} cannot be "
                f"used ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                "give the data with --data"
            ) from None
        from lightning.pytorch.utilities import rank_zero_info

        shown = ", ".join(
            f"{k}={merged[k]!r}" for k in ("path", "seq_len", "batch_size") if k in merged
        )
        rank_zero_info(
            f"{PROG} {sub}: data from the checkpoint: {class_path.rsplit('.', 1)[-1]}({shown})"
        )
        if ignored:
            listed = "; ".join(
                f"data.{k}={v!r} (checkpoint: {args[k]!r}; pass --data.{k} to use it)"
                for k, v in ignored.items()
            )
            rank_zero_info(f"{PROG} {sub}: note: the --config data values not used: {listed}")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Lightning's trainer, plus checkpoint hygiene: every plain ``ModelCheckpoint`` becomes a
        :class:`~kimi_linear.lightning.callbacks.KimiModelCheckpoint` (final step saved), files
        are written atomically, and a resumed ``fit`` re-applies its changed hyper-parameters."""
        from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

        from kimi_linear.lightning.callbacks import (
            KimiModelCheckpoint,
            KimiRichProgressBar,
            ResumeOverrides,
            use_atomic_checkpoint_io,
        )
        from kimi_linear.lightning.logs import RunLogger

        trainer = super().instantiate_trainer(**kwargs)
        for cb in trainer.callbacks:
            if type(cb) is ModelCheckpoint:  # same state, one extra hook: safe to upgrade
                cb.__class__ = KimiModelCheckpoint
            elif type(cb) is RichProgressBar:  # same state, one description fixed
                cb.__class__ = KimiRichProgressBar
        use_atomic_checkpoint_io(trainer)
        ckpt_path = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        if self.subcommand == "fit" and ckpt_path:
            # every resumed fit: the new run's hyper-parameters and schedule over the restored
            # optimizer / scheduler state (an unchanged schedule stays as it was)
            trainer.callbacks.append(ResumeOverrides(getattr(self, "_resume_changes", {})))
            step = getattr(self, "_resume_step", None)
            for logger in trainer.loggers:
                if isinstance(logger, RunLogger) and logger._version is None and step is not None:
                    version = _run_version(ckpt_path, logger.root_dir)
                    if version is not None:  # continue the checkpoint's run folder
                        logger.resume_at(version, step)
        return trainer

    def before_fit(self) -> None:
        """Say where the run writes (rank 0), before training starts."""
        from lightning.pytorch.utilities import rank_zero_info

        from kimi_linear.lightning.logs import RunLogger

        trainer = self.trainer
        if trainer.log_dir is None:
            return
        what = []
        for logger in trainer.loggers:
            if isinstance(logger, RunLogger):
                what.append("metrics.csv")
                if logger.tensorboard:
                    what.append("TensorBoard events")
        what.append("checkpoints/")
        resumed = next(
            (
                lg.resume_step
                for lg in trainer.loggers
                if getattr(lg, "resume_step", None) is not None
            ),
            None,
        )
        verb = f"continuing at step {resumed}" if resumed is not None else "writing"
        rank_zero_info(
            f"{PROG} fit: run folder {trainer.log_dir} ({verb}: {', '.join(what)}); "
            f"curves: {PROG} plot {trainer.log_dir}"
        )

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
def _recover_checkpoint(path: str | os.PathLike) -> None:
    """Finish or roll back a sharded save of ``path`` that a kill interrupted (``<path>.tmp`` /
    ``<path>.old`` left next to it; see :func:`~kimi_linear.lightning.parallel.recover_checkpoint_swap`)."""
    from kimi_linear.lightning.parallel import recover_checkpoint_swap

    done = recover_checkpoint_swap(path)
    if done is not None:
        print(
            f"{PROG}: {os.fspath(path)!r}: an interrupted save was recovered: {done}",
            file=sys.stderr,
        )


def check_device(device: str | torch.device, arg: str = "--device") -> torch.device:
    """``device`` as a :class:`torch.device`, refused with a :class:`UsageError` naming ``arg``
    when it is not a device name or not present on this machine (``cuda`` without a CUDA device,
    ``cuda:3`` with two GPUs), before any checkpoint is read (a missing device used to surface
    as an error about the checkpoint)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(
            f"{arg}: {str(device)!r} is not a device name (expected cpu, cuda, cuda:N or mps)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            )
            raise UsageError(
                f"{arg}: {str(device)!r} but there is no CUDA device here "
                f"(torch {torch.__version__}, {build}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"{arg}: {str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{arg}: {str(device)!r} but MPS is not available here; use --device cpu")
    return dev


def load_model(path: str | os.PathLike, device: str = "cpu") -> Any:
    """The :class:`KimiLinearForCausalLM` of a Lightning checkpoint file, a sharded (FSDP2,
    distributed-checkpoint) checkpoint folder, or an exported folder.

    No code from the file runs: a ``.ckpt`` is read with ``weights_only=True`` (allow-listed,
    :func:`~kimi_linear.lightning.callbacks.load_checkpoint`) and the model is built from its
    recorded config (Lightning's ``load_from_checkpoint`` would also import and call the
    ``_instantiator`` a checkpoint names); a sharded folder is checked by
    :func:`~kimi_linear.lightning.parallel.verify_sharded_checkpoint`; an exported folder holds
    JSON and safetensors only.

    Raises:
        UsageError: ``device`` is not present here (:func:`check_device`), or the path is not
            a checkpoint.
    """
    device = check_device(device)
    p = Path(path)
    _recover_checkpoint(p)
    if not p.exists():
        raise UsageError(f"--ckpt_path: {os.fspath(path)!r} does not exist")
    from kimi_linear.lightning.callbacks import load_checkpoint
    from kimi_linear.lightning.parallel import (
        is_sharded_checkpoint,
        load_sharded_checkpoint,
        model_from_weights,
    )

    if is_sharded_checkpoint(p):  # consolidated tensor by tensor in this process
        return load_sharded_checkpoint(p).to(device)
    if p.is_dir():
        from kimi_linear.model import KimiLinearForCausalLM

        try:
            return KimiLinearForCausalLM.from_pretrained(p, device=device)
        except ValueError as e:
            raise UsageError(f"--ckpt_path: {e}") from e
    check_checkpoint_file(p)  # empty / truncated: name it and the folder's other checkpoints
    ckpt = load_checkpoint(p)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not isinstance(ckpt.get("hyper_parameters"), dict):
        raise UsageError(
            f"--ckpt_path: {os.fspath(path)!r} is not a kimi-linear Lightning checkpoint "
            "(no state_dict / hyper_parameters)"
        )
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if ckpt["hyper_parameters"].get("lora") is not None:  # a LoRA run: adapters merged
        from kimi_linear.lightning.finetune import model_from_lora_checkpoint

        return model_from_lora_checkpoint(ckpt["hyper_parameters"], weights, p).to(device)
    return model_from_weights(ckpt["hyper_parameters"], weights, p).to(device)


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
    from kimi_linear.lightning.callbacks import load_checkpoint

    ckpt = load_checkpoint(source)  # weights_only, allow-listed: no code from the file runs
    if not isinstance(ckpt, dict):
        return None
    spec = find_tokenizer_spec(ckpt)
    if isinstance(spec, dict) and spec.get("trust_remote_code"):
        # a file never decides to run a tokenizer folder's Python code: that takes an explicit
        # --tokenizer '{..., "trust_remote_code": true}'
        spec = {**spec, "trust_remote_code": False}
    if spec is None:
        # the byte-level text data records no tokenizer state: its class says it all
        data = ckpt.get("datamodule_hyper_parameters") or {}
        if str(data.get("_class_path", "")).endswith(".TextDataModule"):
            spec = {"kind": "byte"}
    return spec


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
        description="Continue --prompt with a checkpoint (a Lightning .ckpt, a sharded checkpoint "
        "folder or an exported / released folder), using the tokenizer the model was trained "
        "with (recorded in the checkpoint, or the folder's tokenizer files; --tokenizer "
        "overrides it). One prompt and one sample are printed token by token as they are "
        "generated; several are printed when all are done. Time to first token and tokens/s "
        "go to stderr. Decoding: --temperature 0 is greedy (argmax, deterministic); a "
        "temperature > 0 samples from the softmax at that temperature, optionally restricted "
        "to the --top_k most likely tokens and / or the --top_p nucleus, reproducibly from "
        "--seed.",
    )
    p.add_argument(
        "--ckpt_path",
        required=True,
        help="Lightning checkpoint file, sharded checkpoint folder, or exported model folder",
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
    p.add_argument(
        "--temperature",
        type=float,
        default=0.8,
        help="0: greedy decoding (argmax); > 0: sampling at this temperature (default 0.8)",
    )
    p.add_argument(
        "--top_k", type=int, default=None, help="sample among the k most likely tokens only"
    )
    p.add_argument(
        "--top_p",
        type=float,
        default=None,
        help="nucleus sampling: the smallest set of tokens whose probability reaches p",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    p.add_argument(
        "--no_stream",
        action="store_true",
        help="print the text when it is complete, not token by token",
    )
    p.add_argument("--device", default="cpu")
    return p


class _TextStream:
    """Print the text of one row of generated ids as the tokens arrive.

    Each new token re-decodes the ids so far and prints what the text grew by; a text that ends
    in an incomplete UTF-8 sequence (a U+FFFD at its end) waits for the next token.  Stops at
    ``eos_id``; ids past the tokenizer's vocabulary are skipped (counted in ``dropped``).
    """

    def __init__(self, tok: Any, out: Any = None) -> None:
        self.tok, self.out = tok, out if out is not None else sys.stdout
        self.ids: list[int] = []
        self.printed = ""
        self.done = False
        self.dropped = 0

    def put(self, token: int) -> None:
        if self.done:
            return
        if token == self.tok.eos_id:
            self.done = True
            return
        if token >= self.tok.vocab_size:
            self.dropped += 1
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def _emit(self, text: str) -> None:
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed) :])
            self.out.flush()
        self.printed = text

    def end(self) -> None:
        self._emit(self.tok.decode(self.ids))
        self.out.write("\n")
        self.out.flush()


def generate_main(argv: list[str]) -> int:
    """``kimi-linear generate``: print ``--num_samples`` continuations of each ``--prompt``
    (prompts of different lengths run as one batch, left-padded with an attention mask); one
    continuation is streamed token by token.  Time to first token and tokens/s go to stderr."""
    import time

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
    stream = _TextStream(tok) if len(prompts) == 1 and not args.no_stream else None
    times: list[float] = []

    def on_tokens(tokens: torch.Tensor) -> None:
        if stream is not None:
            stream.put(int(tokens[0]))
        times.append(time.perf_counter())

    if stream is not None:
        print(prompts[0], end="", flush=True)
    start = time.perf_counter()
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
            streamer=on_tokens,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    new_ids = out[:, width:]
    beyond = new_ids >= tok.vocab_size  # embedding rows past the tokenizer (a padded vocabulary)
    if stream is not None:
        stream.end()
    else:
        for i, (text, row) in enumerate(zip(prompts, new_ids)):
            if len(args.prompt) > 1:
                print(f"--- prompt {i // args.num_samples} sample {i % args.num_samples}")
            elif args.num_samples > 1:
                print(f"--- sample {i}")
            print(text + tok.decode(row[row < tok.vocab_size]))
    if bool(beyond.any()):
        print(
            f"{PROG} generate: note: dropped {int(beyond.sum())} sampled id(s) >= "
            f"{tok.vocab_size}, outside the tokenizer's vocabulary",
            file=sys.stderr,
        )
    if times:
        steps = len(times)
        ttft = times[0] - start
        rate = (steps - 1) / (times[-1] - times[0]) if steps > 1 and times[-1] > times[0] else None
        decode = f", then {rate:.1f} tokens/s" if rate is not None else ""
        batch = f" x {len(prompts)} rows" if len(prompts) > 1 else ""
        print(
            f"{PROG} generate: {width} prompt tokens{batch}; time to first token "
            f"{ttft * 1e3:.0f} ms{decode} ({steps} decoding steps in {times[-1] - start:.2f} s)",
            file=sys.stderr,
        )
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
    p.add_argument(
        "--adapter_only",
        action="store_true",
        help="a LoRA run's checkpoint: write the adapters alone in peft's format "
        "(adapter_config.json + adapter_model.safetensors) instead of the merged model",
    )
    return p


def export_main(argv: list[str]) -> int:
    """``kimi-linear export``: checkpoint -> ``save_pretrained`` folder."""
    args = _export_parser().parse_args(argv)
    from kimi_linear.hf import check_output_dir

    try:  # refuse to replace a user's files unless asked to
        check_output_dir(args.output_dir, overwrite=args.overwrite)
    except ValueError as e:
        raise UsageError(f"--output_dir: {e}") from e
    if args.adapter_only:  # LoRA adapters alone (kimi_linear.lightning.finetune)
        from kimi_linear.lightning.finetune import export_adapter

        export_adapter(args.ckpt_path, args.output_dir)
        print(f"exported the LoRA adapters of {args.ckpt_path} to {args.output_dir}")
        return 0
    from kimi_linear.lightning.parallel import is_sharded_checkpoint, load_sharded_checkpoint

    _recover_checkpoint(args.ckpt_path)
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
    if tok is not None:  # config.json / generation_config.json name the tokenizer's specials
        import dataclasses

        ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        model.config = dataclasses.replace(model.config, **ids)
    try:
        model.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size)
    except ValueError as e:
        raise UsageError(str(e)) from e
    from kimi_linear.lightning.tokenizer import HF_TOKENIZER_FILES, save_tokenizer_files

    same_folder = Path(args.ckpt_path).resolve() == Path(args.output_dir).resolve()
    if args.overwrite and not same_folder:  # no stale tokenizer of an earlier export
        for name in HF_TOKENIZER_FILES:
            (Path(args.output_dir) / name).unlink(missing_ok=True)
    written = [] if same_folder or tok is None else save_tokenizer_files(tok, args.output_dir)
    n = model.num_parameters()
    print(f"exported {n:,} parameters ({model.dtype}) of {args.ckpt_path} to {args.output_dir}")
    if written:
        print(f"with its tokenizer: {', '.join(written)}")
    elif tok is not None:
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
