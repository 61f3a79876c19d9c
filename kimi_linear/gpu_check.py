"""One command that validates the Triton KDA kernels on a GPU and produces every GPU figure.

Run on one H100 / H200 (a few minutes)::

    python -m kimi_linear.gpu_check                    # budget 8 minutes, all three parts
    python -m kimi_linear.gpu_check --budget 4 --parts correctness
    python -m kimi_linear.gpu_check --dry-run          # CPU, toy sizes, Triton interpreter (CI)

Three parts, in order of value; each item's result is written as soon as it finishes, so a run
cut off by its budget (or killed) keeps everything measured before:

1. ``correctness``: :func:`kimi_linear.kernels.chunk_kda` forward and backward (output, final
   state and the gradients of q, k, v, g, beta and the initial state; equal-length and packed
   varlen batches) and :func:`kimi_linear.kernels.fused_recurrent_kda` against a float64
   reference and fla's kernels, in bf16 and fp32, at shapes up to B=4, H=32, T=8K, K=V=128 and
   B=1, H=16, T=64K; then the model's ``triton`` backend against its ``torch`` backend over a
   few fp32 training steps of the ``small`` preset. Errors are norm-relative,
   ``||x - ref|| / ||ref||`` per tensor, with the tolerances in :data:`TOLERANCE`.
2. ``speed``: our kernels against fla's on the same inputs in the same run, interleaved rounds
   of ``triton.testing.do_bench`` (min / median / max): forward and forward + backward at
   B=4, H=32, T=8K and B=1, H=16, T=64K (K=V=128, bf16), a packed batch of many short
   sequences, and one decode step per layer at batch 1 and 64 against its state-bytes floor.
3. ``model``: decode time per token and throughput of the Kimi-Linear-48B-A3B layout (all 27
   layers at full width, 16 routed experts so it fits one GPU) and its all-MLA twin at 128K,
   512K and 1M tokens, batch 1 and the largest batch that fits, each against its bytes floor;
   chunked-prefill tokens/s of both; a few bf16 (autocast) training steps of ``small``
   (tokens/s, peak memory) with the ``triton`` and ``fla`` backends.

Every item checks the time left before it starts (a rough cost estimate per item, printed with
the reason when an item is skipped), and a timer stops the item in flight when the budget runs
out. Outputs, under ``benchmarks/results/<gpu-name>/`` (``--dry-run``: ``.../cpu/quick/``) or
``--out-dir``: ``gpu_check_<part>.json`` / ``.md`` per part and ``gpu_check.json`` / ``.md``,
a summary of every part file in that folder (so parts run by separate commands add up), with
the verdict: the kernels are validated on this GPU architecture when every correctness item
ran and passed.

The benchmark helpers come from the repository's ``benchmarks/`` folder (``common.py``,
``kernel_speed.py``, ``decode.py``, ``prefill.py``): run this from a checkout (``pip install -e .``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

PARTS = ("correctness", "speed", "model", "extra")
#: The parts a run does by default (``extra``: prefill, training, packed-batch speed, on request).
DEFAULT_PARTS = ("correctness", "speed", "model")
#: The autotune space of our kernels per part (``kimi_linear.kernels.utils.AUTOTUNE_SPACES``):
#: correctness needs no tuning (the first config, one binary per kernel); the timed parts tune
#: over the small pre-chosen ``suite`` set. fla's autotuning is left alone.
PART_SPACE = {"correctness": "first", "speed": "suite", "model": "suite", "extra": "suite"}

#: Norm-relative tolerance of our kernels against the float64 reference, by input dtype. An
#: item also passes when our error is at most ``FLA_SLACK`` times fla's own error against the
#: same reference (bf16 gradients such as ``dg`` carry rounding no bf16 kernel avoids).
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2}
FLA_SLACK = 1.25
#: The model check (fp32): relative loss difference per step, and norm-relative difference of
#: the first step's gradients (all parameters as one vector), triton vs torch backend.
MODEL_LOSS_TOL = 1e-3
MODEL_GRAD_TOL = 5e-3

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
TENSORS = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0")


# ----------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes and repetition counts of one run (:func:`gpu_sizes` or :func:`dry_run_sizes`).

    Shapes are ``(B, T, H, K, V)``; the ``*_s`` fields are rough costs (seconds) used only to
    skip an item that would not finish inside the budget.
    """

    chunk_shapes: tuple[tuple[int, int, int, int, int], ...]
    odd_shape: tuple[int, int, int, int, int]
    reference_check_shape: tuple[int, int, int, int, int]
    varlen_lengths: tuple[int, ...]
    varlen_heads: tuple[int, int, int]  # H, K, V
    recurrent_shapes: tuple[tuple[int, int, int, int, int], ...]
    model_preset: str
    model_batch: tuple[int, int]  # B, T
    model_steps: int
    speed_shapes: tuple[tuple[int, int, int, int, int], ...]
    speed_varlen: tuple[int, int, int, int]  # sequences, min len, max len, H (K = V = 128)
    speed_decode_batches: tuple[int, ...]
    speed_decode_heads: tuple[int, int, int]
    speed_rounds: int
    bench_preset: str
    bench_experts: int | None
    decode_contexts: tuple[int, ...]
    decode_steps: int
    decode_reps: int
    max_batch: int
    prefill_lengths: tuple[int, ...]
    prefill_chunk: int
    train_preset: str
    train_batch: tuple[int, int]
    train_steps: int
    train_backends: tuple[str, ...]
    costs: dict[str, Cost]
    compile_s: dict[str, float]
    grid_chunks: int = 8  # the grid item: chunks of its long sequence
    safe_gate_bound: float = -5.0


@dataclasses.dataclass(frozen=True)
class Cost:
    """Estimated cost of one item on an H100 / H200 from a cold Triton cache: ``run_s`` seconds
    of work, plus the compile of every kernel set in ``compiles`` (:data:`COMPILE_S`) that no
    earlier item of the run compiled."""

    run_s: float
    compiles: tuple[str, ...] = ()


#: Cold-cache compile seconds of each kernel set the suite builds, charged to the first item that
#: uses it. ``ours ...``: the sum over the kernels of the set of ``compile_s`` in
#: ``python -m kimi_linear.kernels.compile_check --arch 90 --space first|suite`` (Triton's sm_90
#: compiler on this repository's 2-core CI-class CPU, shared: an upper bound for a GPU host),
#: rounded up; the sets are per dtype and head dims (the head count and size buckets are not
#: specialised, ``utils.NO_SPECIALIZE``). ``fla ...``: estimates, not measured (fla's kernels
#: were not compiled here): its autotune lists hold about 80 configs for ``chunk_kda`` forward +
#: backward, at ~1 s each, and its head count ``H`` is a compile-time constant, so each new H
#: compiles the set again.
COMPILE_S: dict[str, float] = {
    # benchmarks/results/cpu/kernels.compile_sm90_bf16_k128_suite.md (CPU seconds), rounded up
    "ours chunk bf16 K=V=128": 16.0,
    "ours safe gate bf16 K=V=128": 6.0,
    "ours suite configs bf16 K=V=128": 5.0,
    "ours recurrent bf16": 1.0,
    "ours decode variants bf16": 1.0,
    # kernels.compile_sm90_fp32_k128_first.md (compile_check --dtype fp32, first space)
    "ours chunk fp32 K=V=128": 33.0,
    "ours safe gate fp32 K=V=128": 10.0,
    "ours recurrent fp32": 1.0,
    # the two state kernels again, without initial / final state (the model's layers)
    "ours state variants fp32": 13.0,
    # kernels.compile_sm90_bf16_k64v128_first.md (--head-dim 64 --value-dim 128)
    "ours chunk bf16 K=64 V=128": 14.0,
    # estimates (see above)
    "fla chunk bf16 H=64 (full autotune)": 80.0,
    "fla chunk bf16 H=16 (full autotune)": 80.0,
    "fla recurrent bf16": 3.0,
}

#: Default wall-clock budget of a run (``--budget``), minutes.
DEFAULT_BUDGET_MIN = 8.0
#: Seconds before the first item: imports (torch, triton, fla), the CUDA context, the result
#: folder (the budget's clock starts after them; the plan counts them against it anyway).
STARTUP_S = 15.0


