"""Compile every KDA kernel for a CUDA architecture without a GPU, and report its resources.

One job: the ahead-of-time compile report (``python -m kimi_linear.kernels.compile_check``);
its length is the table of every kernel's compile signatures.

The Triton interpreter (how the tests run on CPU) checks what the kernels compute but not that
they compile for a GPU: loop-carried types, layouts, shared-memory budgets are only checked by
the real compiler. This tool runs Triton's ahead-of-time compiler (its bundled ``ptxas``) for a
chosen architecture, with the constexpr values the launchers use and each kernel's first
autotune config (block sizes, warps, stages; ``--num-warps`` / ``--num-stages`` override the
last two), the pointer arguments specialised as 16-byte aligned as the JIT does at a launch
(every tensor the launchers pass is; without that hint the compiler vectorises no global access
and the figures are those of a variant that never runs), kernels with a ``SAFE_GATE`` switch
once per value (``name[SAFE_GATE]`` for the bounded-gate variant), and prints per kernel::

    python -m kimi_linear.kernels.compile_check --arch 90 --dtype bf16 --head-dim 128

- ``num_warps``, shared memory per block (bytes), registers and stack/local (spill) bytes per
  thread (``cuobjdump``);
- ``mma``: the tensor-core instruction kinds in the PTX, ``<instruction>.<operand type>``
  (``wgmma.bf16``: Hopper warpgroup MMA on bf16 operands; ``mma.tf32``: Ampere-style
  ``mma.sync`` on TF32 operands); empty when the products run on the FMA units;
- ``ctas_per_sm``: resident CTAs per SM from registers, shared memory and warps against the
  architecture's limits (:data:`ARCH_LIMITS`, the CUDA occupancy rules: registers allocated per
  warp in 256-register units from four sub-partitions, 1 KiB of shared memory reserved per CTA,
  the largest shared-memory carveout), and which of the three limits it (``limited_by``).

- ``config`` and ``compile s``: the autotune config compiled and the CPU seconds of its cold
  compile (this process and ``ptxas``). ``--space suite`` / ``full`` compiles every config of
  that autotune space (``utils.AUTOTUNE_SPACES``) instead of the first: the report behind the
  GPU suite's pruned set and its compile budget (``benchmarks.gpu_check.sizes.COMPILE_S``).

``--targets`` also checks the performance targets (:func:`target_misses`: no TF32 products for
16-bit inputs, no spills, every chunk kernel at least 2 CTAs per SM) and lists the misses.

Exit code 1 when a kernel fails to compile, or cannot be resident on an SM (``ctas_per_sm`` 0:
more shared memory per block than the architecture allows, or more registers than an SM has;
the compiler accepts such a kernel, its launch would fail), or with ``--targets`` when one is
missed. Kernels are jitted at import, so under ``TRITON_INTERPRET=1`` the tool re-executes
itself without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import chunk_bwd, chunk_fwd, fused_recurrent, prologue, split
from .utils import (
    AUTOTUNE_SPACES,
    CHUNK_SIZE,
    MAX_HEAD_DIM,
    SUB_CHUNK_SIZE,
    TUNE_KEYS,
    autotuned_kernels,
    config_str,
    dot_precision,
    interpret_mode,
    next_pow2,
    space_configs,
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Arguments holding the caller's tensors (input dtype); every other pointer is an fp32 buffer.
_IO_ARGS = {"q", "k", "v", "beta", "o", "do", "dv", "dq", "dk", "qg", "kg"}
# Intermediates the chunk kernels store in the input dtype (tensor-core operands only), and the
# chunk states / state gradients, stored in utils.state_dtype (bf16 for fp16 inputs).
_IO_ARGS |= {"Aqk", "Ainv", "W", "delta", "dd"}
# the row-wise prologue kernels (prologue.py): their tensors, element / row counts, factor
_IO_ARGS |= {"x", "y", "dy", "dx"}
_COUNT_ARGS, _FACTOR_ARGS = {"n_rows", "n", "m_stride", "a_stride"}, {"c"}
_STATE_ARGS = {"h", "dh"}
_INDEX_ARGS = {"cu_seqlens", "chunk_indices", "chunk_offsets", "seq_segments"}


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block resource limits of a compute capability (CUDA programming guide,
    "Technical Specifications per Compute Capability")."""

    max_shared_per_block: int  #: bytes, with the opt-in carveout
    shared_per_sm: int  #: bytes, the largest carveout
    max_warps_per_sm: int
    max_ctas_per_sm: int
    registers_per_sm: int = 65536
    reserved_shared_per_cta: int = 1024  #: bytes the driver keeps per CTA (sm_80 and later)
    shared_alloc_unit: int = 128
    register_alloc_unit: int = 256  #: registers, allocated per warp
    sub_partitions: int = 4  #: the register file is split between four schedulers


