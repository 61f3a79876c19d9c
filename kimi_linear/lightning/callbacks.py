"""Lightning callbacks and checkpoint I/O of the training command line.

* :class:`AtomicCheckpointIO`: checkpoint files are written to a temporary file in the target's
  own folder, flushed to disk and renamed over the target, so a kill during the write never
  destroys the previous good checkpoint (Lightning's default goes through the system temp dir,
  whose final move is a plain copy when the run folder is on another filesystem).
* :class:`KimiModelCheckpoint`: Lightning's ``ModelCheckpoint`` that also saves the final
  training step (``max_steps`` not a multiple of ``every_n_train_steps`` otherwise leaves
  ``last.ckpt`` behind the trained model) and writes through :class:`AtomicCheckpointIO`.
* :class:`ResumeOverrides`: on ``fit --ckpt_path``, re-applies the optimizer hyper-parameters and
  the learning-rate schedule of the *new* run (learning rate, weight decay, betas, warmup,
  schedule length, minimum ratio) after Lightning restored the checkpoint's optimizer and
  scheduler state; moments and step counts are kept.
* :class:`KimiRichProgressBar`: no ``Epoch 0/-2`` in a run bounded by steps.
* :class:`ThroughputMonitor`: Lightning's ``ThroughputMonitor`` fed by the analytic FLOPs per
  token of :mod:`kimi_linear.flops`: tokens/s, step time, per-device peak memory and model
  FLOPs utilization (MFU), logged with the losses.
* :func:`load_checkpoint`: read a ``torch.save`` checkpoint file (a Lightning ``.ckpt``, a
  sharded folder's ``meta.pt``) without running code from it: ``weights_only=True`` with the
  small allow-list :data:`SAFE_GLOBALS`; anything else is refused with one line naming the file.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import pathlib
import pickle
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks import ThroughputMonitor as LightningThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info

from kimi_linear.errors import UsageError
from kimi_linear.flops import flops_per_token, kda_flops_chunk

__all__ = [
    "SAFE_GLOBALS",
    "AtomicCheckpointIO",
    "KimiModelCheckpoint",
    "KimiRichProgressBar",
    "ResumeOverrides",
    "ThroughputMonitor",
    "atomic_torch_save",
    "load_checkpoint",
    "use_atomic_checkpoint_io",
]


# ------------------------------------------------------------------------ atomic writes
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``.

    The bytes go to a temporary file in ``path``'s own folder (so the final rename never
    crosses a filesystem, whatever the system temp dir is), are flushed and fsynced, and the
    file is renamed over ``path`` (atomic on POSIX and Windows).  On any error the temporary file
    is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------------ safe loading
def _attribute_dict() -> type:
    from lightning.fabric.utilities.data import AttributeDict

    return AttributeDict


#: Globals a checkpoint may reference on top of what ``torch.load(weights_only=True)`` accepts
#: by default (tensors, dtypes, containers, numbers, strings): plain value types that
#: hyper-parameters and callback states can hold.  Rebuilding them runs no code of the file.
SAFE_GLOBALS: tuple[Any, ...] = (
    pathlib.PosixPath,
    pathlib.PurePosixPath,
    pathlib.WindowsPath,
    pathlib.PureWindowsPath,
    argparse.Namespace,
    _attribute_dict(),
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", what: str = "--ckpt_path"
) -> Any:
    """The object in the ``torch.save`` file ``path``, read without running code from it.

    Lightning checkpoints are pickles; a crafted one can name any importable function
    (``__reduce__``) to run while it is unpickled.  Here the file's pickle is first scanned
    (``torch.serialization.get_unsafe_globals_in_checkpoint``, which executes nothing): a
    reference to anything outside ``torch.load(weights_only=True)``'s own allow-list and
    :data:`SAFE_GLOBALS` is refused; then it is loaded with ``weights_only=True``.

    Raises:
        UsageError: one line ``{what}: '{path}' ...`` naming the file and why it was refused
            or could not be read.
    """
    name = os.fspath(path)
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS}
    try:
        unsafe = [
            g
            for g in torch.serialization.get_unsafe_globals_in_checkpoint(name)
            if g not in allowed
        ]
    except Exception as e:  # noqa: BLE001 - not a readable torch.save archive
        raise UsageError(f"{what}: {name!r} could not be read ({_first_line(e)})") from None
    if unsafe:
        listed = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
        raise UsageError(
            f"{what}: {name!r} was refused: it references {listed}, which no checkpoint of this "
            "kit holds (checkpoints are loaded with weights_only=True and never run code); if "
            "you trust the file, load it yourself with torch.load(weights_only=False)"
        )
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(name, map_location=map_location, weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as e:
        raise UsageError(f"{what}: {name!r} could not be read ({_first_line(e)})") from None


def _is_local(path: str | os.PathLike) -> bool:
    s = os.fspath(path)
    return "://" not in s or s.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` whose local saves go through :func:`atomic_torch_save`
    (remote URLs keep Lightning's fsspec path), and whose local loads go through
    :func:`load_checkpoint` (no code from the file runs) unless ``weights_only=False`` is asked
    for explicitly."""

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False or not _is_local(path) or not os.path.isfile(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return load_checkpoint(path, map_location=map_location)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = os.fspath(path)
        atomic_torch_save(
            checkpoint, local[len("file://") :] if local.startswith("file://") else local
        )


def use_atomic_checkpoint_io(trainer: pl.Trainer) -> None:
    """Make ``trainer`` write single-file checkpoints atomically, unless a custom
    ``CheckpointIO`` plugin was chosen (only Lightning's default is replaced)."""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None or type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


# ------------------------------------------------------------------ final-step checkpoint
class KimiModelCheckpoint(ModelCheckpoint):
    """Lightning's :class:`ModelCheckpoint` (same arguments) that also saves at the end of
    training when the last step was not saved yet, and writes files atomically.

    The final save follows the callback's own settings: a step-named file when it keeps
    checkpoints (``save_top_k != 0``; with a ``monitor``, only when the monitored value is
    available), and ``last.ckpt`` when ``save_last`` is set.  The shipped configs use it;
    the command line turns a plain ``ModelCheckpoint`` into this one.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        use_atomic_checkpoint_io(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if self.save_top_k != 0:
                if self.monitor is None:
                    self._save_none_monitor_checkpoint(trainer, candidates)
                elif self.monitor in candidates:
                    self._save_monitor_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)


# ------------------------------------------------------------------------ resume overrides
class ResumeOverrides(Callback):
    """Apply the new run's optimizer hyper-parameters and learning-rate schedule when resuming
    ``fit`` from a checkpoint (``kimi-linear fit --ckpt_path`` adds it to every resumed fit).

    Lightning restores the optimizer's ``param_groups`` (learning rate, weight decay, betas...)
    and the scheduler's state (base learning rates and the schedule function's fields:
    ``WarmupCosine``'s ``warmup_steps``, ``total_steps``, ``min_ratio``) from the checkpoint,
    which would silently undo ``--model.lr`` and friends and keep the old schedule.  This
    callback records the freshly configured values before the restore (``on_fit_start``) and
    applies them after it (``on_train_start``):

    * ``changes`` (the ``model.*`` values that differ from the checkpoint's): every group's
      hyper-parameters and the scheduler's base learning rates are the new run's;
    * the schedule: when the new run's schedule function differs from the restored one (a
      changed ``model.warmup_steps`` / ``model.max_steps`` / ``model.min_lr_ratio``, or a
      changed ``trainer.max_steps`` / ``max_epochs`` when ``model.max_steps`` is unset, which
      sets the schedule's length), the new one replaces it.  The learning rate of step ``s`` is
      then the new schedule's at ``s``, as if the run had been configured that way from the
      start; e.g. a finished 120-step run resumed with ``max_steps: 240`` continues from the
      cosine's value at 120 / 240 (up from its floor), instead of running the extra steps at
      the minimum learning rate.  An unchanged schedule is kept as it was.

    Optimizer moments, step counts and the scheduler's position come from the checkpoint.
    Every change is reported in one line (``Resumed with new hyper-parameters (...)``, and
    the schedule before and after with the learning rate at the resumed step).

    Args:
        changes: ``{hyper-parameter: (checkpoint value, new value)}``, reported once.
    """

    #: Module hyper-parameters that shape the schedule (the function's fields follow them).
    SCHEDULE_KEYS = frozenset({"warmup_steps", "max_steps", "min_lr_ratio"})

    def __init__(self, changes: Mapping[str, tuple[Any, Any]] | None = None) -> None:
        self.changes = dict(changes or {})
        self._groups: list[list[dict[str, Any]]] = []
        self._schedulers: list[dict[str, Any]] = []
        #: what was applied, for tests and logs: ``(old fields, new fields)`` per scheduler
        self.schedule_changes: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._groups = [
            [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            for opt in trainer.optimizers
        ]
        self._schedulers = []
        for cfg in trainer.lr_scheduler_configs:
            sch = cfg.scheduler
            lambdas = getattr(sch, "lr_lambdas", [])
            self._schedulers.append(
                {
                    "base_lrs": list(getattr(sch, "base_lrs", [])),
                    "lambdas": [copy.deepcopy(getattr(fn, "__dict__", {})) for fn in lambdas],
                }
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.changes:
            for opt, groups in zip(trainer.optimizers, self._groups):
                for group, fresh in zip(opt.param_groups, groups):
                    group.update(copy.deepcopy(fresh))
        self.schedule_changes = []
        # a fresh schedule whose length is the trainer's estimate over max_epochs was configured
        # with a pending length (it needs the train loader, only now set up with its restored
        # position): the module resolves it before it is compared with the restored one
        resolve = getattr(pl_module, "resolve_lr_schedule", None)
        for cfg, saved in zip(trainer.lr_scheduler_configs, self._schedulers):
            sch = cfg.scheduler
            if self.changes and saved["base_lrs"]:
                sch.base_lrs = list(saved["base_lrs"])
            lambdas = list(getattr(sch, "lr_lambdas", []))
            if callable(resolve):
                saved["lambdas"] = [resolve(f) if f else f for f in saved["lambdas"]]
            for fn, fields in zip(lambdas, saved["lambdas"]):
                old = dict(getattr(fn, "__dict__", {}))
                if fields and old != fields:
                    fn.__dict__.update(copy.deepcopy(fields))
                    if (old, fields) not in self.schedule_changes:
                        self.schedule_changes.append((old, dict(fields)))
            if lambdas:
                before = [g["lr"] for g in sch.optimizer.param_groups]
                step = sch.last_epoch
                for group, base, fn in zip(sch.optimizer.param_groups, sch.base_lrs, lambdas):
                    group["lr"] = base * fn(step)
                sch._last_lr = [g["lr"] for g in sch.optimizer.param_groups]
                for old, new in self.schedule_changes:
                    rank_zero_info(
                        f"Resumed with a new learning-rate schedule at step {step}: "
                        f"{_fields(old)} -> {_fields(new)} (lr {before[0]:.4g} -> "
                        f"{sch._last_lr[0]:.4g})"
                    )
        if self.changes:
            listed = ", ".join(
                f"model.{k}: {old!r} -> {new!r}" for k, (old, new) in self.changes.items()
            )
            rank_zero_info(f"Resumed with new hyper-parameters ({listed})")


def _fields(fields: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in fields.items())


# --------------------------------------------------------------------------- progress bar
class KimiRichProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` whose description reads ``Epoch 3 (max_steps 120)`` when
    the run is bounded by steps (``max_epochs: -1``), not ``Epoch 3/-2``, and without the
    ``v_num: 0.000`` field; the command line uses it in place of a plain ``RichProgressBar``."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}"
        if max_epochs is not None and max_epochs > 0:
            text += f"/{max_epochs - 1}"
        elif self.trainer.max_steps is not None and self.trainer.max_steps > 0:
            text += f" (max_steps {self.trainer.max_steps})"
        width = len(self.validation_description)
        return f"{text:{width}}" if len(text) < width else text

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Lightning's metrics without ``v_num`` (the run folder is printed at the start)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


# ------------------------------------------------------------------------------ throughput
#: Dense peak FLOP/s per device by precision (NVIDIA's spec sheets, without the 2x of
#: structured sparsity) for the GPUs where Lightning's ``get_available_flops`` has no figure or
#: a wrong one; every other device is Lightning's.  Ours does more here: ``NVIDIA H200`` (the
#: name the SXM part reports) is unknown to Lightning, whose H200 entries are the sparse figures;
#: ``NVIDIA L40S`` is read as an L4 (3x too low); the RTX 4090's bf16 / fp16 entry is its
#: non-tensor rate.  Matched as a substring of ``torch.cuda.get_device_name`` (longest first).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183.0e12, "fp32": 91.6e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
}

#: our precision names -> the dtype keys of Lightning's FLOPs table
_LIGHTNING_DTYPES: dict[str, torch.dtype | str] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "tf32": "tfloat32",
    "fp32": torch.float32,
}


def _precision_key(trainer: pl.Trainer) -> str:
    p = str(getattr(trainer, "precision", "32-true"))
    if "bf16" in p:
        return "bf16"
    if "16" in p:
        return "fp16"
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def peak_flops_of(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of a CUDA ``device`` at ``precision`` (``bf16``, ``fp16``, ``tf32``,
    ``fp32``): :data:`PEAK_FLOPS` for the GPUs it lists, else Lightning's
    ``get_available_flops``; ``None`` for a CPU or a GPU neither knows."""
    from lightning.fabric.utilities.throughput import get_available_flops

    if precision not in _LIGHTNING_DTYPES:
        raise ValueError(f"precision must be one of {sorted(_LIGHTNING_DTYPES)}, got {precision!r}")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in name.lower():
            return table.get(precision)
    flops = get_available_flops(device, _LIGHTNING_DTYPES[precision])
    return None if flops is None else float(flops)


def _input_ids(batch: Any) -> torch.Tensor:
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(
            "ThroughputMonitor: expected a training batch with a 2-D 'input_ids' tensor [B, T], "
            f"got {type(batch).__name__}"
        )
    return ids


def _rows(batch: Any) -> int:
    return int(_input_ids(batch).shape[0])


def _tokens(batch: Any) -> int:
    return int(_input_ids(batch).numel())


class ThroughputMonitor(LightningThroughputMonitor):
    """Log training throughput with the losses: ``perf/tokens_per_s`` (all ranks),
    ``perf/step_time_s`` (per optimizer step), ``perf/peak_memory_gib`` (peak allocated on rank
    0's device since training started; CUDA only) and ``perf/mfu``.

    Lightning's ``ThroughputMonitor`` does the timing (CUDA-synchronised, validation time left
    out of the training windows) and its ``Throughput`` the rates and MFU over a window of the
    last ``log_every_n_steps`` optimizer steps; this class feeds it our analytic FLOPs and logs
    under the names above through ``LightningModule.log_dict``, so they share the losses' rows
    of ``metrics.csv``.  Beyond Lightning's callback (hence not used as is): the FLOPs per
    batch come from the model's config (no ``flops_per_batch`` on the module needed), the
    window is exactly the steps since the previous log (also under gradient accumulation),
    validation / test batches are not logged with their batch index as the step, the peak
    memory is logged, and peak FLOP/s come from :func:`peak_flops_of` (Lightning's table plus
    :data:`PEAK_FLOPS`).

    MFU is ``tokens/s * flops_per_token / (world_size * peak)``, where ``flops_per_token`` is the
    analytic training cost (forward + backward) of the model's config at the batch's length
    (:func:`kimi_linear.flops.flops_per_token`) and ``peak`` the device's dense peak FLOP/s:
    ``peak_flops`` if given, else :func:`peak_flops_of` the device at the trainer's precision.
    Without either (a CPU, an unknown GPU) MFU is not logged, and a one-line note says so.

    Args:
        peak_flops: peak FLOP/s of one device (e.g. ``989e12`` for an H100 in bf16).
        log_every_n_steps: log every this many optimizer steps (``None``: the trainer's
            ``log_every_n_steps``).  Tokens and time are averaged over the window.
    """

    def __init__(
        self, peak_flops: float | None = None, log_every_n_steps: int | None = None
    ) -> None:
        if peak_flops is not None and not (
            isinstance(peak_flops, (int, float))
            and not isinstance(peak_flops, bool)
            and math.isfinite(peak_flops)
            and peak_flops > 0
        ):
            raise ValueError(f"peak_flops must be None or a finite number > 0, got {peak_flops!r}")
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 1
        ):
            raise ValueError(
                f"log_every_n_steps must be None or an int >= 1, got {log_every_n_steps!r}"
            )
        super().__init__(batch_size_fn=_rows, length_fn=_tokens)
        self.peak_flops = None if peak_flops is None else float(peak_flops)
        self.log_every_n_steps = log_every_n_steps
        self._every = 1
        self._accumulate = 1
        self._flops_per_token: dict[int, float] = {}
        self._last_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._every = self.log_every_n_steps or trainer.log_every_n_steps or 1
        self._accumulate = max(int(trainer.accumulate_grad_batches), 1)
        # the window: the batches of the last `every` optimizer steps and the point before them
        self.kwargs["window_size"] = self._every * self._accumulate + 1
        with warnings.catch_warnings():  # Lightning's own lookup; ours (below) replaces it
            warnings.simplefilter("ignore")
            super().setup(trainer, pl_module, stage)
        root = trainer.strategy.root_device
        self.available_flops = self.peak_flops or peak_flops_of(root, _precision_key(trainer))
        for throughput in self._throughputs.values():
            throughput.available_flops = self.available_flops
        self._flops_per_token = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.available_flops is None:
            rank_zero_info(
                "ThroughputMonitor: MFU not available (no peak FLOP/s known for "
                f"{pl_module.device.type} device; pass peak_flops to log it)"
            )
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        super().on_train_start(trainer)
        if trainer.is_global_zero:  # the window starts at train start, not at the first batch
            self._throughputs[RunningStage.TRAINING].update(
                time=0.0, batches=0, samples=0, lengths=0, flops=0
            )
        self._last_step = trainer.global_step

    def _flops_per_batch(self, pl_module: pl.LightningModule, batch: Any) -> float | None:
        """Analytic training FLOPs of this rank's ``batch`` (``None`` without a model config)."""
        config = getattr(pl_module, "config", None)
        if config is None:
            return None
        ids = _input_ids(batch)
        T = int(ids.shape[1])
        if T not in self._flops_per_token:
            chunk = kda_flops_chunk(config, pl_module.device.type)
            self._flops_per_token[T] = flops_per_token(
                config, T, training=True, kda_chunk_len=chunk
            )
        return self._flops_per_token[T] * ids.numel()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Lightning's callback reads the FLOPs of the batch from this attribute of the module
        pl_module.flops_per_batch = self._flops_per_batch(pl_module, batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _compute(self, trainer: pl.Trainer, iter_num: int | None = None) -> None:
        """Log the training window's rates under our names every ``log_every_n_steps``
        optimizer steps (Lightning calls this after each optimizer step and each evaluation
        batch; evaluation batches are timed only, to leave them out of the training windows)."""
        if trainer.state.stage != RunningStage.TRAINING:
            return
        step = trainer.global_step
        if step == self._last_step or step % self._every != 0:
            return
        self._last_step = step
        metrics = self._throughputs[RunningStage.TRAINING].compute()
        sep = self._throughputs[RunningStage.TRAINING].separator
        items = metrics.get(f"device{sep}items_per_sec")
        if items is None:  # fewer than a window of batches (a resumed run's first log)
            return
        pl_module = trainer.lightning_module
        stats = {
            "perf/tokens_per_s": items * max(trainer.world_size, 1),
            "perf/step_time_s": self._accumulate / metrics[f"device{sep}batches_per_sec"],
        }
        if pl_module.device.type == "cuda":
            stats["perf/peak_memory_gib"] = (
                torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            )
        if f"device{sep}mfu" in metrics:
            stats["perf/mfu"] = metrics[f"device{sep}mfu"]
        pl_module.log_dict(stats, on_step=True, on_epoch=False, rank_zero_only=True)
