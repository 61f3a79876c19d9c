"""Static cost model of the chunked KDA kernels, ours against fla 0.6, counted without a GPU.

For the forward and the backward of :func:`kimi_linear.kernels.chunk_kda` and of fla's
``fla.ops.kda.chunk_kda`` (default path: precomputed log decay, no in-kernel l2norm / gate /
sigmoid, ``safe_gate=False``, recompute on), counted the same way for both:

* **launches**: Triton kernel launches (each with its kernel name and grid);
* **bytes**: per launch, the sum of the sizes of its tensor arguments (``numel * itemsize``),
  each distinct tensor once, whether the kernel reads it, writes it or both; scalars and
  ``None`` count 0. This is the traffic of a kernel that touches each argument once (an upper
  bound for arguments it only partly reads, e.g. a last row; a lower bound where it reads a
  tile several times, which caches mostly absorb). Host-side torch ops between the launches
  (fla's ``.to(dtype)`` casts of the gradients, zero fills) are not counted;
* **saved**: bytes of the tensors the autograd node keeps from the forward for the backward,
  leaving out the inputs (activation memory per call);
* **tensor FLOPs**: ``2 * M * N * K`` of every ``tl.dot`` the kernels issue (zero tiles
  included), counted by running the kernels under the Triton interpreter at a small shape
  (B = 1, H = 1, T = ``--flop-tokens``) and scaling by ``B * H * T``; the count is linear in
  the number of full 64-token chunks (checked: T and 2T must give exactly 2x, else the run
  fails), so the scaled figure is exact for T a multiple of 64. FLOPs are also split by operand
  dtype of the product (``fp32`` operands run as TF32 or exact fp32 on a GPU; ``bf16`` / ``fp16``
  operands at the full tensor-core rate).

Launches and bytes come from the host code run at the true shape on CPU tensors with every
launch intercepted before it executes (``torch.empty`` tensors: nothing is computed, and the
untouched pages cost no memory), so they include every buffer the host code allocates.

Default shapes (K = V = 128, bf16): B = 4, H = 32, T = 8K and B = 1, H = 16, T = 64K.
Outputs ``kernel_cost.json`` and ``kernel_cost.md`` (``kernel_cost_<tag>.*`` with ``--tag``)
under ``benchmarks/results/cpu/`` (or ``--out-dir``). Takes about a minute on one CPU core (the interpreter runs for the FLOP count).

Examples::

    python benchmarks/kernel_cost.py
    python benchmarks/kernel_cost.py --shapes 4x32x8192 --head-dim 64 --dtype fp32
"""

from __future__ import annotations

import os

# The kernels run (FLOP count) or are intercepted (launches, bytes) on the CPU: the interpreter
# must be chosen before triton is imported.
os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    DTYPES,
    HelpFormatter,
    fail,
    markdown_table,
    parse_dtype,
    save_results,
)
from triton.runtime import autotuner, interpreter  # noqa: E402

CHUNK = 64
PROVIDERS = ("ours", "fla")


@dataclass
class Launch:
    """One intercepted kernel launch."""

    phase: str
    kernel: str
    grid: tuple[int, ...]
    nbytes: int
    tensors: list[tuple[str, tuple[int, ...], str]]


@dataclass
class Recorder:
    """Collects launches (and, when kernels execute, ``tl.dot`` FLOPs) per phase."""

    execute: bool
    phase: str = "forward"
    launches: list[Launch] = field(default_factory=list)
    #: (phase, kernel, operand dtype) -> tensor FLOPs
    flops: dict[tuple[str, str, str], int] = field(default_factory=lambda: defaultdict(int))
    current: str = ""
    #: bytes the autograd node keeps for the backward, beyond the inputs themselves
    saved_bytes: int = 0


def _grid(grid: Any, meta: dict[str, Any]) -> tuple[int, ...]:
    g = grid(meta) if callable(grid) else grid
    g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
    return g + (1,) * (3 - len(g))


