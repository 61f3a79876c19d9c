"""Running a part: the time budget, items and their context, each result saved as it comes."""

from __future__ import annotations

import dataclasses
import gc
import json
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_check.results import jsonable, render_part_markdown, write_atomic, write_summary
from benchmarks.gpu_check.sizes import Cost, Sizes


class BudgetExceeded(Exception):
    """Raised inside the item in flight when the run's time budget runs out."""


class Budget:
    """Wall-clock budget of a run: time left, and a timer that interrupts the item in flight.

    The timer (``SIGALRM``, main thread only) raises :class:`BudgetExceeded` only while an item
    runs (inside :meth:`armed`); between items the run checks :meth:`remaining` itself.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.monotonic()
        self._armed = False
        self._timer = False
        self._previous: Any = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def _on_alarm(self, signum: int, frame: Any) -> None:
        if self._armed:
            self._armed = False
            raise BudgetExceeded(f"the {self.seconds:.0f} s budget ran out during this item")

    def start_timer(self) -> None:
        """Arm the interrupting timer, where the platform and thread allow it."""
        import threading

        if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, max(self.remaining(), 1e-3))
            self._timer = True

    def stop_timer(self) -> None:
        if self._timer:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous or signal.SIG_DFL)
            self._timer = False

    @contextmanager
    def armed(self) -> Iterator[None]:
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


class PartReport:
    """The items of one part, rewritten to ``gpu_check_<part>.json`` / ``.md`` on every change."""

    def __init__(self, part: str, folder: Path, header: dict[str, Any]) -> None:
        self.part = part
        self.folder = folder
        self.data: dict[str, Any] = {"part": part, **header, "status": "running", "items": []}

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.data["items"]

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(
            self.folder / f"gpu_check_{self.part}.json",
            json.dumps(jsonable(self.data), indent=2) + "\n",
        )
        write_atomic(self.folder / f"gpu_check_{self.part}.md", render_part_markdown(self.data))
        write_summary(self.folder)


@dataclasses.dataclass
class Item:
    """One unit of work: ``fn(ctx)`` fills ``ctx.record`` (and may append rows as it goes)."""

    name: str
    cost: str
    fn: Callable[[ItemContext], None]


class ItemContext:
    """What an item sees: its record (saved on :meth:`add_row`), the budget and the sizes."""

    def __init__(self, record: dict[str, Any], report: PartReport, run: Run) -> None:
        self.record = record
        self.report = report
        self.run = run

    def add_row(self, row: dict[str, Any]) -> None:
        self.record.setdefault("rows", []).append(row)
        self.report.save()

    def time_left(self, need_s: float) -> str | None:
        """``None`` when ``need_s`` seconds are left, else the reason to skip."""
        left = self.run.budget.remaining()
        if left < need_s:
            return (
                f"skipped: {max(left, 0):.0f} s of the budget left, this needs about {need_s:.0f} s"
            )
        return None


@dataclasses.dataclass
class Run:
    device: torch.device
    dtypes: tuple[torch.dtype, ...]
    sizes: Sizes
    budget: Budget
    folder: Path
    dry_run: bool
    seed: int
    header: dict[str, Any]
    compiled: set[str] = dataclasses.field(default_factory=set)
    #: run fla beside ours on every correctness item ("always"), or only when ours misses the
    #: tolerance (fla then decides through FLA_SLACK; saves compiling fla's kernels)
    fla_second_opinion: str = "on miss"

    def cost(self, key: str) -> float:
        """Estimated seconds of an item with cost ``key``: its run plus every kernel set it
        compiles first (0 in a dry run)."""
        if self.dry_run:
            return 0.0
        c = self.sizes.costs.get(key, Cost(30.0))
        return c.run_s + sum(
            self.sizes.compile_s.get(k, 0.0) for k in c.compiles if k not in self.compiled
        )

    def mark_compiled(self, key: str) -> None:
        self.compiled.update(self.sizes.costs.get(key, Cost(0.0)).compiles)


def run_part(run: Run, part: str, items: Sequence[Item]) -> PartReport:
    """Run ``items`` in order under the budget; the part file is rewritten after each."""
    report = PartReport(part, run.folder, run.header)
    report.save()
    print(f"== {part}: {len(items)} items, {max(run.budget.remaining(), 0):.0f} s of budget left")
    for item in items:
        record: dict[str, Any] = {"name": item.name, "status": "running"}
        report.items.append(record)
        need = run.cost(item.cost)
        record["planned_s"] = need
        left = run.budget.remaining()
        if left <= need:
            record["status"] = "skipped"
            record["reason"] = (
                f"{max(left, 0):.0f} s of the budget left, the item needs about {need:.0f} s"
            )
            report.save()
            print(f"  {item.name}: skipped ({record['reason']})")
            continue
        report.save()
        t0 = time.monotonic()
        ctx = ItemContext(record, report, run)
        try:
            with run.budget.armed():
                item.fn(ctx)
            if record["status"] == "running":
                record["status"] = "ok"
        except BudgetExceeded as e:
            record["status"] = "cut off"
            record["reason"] = str(e)
        except torch.OutOfMemoryError as e:
            record["status"] = "error"
            record["reason"] = f"out of memory: {str(e).splitlines()[0][:200]}"
        except Exception as e:  # one failing item must not stop the suite
            record["status"] = "error"
            record["reason"] = (
                f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            )
        record["seconds"] = round(time.monotonic() - t0, 2)
        run.mark_compiled(item.cost)
        free_memory(run.device)
        report.save()
        print(f"  {item.name}: {record['status']} ({record['seconds']:.1f} s)" + _brief(record))
    statuses = {r["status"] for r in report.items}
    report.data["status"] = "complete" if statuses <= {"pass", "ok"} else "incomplete"
    if "fail" in statuses or "error" in statuses:
        report.data["status"] = "failed"
    report.save()
    return report


def _brief(record: dict[str, Any]) -> str:
    if record.get("reason"):
        return f": {record['reason']}"
    if record.get("summary"):
        return f": {record['summary']}"
    return ""


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