KB = 1024
#: Limits of the architectures the tool compiles for (``--arch``).
ARCH_LIMITS: dict[int, ArchLimits] = {
    80: ArchLimits(163 * KB, 164 * KB, max_warps_per_sm=64, max_ctas_per_sm=32),  # A100
    86: ArchLimits(99 * KB, 100 * KB, max_warps_per_sm=48, max_ctas_per_sm=16),  # RTX 30xx, A10
    89: ArchLimits(99 * KB, 100 * KB, max_warps_per_sm=48, max_ctas_per_sm=24),  # L4, L40, RTX 40xx
    90: ArchLimits(227 * KB, 228 * KB, max_warps_per_sm=64, max_ctas_per_sm=32),  # H100, H200
    100: ArchLimits(227 * KB, 228 * KB, max_warps_per_sm=64, max_ctas_per_sm=32),  # B200
}

_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]*?\.m\d+n\d+k\d+((?:\.\w+)+)")
_LAYOUTS = {"row", "col"}


def mma_kinds(ptx: str) -> list[str]:
    """Sorted tensor-core instruction kinds in ``ptx``: ``"wgmma.<A type>"`` or ``"mma.<A type>"``.

    ``wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16`` gives ``wgmma.bf16``;
    ``mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32`` gives ``mma.tf32`` (the first type
    after the shape is the accumulator's, the second the A operand's).
    """
    kinds = set()
    for op, tail in _MMA.findall(ptx):
        types = [t for t in tail.strip(".").split(".") if t not in _LAYOUTS]
        if len(types) >= 2:
            kinds.add(f"{'wgmma' if op.startswith('wgmma') else 'mma'}.{types[1]}")
    return sorted(kinds)


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def ctas_per_sm(
    arch: int, num_warps: int, registers: int | None, shared: int
) -> tuple[int, str] | tuple[None, None]:
    """(resident CTAs per SM, the limiting resource) for a kernel on ``sm_<arch>``.

    The smallest of the limits by registers (``registers`` per thread, allocated per warp in
    256-register units from four sub-partitions of the register file), by shared memory
    (``shared`` bytes + 1 KiB reserved per CTA, 128-byte units, against the largest carveout),
    by resident warps and by resident CTAs. 0 when one CTA does not fit (``"shared"`` when the
    block needs more shared memory than the architecture allows per block). ``(None, None)``
    without a register count or for an architecture not in :data:`ARCH_LIMITS`.
    """
    lim = ARCH_LIMITS.get(arch)
    if lim is None or registers is None:
        return None, None
    if shared > lim.max_shared_per_block:
        return 0, "shared"
    per_warp = _round_up(max(registers, 1) * 32, lim.register_alloc_unit)
    warps_by_regs = (lim.registers_per_sm // lim.sub_partitions // per_warp) * lim.sub_partitions
    per_cta_shared = _round_up(shared + lim.reserved_shared_per_cta, lim.shared_alloc_unit)
    limits = {
        "registers": warps_by_regs // num_warps,
        "shared": lim.shared_per_sm // per_cta_shared,
        "warps": lim.max_warps_per_sm // num_warps,
        "ctas": lim.max_ctas_per_sm,
    }
    name = min(limits, key=lambda k: limits[k])
    return limits[name], name


def target_misses(results: list[Result], dtype: str, min_ctas: int = 2) -> list[str]:
    """The performance targets a compile report misses (empty: all met).

    For 16-bit inputs no TF32 tensor-core instruction (products on bf16/fp16 operands); no
    spill bytes in any kernel; every chunked-path kernel (all but the decode kernel,
    ``*fused_recurrent*``) at least ``min_ctas`` resident CTAs per SM.
    """
    misses = []
    for r in results:
        if not r.ok:
            misses.append(f"{r.kernel}: does not compile")
            continue
        if dtype != "fp32" and any(kind.endswith(".tf32") for kind in r.mma):
            misses.append(
                f"{r.kernel}: TF32 tensor-core products ({', '.join(r.mma)}) on {dtype} inputs"
            )
        if r.local_bytes:
            misses.append(f"{r.kernel}: {r.local_bytes} spill bytes/thread")
        if (
            "fused_recurrent" not in r.kernel
            and r.ctas_per_sm is not None
            and r.ctas_per_sm < min_ctas
        ):
            misses.append(
                f"{r.kernel}: {r.ctas_per_sm} CTA(s)/SM (limited by {r.limited_by}), "
                f"target >= {min_ctas}"
            )
    return misses


@dataclass
class Result:
    kernel: str
    ok: bool
    shared: int | None = None
    registers: int | None = None
    local_bytes: int | None = None
    error: str | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    mma: list[str] = dataclasses.field(default_factory=list)
    ctas_per_sm: int | None = None
    limited_by: str | None = None
    #: a CTA fits on an SM: shared memory per block within the architecture's limit, and
    #: registers for all its warps
    fits: bool | None = None
    #: the autotune config compiled (``utils.config_str``: meta-parameters, warps, stages)
    config: str | None = None
    #: CPU seconds of ``triton.compile`` (source to cubin, no cache: this process and its
    #: ``ptxas`` child), on this machine's CPU; CPU time, so a loaded machine does not inflate it
    compile_s: float | None = None


def _jit_fn(kernel: Any) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _signature(fn: JITFunction, dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif (
            name in ("H", "HQ")
            or name in TUNE_KEYS
            or name in fused_recurrent.INT_ARGS
            or name in _COUNT_ARGS
        ):
            sig[name] = "i32"
        elif name == "scale" or name in fused_recurrent.FLOAT_ARGS or name in _FACTOR_ARGS:
            sig[name] = "fp32"
        elif name in _INDEX_ARGS:
            sig[name] = "*i32"
        elif name in _IO_ARGS:
            sig[name] = "*" + dtype
        elif name in _STATE_ARGS:
            sig[name] = "*" + ("bf16" if dtype == "fp16" else dtype)
        else:
            sig[name] = "*fp32"
    return sig


def _aligned(fn: JITFunction, signature: dict[str, str]) -> dict[tuple[int], list]:
    """Divisibility attributes of the pointer arguments: 16-byte aligned, as the JIT specialises
    them at a launch (every tensor the launchers pass is a fresh allocation or a contiguous view
    of one at offset 0). Without them the compiler may not vectorise any global access (16-bit
    elements one at a time), which inflates registers and instruction counts. Integer arguments
    (``H``) stay unspecialised: the report holds for any head count."""
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*")
    }


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, stack + local bytes per thread: spills) via ``cuobjdump``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=False
        )
    finally:
        os.unlink(path)
    regs = re.search(r"REG:(\d+)", out.stdout)
    stack = re.search(r"STACK:(\d+)", out.stdout)
    local = re.search(r"LOCAL:(\d+)", out.stdout)
    if stack is None and local is None:
        return (int(regs.group(1)) if regs else None, None)
    spill = sum(int(m.group(1)) for m in (stack, local) if m is not None)
    return (int(regs.group(1)) if regs else None, spill)


