"""Static cost model of the chunked KDA kernels, ours against fla 0.6, counted without a GPU.

For the forward and the backward of our chunked KDA (:mod:`kimi_linear.kernels.chunk`) and of
fla's ``fla.ops.kda.chunk.ChunkKDAFunction``, both at the autograd-function level (the host
code that prepares the inputs and launches the kernels; precomputed log decay ``g``, no
in-kernel l2norm / gate / sigmoid, recompute on), counted the same way for every provider:

* ``ours``: the default gate path (any ``g``, e.g. the release's softplus gate);
  ``ours_safe``: the bounded safe gate (``gate_lower_bound=-5``; tensor-core diagonal blocks);
  ``fla``: fla's default path (``safe_gate=False``); ``fla_safe``: ``safe_gate=True,
  lower_bound=-5``; ``ours_api``: the public :func:`kimi_linear.kernels.chunk_kda` (input
  checks and the isolation of non-finite inputs around ``ours``); ``ours_split`` (not in the
  default count, in ``--predict``'s): ``ours`` with the in-device sequence split forced
  (:mod:`kimi_linear.kernels.split`, ``chunk_kda(segment_chunks=n)``).

Everything is counted by **running** the code on the CPU, Triton kernels under the interpreter,
with every Triton launch and every torch op on the tensors involved recorded:

* **launches**: Triton kernel launches, plus torch ops that launch a device kernel (memsets /
  zero fills, casts, clones, copies, elementwise ops, reductions); views, ``empty``
  allocations and lazy no-op casts launch nothing and are not counted. ``host_syncs``: device
  to host reads (``.item()`` and the like).
* **bytes** (``GiB``): per Triton launch, the distinct bytes its loads read plus the distinct
  bytes its stores write, per tensor argument (a read-modify-write counts twice; a partly read
  argument counts only what is read; a tile several programs read counts once: the DRAM
  traffic with perfect caching within the launch). ``access_GiB``: every load and store,
  repeats included (no caching at all). Per torch op: the bytes of its tensor inputs read
  (not the destination of a fill or a copy) plus the bytes of its outputs written.
* **tensor FLOPs**: ``2 * M * N * K`` of every ``tl.dot`` (zero tiles included), split by
  operand dtype (``fp32`` operands: TF32 or exact fp32 on a GPU).
* **exponentials** (``exp``: ``tl.exp`` / ``tl.exp2``) and ``log`` (``tl.log`` / ``tl.log2``)
  per element, and **elementwise** float work: every other floating-point elementwise op
  (add, mul, fma, div, compare, select, cast, abs, sqrt, ...) per element, and the elements fed
  to reductions and scans (``tl.sum``, ``tl.max``, ``tl.cumsum``); integer / index and pointer
  arithmetic is left out. Torch ops count their elements as elementwise work (and as
  exponentials for exp / log / sigmoid / softplus ops). Counted as the kernels are written,
  masked-off lanes included, before any compiler simplification.
* **saved**: bytes of the tensors the autograd node keeps for the backward beyond the inputs.

The interpreter runs at small shapes and the counts are extrapolated: every quantity of every
launch is fitted as ``c + N * (a * T + b)`` (``N = B * H`` sequence-heads) from three runs,
``(B, H, T) = (1, 1, T0), (1, 1, 2 * T0), (1, 2, T0)`` with ``T0 = --count-tokens``, then
evaluated at each ``--shapes`` entry; the three runs must issue the same launches in the same
order (else the run fails). The fit is exact for costs linear in tokens per sequence-head
plus a per-sequence-head term (states) and a constant; it assumes T a multiple of 64 (no
partial chunk) and K, V the counted head dims. ``--check`` adds a run at ``(2, 2, T0)``
and reports the largest relative error of the fit there. ``ours_split`` is counted with one
chunk per segment (T0 >= 128: several segments) plus a run at ``(1, 1, 2 T0)`` with two, and
fitted as ``c + N * (a * T + b + d * S)`` (``S`` segments per sequence: the transitions, the
folds and the entry states cost per segment); ``--check`` counts it at ``(2, 2, 2 T0)``
(``S = 4``). The count tables evaluate it at ``--segment-chunks``. Autotuned kernels run their first
config (their tile sizes change re-reads, i.e. ``access_GiB``, and elementwise work on masked
lanes; rarely the distinct bytes). Grids in the launch table are those of the ``(1, 1, T0)``
run.

``--predict`` turns the counts into predicted times on an H100 SXM and an H200 (issue 21 part
2): per launch a bytes floor, a tensor-FLOP floor, an exponential floor, an elementwise floor
and a serial-chain floor (dependent chunk steps x a stated step latency, with the programs vs
SMs fill), the launch's time the max of them, a phase's the sum plus a per-launch overhead;
and the same with T split into S segments per sequence: for ours from the counted
``ours_split`` launches (transitions, fold, states forward; the backward's recompute the same,
then its reverse pass from zero, reverse fold reusing ``M``, reverse pass), for a provider
without a counted split from :func:`split_work`, an analytic model of the same kernels
(checked launch by launch against the counts: :func:`split_check`, the "analytic split"
table, ``tests/test_kernel_cost.py``). The automatic choice
(:func:`kimi_linear.kernels.split.auto_segment_chunks` with the GPU's SM count) is predicted
per shape at several step latencies beside the model's best S, with a sentence saying whether
they agree. Constants and datasheet sources in :data:`GPUS`, :data:`STEP_LATENCY_S`,
:data:`LAUNCH_OVERHEAD_S`, :data:`SM_BANDWIDTH`; it writes ``kernel_cost_predict.json`` /
``.md`` (default shapes 2x64x8192, 1x16x65536, 1x32x1048576; providers ours, ours_split and
fla). Predictions, not measurements.

Outputs ``kernel_cost.json`` and ``kernel_cost.md`` (``kernel_cost_<tag>.*`` with ``--tag``)
under ``benchmarks/results/cpu/`` or ``--out-dir``; committed results are never replaced
unless ``--overwrite``. About three minutes on one CPU core at the defaults (four with
``--check``; ``--predict --check`` about eight).

Examples::

    python -m benchmarks.kernel_cost --out-dir /tmp/cost
    python -m benchmarks.kernel_cost --shapes 2x64x8192 --providers ours fla --tag anchor
    python -m benchmarks.kernel_cost --overwrite     # replace the committed results
    python -m benchmarks.kernel_cost --predict --check   # predicted times, ours vs fla
"""

from __future__ import annotations

import os

# The kernels run under the interpreter: it must be chosen before triton is imported.
os.environ["TRITON_INTERPRET"] = "1"

import argparse
import contextlib
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime import autotuner, interpreter

from benchmarks.common import DTYPES, HelpFormatter, fail, parse_dtype
from benchmarks.report import command_line, markdown_table, refuse_overwrite, save_results

CHUNK = 64
PROVIDERS = ("ours", "ours_safe", "fla", "fla_safe", "ours_api", "ours_split")
DEFAULT_PROVIDERS = ("ours", "ours_safe", "fla", "fla_safe", "ours_api")
#: Providers that run the in-device sequence split (forced ``segment_chunks``) of another one:
#: counted at several segment counts, fitted in T and S (:func:`fit`), used by ``--predict``
#: for that provider's split rows.
SPLIT_PROVIDERS = {"ours_split": "ours"}
#: Chunks per segment of the split providers' counting runs (1: several segments per sequence
#: at the small counting lengths; the runs at ``2 T0`` also take ``2 * SPLIT_COUNT_CHUNKS``).
SPLIT_COUNT_CHUNKS = 1
#: Providers compared against fla (numerator, denominator) when both were counted.
RATIOS = (("ours", "fla"), ("ours_safe", "fla"), ("ours_safe", "fla_safe"), ("ours_api", "fla"))
SAFE_GATE_BOUND = -5.0
PHASES = ("forward", "backward")
#: Per-launch quantities, fitted and extrapolated.
METRICS = (
    "read_bytes",
    "write_bytes",
    "access_read_bytes",
    "access_write_bytes",
    "flops_bf16",
    "flops_fp16",
    "flops_fp32",
    "flops_other",
    "exp",
    "log",
    "elementwise",
    "programs",  # grid size of a Triton launch (for the prediction)
)


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------


@dataclass
class Event:
    """One launch: a Triton kernel or a torch op that launches a device kernel."""

    phase: str
    kind: str  # "triton" or "torch"
    name: str
    grid: tuple[int, ...] = ()
    config: str = ""
    counts: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    #: argument name -> [distinct bytes read, distinct bytes written]
    args: dict[str, list[float]] = field(default_factory=dict)


