"""Compile every KDA kernel for a CUDA architecture without a GPU, and report its resources.

The Triton interpreter (how the tests run on CPU) checks what the kernels compute but not that
they compile for a GPU: loop-carried types, layouts, shared-memory budgets are only checked by
the real compiler. This tool runs Triton's ahead-of-time compiler (its bundled ``ptxas``) for a
chosen architecture, with the constexpr values the launchers use and each kernel's first
autotune config (block sizes, warps, stages; ``--num-warps`` / ``--num-stages`` override the
last two), and prints shared memory, registers and stack/local (spill) bytes per thread per
kernel (``cuobjdump``)::

    python -m kimi_linear.kernels.compile_check --arch 90 --dtype bf16 --head-dim 128

Kernels are jitted at import, so under ``TRITON_INTERPRET=1`` the tool re-executes itself
without it. Exit code 1 when a kernel fails to compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from . import chunk_bwd, chunk_fwd, fused_recurrent
from .utils import CHUNK_SIZE, SUB_CHUNK_SIZE, dot_precision, interpret_mode, next_pow2

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Arguments holding the caller's tensors (input dtype); every other pointer is an fp32 buffer.
_IO_ARGS = {"q", "k", "v", "beta", "o", "do", "dv", "dq", "dk", "qg", "kg"}
_INDEX_ARGS = {"cu_seqlens", "chunk_indices", "chunk_offsets"}


@dataclass
class Result:
    kernel: str
    ok: bool
    shared: int | None = None
    registers: int | None = None
    local_bytes: int | None = None
    error: str | None = None


def _jit_fn(kernel: Any) -> JITFunction:
    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def _signature(fn: JITFunction, dtype: str, constexprs: dict[str, Any]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "H":
            sig[name] = "i32"
        elif name == "scale":
            sig[name] = "fp32"
        elif name in _INDEX_ARGS:
            sig[name] = "*i32"
        elif name in _IO_ARGS:
            sig[name] = "*" + dtype
        else:
            sig[name] = "*fp32"
    return sig


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


def _first_config(kernel: Any) -> tuple[dict[str, Any], int, int]:
    """(meta-parameters, num_warps, num_stages) of a kernel's first autotune config.

    That is the config the interpreter runs; the kernels order their configs so that it is
    the one picked from this report (the autotuner times all of them on a GPU).
    """
    configs = getattr(kernel, "configs", None)
    if configs:  # triton.autotune
        first = configs[0]
        return dict(first.kwargs), first.num_warps, first.num_stages
    fixed = getattr(kernel, "kwargs", None)
    if fixed is not None:  # the interpreter's fixed config
        meta = dict(fixed)
        return meta, meta.pop("num_warps"), meta.pop("num_stages")
    return {}, 4, 2


def kernel_specs(
    head_dim_k: int, head_dim_v: int, dtype: str
) -> list[tuple[Any, dict[str, Any], int, int]]:
    """(kernel, constexprs, num_warps, num_stages) for every kernel, as the launchers use them:
    the launchers' constexprs plus the kernel's first autotune config."""
    BT, BC = CHUNK_SIZE, SUB_CHUNK_SIZE
    K, V = head_dim_k, head_dim_v
    BK = next_pow2(K)
    BKS = min(BK, 64)
    prec = dot_precision(_DTYPES[dtype])
    state = dict(K=K, V=V, BT=BT, BK=BK, BKS=BKS, DOT_PREC=prec)
    launches = [
        (chunk_fwd._chunk_cumsum_kernel, dict(K=K, BT=BT, BK=BKS)),
        (
            chunk_fwd._intra_fwd_kernel,
            dict(K=K, BT=BT, BC=BC, BK=BK, BKD=min(BK, 32), DOT_PREC=prec),
        ),
        (
            chunk_fwd._solve_wy_kernel,
            dict(
                K=K, V=V, BT=BT, BC=BC, BK=BKS, BV=min(next_pow2(V), 64), HAS_DO=True, DOT_PREC=prec
            ),
        ),
        (chunk_fwd._chunk_fwd_state_kernel, dict(state, USE_H0=True, STORE_FINAL=True)),
        (chunk_fwd._chunk_fwd_o_kernel, dict(K=K, V=V, BT=BT, BKS=BKS, DOT_PREC=prec)),
        (chunk_bwd._chunk_bwd_state_kernel, dict(state, USE_DHT=True, STORE_DH0=True)),
        (chunk_bwd._bwd_dv_kernel, dict(K=K, V=V, BT=BT, BKS=BKS, DOT_PREC=prec)),
        (chunk_bwd._intra_bwd_kernel, dict(K=K, BT=BT, BC=BC, BKD=min(BK, 32), DOT_PREC=prec)),
        (chunk_bwd._bwd_dqkg_kernel, dict(K=K, V=V, BT=BT, DOT_PREC=prec)),
    ]
    specs = []
    for kernel, constexprs in launches:
        meta, warps, stages = _first_config(kernel)
        specs.append((kernel, {**constexprs, **meta}, warps, stages))
    # Not autotuned: the launcher's choice (fused_recurrent._launch).
    BV = min(next_pow2(V), 32 if BK >= 128 else 64)
    specs.append(
        (
            fused_recurrent._fused_recurrent_kernel,
            dict(K=K, V=V, BK=BK, BV=BV, USE_H0=True, STORE_FINAL=True),
            1 if BK * BV <= 1024 else 4,
            2,
        )
    )
    return specs


def check(
    arch: int = 90,
    dtype: str = "bf16",
    head_dim_k: int = 128,
    head_dim_v: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> list[Result]:
    """Compile all kernels for ``sm_<arch>``; one :class:`Result` per kernel variant.

    ``num_warps`` / ``num_stages`` override the per-kernel defaults.
    """
    target = GPUTarget("cuda", arch, 32)
    results = []
    for kernel, constexprs, warps, stages in kernel_specs(
        head_dim_k, head_dim_v or head_dim_k, dtype
    ):
        fn = _jit_fn(kernel)
        src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
        try:
            options = {"num_warps": num_warps or warps, "num_stages": num_stages or stages}
            compiled = triton.compile(src, target=target, options=options)
        except Exception as e:  # noqa: BLE001 - report every compiler failure
            results.append(Result(fn.__name__, False, error=f"{type(e).__name__}: {e}"))
            continue
        regs, spills = _resource_usage(compiled.asm["cubin"])
        results.append(Result(fn.__name__, True, compiled.metadata.shared, regs, spills))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (80, 90, ...)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--head-dim", type=int, default=128, help="K (and V unless --value-dim)")
    p.add_argument("--value-dim", type=int, default=None, help="V when it differs from K")
    p.add_argument("--num-warps", type=int, default=None, help="override every kernel's num_warps")
    p.add_argument(
        "--num-stages", type=int, default=None, help="override every kernel's num_stages"
    )
    p.add_argument(
        "--save",
        default=None,
        metavar="PREFIX",
        help="also write PREFIX.json and PREFIX.md (e.g. benchmarks/results/cpu/kernels.compile_sm90)",
    )
    args = p.parse_args(argv)
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
        args.arch, args.dtype, args.head_dim, args.value_dim, args.num_warps, args.num_stages
    )
    title = (
        f"sm_{args.arch}, {args.dtype}, K={args.head_dim}, V={args.value_dim or args.head_dim}, "
        f"num_warps={args.num_warps or 'default'}, num_stages={args.num_stages or 'default'}, "
        f"triton {triton.__version__}"
    )
    dash = lambda x: "-" if x is None else str(x)
    lines = [
        title,
        "",
        "| kernel | compiles | shared bytes | registers/thread | spill bytes/thread |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.kernel} | {'yes' if r.ok else 'NO'} | {dash(r.shared)} | {dash(r.registers)} | "
            f"{dash(r.local_bytes)} |"
        )
    print("\n".join(lines))
    for r in results:
        if r.error:
            print(f"{r.kernel}: {r.error}")
    if args.save:
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        with open(args.save + ".md", "w") as f:
            f.write(
                "# KDA kernels compiled ahead of time (no GPU): resources\n\n"
                + "\n".join(lines)
                + "\n"
            )
        with open(args.save + ".json", "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "triton": triton.__version__,
                    "results": [dataclasses.asdict(r) for r in results],
                },
                f,
                indent=2,
            )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