def _configs(kernel: Any, space: str = "first") -> list[tuple[dict[str, Any], int, int]]:
    """(meta-parameters, num_warps, num_stages) of each config of ``kernel`` in ``space``
    (``utils.AUTOTUNE_SPACES``; ``"first"``: the first config alone).

    The first config is the one the interpreter runs; the kernels order their configs so that
    it is the one picked from this report (the autotuner times a space's configs on a GPU).
    """
    for entry in autotuned_kernels():
        if entry.kernel is kernel:
            return [
                (dict(c.kwargs), c.num_warps, c.num_stages) for c in space_configs(entry, space)
            ]
    fixed = getattr(kernel, "kwargs", None)
    if fixed is not None:  # a fixed config outside the registry
        meta = dict(fixed)
        return [(meta, meta.pop("num_warps"), meta.pop("num_stages"))]
    return [({}, 4, 2)]


#: The in-kernel gate variants compiled (``chunk_fwd.GATE_*``; ``use_gate_in_kernel``).
_GATE_VARIANTS = (
    dict(GATE=chunk_fwd.GATE_NONE, HAS_A=False, HAS_BIAS=False),
    dict(GATE=chunk_fwd.GATE_SOFTPLUS, HAS_A=True, HAS_BIAS=True),
    dict(GATE=chunk_fwd.GATE_LOWER_BOUND, HAS_A=True, HAS_BIAS=True),
)


