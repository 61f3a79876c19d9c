"""The LightningCLI subcommands of ``kimi-linear``: fit, validate, test, predict.

They are dispatched by :mod:`kimi_linear.cli` (the one subcommand table; ``generate`` and
``export`` are :mod:`.generate` and :mod:`.export`).

``fit`` / ``validate`` / ``test`` / ``predict`` are Lightning's :class:`LightningCLI`
subcommands over :class:`~kimi_linear.lightning.module.KimiLinearLitModule` and any
``LightningDataModule`` (``--data SyntheticDataModule`` / ``TextDataModule``; text by default),
with ``--config FILE.yaml``, ``--print_config`` and ``--ckpt_path`` (resume).  The data's
vocabulary size is linked into the model (``data.vocab_size -> model.vocab_size``).  A resumed
run is checked against its checkpoint (:data:`RESUMABLE_HPARAMS` may change, nothing else) and
reads the checkpoint's data module unless told otherwise.

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

from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from kimi_linear.errors import PROG, UsageError, did_you_mean
from kimi_linear.lightning.callbacks import (
    KimiModelCheckpoint,
    KimiRichProgressBar,
    ResumeOverrides,
    load_checkpoint,
    use_atomic_checkpoint_io,
)
from kimi_linear.lightning.checkpoints import (
    check_checkpoint_file,
    other_checkpoints,
    recover_interrupted_save,
    verify_sharded_checkpoint,
)
from kimi_linear.lightning.data import (  # noqa: F401  (short names for --data)
    SyntheticDataModule,
    TextDataModule,
    TokenDataModule,
)
from kimi_linear.lightning.logs import RunLogger
from kimi_linear.lightning.module import KimiLinearLitModule

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
DEFAULT_ROOT_DIR = "runs"


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
            recover_interrupted_save(ckpt)
            if not os.path.exists(ckpt):
                raise UsageError(f"--ckpt_path: {os.fspath(ckpt)!r} does not exist")
            check_checkpoint_file(ckpt)
            if os.path.isdir(ckpt):  # sharded: checked without running code from it
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
        try:  # weights_only, allow-listed: no code from the file runs
            ckpt = load_checkpoint(source)
        except UsageError as e:
            raise UsageError(f"{e}{other_checkpoints(ckpt_path)}") from None
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
    "DEFAULT_ROOT_DIR",
    "LIGHTNING_SUBCOMMANDS",
    "RESUMABLE_HPARAMS",
    "KimiLinearCLI",
    "build_cli",
    "default_loggers",
    "lightning_main",
]