class _ArgMemory:
    """Distinct bytes loaded / stored per tensor argument of one Triton launch (byte maps)."""

    def __init__(self, bound: dict[str, Any]):
        spans: dict[tuple[int, int], str] = {}
        for name, x in bound.items():
            if not isinstance(x, torch.Tensor) or x.numel() == 0:
                continue
            start = x.data_ptr()
            last = sum((s - 1) * abs(st) for s, st in zip(x.shape, x.stride()))
            spans.setdefault((start, start + (last + 1) * x.element_size()), name)
        order = sorted(spans)
        self.starts = np.array([s for s, _ in order], dtype=np.uint64)
        self.ends = np.array([e for _, e in order], dtype=np.uint64)
        self.names = [spans[s] for s in order]
        self.maps = {
            kind: [np.zeros(int(e - s), dtype=bool) for s, e in order] for kind in ("r", "w")
        }
        self.outside = 0

    def record(self, addrs: np.ndarray, elem: int, kind: str) -> None:
        if addrs.size == 0:
            return
        addrs = addrs.astype(np.uint64, copy=False).ravel()
        idx = np.searchsorted(self.starts, addrs, side="right").astype(np.int64) - 1
        inside = idx >= 0
        inside[inside] &= addrs[inside] < self.ends[idx[inside]]
        self.outside += int((~inside).sum()) * elem
        for i in np.unique(idx[inside]):
            off = (addrs[idx == i] - self.starts[i]).astype(np.int64)
            byte = (off[:, None] + np.arange(elem, dtype=np.int64)[None, :]).ravel()
            self.maps[kind][i][np.minimum(byte, self.maps[kind][i].size - 1)] = True

    def per_arg(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for i, name in enumerate(self.names):
            r, w = int(self.maps["r"][i].sum()), int(self.maps["w"][i].sum())
            if r or w:
                prev = out.setdefault(name, [0.0, 0.0])
                prev[0] += r
                prev[1] += w
        return out


@dataclass
class Recorder:
    """Collects the events of one forward + backward, per phase."""

    phase: str = "forward"
    events: list[Event] = field(default_factory=list)
    current: Event | None = None
    memory: _ArgMemory | None = None
    depth: int = 0  # > 0 inside a counted interpreter op (its inner ops are not counted again)
    in_launch: bool = False
    recording: bool = False
    syncs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    saved_bytes: int = 0


def _is_float(dtype: Any) -> bool:
    scalar = getattr(dtype, "scalar", dtype)
    return bool(getattr(scalar, "is_floating", lambda: False)())


def _elem_bytes(ptrs: Any) -> int:
    return max(1, ptrs.get_element_ty().primitive_bitwidth // 8)


def _masked_addrs(ptrs: Any, mask: Any) -> np.ndarray:
    data = np.asarray(ptrs.data)
    if mask is None:
        return data.ravel()
    m = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape)
    return data[m]


def _grid(grid: Any, meta: dict[str, Any]) -> tuple[int, ...]:
    g = grid(meta) if callable(grid) else grid
    g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
    return g + (1,) * (3 - len(g))


def _tensor_range(*bounds: Any) -> Iterator[Any]:
    """``range`` whose loop index is a Triton scalar tensor, as in compiled code.

    The interpreter runs ``for i in range(n)`` as Python, with an ``int`` index; kernels that
    call tensor methods on the index (fla's ``i_t.to(tl.int64)``) need the compiled semantics.
    """
    import triton.language as tl

    ints = [int(b.handle.data.item()) if isinstance(b, tl.core.tensor) else int(b) for b in bounds]
    for i in range(*ints):
        yield tl.core.tensor(
            interpreter.TensorHandle(np.array(i, dtype=np.int32), tl.int32), tl.int32
        )


@contextlib.contextmanager
def _interpreter_compat(fn: Callable) -> Iterator[None]:
    """Run a kernel of a module other than ours as compiled code would run it.

    * ``range`` becomes :func:`_tensor_range` (a tensor loop index);
    * module globals bound to ``triton.language`` builtins at import (fla's
      ``gather = tl.gather``) are forwarded to ``tl`` at call time: the interpreter patches
      ``tl``'s attributes, not copies of them.
    """
    import triton.language as tl

    scope = fn.__globals__
    if scope.get("__name__", "").startswith("kimi_linear"):
        yield
        return
    builtins = {id(getattr(tl, n)): n for n in dir(tl) if not n.startswith("_")}
    added: dict[str, Any] = {}
    if "range" not in scope:
        added["range"] = _tensor_range
    for name, val in list(scope.items()):
        tl_name = builtins.get(id(val))
        if tl_name is not None and getattr(val, "__triton_builtin__", False):
            added[name] = (lambda n: lambda *a, **k: getattr(tl, n)(*a, **k))(tl_name)
    old = {n: scope[n] for n in added if n in scope}
    scope.update(added)
    try:
        yield
    finally:
        for n in added:
            if n in old:
                scope[n] = old[n]
            else:
                del scope[n]


#: ``tl.dot`` input precisions of fp32 operands that run as several products on a GPU:
#: enum name -> (operand dtype of each product, number of products)
_SPLIT_PRECISIONS = {"TF32x3": ("fp32", 3), "BF16x3": ("bf16", 3), "BF16x6": ("bf16", 6)}
_GPU_PRECISIONS = ("tf32", "tf32x3", "ieee", "bf16x3", "bf16x6")

# torch ops: which launch nothing, which only write, which compute exponentials
_NO_LAUNCH = {
    "empty",
    "empty_strided",
    "empty_like",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "set_",
    "resize_",
    "is_same_size",
    "_has_compatible_shallow_copy_type",
    "record_stream",
    "scalar_tensor",  # a wrapped Python number (a host scalar on a GPU, no launch)
}
_SYNC = {"_local_scalar_dense", "is_nonzero", "equal", "item", "nonzero", "allclose"}
_WRITE_ONLY = {"zero_", "fill_", "normal_", "uniform_", "random_", "bernoulli_", "copy_"}
_FILLS = {"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros"}
_FILLS |= {"new_ones", "new_full", "arange", "zero_", "fill_"}
_EXP_OPS = {"exp", "exp2", "expm1", "log", "log2", "log1p", "sigmoid", "softplus", "silu"}
_EXP_OPS |= {"logsigmoid", "_softmax", "_log_softmax", "log_sigmoid_forward", "tanh"}


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a view covers (broadcast strides count once)."""
    n = 1
    for s, st in zip(t.shape, t.stride()):
        if st != 0:
            n *= s
    return n * t.element_size() if t.numel() else 0


class _TorchOps(TorchDispatchMode):
    """Records the torch ops run on the recorded tensors as launches (see the module doc)."""

    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec = self.rec
        if not rec.recording or rec.in_launch:
            return out
        base = func.overloadpacket.__name__
        if base in _SYNC:
            rec.syncs[rec.phase] += 1
            return out
        if func.is_view or base in _NO_LAUNCH or base.startswith(("sym_", "_to_copy_no")):
            return out
        if base == "detach" or base == "alias":
            return out
        ev = Event(rec.phase, "torch", f"aten.{base}")
        schema = func._schema.arguments
        read_names = set()
        ins: dict[tuple, tuple[str, torch.Tensor]] = {}
        for i, a in enumerate(schema):
            val = kwargs.get(a.name, args[i] if i < len(args) else None)
            vals = val if isinstance(val, (list, tuple)) else [val]
            for t in vals:
                if not isinstance(t, torch.Tensor):
                    continue
                written = a.alias_info is not None and a.alias_info.is_write
                if base in _FILLS or (
                    written and (base in _WRITE_ONLY or a.name == "out" or a.kwarg_only)
                ):
                    continue  # a fill reads nothing; a copy or out= does not read its target
                key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
                ins.setdefault(key, (a.name, t))
                read_names.add(a.name)
        outs = out if isinstance(out, (list, tuple)) else [out]
        outs = [t for t in outs if isinstance(t, torch.Tensor)]
        numel = max([t.numel() for t in outs] + [t.numel() for _, t in ins.values()] + [0])
        for name, t in ins.values():
            ev.args.setdefault(name, [0.0, 0.0])[0] += _distinct_bytes(t)
        for i, t in enumerate(outs):
            ev.args.setdefault(f"out{i}" if len(outs) > 1 else "out", [0.0, 0.0])[1] += (
                _distinct_bytes(t)
            )
        ev.counts["read_bytes"] = sum(v[0] for v in ev.args.values())
        ev.counts["write_bytes"] = sum(v[1] for v in ev.args.values())
        ev.counts["access_read_bytes"] = ev.counts["read_bytes"]
        ev.counts["access_write_bytes"] = ev.counts["write_bytes"]
        if base not in _FILLS:
            ev.counts["elementwise"] = float(numel)
        if base in _EXP_OPS:
            ev.counts["exp" if "log" not in base else "log"] = float(numel)
        rec.events.append(ev)
        return out


@contextlib.contextmanager
def counting(rec: Recorder) -> Iterator[Recorder]:
    """Patch the interpreter (launches, memory, ``tl.dot``, elementwise ops) and the autotuner,
    and record torch ops, into ``rec`` (only while ``rec.recording``).

    The autotuner runs its first config (after pruning) instead of benchmarking all of them.
    """
    B = interpreter.InterpreterBuilder
    saved: dict[tuple[Any, str], Any] = {}

    def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        saved[(owner, name)] = getattr(owner, name)
        setattr(owner, name, make(saved[(owner, name)]))

    def counted(category: str | Callable[..., str | None]) -> Callable[[Any], Any]:
        """Wrap an interpreter op: count its output elements under ``category``."""

        def make(orig):
            def op(self, *a, **k):
                if rec.depth or rec.current is None:
                    return orig(self, *a, **k)
                rec.depth += 1
                try:
                    ret = orig(self, *a, **k)
                finally:
                    rec.depth -= 1
                cat = category(*a) if callable(category) else category
                if cat is not None:
                    rec.current.counts[cat] += float(np.size(ret.data))
                return ret

            return op

        return make

    def fp_binary(lhs, rhs, *_):
        return "elementwise" if _is_float(lhs.dtype) or _is_float(rhs.dtype) else None

    def fp_ternary(cond, lhs, rhs, *_):
        return "elementwise" if _is_float(lhs.dtype) or _is_float(rhs.dtype) else None

    def fp_unary(arg, *_):
        return "elementwise" if _is_float(arg.dtype) else None

    def fp_cast(src, dst_type, *_):
        return "elementwise" if _is_float(src.dtype) or _is_float(dst_type) else None

    patch(B, "binary_op", counted(lambda lhs, rhs, op: fp_binary(lhs, rhs)))
    patch(B, "ternary_op", counted(lambda lhs, rhs, other, op: fp_ternary(lhs, rhs, other)))
    patch(B, "unary_op", counted(lambda arg, op: fp_unary(arg)))
    patch(B, "cast_impl", counted(fp_cast))
    patch(B, "create_fp_to_fp", counted(fp_cast))
    patch(B, "create_fma", counted("elementwise"))
    patch(B, "create_clampf", counted("elementwise"))
    patch(B, "create_fabs", counted("elementwise"))
    patch(B, "create_rsqrt", counted("elementwise"))
    patch(B, "create_erf", counted("elementwise"))
    for name in ("create_exp", "create_exp2"):
        patch(B, name, counted("exp"))
    for name in ("create_log", "create_log2"):
        patch(B, name, counted("log"))

    def reduce_make(orig):
        def apply(self, input):
            if rec.depth or rec.current is None:
                return orig(self, input)
            rec.depth += 1
            try:
                ret = orig(self, input)
            finally:
                rec.depth -= 1
            for x in input if isinstance(input, (tuple, list)) else (input,):
                if _is_float(x.dtype):
                    rec.current.counts["elementwise"] += float(np.size(x.handle.data))
            return ret

        return apply

    patch(interpreter.ReduceScanOpInterface, "apply", reduce_make)

    def load_make(orig):
        def load(self, ptrs, mask, other, cache_policy, is_volatile):
            if rec.memory is not None and not rec.depth:
                addrs = _masked_addrs(ptrs, mask)
                elem = _elem_bytes(ptrs)
                rec.memory.record(addrs, elem, "r")
                rec.current.counts["access_read_bytes"] += float(addrs.size * elem)
            return orig(self, ptrs, mask, other, cache_policy, is_volatile)

        return load

    def store_make(orig):
        def store(self, ptrs, value, mask, cache_policy):
            if rec.memory is not None and not rec.depth:
                addrs = _masked_addrs(ptrs, mask)
                elem = _elem_bytes(ptrs)
                rec.memory.record(addrs, elem, "w")
                rec.current.counts["access_write_bytes"] += float(addrs.size * elem)
            return orig(self, ptrs, value, mask, cache_policy)

        return store

    def rmw_make(orig):
        def rmw(self, rmw_op, ptr, val, mask, sem, scope):
            if rec.memory is not None and not rec.depth:
                addrs, elem = _masked_addrs(ptr, mask), _elem_bytes(ptr)
                for kind, key in (("r", "access_read_bytes"), ("w", "access_write_bytes")):
                    rec.memory.record(addrs, elem, kind)
                    rec.current.counts[key] += float(addrs.size * elem)
            return orig(self, rmw_op, ptr, val, mask, sem, scope)

        return rmw

    def cas_make(orig):
        def cas(self, ptr, cmp, val, sem, scope):
            if rec.memory is not None and not rec.depth:
                addrs, elem = _masked_addrs(ptr, None), _elem_bytes(ptr)
                for kind, key in (("r", "access_read_bytes"), ("w", "access_write_bytes")):
                    rec.memory.record(addrs, elem, kind)
                    rec.current.counts[key] += float(addrs.size * elem)
            return orig(self, ptr, cmp, val, sem, scope)

        return cas

    patch(B, "create_masked_load", load_make)
    patch(B, "create_masked_store", store_make)
    patch(B, "create_atomic_rmw", rmw_make)
    patch(B, "create_atomic_cas", cas_make)

    def dot_make(orig):
        def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            if rec.current is not None:
                *batch, m, kk = a.data.shape
                n = b.data.shape[-1]
                count = 2 * m * n * kk
                for s in batch:
                    count *= s
                dt = str(a.dtype.scalar)
                # fp32 products split into several 16-bit / TF32 products run each of them
                split = _SPLIT_PRECISIONS.get(getattr(input_precision, "name", ""))
                if split is not None and dt == "fp32":
                    dt, times = split
                    count *= times
                key = f"flops_{dt}" if dt in ("bf16", "fp16", "fp32") else "flops_other"
                rec.current.counts[key] += float(count)
            rec.depth += 1
            try:
                return orig(self, a, b, d, input_precision, max_num_imprecise_acc)
            finally:
                rec.depth -= 1

        return dot

    patch(B, "create_dot", dot_make)
    # fla's safe-gate backward asks for "bf16x3" products, which the interpreter's default
    # options reject (its products are exact anyway); allow the GPU's list while counting.
    options = interpreter.interpreter_builder.options
    allowed = options.allowed_dot_input_precisions
    object.__setattr__(
        options, "allowed_dot_input_precisions", tuple(dict.fromkeys((*allowed, *_GPU_PRECISIONS)))
    )

    def run_make(orig):
        def run(self, *args, grid, warmup, **kwargs):
            if not rec.recording or warmup:
                return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            bound = dict(zip(self.arg_names, args))
            bound.update(kwargs)
            meta = {k: v for k, v in kwargs.items() if isinstance(v, (int, bool)) and k.isupper()}
            ev = Event(
                rec.phase,
                "triton",
                self.fn.__name__,
                _grid(grid, bound),
                " ".join(f"{k}={v}" for k, v in sorted(meta.items())),
            )
            ev.counts["programs"] = float(np.prod(ev.grid))
            rec.events.append(ev)
            rec.current, rec.memory, rec.in_launch = ev, _ArgMemory(bound), True
            try:
                with _interpreter_compat(self.fn):
                    return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                ev.args = rec.memory.per_arg()
                ev.counts["read_bytes"] = sum(v[0] for v in ev.args.values())
                ev.counts["write_bytes"] = sum(v[1] for v in ev.args.values())
                if rec.memory.outside:
                    ev.args["(outside the arguments)"] = [float(rec.memory.outside), 0.0]
                rec.current, rec.memory, rec.in_launch = None, None, False

        return run

    def tune_make(orig):
        def tune(self, *args, **kwargs):
            self.nargs = dict(zip(self.arg_names, args))
            config = self.prune_configs(kwargs)[0]
            if config.pre_hook is not None:
                config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
            ret = self.fn.run(*args, **kwargs, **config.all_kwargs())
            self.nargs = None
            return ret

        return tune

    patch(interpreter.InterpretedFunction, "run", run_make)
    patch(autotuner.Autotuner, "run", tune_make)
    try:
        with _TorchOps(rec):
            yield rec
    finally:
        for (owner, name), orig in saved.items():
            setattr(owner, name, orig)
        object.__setattr__(options, "allowed_dot_input_precisions", allowed)


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------


def make_inputs(B: int, T: int, H: int, K: int, V: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """q, k, v (L2-normalised q, k), g in [-1, 0] (fp32), beta: leaves requiring grad."""
    gen = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, K, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    dtypes = [dtype, dtype, dtype, torch.float32, dtype]
    return [x.to(d).requires_grad_() for x, d in zip((q, k, v, g, beta), dtypes)]


def provider_fn(
    name: str, segment_chunks: int = SPLIT_COUNT_CHUNKS
) -> tuple[Callable[[list[torch.Tensor]], None], Callable[..., Any]]:
    """``(prepare, run)``: ``prepare(inputs)`` warms host caches (outside the count);
    ``run(q, k, v, g, beta) -> (o, final_state)``. ``segment_chunks``: the chunks per segment
    of ``ours_split`` (forced, as ``chunk_kda(segment_chunks=n)``); ignored by the others."""
    if name in ("ours", "ours_safe", "ours_split"):
        from kimi_linear.kernels.chunk import ChunkKDAFunction
        from kimi_linear.kernels.split import segment_plan
        from kimi_linear.kernels.utils import pack

        safe = name == "ours_safe"
        n = segment_chunks if name == "ours_split" else 0

        def plan(q):  # host-cached like chunk_kda's (prepare warms it: no copy is counted)
            B, T = q.shape[:2]
            return segment_plan(tuple(range(0, B * T + 1, T)), n, q.device) if n else None

        def ours(q, k, v, g, beta):
            # the host code of chunk_kda between its checks and the autograd function (A_log,
            # dt_bias None: the gate is precomputed; ours_split: a forced segment plan)
            B, T, H, K = q.shape
            (pq, pk, pv, pg, pb), tables = pack(q, k, v, g, beta, None)
            o, ht = ChunkKDAFunction.apply(
                pq, pk, pv, pg, pb, None, None, K**-0.5, None, False, tables, True, safe,
                None, 0.0, False, None, None, plan(q),
            )  # fmt: skip
            return o.view(B, T, H, v.shape[-1]), ht

        def prepare(xs):
            pack(*xs, None)
            if n and plan(xs[0]) is None:
                fail(f"{name}: T={xs[0].shape[1]} is not longer than {n} chunks: nothing splits")

        return prepare, ours
    if name == "ours_api":
        from kimi_linear.kernels import chunk_kda
        from kimi_linear.kernels.utils import pack

        return (lambda xs: pack(*xs, None)), (lambda q, k, v, g, beta: chunk_kda(q, k, v, g, beta))
    from fla.ops.kda.chunk import ChunkKDAFunction as FlaFunction

    safe = name == "fla_safe"

    def fla_fn(q, k, v, g, beta):
        # fla's autograd function with the arguments chunk_kda passes by default (the public
        # wrapper adds argument checks and the dispatch to other backends)
        return FlaFunction.apply(
            q, k, v, g, beta, None, None, q.shape[-1] ** -0.5, None, False,
            False, False, False, False, False, None, None,
            safe, SAFE_GATE_BOUND if safe else None,
        )  # fmt: skip

    return (lambda xs: None), fla_fn


def saved_bytes(o: torch.Tensor, inputs: list[torch.Tensor]) -> int:
    """Bytes of the tensors the KDA autograd node saves for the backward, each distinct storage
    once, leaving out the inputs (and views of them), which the caller holds anyway."""
    node, todo = None, [o.grad_fn]
    while todo:  # breadth-first: the node may sit behind views or the isolation's where
        n = todo.pop(0)
        if n is None:
            continue
        if "ChunkKDA" in type(n).__name__:
            node = n
            break
        todo += [f for f, _ in n.next_functions]
    if node is None:
        fail("no ChunkKDA autograd node found behind the output")
    held = {x.untyped_storage().data_ptr() for x in inputs}
    seen, total = set(), 0
    for t in node.saved_tensors:
        if t is None:
            continue
        ptr = t.untyped_storage().data_ptr()
        if ptr in held or ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


def record(fn: Callable[[], Any], phase: str = "forward") -> tuple[Recorder, Any]:
    """Run ``fn()`` with every Triton launch and torch launch recorded; ``(recorder, result)``.

    The building block of :func:`count`, for any code (e.g. a toy kernel in a test)."""
    rec = Recorder(phase=phase)
    with counting(rec):
        rec.recording = True
        try:
            out = fn()
        finally:
            rec.recording = False
    return rec, out


def count(
    provider: str,
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    dtype,
    segment_chunks: int = SPLIT_COUNT_CHUNKS,
) -> Recorder:
    """Forward then backward of ``provider`` at one shape, every launch recorded
    (``segment_chunks``: of a split provider)."""
    prepare, fn = provider_fn(provider, segment_chunks)
    inputs = make_inputs(B, T, H, K, V, dtype)
    prepare(inputs)
    rec = Recorder()
    with warnings.catch_warnings(), counting(rec):
        warnings.simplefilter("ignore")
        rec.recording, rec.phase = True, "forward"
        o, _ = fn(*inputs)
        rec.recording = False
        rec.saved_bytes = saved_bytes(o, inputs)
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.dtype)
        rec.recording, rec.phase = True, "backward"
        o.backward(do)
        rec.recording = False
    return rec


# ---------------------------------------------------------------------------------------------
# Extrapolation
# ---------------------------------------------------------------------------------------------


@dataclass
class Fit:
    """``value(B, H, T) = c + B * H * (a * T + b)`` per launch and quantity; a split provider's
    fit adds ``+ B * H * d * S`` (``S`` segments per sequence, :attr:`seg_coef`)."""

    t0: int
    events: list[Event]  # those of the (1, 1, T0) run (names, grids, phases)
    coef: list[dict[str, tuple[float, float, float]]]  # per event: metric -> (c, a, b)
    arg_coef: list[dict[str, tuple[tuple[float, ...], tuple[float, ...]]]]
    saved: tuple[float, float, float]
    syncs: dict[str, int]
    #: per event: metric -> d (split providers; empty otherwise)
    seg_coef: list[dict[str, float]] = field(default_factory=list)
    #: per event: argument -> (d of the bytes read, d of the bytes written)
    arg_seg_coef: list[dict[str, tuple[float, float]]] = field(default_factory=list)
    #: chunks per segment of the (1, 1, T0) run; 0: not a split provider
    segment_chunks: int = 0

    def segments(self, T: int, segment_chunks: int | None = None) -> int:
        """Segments per sequence of length ``T`` cut into ``segment_chunks``-chunk segments
        (default: the counting runs' segment length); 0 for an unsplit fit."""
        n = segment_chunks or self.segment_chunks
        return -(-(T // CHUNK) // n) if self.segment_chunks else 0

    def at(self, B: int, H: int, T: int, i: int, metric: str, segments: int | None = None) -> float:
        c, a, b = self.coef[i].get(metric, (0.0, 0.0, 0.0))
        d = self.seg_coef[i].get(metric, 0.0) if self.seg_coef else 0.0
        S = self.segments(T) if segments is None else segments
        return c + B * H * (a * T + b + d * S)

    def arg_at(
        self, B: int, H: int, T: int, i: int, segments: int | None = None
    ) -> dict[str, list[float]]:
        S = self.segments(T) if segments is None else segments
        d = self.arg_seg_coef[i] if self.arg_seg_coef else {}
        out = {}
        for name, coefs in self.arg_coef[i].items():
            ds = d.get(name, (0.0, 0.0))
            out[name] = [c + B * H * (a * T + b + dj * S) for (c, a, b), dj in zip(coefs, ds)]
        return out

    def saved_at(self, B: int, H: int, T: int) -> float:
        c, a, b = self.saved
        return c + B * H * (a * T + b)


def _coef(m11: float, m11t: float, m12: float, t0: int) -> tuple[float, float, float]:
    a = (m11t - m11) / t0
    b = m12 - m11 - a * t0
    c = m11 - a * t0 - b
    return c, a, b


def _signature(rec: Recorder) -> list[tuple[str, str, str]]:
    return [(e.phase, e.kind, e.name) for e in rec.events]


def _seg_coef(
    m11: float, m11t: float, m12: float, m11t_half: float, t0: int, s: tuple[int, int, int]
) -> tuple[tuple[float, float, float], float]:
    """``c + N * (a * T + b + d * S)`` through (1, 1, T0, S1), (1, 1, 2 T0, S2), (1, 2, T0, S1)
    and (1, 1, 2 T0, S4): ``((c, a, b), d)``."""
    s1, s2, s4 = s
    d = (m11t - m11t_half) / (s2 - s4)
    a = (m11t - m11 - d * (s2 - s1)) / t0
    per = m12 - m11  # one sequence-head at (T0, S1)
    b = per - a * t0 - d * s1
    return (m11 - per, a, b), d


def fit(provider: str, t0: int, K: int, V: int, dtype, check: bool) -> tuple[Fit, float | None]:
    """Count ``provider`` at the three small shapes (and ``(2, 2, T0)`` with ``check``) and fit
    every quantity; returns the fit and, with ``check``, its largest relative error there.

    A split provider (:data:`SPLIT_PROVIDERS`) runs with :data:`SPLIT_COUNT_CHUNKS` chunks per
    segment (``n``), so its segments per sequence ``S`` grow with T; a fourth run at
    ``(1, 1, 2 T0)`` with ``2 n`` separates the per-segment costs (``d * S``) from the
    per-token ones, and ``check`` counts at ``(2, 2, 2 T0)`` with ``n`` (``S`` and ``B * H``
    both outside the fitted runs)."""
    split = provider in SPLIT_PROVIDERS
    n = SPLIT_COUNT_CHUNKS
    plan = [(1, t0, 1, n), (1, 2 * t0, 1, n), (1, t0, 2, n)] + ([(1, 2 * t0, 1, 2 * n)] * split)
    runs = [count(provider, b, t, h, K, V, dtype, c) for b, t, h, c in plan]
    sig = _signature(runs[0])
    for (b, t, h, c), r in zip(plan[1:], runs[1:]):
        if _signature(r) != sig:
            fail(
                f"{provider}: the launches at B={b} H={h} T={t} (segment_chunks={c}) differ "
                f"from those at B=1 H=1 T={t0}, so the counts cannot be extrapolated:\n  {sig}"
                f"\n  {_signature(r)}"
            )
    segs = tuple(-(-(t // CHUNK) // c) for _, t, _, c in plan)
    coef, arg_coef, seg_coef, arg_seg_coef = [], [], [], []
    for i in range(len(runs[0].events)):
        evs = [r.events[i] for r in runs]
        names = sorted(set().union(*(e.args for e in evs)))
        if not split:
            coef.append({m: _coef(*(e.counts.get(m, 0.0) for e in evs), t0) for m in METRICS})
            arg_coef.append(
                {
                    a: tuple(
                        _coef(*(e.args.get(a, [0.0, 0.0])[j] for e in evs), t0) for j in (0, 1)
                    )
                    for a in names
                }
            )
            continue
        s3 = (segs[0], segs[1], segs[3])
        fits = {m: _seg_coef(*(e.counts.get(m, 0.0) for e in evs), t0, s3) for m in METRICS}
        coef.append({m: v[0] for m, v in fits.items()})
        seg_coef.append({m: v[1] for m, v in fits.items()})
        per_arg = {
            a: [_seg_coef(*(e.args.get(a, [0.0, 0.0])[j] for e in evs), t0, s3) for j in (0, 1)]
            for a in names
        }
        arg_coef.append({a: (v[0][0], v[1][0]) for a, v in per_arg.items()})
        arg_seg_coef.append({a: (v[0][1], v[1][1]) for a, v in per_arg.items()})
    syncs = {p: runs[0].syncs.get(p, 0) for p in PHASES}
    result = Fit(
        t0,
        runs[0].events,
        coef,
        arg_coef,
        _coef(*(float(r.saved_bytes) for r in runs[:3]), t0),
        syncs,
        seg_coef,
        arg_seg_coef,
        n if split else 0,
    )
    error = None
    if check:
        b, t, h = (2, 2 * t0, 2) if split else (2, t0, 2)
        r22 = count(provider, b, t, h, K, V, dtype, n)
        if _signature(r22) != sig:
            fail(f"{provider}: the launches at B={b} H={h} T={t} differ from those at B=1 H=1")
        error = 0.0
        for i, ev in enumerate(r22.events):
            for m in METRICS:
                want = ev.counts.get(m, 0.0)
                got = result.at(b, h, t, i, m)
                if want or got:
                    error = max(error, abs(got - want) / max(abs(want), 1.0))
    return result, error


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def summarize(
    provider: str, shape: tuple[int, int, int], f: Fit, segment_chunks: int | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-phase totals and the per-launch rows of one provider at one shape (a split
    provider's at ``segment_chunks`` chunks per segment; default: its counting runs')."""
    B, H, T = shape
    key = f"{B}x{H}x{T}"
    S = f.segments(T, segment_chunks) if f.segment_chunks else None
    totals, launches = [], []
    for phase in PHASES:
        idx = [i for i, e in enumerate(f.events) if e.phase == phase]
        tot: dict[str, float] = defaultdict(float)
        for i in idx:
            ev = f.events[i]
            vals = {m: max(0.0, f.at(B, H, T, i, m, S)) for m in METRICS}
            for m, v in vals.items():
                tot[m] += v
            flops = sum(vals[m] for m in METRICS if m.startswith("flops_"))
            launches.append(
                {
                    "provider": provider,
                    "shape": key,
                    "phase": phase,
                    "kind": ev.kind,
                    "kernel": ev.name,
                    "grid_counted": "x".join(map(str, ev.grid)) if ev.grid else "",
                    "config": ev.config,
                    "read_GiB": vals["read_bytes"] / 2**30,
                    "write_GiB": vals["write_bytes"] / 2**30,
                    "access_GiB": (vals["access_read_bytes"] + vals["access_write_bytes"]) / 2**30,
                    "tensor_gflop": flops / 1e9,
                    "gexp": vals["exp"] / 1e9,
                    "glog": vals["log"] / 1e9,
                    "gelementwise": vals["elementwise"] / 1e9,
                    "args_GiB": {
                        n: {"read": r / 2**30, "write": w / 2**30}
                        for n, (r, w) in f.arg_at(B, H, T, i, S).items()
                        if r > 0.5 or w > 0.5
                    },
                }
            )
        nbytes = tot["read_bytes"] + tot["write_bytes"]
        kinds = [f.events[i].kind for i in idx]
        row = {
            "provider": provider,
            "shape": key,
            **({"segments": S} if S else {}),
            "phase": phase,
            "launches": len(idx),
            "triton": kinds.count("triton"),
            "torch": kinds.count("torch"),
            "host_syncs": f.syncs.get(phase, 0),
            "bytes": nbytes,
            "GiB": nbytes / 2**30,
            "read_GiB": tot["read_bytes"] / 2**30,
            "write_GiB": tot["write_bytes"] / 2**30,
            "access_GiB": (tot["access_read_bytes"] + tot["access_write_bytes"]) / 2**30,
            "tensor_gflop": sum(tot[m] for m in METRICS if m.startswith("flops_")) / 1e9,
        }
        for m in ("flops_bf16", "flops_fp16", "flops_fp32", "flops_other"):
            if tot[m]:
                row["gflop_" + m.removeprefix("flops_")] = tot[m] / 1e9
        row.update(
            {
                "gexp": tot["exp"] / 1e9,
                "glog": tot["log"] / 1e9,
                "gelementwise": tot["elementwise"] / 1e9,
                "saved_GiB": f.saved_at(B, H, T) / 2**30 if phase == "forward" else None,
            }
        )
        totals.append(row)
    return totals, launches


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def ratios(totals: list[dict[str, Any]], shapes: list[str]) -> list[dict[str, Any]]:
    """Ours / fla per shape and phase (and forward + backward) for every counted pair."""
    by = {(r["provider"], r["shape"], r["phase"]): r for r in totals}
    rows = []
    for num, den in RATIOS:
        for shape in shapes:
            for phase in (*PHASES, "forward+backward"):
                parts = PHASES if phase == "forward+backward" else (phase,)
                if any((p, shape, ph) not in by for p in (num, den) for ph in parts):
                    continue

                def total(p: str, col: str, shape: str = shape, parts: tuple = parts) -> float:
                    return sum(by[(p, shape, ph)][col] for ph in parts)

                rows.append(
                    {
                        "ratio": f"{num}/{den}",
                        "shape": shape,
                        "phase": phase,
                        **{
                            col: _ratio(total(num, col), total(den, col))
                            for col in (
                                "launches",
                                "bytes",
                                "access_GiB",
                                "tensor_gflop",
                                "gexp",
                                "gelementwise",
                            )
                        },
                    }
                )
    return rows


# ---------------------------------------------------------------------------------------------
# Prediction: floors per launch on a stated GPU (issue 21 part 2)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet figures of one GPU (dense tensor-core rates, no sparsity) and its per-SM rates.

    ``clock_hz`` is the clock the dense bf16 figure is quoted at: ``bf16 / (sms * 4096)``
    (4096 dense bf16 FLOPs per clock per SM on sm_90), so the SFU and FP32 rates use the same
    clock as the tensor peak.
    """

    name: str
    hbm_bytes_per_s: float
    bf16_flops_per_s: float  # dense bf16 / fp16 tensor-core FLOPs per second
    tf32_flops_per_s: float  # dense tf32 tensor-core FLOPs per second (fp32-operand tl.dot)
    sms: int
    sfu_per_clk_sm: int = 16  # exp2 / log2 (MUFU) results per clock per SM, cc 9.0
    fp32_per_clk_sm: int = 128  # fp32 add / mul / fma results per clock per SM, cc 9.0
    source: str = ""

    @property
    def clock_hz(self) -> float:
        return self.bf16_flops_per_s / (self.sms * 4096)


_DATASHEET = (
    "NVIDIA {0} datasheet (nvidia.com/en-us/data-center/{1}/): BF16 1,979 TFLOPS and TF32 "
    "989 TFLOPS are with sparsity, dense is half; SMs: NVIDIA H100 Tensor Core GPU "
    "Architecture whitepaper (132 SMs on SXM5; H200 is the same GH100 die); SFU / FP32 rates: "
    "CUDA C++ Programming Guide, arithmetic instruction throughput table, compute capability 9.0"
)
#: The GPUs predicted for (SXM parts; the H200 differs from the H100 only by its HBM3e).
GPUS: dict[str, GpuSpec] = {
    "H100-SXM": GpuSpec(
        "H100 SXM5 80 GB (HBM3 3.35 TB/s)",
        3.35e12,
        989.4e12,
        494.7e12,
        132,
        source=_DATASHEET.format("H100", "h100") + "; HBM3 3.35 TB/s",
    ),
    "H200": GpuSpec(
        "H200 SXM 141 GB (HBM3e 4.8 TB/s)",
        4.8e12,
        989.4e12,
        494.7e12,
        132,
        source=_DATASHEET.format("H200", "h200") + "; HBM3e 4.8 TB/s",
    ),
}
#: Fixed latency of one dependent chunk step of a sequential program (s), an estimate: the
#: part of a 64-token state step that no throughput hides, two dependent tensor-core products
#: (state -> new values -> state: the pipeline latency of each wgmma group, ~100-150 clocks),
#: the shared-memory round trip of the new values between them with its barrier (~100
#: clocks), the cast of the fp32 state to bf16 operands and the loop-carried branch: ~550
#: clocks at 1.83 GHz. The program's own per-step work (its tensor FLOPs, exponentials and
#: elementwise ops at one SM's rates) comes on top, from the counts. Measured per-step latency
#: replaces it after the first GPU run (the suite reports it beside this).
STEP_LATENCY_S = 0.3e-6
#: Per-launch overhead (s), an estimate: the gap between back-to-back kernels on one stream
#: without CUDA graphs (launch, ramp-up and tail of the grid), typically 2-5 us on H100.
LAUNCH_OVERHEAD_S = 3e-6
#: Bandwidth one program (one SM) can draw (bytes/s), an estimate by Little's law: ~64 KB of
#: loads in flight per SM (two pipeline stages of a chunk's bf16 tiles) over ~0.65 us of DRAM
#: latency. It only matters for launches with fewer programs than ``HBM / SM_BANDWIDTH``
#: (34 on an H100, 48 on an H200).
SM_BANDWIDTH = 100e9
#: Tokens per dependent step of the sequential (state) kernels: the chunk of both ours and
#: fla's (64), so a sequential program runs T / 64 steps per sequence-head.
STEP_TOKENS = CHUNK
FLOORS = ("bytes", "tensor", "exp", "elementwise", "serial")
#: Sequence splits predicted (segments per sequence-head; T / 64 must be a multiple).
DEFAULT_SEGMENTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREDICT_SHAPES = [(2, 64, 8192), (1, 16, 65536), (1, 32, 1048576)]
#: Step latencies of the serial sweep (s): from a fast step to the pessimistic end, 6.6 us =
#: 4 x 1.65 us (the issue's estimate per 16-token step on an H200, as if a 64-token step
#: cost four of them).
STEP_LATENCY_SWEEP_S = (0.1e-6, 0.3e-6, 1e-6, 2e-6, 6.6e-6)
PREDICT_PROVIDERS = ["ours", "ours_split", "fla"]
#: Segments per sequence whose split launches the launch table lists (first GPU).
SPLIT_LAUNCH_ROWS = 16
#: Step latencies (s) of the automatic split's table, beside the stated one.
AUTO_SPLIT_LATENCIES_S = (0.3e-6, 1e-6, 2e-6)
#: The automatic choice "agrees" with the model when its predicted time is within this factor
#: of the model's best split (or no split).
AUTO_AGREE = 1.05


@dataclass(frozen=True)
class LaunchWork:
    """What one launch does at one shape, the input of :func:`floors`.

    ``programs``: the launch's grid size (0 for a torch op: treated as filling the GPU);
    ``steps``: dependent chunk steps each program runs one after the other (1 for a
    chunk-parallel kernel, ``T / 64`` for a state recurrence); ``written``: the bytes stored.
    """

    name: str
    bytes: float
    flops_bf16: float = 0.0  # bf16 / fp16 operand tensor FLOPs
    flops_tf32: float = 0.0  # fp32 operand tensor FLOPs (TF32 on the GPU)
    exp: float = 0.0  # exponentials + logarithms (SFU)
    elementwise: float = 0.0  # other floating-point elementwise ops
    programs: float = 0.0
    steps: int = 1
    written: float = 0.0  # the part of ``bytes`` stored (the rest is loaded)
    reverse: bool = False  # a reverse (backward) state pass: a split reuses the forward's M


def floors(
    w: LaunchWork,
    gpu: GpuSpec,
    step_latency_s: float = STEP_LATENCY_S,
) -> dict[str, Any]:
    """The floors (seconds) of one launch on ``gpu`` and the predicted time, their max.

    * ``bytes``: bytes / bandwidth, the bandwidth ``min(HBM, programs * SM_BANDWIDTH)``;
    * ``tensor``: bf16 FLOPs / dense bf16 peak + tf32 FLOPs / dense tf32 peak;
    * ``exp``: (exponentials + logs) / (16 per clock per SM);
    * ``elementwise``: other float ops / (128 per clock per SM), as counted (written ops,
      masked lanes included: an upper estimate of the work);
    * the three compute floors divide by the fill ``min(1, programs / SMs)``: a launch with
      fewer programs than SMs leaves SMs idle;
    * ``serial``: ``steps * max(step_latency + unit, share * unit)``: ``unit`` is one
      program's per-step work on one SM at the rate of its slowest unit (its tensor FLOPs,
      exponentials and elementwise ops overlapped: the optimistic bound), ``share = max(1,
      programs / SMs)`` programs resident per SM take turns; ``step_latency`` is the part of a
      dependent step that no throughput hides. For a chunk-parallel launch (one step, ``share``
      taken as 1: its programs' turns are its compute floors) this is one program's latency.
    """
    torch_op = w.programs <= 0
    fill = 1.0 if torch_op else min(1.0, w.programs / gpu.sms)
    bandwidth = gpu.hbm_bytes_per_s
    if not torch_op:
        bandwidth = min(bandwidth, w.programs * SM_BANDWIDTH)
    clock = gpu.clock_hz
    out = {
        "bytes": w.bytes / bandwidth,
        "tensor": (w.flops_bf16 / gpu.bf16_flops_per_s + w.flops_tf32 / gpu.tf32_flops_per_s)
        / fill,
        "exp": w.exp / (gpu.sfu_per_clk_sm * gpu.sms * clock * fill),
        "elementwise": w.elementwise / (gpu.fp32_per_clk_sm * gpu.sms * clock * fill),
        "serial": 0.0,
    }
    if not torch_op:
        # one program's step on one SM alone: unit time = total at fill 1 * SMs / (programs*steps)
        per = w.programs * max(1, w.steps)
        unit = max(out[k] for k in ("tensor", "exp", "elementwise")) * fill * gpu.sms / per
        # resident programs take turns only along a chain; a chunk-parallel launch's turns
        # are its compute floors already
        share = max(1.0, w.programs / gpu.sms) if w.steps > 1 else 1.0
        step = max(step_latency_s + unit, share * unit)
        out["serial"] = max(1, w.steps) * step
    out["predicted"] = max(out[k] for k in FLOORS)
    out["bound"] = max(FLOORS, key=lambda k: out[k])
    out["fill"] = fill
    return out


def _fold_tiles(K: int, V: int) -> tuple[int, int]:
    """``(BV, BKS)`` of the fold kernel as :func:`kimi_linear.kernels.split.fold_states`
    launches it (its value-block width and key-slice width)."""
    from kimi_linear.kernels.split import fold_constexprs

    meta = fold_constexprs(K, V, False)
    return int(meta["BV"]), int(meta["BKS"])


def split_work(
    w: LaunchWork, segments: int, seq_heads: int, K: int, V: int, reverse: bool | None = None
) -> list[LaunchWork]:
    """A sequential launch split into ``segments`` per sequence-head: three launches, as the
    kernels of :mod:`kimi_linear.kernels.split` run them (checked against their counted
    launches: ``tests/test_kernel_cost.py``). Segments of ``ceil(steps / S)`` chunk steps.

    A forward state pass (``reverse`` False; the forward and the backward's recompute):

    1. ``transitions``: every segment from a zero state, plus ``K / V`` as many programs that
       start from the identity and carry its transition ``M``: programs, exponentials and
       work ``x (K + V) / V`` (the ``M`` programs run the same decays), tensor FLOPs
       ``x (1 + K / V * 2 BK / (64 + 2 BK))`` and elementwise work less ``U``'s share (they
       skip ``U = N (beta v)``); bytes: what the pass loads, then ``[K, V + K]`` fp32 per segment
       stored (``H | M``), nothing per chunk;
    2. ``fold``: per (sequence-head, value block of the fold's width) ``S`` dependent fp32
       steps ``s = M s + H`` (``2 K^2 V`` FLOPs each); reads ``M``, ``H`` and its own stored
       entry state (the state lives in memory between steps), writes each entry state;
    3. ``states``: the unsplit pass over ``S`` times the programs, each segment from its
       entry state (read: ``[K, V]`` fp32 per segment; one more add per element).

    The reverse pass (``reverse`` True; default: a backward launch whose name says ``bwd``)
    reuses the recompute's ``M``: its first launch runs the unsplit pass's work over ``S`` times
    the programs from a zero gradient storing only each segment's start gradient ``E [K, V]``
    fp32 (no ``M`` programs, nothing per chunk); the reverse fold (``M^T``) reads ``M``, ``E``
    and its entry state and writes each segment's end gradient; then the unsplit pass again
    from those (as ``states``).

    ``segments=1`` or a launch with one step returns ``[w]``. The sequence's initial / final
    state reads and writes of the fold are left out (the counted providers pass none).
    """
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    if segments == 1 or w.steps <= 1:
        return [w]
    if reverse is None:
        reverse = w.reverse
    steps = -(-w.steps // segments)
    SN = segments * seq_heads
    state = 4.0 * SN * K * V  # one fp32 [K, V] per segment and head
    trans_m = 4.0 * SN * K * K
    fold_bv, fold_bks = _fold_tiles(K, V)
    fold_programs = float(seq_heads * -(-V // fold_bv))
    fold = LaunchWork(
        f"{w.name} [split: {'reverse ' * reverse}fold]",
        trans_m + 3 * state,  # M, H (or E) and the entry state read, the entry state written
        flops_tf32=2.0 * SN * K * K * V,
        elementwise=float(SN * K * V * -(-K // fold_bks)),
        programs=fold_programs,
        steps=segments,
        written=state,
        reverse=reverse,
    )
    loaded = w.bytes - w.written
    if reverse:
        first = LaunchWork(
            f"{w.name} [split: reverse offsets]",
            loaded + state,
            w.flops_bf16,
            w.flops_tf32,
            w.exp,
            w.elementwise,
            w.programs * segments,
            steps,
            state,
            reverse=True,
        )
    else:
        cols = (K + V) / V
        # the M programs skip U = N (beta v): per chunk 2 BT^2 of the pass's
        # 2 BT^2 + 4 BT BK tensor FLOPs per value column
        bk = max(16, 1 << (K - 1).bit_length())
        m_flops = 1 + (cols - 1) * 2 * bk / (CHUNK + 2 * bk)
        # ... and U's elementwise work as the interpreter counts it, per chunk and program:
        # the masked loads' fills of N [BT, BT], beta and v, the casts of beta and v, the beta
        # scaling and the operand cast (BT^2 + 5 BT BV + 2 BT, BV = 32: the first config)
        per = w.elementwise / max(w.programs * w.steps, 1.0)
        u_share = min(1.0, (CHUNK * CHUNK + 5 * CHUNK * 32 + 2 * CHUNK) / per) if per else 0.0
        m_elem = 1 + (cols - 1) * (1 - u_share)
        first = LaunchWork(
            f"{w.name} [split: transitions]",
            loaded + state + trans_m,
            w.flops_bf16 * m_flops,
            w.flops_tf32 * m_flops,
            w.exp * cols,
            w.elementwise * m_elem,
            w.programs * segments * cols,
            steps,
            state + trans_m,
        )
    states = LaunchWork(
        f"{w.name} [split: {'reverse ' * reverse}states]",
        w.bytes + state,
        w.flops_bf16,
        w.flops_tf32,
        w.exp,
        w.elementwise + SN * K * V,
        w.programs * segments,
        steps,
        w.written,
        reverse=reverse,
    )
    return [first, fold, states]


#: Roles of a split provider's sequential launches (kernel, constexpr that tells them apart).
_SPLIT_ROLES = {
    ("_chunk_fwd_state_kernel", "SEGMENT_PASS=True"): "transitions",
    ("_chunk_fwd_state_kernel", "SEGMENT_PASS=False"): "states",
    ("_fold_kernel", "REVERSE=False"): "fold",
    ("_chunk_bwd_state_kernel", "STORE_CHUNKS=False"): "reverse offsets",
    ("_fold_kernel", "REVERSE=True"): "reverse fold",
    ("_chunk_bwd_state_kernel", "STORE_CHUNKS=True"): "reverse states",
}


def split_role(ev: Event) -> str | None:
    """The part of the sequence split a counted launch of a split provider plays (the names of
    :func:`split_work`), or None for a chunk-parallel launch."""
    flags = set(ev.config.split())
    for (name, flag), role in _SPLIT_ROLES.items():
        if ev.name == name and flag in flags:
            return role
    return None


#: Quantities :func:`split_check` compares (LaunchWork attributes).
SPLIT_CHECK_FIELDS = ("bytes", "flops", "exp", "elementwise", "programs", "steps")


def split_check(
    unsplit: list[LaunchWork],
    counted: list[LaunchWork],
    segments: int,
    seq_heads: int,
    K: int,
    V: int,
) -> list[dict[str, Any]]:
    """The analytic split (:func:`split_work` of the ``unsplit`` launches) against the counted
    launches of the real split (``counted``, one phase, in launch order): per launch, each
    quantity of :data:`SPLIT_CHECK_FIELDS` counted and modelled and their relative difference
    (``model / counted - 1``). Raises ValueError when the launch lists differ in length."""
    model = [x for w in unsplit for x in split_work(w, segments, seq_heads, K, V)]
    if len(model) != len(counted):
        raise ValueError(
            f"the analytic split has {len(model)} launches, the counted one {len(counted)}: "
            f"{[w.name for w in model]} vs {[w.name for w in counted]}"
        )

    def get(w: LaunchWork, k: str) -> float:
        return w.flops_bf16 + w.flops_tf32 if k == "flops" else float(getattr(w, k))

    rows = []
    for m, c in zip(model, counted):
        row: dict[str, Any] = {"model": m.name, "counted": c.name}
        for k in SPLIT_CHECK_FIELDS:
            a, b = get(m, k), get(c, k)
            row[k] = (a, b)
            row[f"{k}_rel"] = (a / b - 1.0) if b else (0.0 if not a else float("inf"))
        rows.append(row)
    return rows


def recorded_works(rec: Recorder, T: int, phase: str, segments: int = 0) -> list[LaunchWork]:
    """The launches of one counted run (one shape, every sequence of length ``T``) as
    :class:`LaunchWork`: ours's state kernels run ``T / 64`` steps unsplit; with ``segments``
    (a split run) the roles of :func:`split_role` give the steps."""
    out = []
    C = T // STEP_TOKENS
    for ev in rec.events:
        if ev.phase != phase:
            continue
        c = ev.counts
        role = split_role(ev) if segments else None
        name = ev.name
        if role is not None:
            steps = segments if role.endswith("fold") else -(-C // segments)
            name = f"{ev.name} [split: {role}]"
        else:
            steps = C if ev.name in {k for k, _ in _SPLIT_ROLES} else 1
        out.append(
            LaunchWork(
                name,
                c["read_bytes"] + c["write_bytes"],
                c["flops_bf16"] + c["flops_fp16"] + c["flops_other"],
                c["flops_fp32"],
                c["exp"] + c["log"],
                c["elementwise"],
                c["programs"] if ev.kind == "triton" else 0.0,
                steps,
                c["write_bytes"],
                reverse=phase == "backward" and steps > 1 and "bwd" in ev.name,
            )
        )
    return out


def launch_works(
    f: Fit, shape: tuple[int, int, int], phase: str, segment_chunks: int | None = None
) -> list[LaunchWork]:
    """The launches of one phase at ``shape`` from a fit: counts, programs and serial steps.

    A Triton launch whose program count does not grow with T while its work does is a
    sequential (state) kernel: ``T / 64`` dependent steps per program; every other launch
    runs one step per program. A split provider's fit is evaluated at ``segment_chunks``
    chunks per segment (default: its counting runs'), ``S = ceil(T / 64 / segment_chunks)``
    segments per sequence: its passes over segments run ``segment_chunks`` steps, its folds
    ``S`` (:func:`split_role`)."""
    B, H, T = shape
    S = f.segments(T, segment_chunks) if f.segment_chunks else None
    out = []
    for i, ev in enumerate(f.events):
        if ev.phase != phase:
            continue

        def val(m: str, i: int = i) -> float:
            return max(0.0, f.at(B, H, T, i, m, S))

        programs = val("programs") if ev.kind == "triton" else 0.0
        role = split_role(ev) if S else None
        name = ev.name
        if role is not None:
            steps = S if role.endswith("fold") else -(-(T // STEP_TOKENS) // S)
            name = f"{ev.name} [split: {role}]"
        else:
            grows = f.coef[i].get("programs", (0.0, 0.0, 0.0))[1]
            work_grows = any(
                f.coef[i].get(m, (0.0, 0.0, 0.0))[1] > 0
                for m in ("flops_bf16", "flops_fp16", "flops_fp32", "elementwise")
            )
            steps = T // STEP_TOKENS if programs and abs(grows) < 1e-12 and work_grows else 1
        out.append(
            LaunchWork(
                name,
                val("read_bytes") + val("write_bytes"),
                val("flops_bf16") + val("flops_fp16") + val("flops_other"),
                val("flops_fp32"),
                val("exp") + val("log"),
                val("elementwise"),
                programs,
                steps,
                val("write_bytes"),
                reverse=phase == "backward" and steps > 1 and "bwd" in ev.name,
            )
        )
    return out


def predict_phase(
    works: list[LaunchWork],
    gpu: GpuSpec,
    step_latency_s: float = STEP_LATENCY_S,
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
) -> dict[str, Any]:
    """Per-launch floors and the phase's predicted time: the sum over launches of
    (max of the launch's floors + the per-launch overhead)."""
    rows = []
    for w in works:
        fl = floors(w, gpu, step_latency_s)
        rows.append({"work": w, **fl})
    total = sum(r["predicted"] for r in rows) + launch_overhead_s * len(rows)
    by_floor = {k: sum(r["predicted"] for r in rows if r["bound"] == k) for k in FLOORS}
    return {
        "launches": rows,
        "predicted_s": total,
        "overhead_s": launch_overhead_s * len(rows),
        "bound_s": by_floor,
    }


def predict_split(
    works: list[LaunchWork],
    gpu: GpuSpec,
    segments: int,
    seq_heads: int,
    K: int,
    V: int,
    step_latency_s: float = STEP_LATENCY_S,
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
) -> dict[str, Any]:
    """:func:`predict_phase` with every sequential launch split into ``segments``."""
    split = [x for w in works for x in split_work(w, segments, seq_heads, K, V)]
    return predict_phase(split, gpu, step_latency_s, launch_overhead_s)


def _us(x: float) -> float:
    return x * 1e6


def serial_sweep(
    works: dict[tuple[str, str], dict[str, list[LaunchWork]]],
    gpus: dict[str, GpuSpec],
    anchor: tuple[int, int, int],
    long: tuple[int, int, int],
    K: int,
    V: int,
    segments: tuple[int, ...],
    latencies: tuple[float, ...] = STEP_LATENCY_SWEEP_S,
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
    split_at: Callable[[str, str, int], list[LaunchWork]] | None = None,
) -> list[dict[str, Any]]:
    """Where the long shape turns serial-chain bound: per GPU, provider and step latency, the
    forward at ``anchor`` and at ``long`` (same token-heads, fewer sequence-heads), the share
    of the long forward in serial-bound launches, and the best sequence split of it.
    ``split_at(provider, phase, S)``: the long shape's launches split into S segments (default:
    :func:`split_work` of the unsplit ones)."""
    a_key, l_key = ("x".join(map(str, x)) for x in (anchor, long))
    B, H, T = long
    rows = []
    for gname, gpu in gpus.items():
        for provider in sorted({p for p, _ in works}):
            if (provider, a_key) not in works or (provider, l_key) not in works:
                continue
            fa_works, fl_works = (
                works[(provider, a_key)]["forward"],
                works[(provider, l_key)]["forward"],
            )
            for lat in latencies:
                fa = predict_phase(fa_works, gpu, lat, launch_overhead_s)
                fl = predict_phase(fl_works, gpu, lat, launch_overhead_s)
                serial = sum(r["predicted"] for r in fl["launches"] if r["bound"] == "serial")
                best_s, best = 1, fl["predicted_s"]
                for seg in segments:
                    if seg > 1 and (T // STEP_TOKENS) % seg == 0:
                        if split_at is None:
                            t = predict_split(
                                fl_works, gpu, seg, B * H, K, V, lat, launch_overhead_s
                            )
                        else:
                            sw = split_at(provider, "forward", seg)
                            t = predict_phase(sw, gpu, lat, launch_overhead_s)
                        if t["predicted_s"] < best:
                            best_s, best = seg, t["predicted_s"]
                rows.append(
                    {
                        "gpu": gname,
                        "provider": provider,
                        "step_latency_us": _us(lat),
                        "anchor": a_key,
                        "anchor_forward_ms": fa["predicted_s"] * 1e3,
                        "long": l_key,
                        "long_forward_ms": fl["predicted_s"] * 1e3,
                        "long_over_anchor": fl["predicted_s"] / fa["predicted_s"],
                        "serial_bound_share": serial / fl["predicted_s"],
                        "best_segments": best_s,
                        "split_forward_ms": best * 1e3,
                        "split_speedup": fl["predicted_s"] / best,
                        "split_over_anchor": best / fa["predicted_s"],
                    }
                )
    return rows


def auto_segment_chunks_on(gpu: GpuSpec, num_seq_heads: int, max_chunks: int, V: int) -> int:
    """What :func:`kimi_linear.kernels.split.auto_segment_chunks` chooses on ``gpu`` (its SM
    count patched in: no GPU needed): chunks per segment, 0 for no split."""
    from kimi_linear.kernels import split

    with mock.patch.object(split, "_sm_count", lambda device: gpu.sms):
        return split.auto_segment_chunks(num_seq_heads, max_chunks, V, torch.device("cuda"))


def _break_even(
    unsplit: list[LaunchWork],
    split: list[LaunchWork],
    gpu: GpuSpec,
    launch_overhead_s: float,
    hi: float = 20e-6,
) -> float | None:
    """The smallest step latency (s, up to ``hi``) at which ``split`` is predicted no slower
    than ``unsplit`` (bisection; the split's gain grows with the latency), or None."""

    def gain(lat: float) -> float:
        return (
            predict_phase(unsplit, gpu, lat, launch_overhead_s)["predicted_s"]
            - predict_phase(split, gpu, lat, launch_overhead_s)["predicted_s"]
        )

    if gain(0.0) >= 0:
        return 0.0
    if gain(hi) < 0:
        return None
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if gain(mid) >= 0 else (mid, hi)
    return hi


_AGREES = {
    (True, True): "yes",
    (True, False): "forward only",
    (False, True): "fwd+bwd only",
    (False, False): "no",
}


def auto_split_rows(
    works_at: Callable[[str, tuple[int, int, int], str, int], list[LaunchWork]],
    gpus: dict[str, GpuSpec],
    shapes: list[tuple[int, int, int]],
    V: int,
    segments: tuple[int, ...],
    latencies: tuple[float, ...],
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
    provider: str = "ours",
) -> list[dict[str, Any]]:
    """The automatic split (:func:`auto_segment_chunks_on`) per GPU, shape and step latency:
    predicted forward and forward + backward without and with it, the model's best S (over
    ``segments`` dividing T / 64, and the automatic S) for each, whether they agree (the
    automatic choice within :data:`AUTO_AGREE` of the best), and the step latency from which
    the automatic split pays (``None``: it does not split, or not below 20 us)."""
    rows = []
    for gname, gpu in gpus.items():
        for shape in shapes:
            B, H, T = shape
            C = T // STEP_TOKENS
            n = auto_segment_chunks_on(gpu, B * H, C, V)
            s_auto = -(-C // n) if n else 1
            cands = sorted({s for s in segments if s <= C and C % s == 0} | {1, s_auto})
            works = {s: {ph: works_at(provider, shape, ph, s) for ph in PHASES} for s in cands}
            pays = {}
            for ph in ("forward", "fwd_bwd"):
                if s_auto == 1:
                    pays[ph] = None
                    continue
                parts = PHASES if ph == "fwd_bwd" else ("forward",)
                one = [w for p in parts for w in works[1][p]]
                cut = [w for p in parts for w in works[s_auto][p]]
                pays[ph] = _break_even(one, cut, gpu, launch_overhead_s)
            for lat in latencies:
                t = {
                    s: {
                        ph: predict_phase(works[s][ph], gpu, lat, launch_overhead_s)["predicted_s"]
                        for ph in PHASES
                    }
                    for s in cands
                }
                fwd = {s: v["forward"] for s, v in t.items()}
                both = {s: v["forward"] + v["backward"] for s, v in t.items()}
                best_f, best_b = min(fwd, key=fwd.get), min(both, key=both.get)
                agree_f = fwd[s_auto] <= AUTO_AGREE * fwd[best_f]
                agree_b = both[s_auto] <= AUTO_AGREE * both[best_b]
                rows.append(
                    {
                        "gpu": gname,
                        "provider": provider,
                        "shape": "x".join(map(str, shape)),
                        "step_latency_us": _us(lat),
                        "auto_segment_chunks": n,
                        "auto_segments": s_auto,
                        "forward_ms": fwd[1] * 1e3,
                        "forward_auto_ms": fwd[s_auto] * 1e3,
                        "fwd_bwd_ms": both[1] * 1e3,
                        "fwd_bwd_auto_ms": both[s_auto] * 1e3,
                        "best_forward_segments": best_f,
                        "best_forward_ms": fwd[best_f] * 1e3,
                        "best_fwd_bwd_segments": best_b,
                        "best_fwd_bwd_ms": both[best_b] * 1e3,
                        "auto_agrees": _AGREES[(agree_f, agree_b)],
                        "auto_pays_forward_from_us": None
                        if pays["forward"] is None
                        else _us(pays["forward"]),
                        "auto_pays_fwd_bwd_from_us": None
                        if pays["fwd_bwd"] is None
                        else _us(pays["fwd_bwd"]),
                    }
                )
    return rows


def prediction(
    fits: dict[str, Fit],
    shapes: list[tuple[int, int, int]],
    K: int,
    V: int,
    segments: tuple[int, ...] = DEFAULT_SEGMENTS,
    step_latency_s: float = STEP_LATENCY_S,
    launch_overhead_s: float = LAUNCH_OVERHEAD_S,
    gpus: dict[str, GpuSpec] | None = None,
) -> dict[str, Any]:
    """Predicted times per GPU, provider, shape and phase (totals, launches, sequence splits,
    the automatic split and the issue-21 goals). Estimates from counts and datasheet rates,
    not measurements.

    A split provider's fit in ``fits`` (:data:`SPLIT_PROVIDERS`, e.g. ``ours_split``) is not a
    provider of its own here: it gives the split rows of the provider it splits (``source``
    ``counted``); a provider without one is split by :func:`split_work` (``analytic``)."""
    gpus = gpus or GPUS
    split_fits = {SPLIT_PROVIDERS[p]: f for p, f in fits.items() if p in SPLIT_PROVIDERS}
    fits = {p: f for p, f in fits.items() if p not in SPLIT_PROVIDERS}

    def works_at(provider: str, shape: tuple[int, int, int], phase: str, s: int):
        """The launches of ``provider`` at ``shape`` with T cut into ``s`` segments (of
        ``ceil(T / 64 / s)`` chunks)."""
        B, H, T = shape
        unsplit = launch_works(fits[provider], shape, phase)
        if s <= 1:
            return unsplit
        n = -(-(T // STEP_TOKENS) // s)
        if provider in split_fits:
            return launch_works(split_fits[provider], shape, phase, n)
        s = -(-(T // STEP_TOKENS) // n)
        return [x for w in unsplit for x in split_work(w, s, B * H, K, V)]

    totals, launches, splits = [], [], []
    fwd: dict[tuple[str, str, str], float] = {}
    both: dict[tuple[str, str, str], float] = {}
    best: dict[tuple[str, str, str], tuple[int, float, float]] = {}
    for gname, gpu in gpus.items():
        for provider in fits:
            for shape in shapes:
                key = "x".join(map(str, shape))
                B, H, T = shape
                works = {ph: works_at(provider, shape, ph, 1) for ph in PHASES}
                per = {
                    ph: predict_phase(works[ph], gpu, step_latency_s, launch_overhead_s)
                    for ph in PHASES
                }
                for ph in PHASES:
                    p = per[ph]
                    serial = sum(r["serial"] for r in p["launches"] if r["work"].steps > 1)
                    totals.append(
                        {
                            "gpu": gname,
                            "provider": provider,
                            "shape": key,
                            "phase": ph,
                            "launches": len(p["launches"]),
                            "sequential": sum(r["work"].steps > 1 for r in p["launches"]),
                            "predicted_ms": p["predicted_s"] * 1e3,
                            "overhead_ms": p["overhead_s"] * 1e3,
                            **{f"{k}_bound_ms": v * 1e3 for k, v in p["bound_s"].items()},
                            "serial_chain_ms": serial * 1e3,
                        }
                    )
                    for r in p["launches"]:
                        launches.append(_launch_row(gname, provider, key, ph, 1, r))
                fwd[(gname, provider, key)] = per["forward"]["predicted_s"]
                both[(gname, provider, key)] = sum(per[ph]["predicted_s"] for ph in PHASES)
                base_f, base_b = fwd[(gname, provider, key)], both[(gname, provider, key)]
                source = "counted" if provider in split_fits else "analytic"
                for s in segments:
                    C = T // STEP_TOKENS
                    if s > C or C % s:
                        continue
                    sp = {
                        ph: predict_phase(
                            works_at(provider, shape, ph, s),
                            gpu,
                            step_latency_s,
                            launch_overhead_s,
                        )
                        for ph in PHASES
                    }
                    f_s = sp["forward"]["predicted_s"]
                    b_s = f_s + sp["backward"]["predicted_s"]
                    splits.append(
                        {
                            "gpu": gname,
                            "provider": provider,
                            "shape": key,
                            "segments": s,
                            "source": source if s > 1 else "unsplit",
                            "launches": sum(len(sp[ph]["launches"]) for ph in PHASES),
                            "serial_chain_steps": sum(
                                r["work"].steps
                                for ph in PHASES
                                for r in sp[ph]["launches"]
                                if r["work"].steps > 1
                            ),
                            "forward_ms": f_s * 1e3,
                            "forward_speedup": base_f / f_s,
                            "fwd_bwd_ms": b_s * 1e3,
                            "fwd_bwd_speedup": base_b / b_s,
                            "fold_MiB": 4.0 * s * B * H * (K * K + 2 * K * V) / 2**20
                            if s > 1
                            else 0.0,
                        }
                    )
                    if s == SPLIT_LAUNCH_ROWS and gname == next(iter(gpus)):
                        for ph in PHASES:  # the split's sequential launches at one S
                            for r in sp[ph]["launches"]:
                                if r["work"].steps > 1 or "split" in r["work"].name:
                                    launches.append(_launch_row(gname, provider, key, ph, s, r))
                    k3 = (gname, provider, key)
                    if k3 not in best or f_s < best[k3][1]:
                        best[k3] = (s, f_s, b_s)
    ratio_rows = []
    for gname in gpus:
        for shape in shapes:
            key = "x".join(map(str, shape))
            if ("ours" in fits) and ("fla" in fits):
                ratio_rows.append(
                    {
                        "gpu": gname,
                        "shape": key,
                        "forward": fwd[(gname, "ours", key)] / fwd[(gname, "fla", key)],
                        "fwd_bwd": both[(gname, "ours", key)] / both[(gname, "fla", key)],
                    }
                )
    goals = _goals(fits, fwd, both, best, gpus)
    sweep = []
    if (2, 64, 8192) in shapes and (1, 16, 65536) in shapes:
        sweep = serial_sweep(
            {
                (p, "x".join(map(str, s))): {ph: works_at(p, s, ph, 1) for ph in PHASES}
                for p in fits
                for s in ((2, 64, 8192), (1, 16, 65536))
            },
            gpus, (2, 64, 8192), (1, 16, 65536), K, V, segments,
            launch_overhead_s=launch_overhead_s,
            split_at=lambda p, ph, s: works_at(p, (1, 16, 65536), ph, s),
        )  # fmt: skip
    check = []
    for provider, sf in split_fits.items():
        for shape in shapes:
            B, H, T = shape
            C = T // STEP_TOKENS
            for s in sorted({SPLIT_LAUNCH_ROWS, 4} & {x for x in segments if x <= C}):
                n = -(-C // s)
                s = -(-C // n)
                for ph in PHASES:
                    rows = split_check(
                        launch_works(fits[provider], shape, ph),
                        launch_works(sf, shape, ph, n),
                        s, B * H, K, V,
                    )  # fmt: skip
                    check.append(
                        {
                            "provider": provider,
                            "shape": "x".join(map(str, shape)),
                            "segments": s,
                            "phase": ph,
                            "launches": len(rows),
                            **{
                                f"{k}_max_rel": max(abs(r[f"{k}_rel"]) for r in rows)
                                for k in SPLIT_CHECK_FIELDS
                            },
                        }
                    )
    auto = []
    if "ours" in fits:
        lats = tuple(sorted({step_latency_s, *AUTO_SPLIT_LATENCIES_S}))
        auto = auto_split_rows(works_at, gpus, shapes, V, segments, lats, launch_overhead_s)
    return {
        "totals": totals,
        "ratios": ratio_rows,
        "splits": splits,
        "best_split": [
            {
                "gpu": g,
                "provider": p,
                "shape": s,
                "segments": v[0],
                "forward_ms": v[1] * 1e3,
                "fwd_bwd_ms": v[2] * 1e3,
            }
            for (g, p, s), v in best.items()
        ],
        "auto_split": auto,
        "split_model_check": check,
        "goals": goals,
        "serial_sweep": sweep,
        "launches": launches,
    }


def _launch_row(
    gname: str, provider: str, key: str, phase: str, segments: int, r: dict[str, Any]
) -> dict[str, Any]:
    w = r["work"]
    return {
        "gpu": gname,
        "provider": provider,
        "shape": key,
        "segments": segments,
        "phase": phase,
        "kernel": w.name,
        "programs": int(w.programs),
        "steps": w.steps,
        "fill": r["fill"],
        "GiB": w.bytes / 2**30,
        "tensor_gflop": (w.flops_bf16 + w.flops_tf32) / 1e9,
        "gexp": w.exp / 1e9,
        "gelementwise": w.elementwise / 1e9,
        **{f"{k}_us": _us(r[k]) for k in FLOORS},
        "bound": r["bound"],
        "predicted_us": _us(r["predicted"]),
    }


def _goals(fits, fwd, both, best, gpus) -> list[dict[str, Any]]:
    """The issue-21 targets on an H100 at the anchors, with what the model predicts."""
    rows = []
    a, s = "2x64x8192", "1x16x65536"
    g = "H100-SXM" if "H100-SXM" in gpus else next(iter(gpus))
    for provider in fits:
        if (g, provider, a) not in fwd:
            continue
        f_a, b_a = fwd[(g, provider, a)], both[(g, provider, a)]
        rows.append(
            {
                "provider": provider,
                "target": "forward at B=2 H=64 T=8K <= 2.0 ms",
                "predicted": f"{f_a * 1e3:.3g} ms",
                "met": f_a <= 2.0e-3,
            }
        )
        rows.append(
            {
                "provider": provider,
                "target": "forward+backward <= 3.5x forward (B=2 H=64 T=8K)",
                "predicted": f"{b_a / f_a:.3g}x",
                "met": b_a / f_a <= 3.5,
            }
        )
        if (g, provider, s) in fwd:
            f_s = fwd[(g, provider, s)]
            rows.append(
                {
                    "provider": provider,
                    "target": "forward at B=1 H=16 T=64K <= 1.5x B=2 H=64 T=8K, unsplit",
                    "predicted": f"{f_s / f_a:.3g}x",
                    "met": f_s / f_a <= 1.5,
                }
            )
            seg, f_best, _ = best[(g, provider, s)]
            rows.append(
                {
                    "provider": provider,
                    "target": f"the same, T split into the best S segments (S={seg})",
                    "predicted": f"{f_best / f_a:.3g}x",
                    "met": f_best / f_a <= 1.5,
                }
            )
    return rows


def auto_split_verdicts(rows: list[dict[str, Any]], step_latency_us: float) -> list[str]:
    """One plain sentence per GPU and shape at the stated step latency: does the automatic
    split agree with the model's best S?"""
    out = []
    for r in rows:
        if abs(r["step_latency_us"] - step_latency_us) > 1e-9:
            continue
        auto = (
            f"splits into S={r['auto_segments']} ({r['auto_segment_chunks']} chunks each)"
            if r["auto_segment_chunks"]
            else "does not split"
        )
        best = f"the model's best S is {r['best_forward_segments']} forward, "
        best += f"{r['best_fwd_bwd_segments']} forward + backward"
        verdict = {
            "yes": "it agrees",
            "no": "it does not agree",
            "forward only": "it agrees for the forward only",
            "fwd+bwd only": "it agrees for forward + backward only",
        }[r["auto_agrees"]]
        out.append(
            f"- {r['gpu']} {r['shape']} at {step_latency_us:g} us per step: the automatic rule "
            f"{auto}; {best}: {verdict} (auto {r['forward_auto_ms']:.3g} / "
            f"{r['fwd_bwd_auto_ms']:.3g} ms vs best {r['best_forward_ms']:.3g} / "
            f"{r['best_fwd_bwd_ms']:.3g} ms)."
        )
    return out


def predict_markdown(result: dict[str, Any], command: str, meta: dict[str, Any]) -> str:
    """The Markdown page of a prediction (constants and sources first)."""
    gpu_lines = [
        f"- `{k}`: {g.name}; {g.bf16_flops_per_s / 1e12:.1f} TFLOP/s dense bf16, "
        f"{g.tf32_flops_per_s / 1e12:.1f} dense tf32, {g.sms} SMs at "
        f"{g.clock_hz / 1e9:.2f} GHz (the dense peak's clock), exponentials "
        f"{g.sfu_per_clk_sm * g.sms * g.clock_hz / 1e12:.2f} T/s, fp32 ops "
        f"{g.fp32_per_clk_sm * g.sms * g.clock_hz / 1e12:.1f} T/s. Source: {g.source}."
        for k, g in GPUS.items()
        if k in meta["gpus"]
    ]
    tcols = ["gpu", "provider", "shape", "phase", "launches", "sequential", "predicted_ms"]
    tcols += ["overhead_ms", *[f"{k}_bound_ms" for k in FLOORS], "serial_chain_ms"]
    scols = ["gpu", "provider", "shape", "segments", "source", "launches", "serial_chain_steps"]
    scols += ["forward_ms", "forward_speedup", "fwd_bwd_ms", "fwd_bwd_speedup", "fold_MiB"]
    lcols = ["gpu", "provider", "shape", "segments", "phase", "kernel", "programs", "steps"]
    lcols += ["fill", "GiB"]
    lcols += ["tensor_gflop", "gexp", "gelementwise", *[f"{k}_us" for k in FLOORS]]
    lcols += ["bound", "predicted_us"]
    md = [
        "# Predicted times: chunked KDA kernels, ours vs fla (a model, not measurements)",
        "",
        f"`{command}`",
        "",
        f"K = V = {meta['head_dim']}, {meta['dtype']}, precomputed gate (the default gate path: "
        "the release's softplus gate); shapes BxHxT. Every figure below is a **prediction** "
        "from the counts of this script (launches, distinct bytes, `tl.dot` FLOPs, "
        "exponentials, elementwise ops; counted under the interpreter, see `kernel_cost.md`) "
        "and datasheet rates; the first GPU run measures them.",
        "",
        "Per launch, floors (seconds): **bytes** / bandwidth (HBM; a launch of P programs "
        f"draws at most P x {SM_BANDWIDTH / 1e9:g} GB/s); **tensor** "
        "FLOPs / dense peak (bf16 operands at the bf16 peak, fp32 operands at the TF32 peak); "
        "**exp**: exponentials + logs / SFU rate (16 per clock per SM); **elementwise**: other "
        "float ops / fp32 rate (128 per clock per SM; counted as written, masked lanes "
        "included: an upper estimate of the work); the compute floors divide by the fill "
        "`min(1, programs / SMs)`; **serial**: `steps x max(step latency + u, programs per SM "
        "x u)`, u = one program's step work at one SM's rate of its slowest unit, "
        "`steps` = T / 64 for a sequential (state) kernel (its grid does not grow with T), "
        "1 otherwise. Predicted time of a launch = max of its floors; of a phase = sum over "
        "launches + a per-launch overhead.",
        "",
        f"Constants (estimates, stated): step latency {meta['step_latency_us']:g} us per "
        "64-token dependent step (two dependent tensor-core products with a shared-memory "
        "round trip and a barrier between them, ~550 clocks); per-launch overhead "
        f"{meta['launch_overhead_us']:g} us (back-to-back kernels on one stream, no CUDA "
        "graphs). Grids and tiles: the first autotune config of each kernel (the GPU's "
        "autotuner may choose others: estimates).",
        "",
        *gpu_lines,
        "",
        "## Goals (issue 21), H100 SXM: predictions, not measurements",
        "",
        markdown_table(result["goals"], ["provider", "target", "predicted", "met"]),
        "## Totals",
        "",
        markdown_table(result["totals"], tcols),
    ]
    if result["ratios"]:
        md += [
            "## Ours / fla, predicted",
            "",
            markdown_table(result["ratios"], ["gpu", "shape", "forward", "fwd_bwd"]),
        ]
    md += [
        "## Splitting T into S segments (in-device sequence splitting)",
        "",
        "`source` `counted`: the real split (`kimi_linear.kernels.split`, "
        "`chunk_kda(segment_chunks=T/64/S)`) counted under the interpreter as provider "
        "`ours_split` (fitted in T and S) and predicted the same way. Forward: each state pass "
        "becomes three launches: the transitions pass (every segment from a zero state, plus "
        "K/V as many programs carrying `M`: (K+V)/V the programs, FLOPs and exponentials; "
        "`[K, V+K]` fp32 stored per segment and head, nothing per chunk), the fp32 fold (S "
        "dependent steps `s = M s + H` per sequence-head and value block), then the state pass "
        "per segment from its entry state (T / 64S steps). Backward: the recompute splits as "
        "the forward; the reverse pass becomes a pass from a zero gradient (unsplit work, S "
        "times the programs, stores only `[K, V]` per segment), a reverse fold reusing the "
        "recompute's `M`, and the reverse pass again. `analytic`: `split_work` (fla has no "
        "split: hypothetical). `serial_chain_steps`: dependent steps of the sequential "
        "launches, forward + backward. Speedup vs S = 1.",
        "",
        markdown_table(result["splits"], scols),
    ]
    if result.get("auto_split"):
        acols = ["gpu", "shape", "step_latency_us", "auto_segment_chunks", "auto_segments"]
        acols += ["forward_ms", "forward_auto_ms", "fwd_bwd_ms", "fwd_bwd_auto_ms"]
        acols += ["best_forward_segments", "best_forward_ms", "best_fwd_bwd_segments"]
        acols += ["best_fwd_bwd_ms", "auto_agrees", "auto_pays_forward_from_us"]
        acols += ["auto_pays_fwd_bwd_from_us"]
        md += [
            "## The automatic split (`auto_segment_chunks`, 132 SMs) against the model's best S",
            "",
            "What `kimi_linear.kernels.split.auto_segment_chunks` chooses with the GPU's SM "
            "count (0: no split; `auto_segments` = the segments it makes), the predicted "
            "forward and forward + backward without and with it, and the model's best S "
            "(over the splits above and the automatic one) at several step latencies. "
            f"`auto_agrees`: the automatic choice within {AUTO_AGREE:g}x of the best "
            "(forward and forward + backward). `auto_pays_*_from_us`: the step latency from "
            "which the automatic split is predicted no slower than none.",
            "",
            *auto_split_verdicts(result["auto_split"], meta["step_latency_us"]),
            "",
            markdown_table(result["auto_split"], acols),
        ]
    if result.get("split_model_check"):
        ccols = ["provider", "shape", "segments", "phase", "launches"]
        ccols += [f"{k}_max_rel" for k in SPLIT_CHECK_FIELDS]
        md += [
            "## The analytic split model against the counted split",
            "",
            "`split_work` applied to the unsplit launches against the counted `ours_split` "
            "launches at the same shape and S, launch by launch: the largest relative "
            "difference per quantity (0: the same).",
            "",
            markdown_table(result["split_model_check"], ccols),
        ]
    if result["serial_sweep"]:
        sw = list(result["serial_sweep"][0])
        md += [
            "## Where B=1 H=16 T=64K turns serial-chain bound: the step latency swept",
            "",
            "The same token-heads as B=2 H=64 T=8K, 8x fewer sequence-heads: the state "
            "recurrences run 8x longer chains on 8x fewer programs. `serial_bound_share`: the "
            "part of the long forward in serial-bound launches; `split_*`: the best split S.",
            "",
            markdown_table(result["serial_sweep"], sw),
        ]
    md += [
        "## Launches",
        "",
        markdown_table(result["launches"], lcols),
    ]
    return "\n".join(md)


def predict_main(
    args: argparse.Namespace,
    fits: dict[str, Fit],
    command: str,
    name: str,
    fit_errors: dict[str, float] | None = None,
) -> int:
    """``--predict``: the predicted times of the counted providers, printed and saved."""
    K = V = args.head_dim
    segments = tuple(sorted(set(args.segments)))
    result = prediction(
        fits,
        args.shapes,
        K,
        V,
        segments,
        args.step_latency_us * 1e-6,
        args.launch_overhead_us * 1e-6,
    )
    meta = {
        "head_dim": K,
        "dtype": args.dtype,
        "step_latency_us": args.step_latency_us,
        "launch_overhead_us": args.launch_overhead_us,
        "gpus": list(GPUS),
    }
    text = predict_markdown(result, command, meta)
    constants = {
        "step_latency_us": args.step_latency_us,
        "launch_overhead_us": args.launch_overhead_us,
        "sm_bandwidth_bytes_per_s": SM_BANDWIDTH,
        "step_tokens": STEP_TOKENS,
        "estimates": "step latency, launch overhead, per-SM bandwidth, "
        "the elementwise work as written, grids of the first autotune config",
    }
    gpus = {
        k: {
            "name": g.name,
            "hbm_bytes_per_s": g.hbm_bytes_per_s,
            "bf16_dense_flops_per_s": g.bf16_flops_per_s,
            "tf32_dense_flops_per_s": g.tf32_flops_per_s,
            "sms": g.sms,
            "clock_hz": g.clock_hz,
            "sfu_per_clk_sm": g.sfu_per_clk_sm,
            "fp32_per_clk_sm": g.fp32_per_clk_sm,
            "source": g.source,
        }
        for k, g in GPUS.items()
    }
    paths = save_results(
        name,
        torch.device("cpu"),
        {
            "command": command,
            "head_dim": K,
            "dtype": args.dtype,
            "count_tokens": args.count_tokens,
            "fit_check_max_rel_error": fit_errors or None,
            "prediction": "estimates from counts and datasheet rates, not measurements",
            "floors": list(FLOORS),
            "constants": constants,
            "gpus": gpus,
            **result,
        },
        text,
        out_dir=args.out_dir,
    )
    print(markdown_table(result["goals"], ["provider", "target", "predicted", "met"]))
    cols = ["gpu", "provider", "shape", "phase", "launches", "predicted_ms", "serial_chain_ms"]
    print(markdown_table(result["totals"], cols))
    best_cols = ["gpu", "provider", "shape", "segments", "forward_ms", "fwd_bwd_ms"]
    print(markdown_table(result["best_split"], best_cols))
    if result["auto_split"]:
        acols = ["gpu", "shape", "step_latency_us", "auto_segments", "forward_ms"]
        acols += ["forward_auto_ms", "fwd_bwd_ms", "fwd_bwd_auto_ms", "best_forward_segments"]
        acols += ["best_fwd_bwd_segments", "auto_agrees", "auto_pays_fwd_bwd_from_us"]
        print(markdown_table([r for r in result["auto_split"] if r["gpu"] == "H100-SXM"], acols))
        print("\n".join(auto_split_verdicts(result["auto_split"], args.step_latency_us)))
    if result["serial_sweep"]:
        sweep_cols = ["gpu", "provider", "step_latency_us", "long_over_anchor"]
        sweep_cols += ["serial_bound_share", "best_segments", "split_speedup", "split_over_anchor"]
        print(markdown_table(result["serial_sweep"], sweep_cols))
    print(f"wrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return 0


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        B, H, T = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be BxHxT, e.g. 2x64x8192, got {text!r}"
        ) from None
    if min(B, H, T) < 1 or T % CHUNK:
        raise argparse.ArgumentTypeError(
            f"shape {text!r}: B, H, T must be positive and T a multiple of {CHUNK}"
        )
    return B, H, T


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument(
        "--shapes",
        type=parse_shape,
        nargs="+",
        default=None,
        help="BxHxT shapes to extrapolate to (T a multiple of 64); default 2x64x8192 "
        "1x16x65536 (with --predict: and 1x32x1048576)",
    )
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument(
        "--count-tokens",
        "--flop-tokens",
        dest="count_tokens",
        type=int,
        default=128,
        help="T0 of the interpreter runs (at T0 and 2 T0, one and two heads)",
    )
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        choices=PROVIDERS,
        help="default: "
        + " ".join(DEFAULT_PROVIDERS)
        + "; with --predict: "
        + " ".join(PREDICT_PROVIDERS)
        + " (ours_split: the forced sequence split of ours, "
        "counted for the split rows of ours)",
    )
    p.add_argument(
        "--predict",
        action="store_true",
        help="predict times on an H100 SXM and an H200 from the counts (bytes, tensor, "
        "exponential, elementwise and serial-chain floors per launch, sequence splits); "
        "writes kernel_cost_predict[_<tag>].json / .md",
    )
    p.add_argument(
        "--step-latency-us",
        type=float,
        default=STEP_LATENCY_S * 1e6,
        help="--predict: fixed latency of one dependent 64-token step of a sequential kernel",
    )
    p.add_argument(
        "--launch-overhead-us",
        type=float,
        default=LAUNCH_OVERHEAD_S * 1e6,
        help="--predict: overhead added per launch",
    )
    p.add_argument(
        "--segments",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEGMENTS),
        help="--predict: sequence splits S to predict (segments per sequence-head)",
    )
    p.add_argument(
        "--segment-chunks",
        type=int,
        default=16,
        help="chunks per segment at which the count tables evaluate ours_split (counted at "
        f"{SPLIT_COUNT_CHUNKS} and {2 * SPLIT_COUNT_CHUNKS}, fitted in T and the segments)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="also count at B=2 H=2 T=T0 and report the fit's largest relative error there",
    )
    p.add_argument("--out-dir", default=None, help="default benchmarks/results/cpu/")
    p.add_argument(
        "--tag", default="", help="suffix of the output names: kernel_cost_<tag>.json / .md"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace committed results in benchmarks/results/cpu/ (refused otherwise)",
    )
    args = p.parse_args(argv)
    if args.head_dim < 16 or args.head_dim > 256:
        fail(f"--head-dim must be in [16, 256], got {args.head_dim}")
    if args.count_tokens < CHUNK or args.count_tokens % CHUNK:
        fail(f"--count-tokens must be a positive multiple of {CHUNK}, got {args.count_tokens}")
    if args.dtype not in DTYPES:
        fail(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    if args.step_latency_us < 0 or args.launch_overhead_us < 0:
        fail("--step-latency-us and --launch-overhead-us must be >= 0")
    if min(args.segments) < 1:
        fail(f"--segments must be >= 1, got {args.segments}")
    if args.segment_chunks < 1:
        fail(f"--segment-chunks must be >= 1, got {args.segment_chunks}")
    if args.shapes is None:
        args.shapes = PREDICT_SHAPES if args.predict else PREDICT_SHAPES[:2]
    if args.providers is None:
        args.providers = PREDICT_PROVIDERS if args.predict else list(DEFAULT_PROVIDERS)
    dtype = parse_dtype(args.dtype)
    name = "kernel_cost_predict" if args.predict else "kernel_cost"
    name = f"{name}_{args.tag}" if args.tag else name
    refuse_overwrite(name, torch.device("cpu"), out_dir=args.out_dir, overwrite=args.overwrite)
    K = V = args.head_dim
    providers = list(dict.fromkeys(args.providers))
    for split, base in SPLIT_PROVIDERS.items():
        if args.predict and split in providers and base not in providers:
            fail(f"--predict with {split} needs {base} too (the split rows are {base}'s)")
    if any(pv.startswith("fla") for pv in providers):
        try:
            import fla.ops.kda.chunk  # noqa: F401
        except ImportError as e:
            fail(f"fla is not importable ({e}); pass --providers without fla / fla_safe")
    import kimi_linear.kernels  # noqa: F401  (patches the interpreter's numerics first)

    torch.set_num_threads(1)
    shapes = ["x".join(map(str, s)) for s in args.shapes]
    totals, launches, fit_errors, fits = [], [], {}, {}
    for provider in providers:
        print(f"{provider}: counting under the interpreter ...", file=sys.stderr)
        t0 = args.count_tokens
        if provider in SPLIT_PROVIDERS:  # several segments per sequence at T0
            t0 = max(t0, 2 * CHUNK * SPLIT_COUNT_CHUNKS)
        f, err = fit(provider, t0, K, V, dtype, args.check)
        fits[provider] = f
        if err is not None:
            fit_errors[provider] = err
        for shape in args.shapes:
            t, ls = summarize(provider, shape, f, args.segment_chunks)
            totals += t
            launches += ls
    if args.predict:
        return predict_main(args, fits, command_line(__spec__.name, argv), name, fit_errors)
    ratio_rows = ratios(totals, shapes)

    cols = ["provider", "shape", *(["segments"] * any("segments" in r for r in totals))]
    cols += ["phase", "launches", "triton", "torch", "host_syncs", "GiB", "access_GiB"]
    cols += ["tensor_gflop"]
    cols += sorted({c for r in totals for c in r if c.startswith("gflop_")})
    cols += ["gexp", "glog", "gelementwise", "saved_GiB"]
    rcols = ["ratio", "shape", "phase", "launches", "bytes", "access_GiB", "tensor_gflop"]
    rcols += ["gexp", "gelementwise"]
    lcols = ["provider", "shape", "phase", "kind", "kernel", "grid_counted", "read_GiB"]
    lcols += ["write_GiB", "access_GiB", "tensor_gflop", "gexp", "gelementwise"]
    t0 = args.count_tokens
    command = command_line(__spec__.name, argv)
    md = [
        "# Static cost model: chunked KDA kernels, ours vs fla",
        "",
        f"`{command}`",
        "",
        f"K = V = {K}, {args.dtype}; shapes BxHxT. No GPU: the code runs on the CPU (Triton "
        "kernels under the interpreter) with every Triton launch and every torch op that "
        "launches a device kernel recorded, at (B, H, T) = (1, 1, "
        f"{t0}), (1, 1, {2 * t0}), (1, 2, {t0}); each quantity of each launch is fitted as "
        "`c + B*H*(a*T + b)` and evaluated at the shapes below. `launches` = `triton` + "
        "`torch` (memsets, casts, copies, elementwise torch ops); `host_syncs`: device-to-host "
        "reads. `GiB`: distinct bytes each launch loads plus distinct bytes it stores (a "
        "read-modify-write counts twice, a partial read partly); `access_GiB`: every load and "
        "store, repeats included. `tensor_gflop`: `tl.dot` FLOPs (`gflop_<dtype>` by operand "
        "dtype; fp32 operands run as TF32 or fp32). `gexp`: exponentials (`tl.exp`, "
        "`tl.exp2`), `glog`: logarithms, `gelementwise`: other floating-point elementwise "
        "ops and reduction inputs, in 1e9 elements, as written (masked lanes included). "
        "`saved_GiB`: what the forward keeps for the backward beyond the inputs. "
        "Providers: `ours` (default gate path, e.g. softplus), `ours_safe` (bounded safe gate, "
        "-5), `fla` (fla's default `safe_gate=False`), `fla_safe` (`safe_gate=True`, -5), "
        "`ours_api` (public `chunk_kda`: `ours` plus its input checks and the isolation of "
        "non-finite inputs). Counts, not times.",
        "",
        "## Totals",
        "",
        markdown_table(totals, cols),
    ]
    if fit_errors:
        md += [
            "Fit check at B=2 H=2 T=T0, largest relative error per provider: "
            + ", ".join(f"{k} {v:.2g}" for k, v in fit_errors.items()),
            "",
        ]
    if ratio_rows:
        md += ["## Ratios (< 1: the numerator is cheaper)", "", markdown_table(ratio_rows, rcols)]
    md += ["## Launches", "", markdown_table(launches, lcols)]
    text = "\n".join(md)
    paths = save_results(
        name,
        torch.device("cpu"),
        {
            "command": command,
            "head_dim": K,
            "dtype": args.dtype,
            "count_tokens": t0,
            "fit": "c + B*H*(a*T + b) from (1,1,T0), (1,1,2T0), (1,2,T0)",
            "fit_check_max_rel_error": fit_errors or None,
            "totals": totals,
            "ratios": ratio_rows,
            "launches": launches,
        },
        text,
        out_dir=args.out_dir,
    )
    print(markdown_table(totals, cols))
    if ratio_rows:
        print(markdown_table(ratio_rows, rcols))
    print(f"wrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