def kernel_specs(
    head_dim_k: int, head_dim_v: int, dtype: str, space: str = "first"
) -> list[tuple[Any, dict[str, Any], int, int]]:
    """(kernel, constexprs, num_warps, num_stages) for every kernel, as the launchers use them:
    the launchers' constexprs plus each config of the kernel's autotune ``space`` (one entry
    per config; ``"first"``: the first config only)."""
    BT, BC = CHUNK_SIZE, SUB_CHUNK_SIZE
    K, V = head_dim_k, head_dim_v
    BK = next_pow2(K)
    BKS = min(BK, 64)
    prec = dot_precision(_DTYPES[dtype])
    state = dict(K=K, V=V, BT=BT, BK=BK, BKS=BKS, DOT_PREC=prec)
    intra_fwd = dict(K=K, BT=BT, BC=BC, BK=BK, BKD=min(BK, 32), BKW=BKS, DOT_PREC=prec)
    intra_bwd = dict(K=K, BT=BT, BC=BC, BKD=min(BK, 32), DOT_PREC=prec)
    launches = [
        # the cumulative sum and the dg-finishing kernel: without and with the in-kernel gate
        # (use_gate_in_kernel: softplus, and the safe gate with A_log and dt_bias)
        *[
            (
                chunk_fwd._chunk_cumsum_kernel,
                dict(K=K, BT=BT, BK=min(BK, 32), G_FLOOR=chunk_fwd.G_FLOOR, **gate),
            )
            for gate in _GATE_VARIANTS
        ],
        # the kernels with a safe-gate fast path: both variants
        *[
            (chunk_fwd._intra_solve_fwd_kernel, dict(intra_fwd, SAFE_GATE=sg))
            for sg in (False, True)
        ],
        (
            chunk_fwd._recompute_wy_kernel,
            dict(
                K=K,
                V=V,
                BT=BT,
                BK=BKS,
                BV=min(next_pow2(V), 64),
                RECOMPUTE=True,
                HAS_DO=True,
                DOT_PREC=prec,
                GVA=False,
            ),
        ),
        (
            chunk_fwd._chunk_fwd_state_kernel,
            dict(state, USE_H0=True, STORE_FINAL=True, SEGMENT_PASS=False),
        ),
        # in-device sequence splitting (split.py): the transitions pass and the first reverse
        # pass (the states passes are the plain kernels above)
        (
            chunk_fwd._chunk_fwd_state_kernel,
            dict(state, USE_H0=False, STORE_FINAL=False, SEGMENT_PASS=True),
        ),
        (chunk_fwd._chunk_fwd_o_kernel, dict(K=K, V=V, BT=BT, BKS=BKS, DOT_PREC=prec)),
        (
            chunk_bwd._chunk_bwd_state_kernel,
            dict(state, USE_DHT=True, STORE_DH0=True, STORE_CHUNKS=True),
        ),
        (
            chunk_bwd._chunk_bwd_state_kernel,
            dict(state, USE_DHT=False, STORE_DH0=True, STORE_CHUNKS=False),
        ),
        (chunk_bwd._bwd_dv_kernel, dict(K=K, V=V, BT=BT, BKS=BKS, DOT_PREC=prec)),
        *[(chunk_bwd._intra_bwd_kernel, dict(intra_bwd, SAFE_GATE=sg)) for sg in (False, True)],
        *[
            (chunk_bwd._bwd_dqkg_kernel, dict(K=K, V=V, BT=BT, DOT_PREC=prec, **gate))
            for gate in _GATE_VARIANTS
        ],
    ]
    specs = []
    for kernel, constexprs in launches:
        for meta, warps, stages in _configs(kernel, space):
            specs.append((kernel, {**constexprs, **meta}, warps, stages))
    # Not autotuned, Triton's default launch (4 warps): use_qk_l2norm_in_kernel and
    # use_beta_sigmoid_in_kernel of chunk_kda.
    rows = dict(D=K, BD=BK, BR=prologue._ROWS)
    for kernel, constexprs in (
        (prologue._l2norm_fwd_kernel, rows),
        (prologue._l2norm_bwd_kernel, rows),
        (prologue._sigmoid_fwd_kernel, dict(BLOCK=prologue._BLOCK)),
        (prologue._sigmoid_bwd_kernel, dict(BLOCK=prologue._BLOCK)),
    ):
        specs.append((kernel, constexprs, 4, 2))
    # Not autotuned: the fold of a split run (split.fold_states), forward and reverse.
    for reverse in (False, True):
        specs.append((split._fold_kernel, split.fold_constexprs(K, V, reverse), 4, 2))
    # Not autotuned: the launcher's choice (fused_recurrent.launch_constexprs), plain decode.
    constexprs, warps = fused_recurrent.launch_constexprs(K, V)
    specs.append((fused_recurrent._fused_recurrent_kernel, constexprs, warps, 2))
    return specs