def gpu_sizes() -> Sizes:
    """The sizes of a real run on one H100 / H200 (80-141 GB)."""
    return Sizes(
        # correctness: small batches (the float64 reference runs on the GPU too), the long
        # sequence at full depth, every chunk item at one head count
        chunk_shapes=((2, 2048, 8, 128, 128), (1, 32768, 8, 128, 128)),
        odd_shape=(2, 1000, 8, 64, 128),
        reference_check_shape=(1, 1024, 4, 64, 64),
        varlen_lengths=(1, 17, 63, 64, 65, 1000, 3000, 4096, 200),
        varlen_heads=(8, 128, 128),
        recurrent_shapes=((64, 1, 32, 128, 128), (4, 512, 32, 128, 128)),
        model_preset="small",
        model_batch=(2, 1024),
        model_steps=3,
        # speed: the anchor shapes, 1M token-heads each (issue 21)
        speed_shapes=((2, 8192, 64, 128, 128), (1, 65536, 16, 128, 128)),
        speed_varlen=(256, 16, 512, 32),
        speed_decode_batches=(1, 64),
        speed_decode_heads=(32, 128, 128),
        speed_rounds=3,
        bench_preset="kimi-linear-48b-a3b",
        bench_experts=16,
        decode_contexts=(1 << 20, 128 << 10),
        decode_steps=8,
        decode_reps=3,
        max_batch=256,
        prefill_lengths=(8 << 10, 32 << 10, 128 << 10),
        prefill_chunk=16 << 10,
        train_preset="small",
        train_batch=(8, 2048),
        train_steps=5,
        train_backends=("triton", "fla"),
        grid_chunks=70_000,  # 4.48M tokens: past CUDA's 65,535 blocks on a grid's axes 1 and 2
        costs={
            "reference": Cost(6),
            "chunk bf16": Cost(6, ("ours chunk bf16 K=V=128",)),
            "chunk fp32": Cost(5, ("ours chunk fp32 K=V=128",)),
            "safe gate bf16": Cost(5, ("ours safe gate bf16 K=V=128",)),
            "safe gate fp32": Cost(5, ("ours safe gate fp32 K=V=128",)),
            "varlen bf16": Cost(6),
            "varlen fp32": Cost(5),
            "odd bf16": Cost(4, ("ours chunk bf16 K=64 V=128",)),
            "long bf16": Cost(10),
            "grid bf16": Cost(8),
            "recurrent bf16": Cost(3, ("ours recurrent bf16",)),
            "recurrent fp32": Cost(3, ("ours recurrent fp32",)),
            "recurrent varlen bf16": Cost(3),
            "recurrent varlen fp32": Cost(3),
            "model_check": Cost(15, ("ours state variants fp32",)),
            "speed B=2 T=8K H=64": Cost(  # ours, ours without NaN isolation, fla
                23, ("ours suite configs bf16 K=V=128", "fla chunk bf16 H=64 (full autotune)")
            ),
            "speed safe gate": Cost(10),
            "speed B=1 T=64K H=16": Cost(20, ("fla chunk bf16 H=16 (full autotune)",)),
            "speed_decode": Cost(6, ("fla recurrent bf16",)),
            "decode_model": Cost(25, ("ours decode variants bf16",)),
            # not in the default parts (--parts extra)
            "speed_varlen": Cost(60),
            "prefill_model": Cost(30),
            "train": Cost(30),
        },
        compile_s=COMPILE_S,
    )


def dry_run_sizes() -> Sizes:
    """Toy sizes that run every item on a CPU under the Triton interpreter in seconds."""
    return Sizes(
        chunk_shapes=((2, 70, 2, 16, 16), (1, 150, 2, 16, 16)),
        odd_shape=(1, 37, 2, 16, 32),
        reference_check_shape=(1, 40, 2, 8, 8),
        varlen_lengths=(1, 17, 40),
        varlen_heads=(2, 16, 16),
        recurrent_shapes=((3, 1, 2, 16, 16), (1, 20, 2, 16, 32)),
        model_preset="tiny",
        model_batch=(1, 32),
        model_steps=2,
        speed_shapes=((1, 64, 1, 16, 16), (1, 128, 1, 16, 16)),
        speed_varlen=(3, 4, 16, 1),
        speed_decode_batches=(1, 4),
        speed_decode_heads=(2, 16, 16),
        speed_rounds=1,
        bench_preset="tiny",
        bench_experts=None,
        decode_contexts=(1024, 256),
        decode_steps=1,
        decode_reps=1,
        max_batch=3,
        prefill_lengths=(64, 192),
        prefill_chunk=64,
        train_preset="tiny",
        train_batch=(1, 32),
        train_steps=1,
        train_backends=("triton", "torch"),
        grid_chunks=8,
        costs={},
        compile_s={},
    )


# ----------------------------------------------------------------------------- budget
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


# ----------------------------------------------------------------------------- results
def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return x


