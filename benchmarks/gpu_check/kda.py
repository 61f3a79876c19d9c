"""KDA inputs, forward / backward runs and fla's kernels for the suite's items (shapes: B batch,
T tokens, H heads, K key dim, V value dim, N sequences of a packed batch)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks import common
from benchmarks.gpu_check.run import BudgetExceeded, ItemContext, free_memory
from kimi_linear.testing import (
    KDA_INPUT_NAMES,
    KDA_NAMES,
    kda_cotangents,
    kda_run,
    per_sequence,
)
from kimi_linear.testing import kda_inputs as draw_kda_inputs

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}


def shape_str(B: int, T: int, H: int, K: int, V: int) -> str:
    return f"B={B} T={common.fmt_tokens(T)} H={H} K={K} V={V}"


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
    """:func:`kimi_linear.testing.kda_inputs` by name, as the layer makes them: L2-normalised
    q, k and v in ``dtype``; g in ``[gate_low, 0]`` (fp32); beta in ``(0, 1)`` in ``dtype``; an
    fp32 initial state ``h0 [N or B, H, K, V]`` of entries ~ N(0, 1/K); and the upstream
    gradients ``do [B, T, H, V]`` (``dtype``) and ``dht`` (fp32, like ``h0``)."""
    inputs = draw_kda_inputs(
        B,
        T,
        H,
        K,
        V,
        dtype=dtype,
        device=device,
        gate=(gate_low, 0.0),
        N=N,
        seed=seed,
        state_scale=K**-0.5,
        beta_dtype=dtype,
    )
    do, dht = kda_cotangents(inputs, seed=seed + 1)
    return {**dict(zip(KDA_INPUT_NAMES, inputs)), "do": do, "dht": dht}


def fwd_bwd(
    fn: Callable[..., Any],
    x: dict[str, torch.Tensor],
    compute: torch.dtype | None = None,
    **kw: Any,
) -> dict[str, torch.Tensor]:
    """Forward and backward of ``fn`` on copies of ``x`` (``compute``: cast the inputs first),
    by :func:`kimi_linear.testing.kda_run`: the loss is ``<o, do> + <ht, dht>``; returns o, ht
    and the gradients by name (:data:`kimi_linear.testing.KDA_NAMES`)."""
    inputs = [x[n] if compute is None else x[n].to(compute) for n in KDA_INPUT_NAMES]
    return dict(zip(KDA_NAMES, kda_run(fn, inputs, x["do"], x["dht"], **kw)))


def forward_only(
    fn: Callable[..., Any],
    x: dict[str, torch.Tensor],
    compute: torch.dtype | None = None,
    **kw: Any,
) -> dict[str, torch.Tensor]:
    """Forward of ``fn`` on copies of ``x``, without autograd: ``{"o", "ht"}``."""
    xs = [(x[n].to(compute) if compute is not None else x[n]).clone() for n in KDA_INPUT_NAMES]
    with torch.no_grad():
        o, ht = fn(*xs[:5], initial_state=xs[5], output_final_state=True, **kw)
    return {"o": o, "ht": ht}


def fla_ops(device: torch.device) -> SimpleNamespace:
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


def try_fla(
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
        free_memory(ctx.run.device)
        return None