def check(
    arch: int = 90,
    dtype: str = "bf16",
    head_dim_k: int = 128,
    head_dim_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    space: str = "first",
) -> list[Result]:
    """Compile all kernels for ``sm_<arch>``; one :class:`Result` per kernel variant and config
    of the autotune ``space`` (``"first"``, ``"suite"`` or ``"full"``), with its compile time.

    ``num_warps`` / ``num_stages`` override the per-kernel defaults. Compiles skip Triton's
    on-disk cache (``TRITON_ALWAYS_COMPILE``), so ``compile_s`` is a cold-cache figure.

    Raises:
        ValueError: ``arch`` not in :data:`ARCH_LIMITS`, ``dtype`` not one of bf16/fp16/fp32,
            head dims outside ``[1, 256]``, or an unknown ``space``.
    """
    if space not in AUTOTUNE_SPACES:
        raise ValueError(f"space must be one of {', '.join(AUTOTUNE_SPACES)}, got {space!r}")
    if arch not in ARCH_LIMITS:
        raise ValueError(f"arch must be one of {sorted(ARCH_LIMITS)}, got {arch!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    for name, d in (("head_dim_k", head_dim_k), ("head_dim_v", head_dim_v or head_dim_k)):
        if not 1 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be in [1, {MAX_HEAD_DIM}], got {d}")
    limit = ARCH_LIMITS[arch].max_shared_per_block
    target = GPUTarget("cuda", arch, 32)
    results = []
    for kernel, constexprs, warps, stages in kernel_specs(
        head_dim_k, head_dim_v or head_dim_k, dtype, space
    ):
        fn = _jit_fn(kernel)
        name = fn.__name__ + ("[SAFE_GATE]" if constexprs.get("SAFE_GATE") else "")
        name += f"[GATE={constexprs['GATE']}]" if constexprs.get("GATE") else ""
        name += "[SEGMENT_PASS]" if constexprs.get("SEGMENT_PASS") else ""
        name += "[no chunk stores]" if constexprs.get("STORE_CHUNKS") is False else ""
        name += "[REVERSE]" if constexprs.get("REVERSE") else ""
        sig = _signature(fn, dtype, constexprs)
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=_aligned(fn, sig))
        options = {"num_warps": num_warps or warps, "num_stages": num_stages or stages}
        tuned = {k: constexprs[k] for k in sorted(constexprs) if k in _tuned_meta(kernel)}
        label = config_str(
            triton.Config(tuned, num_warps=options["num_warps"], num_stages=options["num_stages"])
        )
        try:
            t0 = _cpu_seconds()
            with _always_compile():
                compiled = triton.compile(src, target=target, options=options)
            seconds = _cpu_seconds() - t0
        except Exception as e:  # noqa: BLE001 - report every compiler failure
            results.append(Result(name, False, error=f"{type(e).__name__}: {e}", config=label))
            continue
        regs, spills = _resource_usage(compiled.asm["cubin"])
        meta = compiled.metadata
        ctas, limiter = ctas_per_sm(arch, meta.num_warps, regs, meta.shared)
        results.append(
            Result(
                name,
                True,
                meta.shared,
                regs,
                spills,
                num_warps=meta.num_warps,
                num_stages=meta.num_stages,
                mma=mma_kinds(compiled.asm["ptx"]),
                ctas_per_sm=ctas,
                limited_by=limiter,
                fits=meta.shared <= limit and ctas != 0,
                config=label,
                compile_s=round(seconds, 3),
            )
        )
    return results


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (``ptxas``)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compile_time_summary(results: list[Result]) -> str:
    """One line: total compile seconds and the seconds per kernel (all its configs)."""
    per: dict[str, float] = {}
    for r in results:
        per[r.kernel] = per.get(r.kernel, 0.0) + (r.compile_s or 0.0)
    return (
        f"compile time (CPU seconds, cold cache): {sum(per.values()):.1f} s for {len(results)} "
        "binaries; per kernel: " + ", ".join(f"{k} {v:.1f} s" for k, v in per.items())
    )