def _write(path: Path, text: str) -> None:
    """Write atomically (a reader, or a run killed mid-write, never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        _write(
            self.folder / f"gpu_check_{self.part}.json",
            json.dumps(_jsonable(self.data), indent=2) + "\n",
        )
        _write(self.folder / f"gpu_check_{self.part}.md", render_part_markdown(self.data))
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


def plan(run: Run, parts: Sequence[str] = DEFAULT_PARTS) -> list[dict[str, Any]]:
    """The items ``parts`` run, in order, each with its estimated compile and run seconds (a
    kernel set's compile charged to its first item): the budget table of the README."""
    builders = {
        "correctness": correctness_items,
        "speed": speed_items,
        "model": model_items,
        "extra": extra_items,
    }
    seen: set[str] = set()
    rows = []
    for part in parts:
        for item in builders[part](run):
            c = run.sizes.costs.get(item.cost, Cost(30.0))
            new = [k for k in c.compiles if k not in seen]
            seen.update(new)
            rows.append(
                {
                    "part": part,
                    "item": item.name,
                    "cost": item.cost,
                    "compile_s": sum(run.sizes.compile_s.get(k, 0.0) for k in new),
                    "compiles": new,
                    "run_s": c.run_s,
                }
            )
    return rows


def budget_markdown(rows: Sequence[dict[str, Any]], budget_min: float = DEFAULT_BUDGET_MIN) -> str:
    """The budget table (Markdown) of :func:`plan` rows, with its total against ``budget_min``."""
    lines = ["| part | item | compile s | run s |", "|---|---|---|---|"]
    lines.append(f"| - | start-up: imports, CUDA context | 0 | {STARTUP_S:g} |")
    for r in rows:
        lines.append(f"| {r['part']} | {r['item']} | {r['compile_s']:g} | {r['run_s']:g} |")
    comp = sum(r["compile_s"] for r in rows)
    work = sum(r["run_s"] for r in rows) + STARTUP_S
    lines.append(f"| **total** | {len(rows)} items | {comp:g} | {work:g} |")
    lines.append("")
    lines.append(
        f"Planned: {comp + work:g} s of the {budget_min * 60:g} s default budget "
        f"({comp:g} s compiling from a cold Triton cache, {work:g} s of work)."
    )
    return "\n".join(lines) + "\n"


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
        _free_memory(run.device)
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


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- helpers
def bench_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` of this checkout as a module (loaded once, by file path)."""
    key = f"kimi_linear_benchmarks_{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = BENCH_DIR / f"{name}.py"
    if not path.is_file():
        raise RuntimeError(
            f"{path} is missing: kimi_linear.gpu_check uses the benchmark helpers of the "
            "repository's benchmarks/ folder; run it from a checkout (pip install -e .)"
        )
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))  # the scripts import their sibling ``common``
    spec = importlib.util.spec_from_file_location(key, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


def rel_err(x: torch.Tensor | None, ref: torch.Tensor | None) -> float:
    """``||x - ref|| / ||ref||`` in float64 (``inf`` for a missing or non-finite ``x``)."""
    if x is None or ref is None:
        return math.inf
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def shape_str(B: int, T: int, H: int, K: int, V: int) -> str:
    fmt = bench_module("common").fmt_tokens
    return f"B={B} T={fmt(T)} H={H} K={K} V={V}"


def kda_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
    N: int | None = None,
    gate_low: float = -1.0,
) -> dict[str, torch.Tensor]:
    """Random KDA inputs as the layer makes them: L2-normalised q, k; g in ``[gate_low, 0]``
    (fp32); beta in ``(0, 1)``; an fp32 initial state ``[N or B, H, K, V]`` of entries
    ~ N(0, 1/K); and the upstream gradients ``do [B, T, H, V]`` and ``dht`` (fp32)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=gen)

    n = B if N is None else N
    return {
        "q": torch.nn.functional.normalize(randn(B, T, H, K), dim=-1).to(dtype),
        "k": torch.nn.functional.normalize(randn(B, T, H, K), dim=-1).to(dtype),
        "v": randn(B, T, H, V).to(dtype),
        "g": gate_low * torch.rand(B, T, H, K, device=device, generator=gen),
        "beta": torch.rand(B, T, H, device=device, generator=gen).to(dtype),
        "h0": randn(n, H, K, V) * K**-0.5,
        "do": randn(B, T, H, V).to(dtype),
        "dht": randn(n, H, K, V),
    }


def per_sequence(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a KDA function without ``cu_seqlens`` support a packed-varlen interface: each
    sequence runs alone from its own initial-state row (outputs concatenated, states stacked)."""

    def wrapped(q, k, v, g, beta, initial_state=None, output_final_state=False, cu_seqlens=None):
        if cu_seqlens is None:
            return fn(
                q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state
            )
        bounds = cu_seqlens.tolist()
        outs, states = [], []
        for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            o, ht = fn(
                *(x[:, s:e] for x in (q, k, v, g, beta)),
                initial_state=None if initial_state is None else initial_state[i : i + 1],
                output_final_state=True,
            )
            outs.append(o)
            states.append(ht)
        return torch.cat(outs, dim=1), torch.cat(states, dim=0)

    return wrapped


def fwd_bwd(
    fn: Callable[..., Any],
    x: dict[str, torch.Tensor],
    compute: torch.dtype | None = None,
    **kw: Any,
) -> dict[str, torch.Tensor]:
    """Forward and backward of ``fn`` on copies of ``x`` (``compute``: cast the inputs first).

    The loss is ``<o, do> + <ht, dht>``; returns o, ht and the gradients (names in
    :data:`TENSORS`). Copies keep ``x`` intact for implementations that modify their inputs.
    """
    names = ("q", "k", "v", "g", "beta", "h0")
    leaves = [
        (x[n].to(compute) if compute is not None else x[n]).detach().clone().requires_grad_()
        for n in names
    ]
    o, ht = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kw)
    acc = torch.float64 if o.dtype == torch.float64 else torch.float32
    loss = (o.to(acc) * x["do"].to(acc)).sum() + (ht.to(acc) * x["dht"].to(acc)).sum()
    loss.backward()
    out = {"o": o.detach(), "ht": ht.detach()}
    for n, leaf in zip(("dq", "dk", "dv", "dg", "dbeta", "dh0"), leaves):
        out[n] = leaf.grad
    return out


def forward_only(
    fn: Callable[..., Any],
    x: dict[str, torch.Tensor],
    compute: torch.dtype | None = None,
    **kw: Any,
) -> dict[str, torch.Tensor]:
    """Forward of ``fn`` on copies of ``x``, without autograd: ``{"o", "ht"}``."""
    xs = [
        (x[n].to(compute) if compute is not None else x[n]).clone()
        for n in ("q", "k", "v", "g", "beta", "h0")
    ]
    with torch.no_grad():
        o, ht = fn(*xs[:5], initial_state=xs[5], output_final_state=True, **kw)
    return {"o": o, "ht": ht}


def compare(
    ours: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    fla: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
) -> tuple[list[dict[str, Any]], bool]:
    """Per-tensor rows (our error and fla's against the reference, ours against fla) and
    whether every tensor passes (:data:`TOLERANCE`, :data:`FLA_SLACK`)."""
    tol = TOLERANCE[dtype]
    rows, ok = [], True
    for name in ours:
        err = rel_err(ours[name], ref[name])
        row: dict[str, Any] = {"tensor": name, "err_vs_fp64": err, "tol": tol}
        fla_err = None
        if fla is not None and name in fla:
            fla_err = rel_err(fla[name], ref[name])
            row["fla_err_vs_fp64"] = fla_err
            row["ours_vs_fla"] = rel_err(ours[name], fla[name])
        passed = math.isfinite(err) and (
            err <= tol
            or (fla_err is not None and math.isfinite(fla_err) and err <= FLA_SLACK * fla_err)
        )
        row["pass"] = passed
        ok &= passed
        rows.append(row)
    return rows, ok


def _fla_ops(device: torch.device) -> SimpleNamespace:
    """fla's KDA functions for ``device``: its Triton kernels on CUDA; on the CPU (dry run) its
    token-by-token reference in place of the chunk kernel, which needs a GPU."""
    from fla.ops.kda import fused_recurrent_kda

    if device.type == "cuda":
        from fla.ops.kda import chunk_kda

        return SimpleNamespace(
            chunk=chunk_kda, recurrent=fused_recurrent_kda, chunk_name="chunk_kda"
        )
    from fla.ops.kda.naive import naive_recurrent_kda

    return SimpleNamespace(
        chunk=per_sequence(naive_recurrent_kda),
        recurrent=fused_recurrent_kda,
        chunk_name="naive_recurrent_kda (CPU dry run)",
    )


def _try_fla(
    ctx: ItemContext, runner: Callable[..., dict[str, torch.Tensor]], *args: Any, **kw: Any
) -> dict[str, torch.Tensor] | None:
    """``runner(*args, **kw)`` for fla's kernels; a failure there is recorded (``fla_error``)
    and the item goes on against the float64 reference alone: fla is the second opinion."""
    try:
        return runner(*args, **kw)
    except BudgetExceeded:
        raise
    except Exception as e:
        ctx.record["fla_error"] = (
            f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        )
        _free_memory(ctx.run.device)
        return None


def _second_opinion(
    ctx: ItemContext,
    ours: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    dtype: torch.dtype,
    runner: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor] | None:
    """fla's result for the :data:`FLA_SLACK` rule, run (inside :func:`_try_fla`, which also
    contains a failing import of fla) only when ours misses the tolerance somewhere, or always
    when ``run.fla_second_opinion == "always"`` (the dry run): a passing item then needs no fla
    kernel compiled."""
    _, ok = compare(ours, ref, None, dtype)
    if ok and ctx.run.fla_second_opinion != "always":
        ctx.record["fla_run"] = "no: every tensor within the tolerance"
        return None
    ctx.record["fla_run"] = "yes" if not ok else "yes (always)"
    return _try_fla(ctx, runner)


def _fla_name(ctx: ItemContext, which: str) -> str:
    """The name of fla's function for the record (``which``: chunk or recurrent), guarded."""
    if which == "recurrent":
        return "fla fused_recurrent_kda"
    try:
        return "fla " + _fla_ops(ctx.run.device).chunk_name
    except Exception as e:  # noqa: BLE001 - informative only
        return f"fla unavailable ({type(e).__name__})"


def _reference(T: int, dry_run: bool) -> tuple[Callable[..., Any], str]:
    """The float64 reference: the token-by-token recurrence for short sequences, else the
    chunked op (whose autograd keeps one state per chunk, not one per token)."""
    from kimi_linear.ops import kda_chunk, kda_recurrent

    if dry_run or T <= 256:
        return per_sequence(kda_recurrent), "kda_recurrent (fp64)"
    return per_sequence(kda_chunk), "kda_chunk (fp64)"


# ----------------------------------------------------------------------------- part 1
def correctness_items(run: Run) -> list[Item]:
    """Every kernel path we ship, bf16 and fp32: equal-length, safe gate, packed varlen, K != V
    under strong decay, a long sequence, more than 65,535 chunks in one launch, decode (dense,
    varlen, state in place), and the model's triton backend against its torch backend."""
    s = run.sizes
    items = [Item("fp64 reference: chunked op = recurrence", "reference", _check_reference)]
    main, long = s.chunk_shapes[0], s.chunk_shapes[-1]
    bf16 = run.dtypes[0]
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        items.append(
            Item(f"chunk_kda {dt} {shape_str(*main)}", f"chunk {dt}", _chunk_item(main, dtype))
        )
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        items.append(
            Item(
                f"chunk_kda safe gate (gate_lower_bound={s.safe_gate_bound:g}) {dt} "
                f"{shape_str(*main)}",
                f"safe gate {dt}",
                _chunk_item(main, dtype, gate_low=s.safe_gate_bound, bound=s.safe_gate_bound),
            )
        )
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        items.append(Item(f"chunk_kda varlen {dt}", f"varlen {dt}", _varlen_item(dtype)))
    dt = DTYPE_NAMES[bf16]
    items.append(
        Item(
            f"chunk_kda strong decay, K != V {dt} {shape_str(*s.odd_shape)}",
            f"odd {dt}",
            _chunk_item(s.odd_shape, bf16, gate_low=-20.0),
        )
    )
    if long != main:
        items.append(
            Item(f"chunk_kda {dt} {shape_str(*long)}", f"long {dt}", _chunk_item(long, bf16))
        )
    items.append(
        Item(
            f"chunk_kda forward, {s.grid_chunks:,} chunks in one launch {dt}",
            f"grid {dt}",
            _grid_item(bf16),
        )
    )
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        for shape in s.recurrent_shapes:
            items.append(
                Item(
                    f"fused_recurrent_kda {dt} {shape_str(*shape)}",
                    f"recurrent {dt}",
                    _recurrent_item(shape, dtype),
                )
            )
    for dtype in run.dtypes:
        dt = DTYPE_NAMES[dtype]
        items.append(
            Item(
                f"fused_recurrent_kda varlen, state in place {dt}",
                f"recurrent varlen {dt}",
                _recurrent_varlen_item(dtype),
            )
        )
    items.append(
        Item(f"model {s.model_preset}: triton vs torch backend", "model_check", _model_check)
    )
    return items


def _check_reference(ctx: ItemContext) -> None:
    """The float64 chunked op against the float64 recurrence (the specification), fwd + bwd."""
    from kimi_linear.ops import kda_chunk, kda_recurrent

    B, T, H, K, V = ctx.run.sizes.reference_check_shape
    x = kda_inputs(B, T, H, K, V, torch.float64, ctx.run.device, ctx.run.seed)
    ref = fwd_bwd(kda_recurrent, x, torch.float64)
    chunk = fwd_bwd(kda_chunk, x, torch.float64)
    tol = 1e-9
    rows = [{"tensor": n, "err": rel_err(chunk[n], ref[n]), "tol": tol} for n in TENSORS]
    for r in rows:
        r["pass"] = r["err"] <= tol
    ctx.record.update(
        shape=shape_str(B, T, H, K, V),
        reference="kda_recurrent (fp64)",
        checked="kda_chunk (fp64)",
        checks=rows,
        status="pass" if all(r["pass"] for r in rows) else "fail",
        summary=f"max err {max(r['err'] for r in rows):.2e} (tol {tol:.0e})",
    )


def _chunk_item(
    shape: tuple[int, int, int, int, int],
    dtype: torch.dtype,
    gate_low: float = -1.0,
    bound: float | None = None,
) -> Callable[[ItemContext], None]:
    """fwd + bwd of ``chunk_kda`` (``bound``: with ``gate_lower_bound``, the safe-gate path; the
    inputs' g then lies in ``[bound, 0]``) against the float64 reference (fla on a miss)."""

    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import chunk_kda

        B, T, H, K, V = shape
        dev = ctx.run.device
        x = kda_inputs(B, T, H, K, V, dtype, dev, ctx.run.seed + T, gate_low=gate_low)
        ref_fn, ref_name = _reference(T, ctx.run.dry_run)
        ref = fwd_bwd(ref_fn, x, torch.float64)
        kw = {} if bound is None else {"gate_lower_bound": bound}
        ours = fwd_bwd(chunk_kda, x, **kw)
        fla = _second_opinion(ctx, ours, ref, dtype, lambda: fwd_bwd(_fla_ops(dev).chunk, x))
        _finish(ctx, ours, ref, fla, dtype, shape_str(*shape), ref_name, _fla_name(ctx, "chunk"))
        if bound is not None:
            ctx.record["gate_lower_bound"] = bound

    return item


def _grid_item(dtype: torch.dtype) -> Callable[[ItemContext], None]:
    """Forward of a packed batch whose first sequence has ``grid_chunks`` chunks (past CUDA's
    65,535 blocks on grid axes 1 and 2 on a GPU run): it must launch, and the short sequence
    packed after it must match a run of that sequence alone."""

    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import chunk_kda
        from kimi_linear.kernels.utils import CHUNK_SIZE

        s, dev = ctx.run.sizes, ctx.run.device
        K = V = s.chunk_shapes[0][3]
        long_len, short_len = s.grid_chunks * CHUNK_SIZE - 5, 100
        cu = torch.tensor([0, long_len, long_len + short_len], device=dev)
        x = kda_inputs(1, long_len + short_len, 1, K, V, dtype, dev, ctx.run.seed + 3, N=2)
        names = ("q", "k", "v", "g", "beta")
        with torch.no_grad():
            o, ht = chunk_kda(
                *(x[n] for n in names),
                initial_state=x["h0"],
                output_final_state=True,
                cu_seqlens=cu,
            )
            o1, h1 = chunk_kda(
                *(x[n][:, long_len:] for n in names),
                initial_state=x["h0"][1:],
                output_final_state=True,
            )
        rows = [
            {"tensor": "o (short sequence)", "err": rel_err(o[:, long_len:], o1)},
            {"tensor": "ht (short sequence)", "err": rel_err(ht[1:], h1)},
            {
                "tensor": "o (long sequence) finite",
                "err": 0.0 if torch.isfinite(o).all() else math.inf,
            },
        ]
        tol = TOLERANCE[dtype]
        for r in rows:
            r["tol"], r["pass"] = tol, r["err"] <= tol
        ctx.record.update(
            dtype=DTYPE_NAMES[dtype],
            shape=f"2 sequences of {long_len:,} ({s.grid_chunks:,} chunks) and {short_len} "
            f"tokens, H=1 K={K} V={V}",
            checks=rows,
            status="pass" if all(r["pass"] for r in rows) else "fail",
            summary=f"launched; short sequence err {max(rows[0]['err'], rows[1]['err']):.1e}",
        )

    return item


def _varlen_item(dtype: torch.dtype) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import chunk_kda

        lengths = ctx.run.sizes.varlen_lengths
        H, K, V = ctx.run.sizes.varlen_heads
        dev = ctx.run.device
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=dev)
        x = kda_inputs(1, sum(lengths), H, K, V, dtype, dev, ctx.run.seed + 7, N=len(lengths))
        ref_fn, ref_name = _reference(max(lengths), ctx.run.dry_run)
        ref = fwd_bwd(ref_fn, x, torch.float64, cu_seqlens=cu)
        ours = fwd_bwd(chunk_kda, x, cu_seqlens=cu)
        fla = _second_opinion(
            ctx, ours, ref, dtype, lambda: fwd_bwd(_fla_ops(dev).chunk, x, cu_seqlens=cu)
        )
        what = f"{len(lengths)} sequences of lengths {list(lengths)}, H={H} K={K} V={V}"
        _finish(
            ctx, ours, ref, fla, dtype, what, ref_name + " per sequence", _fla_name(ctx, "chunk")
        )

    return item


def _recurrent_item(
    shape: tuple[int, int, int, int, int], dtype: torch.dtype
) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import fused_recurrent_kda
        from kimi_linear.ops import kda_recurrent

        B, T, H, K, V = shape
        x = kda_inputs(B, T, H, K, V, dtype, ctx.run.device, ctx.run.seed + 11 + T)
        ref = forward_only(kda_recurrent, x, torch.float64)
        ours = forward_only(fused_recurrent_kda, x)
        dev = ctx.run.device
        fla = _second_opinion(
            ctx, ours, ref, dtype, lambda: forward_only(_fla_ops(dev).recurrent, x)
        )
        _finish(
            ctx,
            ours,
            ref,
            fla,
            dtype,
            shape_str(*shape),
            "kda_recurrent (fp64)",
            _fla_name(ctx, "recurrent"),
        )

    return item


def _recurrent_varlen_item(dtype: torch.dtype) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        from kimi_linear.kernels import fused_recurrent_kda
        from kimi_linear.ops import kda_recurrent

        lengths = ctx.run.sizes.varlen_lengths[:4]
        H, K, V = ctx.run.sizes.varlen_heads
        dev = ctx.run.device
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=dev)
        x = kda_inputs(1, sum(lengths), H, K, V, dtype, dev, ctx.run.seed + 13, N=len(lengths))
        ref = forward_only(per_sequence(kda_recurrent), x, torch.float64, cu_seqlens=cu)
        state = x["h0"].clone()
        ptr = state.data_ptr()
        with torch.no_grad():
            o, ht = fused_recurrent_kda(
                *(x[n] for n in ("q", "k", "v", "g", "beta")),
                initial_state=state,
                cu_seqlens=cu,
                inplace_state=True,
            )
        if ht is None or ht.data_ptr() != ptr:
            raise RuntimeError("inplace_state=True did not return the updated initial_state")
        ours = {"o": o, "ht": state}
        fla = _second_opinion(
            ctx, ours, ref, dtype, lambda: forward_only(_fla_ops(dev).recurrent, x, cu_seqlens=cu)
        )
        what = f"{len(lengths)} sequences of lengths {list(lengths)}, H={H} K={K} V={V}"
        _finish(
            ctx,
            ours,
            ref,
            fla,
            dtype,
            what,
            "kda_recurrent (fp64) per sequence",
            _fla_name(ctx, "recurrent"),
        )

    return item


def _finish(
    ctx: ItemContext,
    ours: dict[str, torch.Tensor],
    ref: dict[str, torch.Tensor],
    fla: dict[str, torch.Tensor] | None,
    dtype: torch.dtype,
    what: str,
    ref_name: str,
    fla_name: str,
) -> None:
    rows, ok = compare(ours, ref, fla, dtype)
    worst = max(rows, key=lambda r: r["err_vs_fp64"] / r["tol"])
    ctx.record.update(
        dtype=DTYPE_NAMES[dtype],
        shape=what,
        reference=ref_name,
        fla=fla_name,
        checks=rows,
        status="pass" if ok else "fail",
        summary=f"worst {worst['tensor']} err {worst['err_vs_fp64']:.2e} (tol {worst['tol']:.0e})",
    )


def _model_check(ctx: ItemContext) -> None:
    """A few fp32 AdamW steps of the same model with the ``triton`` and the ``torch`` backend."""
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    s, dev = ctx.run.sizes, ctx.run.device
    B, T = s.model_batch
    models, opts = {}, {}
    for backend in ("torch", "triton"):
        cfg = KimiLinearConfig.from_preset(s.model_preset, kda_backend=backend)
        torch.manual_seed(ctx.run.seed)
        with torch.device(dev):
            models[backend] = KimiLinearForCausalLM(cfg)
        opts[backend] = torch.optim.AdamW(models[backend].parameters(), lr=1e-3)
    ref_sd = models["torch"].state_dict()
    for key, t in models["triton"].state_dict().items():
        if not torch.equal(t, ref_sd[key]):
            raise RuntimeError(f"the two models were not initialised alike ({key})")
    gen = torch.Generator(device="cpu").manual_seed(ctx.run.seed)
    vocab = models["torch"].config.vocab_size
    losses: dict[str, list[float]] = {"torch": [], "triton": []}
    grad_err = math.nan
    for step in range(s.model_steps):
        ids = torch.randint(0, vocab, (B, T), generator=gen).to(dev)
        grads = {}
        for backend, model in models.items():
            loss = model(ids, labels=ids).loss
            loss.backward()
            losses[backend].append(loss.item())
            if step == 0:
                grads[backend] = torch.cat(
                    [p.grad.flatten() for p in model.parameters() if p.grad is not None]
                )
            opts[backend].step()
            opts[backend].zero_grad(set_to_none=True)
        if step == 0:
            grad_err = rel_err(grads["triton"], grads["torch"])
    loss_err = [abs(a - b) / abs(b) for a, b in zip(losses["triton"], losses["torch"])]
    param_err = rel_err(
        torch.cat([p.detach().flatten() for p in models["triton"].parameters()]),
        torch.cat([p.detach().flatten() for p in models["torch"].parameters()]),
    )
    ok = max(loss_err) <= MODEL_LOSS_TOL and grad_err <= MODEL_GRAD_TOL
    ctx.record.update(
        preset=s.model_preset,
        batch=[B, T],
        steps=s.model_steps,
        optimizer="AdamW lr 1e-3, fp32",
        loss_torch=losses["torch"],
        loss_triton=losses["triton"],
        loss_rel_diff=loss_err,
        loss_tol=MODEL_LOSS_TOL,
        first_step_grad_rel_diff=grad_err,
        grad_tol=MODEL_GRAD_TOL,
        final_param_rel_diff=param_err,
        status="pass" if ok else "fail",
        summary=f"max loss diff {max(loss_err):.1e} (tol {MODEL_LOSS_TOL:.0e}), "
        f"step-1 grads {grad_err:.1e} (tol {MODEL_GRAD_TOL:.0e})",
    )


# ----------------------------------------------------------------------------- part 2
def speed_items(run: Run) -> list[Item]:
    """The anchor shapes (forward, forward + backward, ours against fla), the safe-gate fast
    path at the first anchor, and one decode step per layer against its bytes floor."""
    s = run.sizes
    keys = ("speed B=2 T=8K H=64", "speed B=1 T=64K H=16")
    items = []
    for i, shape in enumerate(s.speed_shapes):
        items.append(
            Item(
                f"chunk_kda bf16 {shape_str(*shape)}",
                keys[min(i, 1)],
                _speed_chunk(shape, kernels_alone=i == 0),
            )
        )
        if i == 0:
            items.append(
                Item(
                    f"chunk_kda bf16 safe gate (gate_lower_bound={s.safe_gate_bound:g}) "
                    f"{shape_str(*shape)}",
                    "speed safe gate",
                    _speed_chunk(shape, safe_gate=True),
                )
            )
    items.append(
        Item("decode step per layer (fused_recurrent_kda) vs floor", "speed_decode", _speed_decode)
    )
    return items


def _timed_providers(
    ctx: ItemContext,
    x: dict[str, torch.Tensor],
    flops: float,
    what: str,
    cu_seqlens: torch.Tensor | None = None,
    safe_gate: float | None = None,
    kernels_alone: bool = False,
) -> None:
    """Forward and forward + backward of ours and fla's chunk kernel, interleaved (and, with
    ``safe_gate``, ours on the safe-gate fast path, ``gate_lower_bound=safe_gate``; with
    ``kernels_alone``, ours with the NaN isolation off too: fla isolates no NaN, so the
    kernels compare like with like, and the isolation's cost is measured beside them).

    fla's ``chunk_kda`` may modify ``g`` and ``v`` in place, so every timed call (ours too, for
    an equal cost) first restores its own copies of g and v; that restore is timed alone in the
    same rounds and subtracted (``net``)."""
    from functools import partial

    from kimi_linear.kernels import chunk_kda

    common = bench_module("common")
    dev, rounds = ctx.run.device, ctx.run.sizes.speed_rounds
    impls: dict[str, Callable[..., Any]] = {"ours": chunk_kda}
    if kernels_alone:
        impls["ours_no_isolation"] = _without_isolation(chunk_kda)
    if safe_gate is not None:
        impls["ours_safe_gate"] = partial(chunk_kda, gate_lower_bound=safe_gate)
    fla_ops = _try_fla(ctx, _fla_ops, dev)  # fla missing or broken: ours are timed alone
    if fla_ops is not None:
        impls["fla"] = fla_ops.chunk
    kw = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
    names = ("q", "k", "v", "g", "beta")
    results: dict[str, Any] = {}
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        fns: dict[str, Callable[[], Any]] = {}
        leaves: dict[str, list[torch.Tensor]] = {}
        for name, fn in impls.items():
            xs = [x[n].detach().clone().requires_grad_(grad) for n in names]
            leaves[name] = xs

            def call(fn=fn, xs=xs, grad=grad) -> None:
                with torch.no_grad():
                    xs[2].copy_(x["v"])
                    xs[3].copy_(x["g"])
                if grad:
                    fn(*xs, **kw)[0].backward(x["do"])
                else:
                    with torch.no_grad():
                        fn(*xs, **kw)

            fns[name] = call
        if "fla" in impls and not _probe_fla(ctx, fns["fla"]):
            del impls["fla"], fns["fla"]
        scratch = [x["v"].clone(), x["g"].clone()]

        def restore(scratch: list[torch.Tensor] = scratch) -> None:
            scratch[0].copy_(x["v"])
            scratch[1].copy_(x["g"])

        fns["restore g, v"] = restore
        t = common.bench_interleaved(
            fns, dev, rounds=rounds, grad_to_none={n: leaves[n] for n in impls}
        )
        net = {n: t[n]["median"] - t["restore g, v"]["median"] for n in impls}
        row: dict[str, Any] = {"mode": mode}
        for n in impls:
            row[f"{n}_ms"] = net[n] * 1e3
            row[f"{n}_min_ms"] = (t[n]["min"] - t["restore g, v"]["median"]) * 1e3
            row[f"{n}_max_ms"] = (t[n]["max"] - t["restore g, v"]["median"]) * 1e3
            row[f"{n}_tflops"] = (3 if grad else 1) * flops / net[n] / 1e12 if net[n] > 0 else None
        row["restore_ms"] = t["restore g, v"]["median"] * 1e3
        row["samples"] = t["ours"]["n"]
        if "fla" in net:
            row["fla_over_ours"] = net["fla"] / net["ours"] if net["ours"] > 0 else None
        if "ours_no_isolation" in net and net["ours_no_isolation"] > 0:
            row["isolation_overhead"] = net["ours"] / net["ours_no_isolation"]
            if "fla" in net:
                row["fla_over_ours_kernels"] = net["fla"] / net["ours_no_isolation"]
        if "ours_safe_gate" in net:
            row["safe_gate_speedup"] = (
                net["ours"] / net["ours_safe_gate"] if net["ours_safe_gate"] > 0 else None
            )
        results[mode] = row
        ctx.add_row(row)
    summary = "fla / ours: fwd {:.2f}x, fwd+bwd {:.2f}x".format(
        results["fwd"].get("fla_over_ours") or math.nan,
        results["fwd+bwd"].get("fla_over_ours") or math.nan,
    )
    if "ours_no_isolation" in impls:
        summary += "; kernels alone (NaN isolation off): fwd {:.2f}x, fwd+bwd {:.2f}x".format(
            results["fwd"].get("fla_over_ours_kernels") or math.nan,
            results["fwd+bwd"].get("fla_over_ours_kernels") or math.nan,
        )
    if safe_gate is not None:
        summary += "; ours / ours safe gate: fwd {:.2f}x, fwd+bwd {:.2f}x".format(
            results["fwd"].get("safe_gate_speedup") or math.nan,
            results["fwd+bwd"].get("safe_gate_speedup") or math.nan,
        )
    ctx.record.update(
        shape=what,
        dtype="bf16",
        timer="triton.testing.do_bench" if dev.type == "cuda" else "perf_counter (CPU dry run)",
        rounds=rounds,
        fla=None if fla_ops is None else "fla " + fla_ops.chunk_name,
        gate_lower_bound=safe_gate,
        summary=summary,
    )


def _without_isolation(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the NaN isolation of the chunked ops off (the kernels alone)."""
    from kimi_linear.ops.isolation import nonfinite_isolation

    def call(*args: Any, **kwargs: Any) -> Any:
        with nonfinite_isolation(False):
            return fn(*args, **kwargs)

    return call


def _probe_fla(ctx: ItemContext, fn: Callable[[], Any]) -> bool:
    """Call fla's timed function once; on failure record ``fla_error`` and time ours alone."""
    try:
        fn()
        return True
    except BudgetExceeded:
        raise
    except Exception as e:
        ctx.record["fla_error"] = (
            f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        )
        _free_memory(ctx.run.device)
        return False


def _speed_chunk(
    shape: tuple[int, int, int, int, int], safe_gate: bool = False, kernels_alone: bool = False
) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        kb = bench_module("kernel_speed")
        B, T, H, K, V = shape
        bound = ctx.run.sizes.safe_gate_bound if safe_gate else None
        x = kda_inputs(
            B, T, H, K, V, torch.bfloat16, ctx.run.device, ctx.run.seed, gate_low=bound or -1.0
        )
        flops = B * H * kb.kda_flops(T, K)
        _timed_providers(
            ctx, x, flops, shape_str(*shape), safe_gate=bound, kernels_alone=kernels_alone
        )

    return item


def _speed_varlen(ctx: ItemContext) -> None:
    kb = bench_module("kernel_speed")
    n, lo, hi, H = ctx.run.sizes.speed_varlen
    K = V = ctx.run.sizes.speed_decode_heads[1]
    gen = torch.Generator(device="cpu").manual_seed(ctx.run.seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(ctx.run.device)
    TT = int(lengths.sum())
    x = kda_inputs(1, TT, H, K, V, torch.bfloat16, ctx.run.device, ctx.run.seed, N=n)
    flops = H * sum(kb.kda_flops(int(t), K) for t in lengths)
    _timed_providers(
        ctx, x, flops, f"{n} sequences of {lo}-{hi} tokens ({TT} in all), H={H} K={K} V={V}", cu
    )


def _speed_decode(ctx: ItemContext) -> None:
    """One decode step of one layer (all heads): ours (state updated in place) and fla's."""
    from kimi_linear.kernels import fused_recurrent_kda

    common, kb = bench_module("common"), bench_module("kernel_speed")
    dev = ctx.run.device
    fla_ops = _try_fla(ctx, _fla_ops, dev)
    fla_step = None if fla_ops is None else fla_ops.recurrent
    bw, bw_source = common.bandwidth(dev, nbytes=1 << 22 if ctx.run.dry_run else 1 << 28)
    H, K, V = ctx.run.sizes.speed_decode_heads
    ctx.record.update(bandwidth_GBps=bw / 1e9, bandwidth_source=bw_source, heads=[H, K, V])
    for B in ctx.run.sizes.speed_decode_batches:
        x = kda_inputs(B, 1, H, K, V, torch.bfloat16, dev, ctx.run.seed + B)
        q, k, v, g, beta = (x[n] for n in ("q", "k", "v", "g", "beta"))
        state, fla_state = x["h0"].clone(), x["h0"].clone()
        state_bytes, io_bytes = kb.decode_step_bytes(q, k, v, g, beta)
        floor = (2 * state_bytes + io_bytes) / bw

        xs = (q, k, v, g, beta)

        def ours(xs: tuple[torch.Tensor, ...] = xs, state: torch.Tensor = state) -> None:
            with torch.no_grad():
                fused_recurrent_kda(*xs, initial_state=state, inplace_state=True)

        def fla(xs: tuple[torch.Tensor, ...] = xs, state: torch.Tensor = fla_state) -> None:
            with torch.no_grad():
                fla_step(*xs, initial_state=state, output_final_state=True)

        fns = {"ours": ours}
        if fla_step is not None and _probe_fla(ctx, fla):
            fns["fla"] = fla
        t = common.bench_interleaved(fns, dev, rounds=ctx.run.sizes.speed_rounds)
        fla_net = t["fla"]["median"] if "fla" in t else math.nan
        ctx.add_row(
            {
                "batch": B,
                "ours_us": t["ours"]["median"] * 1e6,
                "ours_min_us": t["ours"]["min"] * 1e6,
                "ours_max_us": t["ours"]["max"] * 1e6,
                "fla_us": fla_net * 1e6 if "fla" in t else None,
                "floor_us": floor * 1e6,
                "ours_floor_fraction": floor / t["ours"]["median"],
                "fla_floor_fraction": floor / fla_net if fla_net > 0 else None,
                "state_bytes": state_bytes,
                "samples": t["ours"]["n"],
            }
        )
    rows = ctx.record["rows"]
    ctx.record["summary"] = ", ".join(
        f"B={r['batch']}: ours {r['ours_us']:.3g} us = {r['ours_floor_fraction']:.0%} of floor speed"
        for r in rows
    )


# ----------------------------------------------------------------------------- part 3
def model_items(run: Run) -> list[Item]:
    """Decode of the 48B layout and its all-MLA twin at long contexts, against the bytes floor."""
    s = run.sizes
    label = s.bench_preset + (f" --experts {s.bench_experts}" if s.bench_experts else "")
    return [
        Item(f"decode {name} ({label})", "decode_model", _decode_item(name))
        for name in ("hybrid", "all_mla")
    ]


def extra_items(run: Run) -> list[Item]:
    """On request (``--parts extra``): a packed batch of short sequences, chunked prefill of both
    models, and bf16 training steps with each backend."""
    s = run.sizes
    label = s.bench_preset + (f" --experts {s.bench_experts}" if s.bench_experts else "")
    n, lo, hi, H = s.speed_varlen
    items = [
        Item(
            f"chunk_kda bf16 varlen: {n} sequences of {lo}-{hi} tokens, H={H}",
            "speed_varlen",
            _speed_varlen,
        )
    ]
    for name in ("hybrid", "all_mla"):
        items.append(Item(f"prefill {name} ({label})", "prefill_model", _prefill_item(name)))
    for backend in s.train_backends:
        items.append(
            Item(f"train {s.train_preset} bf16, backend {backend}", "train", _train_item(backend))
        )
    return items


def _bench_config(run: Run, name: str) -> Any:
    common = bench_module("common")
    args = SimpleNamespace(
        preset=run.sizes.bench_preset,
        layers=None,
        experts=run.sizes.bench_experts,
        hidden_size=None,
        vocab_size=None,
    )
    cfg = common.config_from_args(args)
    return cfg if name == "hybrid" else cfg.all_mla_twin()


def _model_dtype(run: Run) -> torch.dtype:
    return torch.float32 if run.dry_run else torch.bfloat16


def _resolved_backend(cfg: Any, device: torch.device) -> str:
    """Which KDA backend ``cfg.kda_backend`` runs on ``device`` (for the record)."""
    for module in ("kimi_linear.ops.backend", "kimi_linear.layers.kda"):
        try:
            mod = importlib.import_module(module)
            fn = getattr(mod, "resolve_kda_backend", None)
            if fn is not None:
                return f"{cfg.kda_backend} -> {fn(cfg.kda_backend, device)}"
        except Exception:  # the record is informative only
            continue
    return cfg.kda_backend


def _decode_item(name: str) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        from kimi_linear.model import KimiLinearForCausalLM, cast_model_

        common, decode = bench_module("common"), bench_module("decode")
        run, dev = ctx.run, ctx.run.device
        s = run.sizes
        cfg = _bench_config(run, name)
        dtype = _model_dtype(run)
        nbytes = torch.empty((), dtype=dtype).element_size()
        with torch.device("meta"):
            meta = cast_model_(KimiLinearForCausalLM(cfg), dtype)
        bw, bw_source = common.bandwidth(dev, nbytes=1 << 22 if run.dry_run else 1 << 28)
        ctx.record.update(
            model=name,
            config=f"{cfg.name}: {len(cfg.kda_layers)} KDA + {len(cfg.mla_layers)} MLA layers, "
            f"{cfg.num_experts} routed experts (top {cfg.num_experts_per_token})",
            dtype=DTYPE_NAMES[dtype],
            kda_backend=_resolved_backend(cfg, dev),
            bandwidth_GBps=bw / 1e9,
            bandwidth_source=bw_source,
            steps_per_rep=s.decode_steps,
            reps=s.decode_reps,
        )
        model = decode.build_model(cfg, dtype, dev, run.seed)
        opts = SimpleNamespace(steps=s.decode_steps, warmup=1, reps=s.decode_reps, seed=run.seed)
        for ctx_len in s.decode_contexts:
            per_seq = decode.cache_bytes(
                cfg, ctx_len + s.decode_steps, 1, nbytes
            ) + decode.working_bytes(cfg, ctx_len, 1, nbytes)
            free = common.available_memory(dev)
            largest = min(int((0.85 * free - (64 << 20)) // per_seq), s.max_batch)
            for batch in dict.fromkeys((1, max(largest, 1))):
                row: dict[str, Any] = {"context": ctx_len, "batch": batch}
                if largest < 1:
                    row["status"] = (
                        f"skipped: one sequence needs about {common.fmt_bytes(per_seq)}, "
                        f"{common.fmt_bytes(free)} is free"
                    )
                    ctx.add_row(row)
                    continue
                reason = ctx.time_left(0 if run.dry_run else 15)
                if reason:
                    row["status"] = reason
                    ctx.add_row(row)
                    continue
                try:
                    t = decode.time_decode(model, ctx_len, batch, opts, dtype, dev)
                except torch.OutOfMemoryError as e:
                    row["status"] = f"out of memory: {str(e).splitlines()[0][:160]}"
                    ctx.add_row(row)
                    _free_memory(dev)
                    continue
                _free_memory(dev)
                w = common.active_weight_bytes(meta, batch)["total"]
                c = common.cache_read_bytes(cfg, ctx_len, batch, nbytes)
                floor = (w + c) / bw
                row.update(
                    status="ok",
                    figure="batch 1" if batch == 1 else "largest batch",
                    tpot_ms=t["median"] * 1e3,
                    tpot_min_ms=t["min"] * 1e3,
                    tpot_max_ms=t["max"] * 1e3,
                    tokens_per_s=batch / t["median"],
                    step_bytes=w + c,
                    floor_ms=floor * 1e3,
                    measured_over_floor=t["median"] / floor,
                )
                ctx.add_row(row)
        rows = [r for r in ctx.record.get("rows", []) if r.get("status") == "ok"]
        ctx.record["summary"] = "; ".join(
            f"{common.fmt_tokens(r['context'])} B={r['batch']}: {r['tpot_ms']:.3g} ms/token "
            f"({r['measured_over_floor']:.1f}x floor)"
            for r in rows
        )

    return item


def _prefill_item(name: str) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        common, prefill = bench_module("common"), bench_module("prefill")
        decode = bench_module("decode")
        run, dev = ctx.run, ctx.run.device
        s = run.sizes
        cfg = _bench_config(run, name)
        dtype = _model_dtype(run)
        nbytes = torch.empty((), dtype=dtype).element_size()
        ctx.record.update(
            model=name,
            dtype=DTYPE_NAMES[dtype],
            chunk=s.prefill_chunk,
            batch=1,
            kda_backend=_resolved_backend(cfg, dev),
        )
        model = decode.build_model(cfg, dtype, dev, run.seed)
        gen = torch.Generator(device="cpu").manual_seed(run.seed)
        prompt = torch.randint(0, cfg.vocab_size, (1, max(s.prefill_lengths)), generator=gen).to(
            dev
        )
        with torch.inference_mode():
            prefill.prefill(model, prompt[:, : s.prefill_chunk], s.prefill_chunk, dtype)  # warm-up
            for L in sorted(s.prefill_lengths):
                row: dict[str, Any] = {"length": L}
                # prefill.working_bytes counts fp32 [B, H, chunk, L] scores in case attention
                # falls back to unfused math; SDPA's fused kernels on CUDA never form them, so
                # the check leaves them out there and an out-of-memory is recorded instead.
                scores = cfg.num_attention_heads * min(s.prefill_chunk, L) * L * 4 * 2
                need = (
                    cfg.kv_cache_bytes(L, 1, cache_dtype_bytes=nbytes)["total"]
                    + prefill.working_bytes(cfg, L, s.prefill_chunk, 1, nbytes)
                    - (scores if dev.type == "cuda" and cfg.mla_layers else 0)
                )
                free = common.available_memory(dev)
                reason = ctx.time_left(0 if run.dry_run else 10)
                if need > 0.85 * free:
                    reason = (
                        f"skipped: needs about {common.fmt_bytes(need)}, "
                        f"{common.fmt_bytes(free)} free"
                    )
                if reason:
                    row["status"] = reason
                    ctx.add_row(row)
                    continue
                ids = prompt[:, :L]
                try:
                    t = common.timeit(
                        lambda ids=ids: prefill.prefill(model, ids, s.prefill_chunk, dtype),
                        dev,
                        warmup=0,
                        reps=1 if run.dry_run else 2,
                    )
                except torch.OutOfMemoryError as e:
                    row["status"] = f"out of memory: {str(e).splitlines()[0][:160]}"
                    ctx.add_row(row)
                    _free_memory(dev)
                    continue
                row.update(
                    status="ok",
                    seconds=t["median"],
                    seconds_min=t["min"],
                    seconds_max=t["max"],
                    tokens_per_s=L / t["median"],
                )
                ctx.add_row(row)
                _free_memory(dev)
        rows = [r for r in ctx.record.get("rows", []) if r.get("status") == "ok"]
        ctx.record["summary"] = ", ".join(
            f"{common.fmt_tokens(r['length'])}: {r['tokens_per_s']:.3g} tokens/s" for r in rows
        )

    return item


def _train_item(backend: str) -> Callable[[ItemContext], None]:
    def item(ctx: ItemContext) -> None:
        from kimi_linear.config import KimiLinearConfig
        from kimi_linear.model import KimiLinearForCausalLM
        from kimi_linear.optim import build_optimizer

        common = bench_module("common")
        run, dev = ctx.run, ctx.run.device
        s = run.sizes
        B, T = s.train_batch
        cfg = KimiLinearConfig.from_preset(s.train_preset, kda_backend=backend)
        torch.manual_seed(run.seed)
        with torch.device(dev):
            model = KimiLinearForCausalLM(cfg)
        opt = build_optimizer(model, "adamw", lr=1e-3)
        gen = torch.Generator(device="cpu").manual_seed(run.seed)
        batches = [
            torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(dev) for _ in range(2)
        ]
        losses: list[float] = []

        def step(ids: torch.Tensor) -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())

        step(batches[0])  # warm-up: kernel compilation, allocator
        common.synchronize(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for i in range(s.train_steps):
            step(batches[i % 2])
        common.synchronize(dev)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        loss_values = [float(x) for x in losses]
        if not all(math.isfinite(x) for x in loss_values):
            raise RuntimeError(f"non-finite training loss: {loss_values}")
        ctx.record.update(
            preset=s.train_preset,
            kda_backend=backend,
            precision="bf16 autocast, fp32 weights (bf16-mixed)",
            optimizer="AdamW",
            batch=[B, T],
            timed_steps=s.train_steps,
            seconds=seconds,
            tokens_per_s=B * T * s.train_steps / seconds,
            step_ms=seconds / s.train_steps * 1e3,
            peak_memory_bytes=peak,
            losses=loss_values,
            summary=f"{B * T * s.train_steps / seconds:.3g} tokens/s"
            + (f", peak {common.fmt_bytes(peak)}" if peak is not None else ""),
        )

    return item


# ----------------------------------------------------------------------------- records
class CompileLog:
    """Triton compiles of this process (ours and fla's), timed per kernel, through Triton's
    compilation and autotuning listeners (``triton.knobs``; absent in old Triton releases,
    where the log stays empty and says so)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.tunings: list[dict[str, Any]] = []
        self._previous: tuple[Any, Any] | None = None

    def install(self) -> None:
        knobs = getattr(importlib.import_module("triton"), "knobs", None)
        if knobs is None or not hasattr(getattr(knobs, "compilation", None), "listener"):
            return
        tuning = getattr(knobs, "autotuning", None)
        self._previous = (knobs.compilation.listener, getattr(tuning, "listener", None))

        def on_compile(*, src: Any, metadata: Any, times: Any, cache_hit: bool, **_: Any) -> None:
            fn = getattr(src, "fn", None)
            name = getattr(fn, "__name__", None) or str(getattr(src, "name", "?"))
            module = getattr(getattr(fn, "fn", fn), "__module__", "") or ""
            total_us = getattr(times, "ir_initialization", 0) + sum(
                t for _, t in getattr(times, "lowering_stages", [])
            )
            self.events.append(
                {
                    "kernel": name,
                    "owner": "fla"
                    if module.startswith("fla")
                    else "ours"
                    if "kimi_linear" in module or module.startswith("kernels")
                    else module.split(".")[0] or "?",
                    "seconds": total_us / 1e6,
                    "cache_hit": bool(cache_hit),
                }
            )

        def on_tune(
            *, fn: Any, key: Any, best_config: Any, duration: Any, cache_hit: bool, **_: Any
        ):
            self.tunings.append(
                {
                    "kernel": getattr(fn, "__name__", "?"),
                    "key": str(key),
                    "best": str(best_config),
                    "seconds": duration,
                    "cache_hit": bool(cache_hit),
                }
            )

        knobs.compilation.listener = on_compile
        if tuning is not None and hasattr(tuning, "listener"):
            tuning.listener = on_tune

    def uninstall(self) -> None:
        if self._previous is None:
            return
        knobs = importlib.import_module("triton").knobs
        knobs.compilation.listener = self._previous[0]
        if hasattr(knobs, "autotuning"):
            knobs.autotuning.listener = self._previous[1]
        self._previous = None

    def mark(self) -> tuple[int, int]:
        return len(self.events), len(self.tunings)

    def since(self, mark: tuple[int, int]) -> dict[str, Any]:
        """Compile seconds per kernel (binaries built, not cache hits) and autotuning since
        ``mark``."""
        if self._previous is None:
            return {"available": False, "reason": "this Triton has no compilation listener"}
        per: dict[str, dict[str, Any]] = {}
        for e in self.events[mark[0] :]:
            if e["cache_hit"]:
                continue
            row = per.setdefault(e["kernel"], {"owner": e["owner"], "binaries": 0, "seconds": 0.0})
            row["binaries"] += 1
            row["seconds"] = round(row["seconds"] + e["seconds"], 3)
        tuned = [t for t in self.tunings[mark[1] :] if not t["cache_hit"]]
        return {
            "available": True,
            "per_kernel": per,
            "seconds": {
                o: round(sum(r["seconds"] for r in per.values() if r["owner"] == o), 2)
                for o in sorted({r["owner"] for r in per.values()})
            },
            "autotuning": tuned,
        }


def fla_backends() -> dict[str, Any]:
    """fla's version and the KDA backends it could dispatch to here (availability, switch)."""
    out: dict[str, Any] = {}
    try:
        fla = importlib.import_module("fla")
        out["version"] = getattr(fla, "__version__", None)
        importlib.import_module("fla.ops.kda")
        backends = importlib.import_module("fla.backends")
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return out
    regs = list(getattr(backends, "_function_registries", {}).values())
    regs += list(getattr(backends, "_operation_registries", {}).values())
    avail = {}
    for reg in regs:
        for b in getattr(reg, "_backends", {}).values():
            try:
                avail[f"{reg.operation_name}:{b.backend_type}"] = {
                    "available": bool(b.is_available()),
                    "enabled": bool(b.is_enabled()),
                }
            except Exception as e:  # noqa: BLE001
                avail[f"{reg.operation_name}:{b.backend_type}"] = {"error": type(e).__name__}
    # the KDA op's own backends and those of the shared ops it calls
    out["registered"] = {k: v for k, v in avail.items() if "kda" in k or k.startswith("common:")}
    out["default"] = "Triton (fla's own kernels) unless a backend above is available and enabled"
    return out


def fla_dispatch() -> list[str]:
    """What fla's backend dispatch chose so far in this process (``"op.function -> backend"``;
    empty: every fla call ran fla's default Triton kernels), from its registries' log keys."""
    mod = sys.modules.get("fla.backends")
    if mod is None:
        return []
    regs = list(getattr(mod, "_function_registries", {}).values())
    regs += list(getattr(mod, "_operation_registries", {}).values())
    out = set()
    for reg in regs:
        for key in getattr(reg, "_logged", ()):
            parts = str(key).split(":")
            if len(parts) >= 3:
                out.add(
                    f"{parts[0]}.{parts[1]} -> {parts[2]}"
                    + (" (rejected)" if parts[-1] == "fail" else "")
                )
    return sorted(out)


# ----------------------------------------------------------------------------- markdown
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**NO**"
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return "" if v is None else str(v)


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return ""
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_part_markdown(data: dict[str, Any]) -> str:
    env = data.get("env", {})
    out = [
        f"# GPU check: {data['part']}\n",
        f"{env.get('device', '?')}; torch {env.get('torch')}, triton {env.get('triton')}, "
        f"fla {env.get('fla')}; {env.get('time_utc', '')}"
        + (
            " (**dry run**: toy sizes on the CPU, Triton interpreter; says nothing about a GPU)"
            if data.get("dry_run")
            else ""
        )
        + f". Part status: **{data['status']}**.\n",
    ]
    fla = env.get("fla_backends") or {}
    comp = data.get("compile") or {}
    out.append(
        f"Autotune space of our kernels: {data.get('autotune_space', 'full')}. fla "
        f"{fla.get('version', env.get('fla'))} dispatch: "
        + (", ".join(data.get("fla_dispatch") or []) or "fla's default Triton kernels")
        + ". Compile seconds (cold binaries, this part): "
        + (
            ", ".join(f"{k} {v:g}" for k, v in comp.get("seconds", {}).items()) or "none"
            if comp.get("available")
            else "not recorded"
        )
        + ".\n"
    )
    if comp.get("per_kernel"):
        out.append(
            _table(
                [{"kernel": k, **v} for k, v in sorted(comp["per_kernel"].items())],
                ("kernel", "owner", "binaries", "seconds"),
            )
        )
    if data["part"] == "correctness":
        out.append(
            "Errors are norm-relative, ||x - ref|| / ||ref||, per tensor, against a float64 "
            "reference on the same (rounded) inputs; an item passes when every tensor is within "
            f"the tolerance (fp32 {TOLERANCE[torch.float32]:.0e}, bf16 {TOLERANCE[torch.bfloat16]:.0e}) "
            f"or within {FLA_SLACK}x fla's own error.\n"
        )
    for item in data["items"]:
        out.append(f"## {item['name']}\n")
        meta = {k: v for k, v in item.items() if k not in ("name", "rows", "checks")}
        out.append("; ".join(f"{k}: {_fmt(v)}" for k, v in meta.items()) + "\n")
        if item.get("checks"):
            out.append(_table(item["checks"]))
        if item.get("rows"):
            out.append(_table(item["rows"]))
    return "\n".join(out)


def write_summary(folder: Path) -> dict[str, Any]:
    """Rebuild ``gpu_check.json`` / ``.md`` from every part file in ``folder``."""
    parts: dict[str, Any] = {}
    for part in PARTS:
        path = folder / f"gpu_check_{part}.json"
        if path.is_file():
            try:
                parts[part] = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
    corr = parts.get("correctness")
    verdict: dict[str, Any] = {"kernels_validated": False}
    if corr is None:
        verdict["reason"] = "the correctness part has not run"
    else:
        bad = [i["name"] for i in corr["items"] if i["status"] not in ("pass", "ok")]
        verdict["arch"] = corr.get("env", {}).get("arch")
        verdict["device"] = corr.get("env", {}).get("device")
        if corr.get("dry_run"):
            verdict["reason"] = "dry run (CPU, interpreter): validates the script, not a GPU"
        elif bad:
            verdict["reason"] = f"{len(bad)} correctness item(s) did not pass: {bad}"
        else:
            verdict["kernels_validated"] = True
            verdict["reason"] = "every correctness item passed"
            cap = corr.get("env", {}).get("capability")
            if cap:
                verdict["next_step"] = (
                    f"add {tuple(cap)} to VALIDATED_TRITON_ARCHS in kimi_linear/ops/backend.py "
                    "(kda_backend='auto' then picks our kernels there), with these results"
                )
    summary = {
        "verdict": verdict,
        "parts": {
            p: {
                "status": d["status"],
                "time_utc": d.get("env", {}).get("time_utc"),
                "items": [
                    {
                        k: i.get(k)
                        for k in ("name", "status", "seconds", "summary", "reason")
                        if k in i
                    }
                    for i in d["items"]
                ],
            }
            for p, d in parts.items()
        },
    }
    _write(folder / "gpu_check.json", json.dumps(_jsonable(summary), indent=2) + "\n")
    lines = [
        "# GPU check: summary\n",
        f"Kernels validated on this GPU: **{'yes' if verdict['kernels_validated'] else 'no'}** "
        f"({verdict.get('reason')}).\n",
    ]
    if verdict.get("next_step"):
        lines.append(f"Next step: {verdict['next_step']}.\n")
    for p, d in summary["parts"].items():
        lines.append(f"## {p} ({d['status']}, {d['time_utc']}; details in gpu_check_{p}.md)\n")
        lines.append(
            _table(
                [
                    {
                        "item": i["name"],
                        "status": i["status"],
                        "s": i.get("seconds"),
                        "result": i.get("summary") or i.get("reason"),
                    }
                    for i in d["items"]
                ]
            )
        )
    _write(folder / "gpu_check.md", "\n".join(lines))
    return summary


# ----------------------------------------------------------------------------- entry point
def _positive_minutes(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected minutes as a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number of minutes > 0, got {text!r}")
    return v


def _parts(text: str) -> tuple[str, ...]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(PARTS)}, got {text!r}"
        )
    return tuple(p for p in PARTS if p in names)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m kimi_linear.gpu_check",
        description="Validate the Triton KDA kernels on one GPU and measure every GPU figure "
        "of the kit (correctness, kernel speed vs fla, model decode / prefill / training) "
        "within a time budget.",
    )
    p.add_argument(
        "--budget",
        type=_positive_minutes,
        default=DEFAULT_BUDGET_MIN,
        metavar="MINUTES",
        help=f"wall-clock budget in minutes (default {DEFAULT_BUDGET_MIN:g}, from a cold Triton "
        "cache); items that would not fit are skipped with the reason, the item in flight is "
        "stopped when it runs out",
    )
    p.add_argument(
        "--parts",
        type=_parts,
        default=DEFAULT_PARTS,
        help="comma-separated subset of correctness,speed,model,extra (default: "
        "correctness,speed,model, in that order; extra: packed-batch speed, prefill, training)",
    )
    p.add_argument(
        "--out-dir",
        default=None,
        help="output folder (default benchmarks/results/<gpu-name>/; dry run: .../cpu/quick/)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="toy sizes on the CPU under the Triton interpreter: proves the script works",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every input (default 0)")
    return p.parse_args(argv)


def _prepare_triton(dry_run: bool) -> None:
    """The dry run needs the Triton interpreter, chosen before ``triton`` is first imported."""
    if not dry_run or os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise SystemExit(
            "error: --dry-run runs the kernels under the Triton interpreter, which must be chosen "
            "before triton is imported: set TRITON_INTERPRET=1 in the environment"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _prepare_triton(args.dry_run)
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "error: no CUDA device: the GPU check needs one (use --dry-run to exercise the "
            "script on the CPU at toy sizes)",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    budget = Budget(args.budget * 60)
    common = bench_module("common")
    if args.out_dir is not None:
        folder = Path(args.out_dir)
    else:
        folder = common.RESULTS_DIR / common.device_slug(device)
        if args.dry_run:
            folder = folder / "quick"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out-dir {str(folder)!r} cannot be used as a folder ({e})", file=sys.stderr)
        return 2
    env = common.env_info(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        env["arch"] = f"sm_{major}{minor}"
        env["capability"] = [major, minor]
    else:
        env["arch"] = "cpu (Triton interpreter)"
    env["fla_backends"] = fla_backends()
    header = {
        "env": env,
        "args": {"budget_min": args.budget, "parts": list(args.parts), "seed": args.seed},
        "dry_run": args.dry_run,
    }
    run = Run(
        device=device,
        dtypes=(torch.bfloat16, torch.float32),
        sizes=dry_run_sizes() if args.dry_run else gpu_sizes(),
        budget=budget,
        folder=folder,
        dry_run=args.dry_run,
        seed=args.seed,
        header=header,
        fla_second_opinion="always" if args.dry_run else "on miss",
    )
    print(
        f"gpu_check on {env['device']} ({env['arch']}), budget {args.budget:g} min, parts "
        f"{', '.join(args.parts)}{' (dry run)' if args.dry_run else ''}; writing to {folder}"
    )
    builders = {
        "correctness": correctness_items,
        "speed": speed_items,
        "model": model_items,
        "extra": extra_items,
    }
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    from kimi_linear.kernels import utils as kernel_utils

    compile_log = CompileLog()
    compile_log.install()
    reports = []
    budget.start_timer()
    try:
        for part in args.parts:
            kernel_utils.set_autotune_space(PART_SPACE[part])
            header["autotune_space"] = PART_SPACE[part]
            mark = compile_log.mark()
            report = run_part(run, part, builders[part](run))
            report.data["compile"] = compile_log.since(mark)
            report.data["fla_dispatch"] = fla_dispatch()
            report.save()
            reports.append(report)
    finally:
        budget.stop_timer()
        compile_log.uninstall()
        kernel_utils.set_autotune_space(None)
    summary = write_summary(folder)
    verdict = summary["verdict"]
    print(
        f"verdict: kernels validated on this GPU: {'yes' if verdict['kernels_validated'] else 'no'} "
        f"({verdict['reason']})"
    )
    print(
        f"wrote {folder / 'gpu_check.md'} and the part files beside it ({budget.elapsed():.0f} s)"
    )
    not_passed = [
        f"{r.part}: {i['name']} ({i['status']})"
        for r in reports
        for i in r.items
        if i["status"] not in ("pass", "ok")
    ]
    if not_passed:
        print(
            f"exit 1: {len(not_passed)} item(s) did not pass: " + "; ".join(not_passed[:10]),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
