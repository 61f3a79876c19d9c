"""The training log of a run: one folder, one dense CSV, TensorBoard events beside it.

:class:`RunLogger` is Lightning's ``CSVLogger`` (same folder layout,
``<save_dir>/<name>/version_<n>/``) with three changes:

* **dense CSV**: ``metrics.csv`` has one row per optimizer step holding every metric logged at
  that step (losses, learning rates, throughput, MLA max logits, validation), instead of
  Lightning's one row per logging call (a sparse table where each group of metrics has a row of
  its own);
* **TensorBoard** events are written into the same folder when the ``tensorboard`` package is
  installed (Lightning's ``TensorBoardLogger``, so ``tensorboard --logdir runs`` shows every
  run; ``tensorboard: false`` turns it off, ``true`` makes a missing package an error);
* **resume continues the run**: :meth:`RunLogger.resume_at` (called by ``kimi-linear fit
  --ckpt_path`` when the checkpoint lies in this logger's ``<save_dir>/<name>/version_<n>/``)
  keeps writing to that folder: the rows up to the checkpoint's step are kept, those past it (a
  crashed run's steps that will be trained again) are dropped, and TensorBoard purges its
  events past that step; no new ``version_<n+1>`` splits the curve.

``kimi-linear plot RUN...`` (:mod:`kimi_linear.plot`) draws the curves of these files.
"""

from __future__ import annotations

import csv
import importlib.util
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from kimi_linear.errors import UsageError

__all__ = ["DenseExperimentWriter", "RunLogger", "tensorboard_available"]


def tensorboard_available() -> bool:
    """Whether the ``tensorboard`` package is installed (it is an optional dependency)."""
    return importlib.util.find_spec("tensorboard") is not None


def _step_of(row: dict[str, Any]) -> int | None:
    try:
        return int(float(row["step"]))
    except (KeyError, TypeError, ValueError):
        return None


class DenseExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer with one row per step: metrics logged at the step of the last row
    are merged into it (a later value of the same key replaces the earlier one).

    The last row stays in memory until :meth:`save` is called with ``final=True`` (at the end
    of training), since more metrics of its step may still arrive; every earlier row is written
    at each periodic save.

    Args:
        log_dir: the run folder.
        resume_step: continue the ``metrics.csv`` already in ``log_dir``: keep its rows up to
            this step (the last of them, at this step, stays open for merging), drop later ones.
            ``None``: a fresh file (Lightning's behaviour: an old ``metrics.csv`` is replaced).
    """

    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir=log_dir)
        if resume_step is not None and self._fs.isfile(self.metrics_file_path):
            self._continue(resume_step)

    def _check_log_dir_exists(self) -> None:
        if self._resume_step is None:  # a fresh run in a used folder: Lightning's warning
            super()._check_log_dir_exists()

    def _continue(self, step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if (_step_of(r) is not None and _step_of(r) <= step)]
        self.metrics_keys = sorted(set(keys))
        tail = [rows.pop()] if rows and _step_of(rows[-1]) == step else []
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)
        # the row of the checkpoint's step stays open: the resumed run may log more at that step
        self.metrics = [{k: v for k, v in r.items() if v not in ("", None)} for r in tail]
        for r in self.metrics:
            r["step"] = step

    def log_metrics(self, metrics_dict: dict[str, Any], step: int | None = None) -> None:
        before = len(self.metrics)
        super().log_metrics(metrics_dict, step)
        if before and self.metrics[-2]["step"] == self.metrics[-1]["step"]:
            self.metrics[-2].update(self.metrics.pop())

    def save(self, final: bool = False) -> None:
        """Append the finished rows to ``metrics.csv`` (all rows when ``final``)."""
        if final or len(self.metrics) <= 1:
            if final:
                super().save()
            return
        pending = self.metrics.pop()
        try:
            super().save()
        finally:
            self.metrics = [pending]


class RunLogger(CSVLogger):
    """The logger of ``kimi-linear fit``: a dense ``metrics.csv`` and TensorBoard events in one
    run folder ``<save_dir>/<name>/version_<n>/`` (see the module docstring).

    Args:
        save_dir: root of all runs (``runs``).
        name: the experiment (``tiny``, ``small``...); runs are ``version_0``, ``version_1``...
        version: a fixed version (int) or folder name (str); ``None``: the next free one.
        tensorboard: also write TensorBoard events into the run folder; ``None`` (default):
            when the ``tensorboard`` package is installed.
        flush_logs_every_n_steps: how often the CSV is appended to.
        prefix: a prefix of every metric name.
    """

    def __init__(
        self,
        save_dir: str = "runs",
        name: str = "kimi-linear",
        version: int | str | None = None,
        tensorboard: bool | None = None,
        flush_logs_every_n_steps: int = 50,
        prefix: str = "",
    ) -> None:
        super().__init__(
            save_dir,
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )
        if tensorboard is None:
            tensorboard = tensorboard_available()
        elif tensorboard and not tensorboard_available():
            raise UsageError(
                "trainer.logger: tensorboard=true, but the tensorboard package is not installed "
                "(pip install tensorboard, or tensorboard: null to use it only when installed)"
            )
        self.tensorboard = bool(tensorboard)
        self._resume_step: int | None = None
        self._tb: Any = None

    def resume_at(self, version: int | str, step: int) -> None:
        """Continue the run folder ``version`` from optimizer step ``step`` (a checkpoint's
        ``global_step``): called before anything is logged."""
        if self._experiment is not None:
            raise RuntimeError("RunLogger.resume_at must be called before anything is logged")
        self._version = version
        self._resume_step = int(step)

    @property
    def resume_step(self) -> int | None:
        """The step this run continues from (``None`` for a fresh run)."""
        return self._resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> DenseExperimentWriter:  # type: ignore[override]
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = DenseExperimentWriter(self.log_dir, resume_step=self._resume_step)
        return self._experiment

    def _tensorboard(self) -> Any:
        if not self.tensorboard:
            return None
        if self._tb is None:
            from lightning.pytorch.loggers import TensorBoardLogger

            kwargs: dict[str, Any] = {}
            if self._resume_step is not None:  # drop the events a crashed run wrote past here
                kwargs["purge_step"] = self._resume_step + 1
            self._tb = TensorBoardLogger(
                self.save_dir,
                name=self.name,
                version=self.version,
                default_hp_metric=False,
                prefix=self._prefix,
                **kwargs,
            )
        return self._tb

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        tb = self._tensorboard()
        if tb is not None:
            tb.log_metrics(metrics, step)

    @rank_zero_only
    def save(self) -> None:
        super().save()
        if self._tb is not None:
            self._tb.save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._experiment.save(final=True)
        if self._tb is not None:
            self._tb.finalize(status)