def _tuned_meta(kernel: Any) -> set[str]:
    """Names of the meta-parameters ``kernel``'s autotune configs set (e.g. ``{"BV"}``)."""
    for entry in autotuned_kernels():
        if entry.kernel is kernel:
            return {k for c in entry.full for k in c.kwargs}
    return set()


@contextlib.contextmanager
def _always_compile() -> Iterator[None]:
    """Bypass Triton's on-disk kernel cache, so every compile is timed from source."""
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.compilation, "always_compile"):
        yield
        return
    previous = knobs.compilation.always_compile
    knobs.compilation.always_compile = True
    try:
        yield
    finally:
        knobs.compilation.always_compile = previous


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arch",
        type=int,
        default=90,
        choices=sorted(ARCH_LIMITS),
        help="compute capability x10",
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument(
        "--head-dim",
        type=int,
        default=128,
        help=f"K (and V unless --value-dim), 1 to {MAX_HEAD_DIM}",
    )
    p.add_argument("--value-dim", type=int, default=None, help="V when it differs from K")
    p.add_argument("--num-warps", type=int, default=None, help="override every kernel's num_warps")
    p.add_argument(
        "--num-stages", type=int, default=None, help="override every kernel's num_stages"
    )
    p.add_argument(
        "--space",
        choices=AUTOTUNE_SPACES,
        default="first",
        help="autotune configs to compile per kernel: first (default: the config the "
        "interpreter runs), suite (the GPU suite's small set, KIMI_LINEAR_AUTOTUNE=suite) or "
        "full (every config the autotuner times by default)",
    )
    p.add_argument(
        "--targets",
        action="store_true",
        help="also check the performance targets (16-bit inputs: no TF32 products; no spills; "
        "chunk kernels >= 2 CTAs/SM) and exit 1 when one is missed",
    )
    p.add_argument(
        "--save",
        default=None,
        metavar="PREFIX",
        help="also write PREFIX.json and PREFIX.md (e.g. benchmarks/results/cpu/kernels.compile_sm90)",
    )
    args = p.parse_args(argv)
    for flag, value in (("--head-dim", args.head_dim), ("--value-dim", args.value_dim)):
        if value is not None and not 1 <= value <= MAX_HEAD_DIM:
            p.error(f"{flag} must be in [1, {MAX_HEAD_DIM}], got {value}")
    for flag, value in (("--num-warps", args.num_warps), ("--num-stages", args.num_stages)):
        if value is not None and value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if args.num_warps is not None and args.num_warps & (args.num_warps - 1):
        p.error(f"--num-warps must be a power of two, got {args.num_warps}")
    if interpret_mode():  # the kernels were jitted for the interpreter: start again without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [
            sys.executable,
            "-m",
            "kimi_linear.kernels.compile_check",
            *(sys.argv[1:] if argv is None else argv),
        ]
        return subprocess.run(cmd, env=env, check=False).returncode
    results = check(
        args.arch,
        args.dtype,
        args.head_dim,
        args.value_dim,
        args.num_warps,
        args.num_stages,
        space=args.space,
    )
    title = (
        f"sm_{args.arch}, {args.dtype}, K={args.head_dim}, V={args.value_dim or args.head_dim}, "
        f"num_warps={args.num_warps or 'default'}, num_stages={args.num_stages or 'default'}, "
        f"autotune space {args.space}, triton {triton.__version__}"
    )
    dash = lambda x: "-" if x is None else str(x)
    limit = ARCH_LIMITS[args.arch].max_shared_per_block
    lines = [
        title,
        "",
        "| kernel | compiles | num_warps | shared bytes | registers/thread | spill bytes/thread "
        "| mma | CTAs/SM (limited by) | config | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        shared = dash(r.shared) + ("" if r.fits in (True, None) else f" (> {limit}: too much)")
        ctas = "-" if r.ctas_per_sm is None else f"{r.ctas_per_sm} ({r.limited_by})"
        lines.append(
            f"| {r.kernel} | {'yes' if r.ok else 'NO'} | {dash(r.num_warps)} | {shared} | "
            f"{dash(r.registers)} | {dash(r.local_bytes)} | {', '.join(r.mma) or 'none (FMA)'} | "
            f"{ctas} | {dash(r.config)} | {dash(r.compile_s)} |"
        )
    lines += ["", compile_time_summary(results)]
    problems = [f"{r.kernel}: {r.error}" for r in results if r.error]
    for r in results:
        if r.fits is False and r.shared is not None and r.shared > limit:
            problems.append(
                f"{r.kernel}: needs {r.shared} bytes of shared memory per block, more than "
                f"sm_{args.arch} allows ({limit}); a launch would fail"
            )
        elif r.fits is False:
            problems.append(
                f"{r.kernel}: {r.registers} registers/thread x {r.num_warps} warps exceed the "
                f"register file of an sm_{args.arch} SM; a launch would fail"
            )
    lines += ["", *problems] if problems else []
    misses = target_misses(results, args.dtype) if args.targets else []
    if args.targets:
        lines += ["", "targets: all met"] if not misses else ["", "targets missed:"]
        lines += [f"- {m}" for m in misses]
    print("\n".join(lines))
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        with open(args.save + ".md", "w") as f:
            command = " ".join(
                [
                    "python -m kimi_linear.kernels.compile_check",
                    *(sys.argv[1:] if argv is None else argv),
                ]
            )
            f.write(
                "# KDA kernels compiled ahead of time (no GPU): resources\n\n"
                + f"`{command}`\n\n"
                + "\n".join(lines)
                + "\n"
            )
        with open(args.save + ".json", "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "triton": triton.__version__,
                    "results": [dataclasses.asdict(r) for r in results],
                    "target_misses": misses if args.targets else None,
                },
                f,
                indent=2,
            )
    return 0 if all(r.ok and r.fits is not False for r in results) and not misses else 1


if __name__ == "__main__":
    sys.exit(main())