def _tensor_bytes(bound: dict[str, Any]) -> tuple[int, list[tuple[str, tuple[int, ...], str]]]:
    seen, total, info = set(), 0, []
    for name, x in bound.items():
        if not isinstance(x, torch.Tensor):
            continue
        key = (x.data_ptr(), x.numel(), x.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += x.numel() * x.element_size()
        info.append((name, tuple(x.shape), str(x.dtype).removeprefix("torch.")))
    return total, info


def _tensor_range(*bounds: Any) -> Iterator[Any]:
    """``range`` whose loop index is a Triton scalar tensor, as in compiled code.

    The interpreter runs ``for i in range(n)`` as Python, with an ``int`` index; kernels that
    call tensor methods on the index (fla's ``i_t.to(tl.int64)``) need the compiled semantics.
    """
    import numpy as np
    import triton.language as tl

    ints = [int(b.handle.data.item()) if isinstance(b, tl.core.tensor) else int(b) for b in bounds]
    for i in range(*ints):
        yield tl.core.tensor(
            interpreter.TensorHandle(np.array(i, dtype=np.int32), tl.int32), tl.int32
        )


@contextlib.contextmanager
def _tensor_loop_indices(fn: Callable) -> Iterator[None]:
    """Run a kernel of a module other than ours with :func:`_tensor_range` as its ``range``."""
    scope = fn.__globals__
    if scope.get("__name__", "").startswith("kimi_linear") or "range" in scope:
        yield
        return
    scope["range"] = _tensor_range
    try:
        yield
    finally:
        del scope["range"]


@contextlib.contextmanager
def intercept(rec: Recorder) -> Iterator[Recorder]:
    """Patch the interpreter's launch path (and the autotuner) to record every launch.

    The autotuner runs its first config (after pruning) instead of benchmarking all of them:
    launches, bytes and FLOPs do not depend on the tiling meta-parameters it picks between,
    except through masked padding (none at K = V = 128).
    """
    run0 = interpreter.InterpretedFunction.run
    tune0 = autotuner.Autotuner.run
    dot0 = interpreter.InterpreterBuilder.create_dot

    def run(self, *args, grid, warmup, **kwargs):
        bound = dict(zip(self.arg_names, args))
        bound.update(kwargs)
        nbytes, info = _tensor_bytes(bound)
        name = self.fn.__name__
        rec.launches.append(Launch(rec.phase, name, _grid(grid, bound), nbytes, info))
        if not rec.execute:
            return None
        rec.current = name
        with _tensor_loop_indices(self.fn):
            return run0(self, *args, grid=grid, warmup=warmup, **kwargs)

    def tune(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        config = self.prune_configs(kwargs)[0]
        if config.pre_hook is not None:
            config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
        ret = self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None
        return ret

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        *batch, m, kk = a.data.shape
        n = b.data.shape[-1]
        count = 2 * m * n * kk
        for s in batch:
            count *= s
        rec.flops[(rec.phase, rec.current, str(a.dtype))] += count
        return dot0(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpretedFunction.run = run
    autotuner.Autotuner.run = tune
    interpreter.InterpreterBuilder.create_dot = dot
    try:
        yield rec
    finally:
        interpreter.InterpretedFunction.run = run0
        autotuner.Autotuner.run = tune0
        interpreter.InterpreterBuilder.create_dot = dot0


def make_inputs(B, T, H, K, V, dtype, real: bool) -> list[torch.Tensor]:
    """q, k, v, g, beta leaves (requiring grad): random when ``real``, else ``torch.empty``."""
    shapes = [(B, T, H, K), (B, T, H, K), (B, T, H, V), (B, T, H, K), (B, T, H)]
    dtypes = [dtype, dtype, dtype, torch.float32, dtype]
    if not real:
        xs = [torch.empty(s, dtype=d) for s, d in zip(shapes, dtypes)]
    else:
        gen = torch.Generator().manual_seed(0)
        q = F.normalize(torch.randn(shapes[0], generator=gen), dim=-1)
        k = F.normalize(torch.randn(shapes[1], generator=gen), dim=-1)
        v = torch.randn(shapes[2], generator=gen)
        g = -torch.rand(shapes[3], generator=gen)
        beta = torch.rand(shapes[4], generator=gen)
        xs = [x.to(d) for x, d in zip((q, k, v, g, beta), dtypes)]
    return [x.requires_grad_() for x in xs]


def run_provider(name: str) -> Callable[..., tuple[torch.Tensor, Any]]:
    if name == "ours":
        from kimi_linear.kernels import chunk_kda

        return lambda q, k, v, g, beta: chunk_kda(q, k, v, g, beta)
    from fla.ops.kda.chunk import ChunkKDAFunction

    def fla_fn(q, k, v, g, beta):
        # fla's autograd function with the arguments chunk_kda passes by default (the public
        # wrapper adds only argument checks and the dispatch to other backends).
        return ChunkKDAFunction.apply(
            q, k, v, g, beta, None, None, q.shape[-1] ** -0.5, None, False
        )

    return fla_fn


def count(provider: str, B: int, T: int, H: int, K: int, V: int, dtype, execute: bool) -> Recorder:
    """Forward then backward of ``provider``; launches intercepted (and executed if asked)."""
    fn = run_provider(provider)
    inputs = make_inputs(B, T, H, K, V, dtype, real=execute)
    rec = Recorder(execute=execute)
    with intercept(rec), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec.phase = "forward"
        o, _ = fn(*inputs)
        rec.saved_bytes = saved_bytes(o, inputs)
        do = torch.randn_like(o) if execute else torch.empty_like(o)
        rec.phase = "backward"
        o.backward(do)
    return rec


def saved_bytes(o: torch.Tensor, inputs: list[torch.Tensor]) -> int:
    """Bytes of the tensors the KDA autograd node saves for the backward, each distinct storage
    once, leaving out the inputs (and views of them), which the caller holds anyway."""
    node = o.grad_fn
    while node is not None and "ChunkKDA" not in type(node).__name__:
        node = node.next_functions[0][0]
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
        total += t.numel() * t.element_size()
    return total


def flops_per_token_head(
    provider: str, T: int, K: int, V: int, dtype
) -> dict[tuple[str, str, str], float]:
    """Tensor FLOPs per (token x head) by (phase, kernel, operand dtype), checked linear in T."""
    small = count(provider, 1, T, 1, K, V, dtype, execute=True).flops
    double = count(provider, 1, 2 * T, 1, K, V, dtype, execute=True).flops
    for key in set(small) | set(double):
        if double.get(key, 0) != 2 * small.get(key, 0):
            fail(
                f"{provider}: tensor FLOPs of {key} are not linear in T "
                f"({small.get(key, 0)} at T={T}, {double.get(key, 0)} at T={2 * T})"
            )
    return {key: n / T for key, n in small.items()}


def summarize(
    provider: str, shape: tuple[int, int, int], K: int, V: int, dtype, per_tok: dict
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-phase totals and the per-launch rows of one provider at one shape."""
    B, H, T = shape
    rec = count(provider, B, T, H, K, V, dtype, execute=False)
    scale = B * H * T
    kernel_flops: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for (phase, kernel, dt), n in per_tok.items():
        kernel_flops[(phase, kernel)][dt] += n * scale
    totals, launches = [], []
    for phase in ("forward", "backward"):
        ls = [x for x in rec.launches if x.phase == phase]
        by_dtype: dict[str, float] = defaultdict(float)
        for (ph, _), d in kernel_flops.items():
            if ph == phase:
                for dt, n in d.items():
                    by_dtype[dt] += n
        seen_kernels: dict[str, int] = defaultdict(int)
        for x in ls:
            seen_kernels[x.kernel] += 1
        for x in ls:
            # FLOPs of a kernel launched several times in a phase are split evenly between
            # its launches (per-launch shares are then exact only when the launches match).
            f = sum(kernel_flops.get((phase, x.kernel), {}).values()) / seen_kernels[x.kernel]
            launches.append(
                {
                    "provider": provider,
                    "shape": f"{B}x{H}x{T}",
                    "phase": phase,
                    "kernel": x.kernel,
                    "grid": "x".join(map(str, x.grid)),
                    "bytes": x.nbytes,
                    "tensor_gflop": f / 1e9,
                    "tensors": [f"{n}{list(s)}:{d}" for n, s, d in x.tensors],
                }
            )
        totals.append(
            {
                "provider": provider,
                "shape": f"{B}x{H}x{T}",
                "phase": phase,
                "launches": len(ls),
                "bytes": sum(x.nbytes for x in ls),
                "GiB": sum(x.nbytes for x in ls) / 2**30,
                "tensor_gflop": sum(by_dtype.values()) / 1e9,
                **{f"gflop_{dt}": by_dtype[dt] / 1e9 for dt in sorted(by_dtype)},
                "saved_GiB": rec.saved_bytes / 2**30 if phase == "forward" else None,
            }
        )
    return totals, launches


def parse_shape(text: str) -> tuple[int, int, int]:
    try:
        B, H, T = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shape must be BxHxT, e.g. 4x32x8192, got {text!r}"
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
        default=[(4, 32, 8192), (1, 16, 65536)],
        help="BxHxT shapes (T a multiple of 64); default 4x32x8192 1x16x65536",
    )
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32")
    p.add_argument(
        "--flop-tokens",
        type=int,
        default=128,
        help="T of the interpreter runs that count tl.dot FLOPs (and 2T for the linearity check)",
    )
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--out-dir", default=None, help="default benchmarks/results/cpu/")
    p.add_argument(
        "--tag", default="", help="suffix of the output names: kernel_cost_<tag>.json / .md"
    )
    args = p.parse_args(argv)
    if args.head_dim < 16 or args.head_dim > 256:
        fail(f"--head-dim must be in [16, 256], got {args.head_dim}")
    if args.flop_tokens < CHUNK or args.flop_tokens % CHUNK:
        fail(f"--flop-tokens must be a positive multiple of {CHUNK}, got {args.flop_tokens}")
    if args.dtype not in DTYPES:
        fail(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    dtype = parse_dtype(args.dtype)
    K = V = args.head_dim
    if "fla" in args.providers:
        try:
            import fla.ops.kda  # noqa: F401
        except ImportError as e:
            fail(f"fla is not importable ({e}); pass --providers ours")

    torch.set_num_threads(1)
    totals, launches = [], []
    for provider in args.providers:
        print(f"{provider}: counting tensor FLOPs under the interpreter ...", file=sys.stderr)
        per_tok = flops_per_token_head(provider, args.flop_tokens, K, V, dtype)
        for shape in args.shapes:
            t, ls = summarize(provider, shape, K, V, dtype, per_tok)
            totals += t
            launches += ls

    ratios = []
    if set(args.providers) == set(PROVIDERS):
        for shape in args.shapes:
            key = "x".join(map(str, shape))
            for phase in ("forward", "backward"):
                ours, fla_ = (
                    next(
                        r
                        for r in totals
                        if r["provider"] == pv and r["shape"] == key and r["phase"] == phase
                    )
                    for pv in PROVIDERS
                )
                ratios.append(
                    {
                        "shape": key,
                        "phase": phase,
                        "launches_ours_over_fla": ours["launches"] / fla_["launches"],
                        "bytes_ours_over_fla": ours["bytes"] / fla_["bytes"],
                        "flops_ours_over_fla": ours["tensor_gflop"] / fla_["tensor_gflop"],
                    }
                )
    cols = ["provider", "shape", "phase", "launches", "GiB", "tensor_gflop"]
    cols += sorted({c for r in totals for c in r if c.startswith("gflop_")}) + ["saved_GiB"]
    md = [
        "# Static cost model: chunked KDA kernels, ours vs fla",
        "",
        f"K = V = {K}, {args.dtype}; shapes BxHxT. Produced by `python benchmarks/kernel_cost.py`"
        " (no GPU: launches intercepted; tensor FLOPs from `tl.dot` shapes under the interpreter"
        f" at T = {args.flop_tokens}, scaled). Bytes = sum of each launch's tensor-argument "
        "sizes. `gflop_<dtype>`: tensor FLOPs by operand dtype of the product (fp32 operands: "
        "TF32 or fp32 on a GPU). `saved_GiB`: tensors the forward keeps for the backward beyond "
        "the inputs (activation memory per call).",
        "",
        "## Totals",
        "",
        markdown_table(totals, cols),
    ]
    if ratios:
        md += ["## Ours / fla (< 1: ours cheaper)", "", markdown_table(ratios)]
    md += [
        "## Launches",
        "",
        markdown_table(
            launches, ["provider", "shape", "phase", "kernel", "grid", "bytes", "tensor_gflop"]
        ),
    ]
    text = "\n".join(md)
    paths = save_results(
        f"kernel_cost_{args.tag}" if args.tag else "kernel_cost",
        torch.device("cpu"),
        {
            "head_dim": K,
            "dtype": args.dtype,
            "flop_tokens": args.flop_tokens,
            "totals": totals,
            "ratios": ratios,
            "launches": launches,
        },
        text,
        out_dir=args.out_dir,
    )
    print(markdown_table(totals, cols))
    if ratios:
        print(markdown_table(ratios))
    print(f"wrote {paths['json']} and {paths['md']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
