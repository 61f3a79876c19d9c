"""Chunked KDA with Triton forward and backward: the training and prefill kernel.

Design (see :mod:`kimi_linear.kernels.chunk_fwd` and :mod:`kimi_linear.kernels.chunk_bwd`):
chunks of 64 tokens; the gate is cumulated within each chunk and every decay factor is formed
from a difference of cumulated gates split at a reference row, so nothing overflows however
strong the decay; the intra-chunk triangular system ``(I + Akk)`` is inverted by forward
substitution (16 x 16 diagonal blocks, then block substitution) into the UT/WY form
``W, U`` in the same kernel that forms ``Akk`` (which never leaves its registers); with
``gate_lower_bound`` (the safe gate) the diagonal sub-chunks also run as tensor-core products,
forward and backward; one sequential kernel per (sequence, head, value block) carries the
fp32 state across chunks and stores the chunk-start states, from which a parallel kernel forms
the outputs. When
gradients are needed the forward keeps the cumulative gate ``G`` (fp32) and the ``Aqk`` and
inverse ``N`` tiles (input dtype), and the backward recomputes only the decayed ``qg``, ``kg``,
``W``, ``U``, the chunk-start states and residuals (no state history
is kept between forward and backward; under ``torch.no_grad`` nothing beyond the output),
walks the chunks in reverse for the state gradient, then computes the per-chunk and pairwise
gradient terms. 16-bit inputs feed 16-bit operands to the tensor-core products (fp32
accumulation; see :mod:`kimi_linear.kernels.chunk_fwd`). Packed variable-length batches
(``cu_seqlens``) index chunks per sequence, so no chunk straddles two sequences.
"""

from __future__ import annotations

import functools

import torch

from kimi_linear.ops.backend import (
    check_gate_lower_bound,
    check_safe_gate_argument,
    gate_check_enabled,
)
from kimi_linear.ops.checks import check_log_decay
from kimi_linear.ops.isolation import isolate_nonfinite, isolation_enabled

from .chunk_bwd import chunk_kda_bwd
from .chunk_fwd import chunk_kda_fwd
from .utils import ChunkTables, check_kernel_inputs, pack


class ChunkKDAFunction(torch.autograd.Function):
    """Autograd wrapper over the packed kernels; inputs are packed ``[TT, H, D]`` tensors."""

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        g,
        beta,
        scale,
        initial_state,
        output_final_state,
        tables: ChunkTables,
        keep: bool,
        safe_gate: bool = False,
    ):
        # With gradients to come (``keep``, decided by the caller: grad mode is off in here),
        # keep the intermediates the backward would otherwise recompute with the most work
        # (G, Aqk, N); under no_grad / inference nothing beyond the output.
        fwd = chunk_kda_fwd(
            q,
            k,
            v,
            g,
            beta,
            scale,
            initial_state,
            output_final_state,
            *tables,
            keep=keep,
            safe_gate=safe_gate,
        )
        saved = (fwd.G, fwd.Aqk, fwd.Ainv) if keep else ()
        ctx.save_for_backward(q, k, v, g, beta, initial_state, *saved)
        ctx.scale, ctx.tables, ctx.safe_gate = scale, tables, safe_gate
        return fwd.o, fwd.final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, *saved = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0 = chunk_kda_bwd(
            q,
            k,
            v,
            g,
            beta,
            ctx.scale,
            initial_state,
            do.contiguous(),
            None if dht is None else dht.contiguous(),
            *ctx.tables,
            saved=tuple(saved) or None,
            safe_gate=ctx.safe_gate,
        )
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None, None


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    gate_lower_bound: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention, chunked, with Triton kernels for forward and backward.

    Same meaning as :func:`kimi_linear.ops.kda_recurrent`: per head, with fp32 state ``S [K, V]``,
    ``S = diag(exp(g_t)) S; S += beta_t k_t (v_t - S^T k_t)^T; o_t = S^T (scale q_t)``.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (L2-normalise them: the chunked form relies on
            ``||k|| <= 1``), fp16 / bf16 / fp32, one dtype for q, k, v.
        v: ``[B, T, H, V]`` values; ``V`` may differ from ``K``; both at most 256.
        g: ``[B, T, H, K]`` log decay in ``[-inf, 0]`` (any of the three dtypes; used in fp32);
            ``-inf`` (complete forgetting) and values far below -1000 are exact (clamped per
            step where ``exp`` underflows to 0). ``g > 0`` is not checked unless
            ``KIMI_LINEAR_CHECK_GATE=1`` (a device sync) and may overflow to inf / NaN.
        beta: ``[B, T, H]`` delta-rule step sizes.
        scale: factor on q, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` state before the first token (cast to fp32), ``N = B``,
            or the number of sequences with ``cu_seqlens``.
        output_final_state: also return the ``[N, H, K, V]`` fp32 state after the last token.
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of packed sequences (needs ``B == 1``);
            each sequence starts from its own initial-state row, as if run alone.
        gate_lower_bound: ``None`` (any ``g``), or the caller's promise that every
            ``g >= gate_lower_bound``, a number in ``[-5, 0)`` (the bounded safe gate,
            ``KimiLinearConfig.kda_gate_lower_bound``): the forward and backward then form the
            diagonal 16-token sub-chunk factors by tensor-core products (the fast path of
            :mod:`kimi_linear.kernels.chunk_fwd`); same results. A ``g`` below the bound is
            not checked unless ``KIMI_LINEAR_CHECK_GATE=1`` and may give inf / NaN.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state fp32 or ``None``.
        Gradients flow to q, k, v, g, beta, initial_state (and from a gradient on final_state).

    Raises:
        ValueError: bad shapes, dtypes, devices, head dims over 256, bad ``cu_seqlens``, CPU
            tensors without ``TRITON_INTERPRET=1`` (use the torch backend there), a
            ``gate_lower_bound`` outside ``[-5, 0)``, or (with ``KIMI_LINEAR_CHECK_GATE=1``) a
            ``g`` value above 0 or below ``gate_lower_bound``.

    Non-finite inputs (NaN / inf in q, k, v, beta; NaN in g) are isolated as the recurrence
    isolates them: outputs of the poisoned sequence and head are NaN from the poisoned token on,
    nothing else changes (:mod:`kimi_linear.ops.isolation`: every call runs the kernels on
    cleaned inputs and masks the poisoned outputs, device ops only, no sync and CUDA-graph
    capturable; ``KIMI_LINEAR_ISOLATE_NONFINITE=0`` turns it off).

    Inputs with other strides are made contiguous (a copy); inputs are never modified.
    """
    B, T, H, K, V, N = check_kernel_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    lower_bound = check_safe_gate_argument(gate_lower_bound)
    if gate_check_enabled():  # opt-in: a reduction or two and a device sync
        check_log_decay(g)
        if lower_bound is not None:
            check_gate_lower_bound(g, lower_bound)
    scale = K**-0.5 if scale is None else float(scale)
    run = functools.partial(
        _chunk_kda_packed,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        safe_gate=lower_bound is not None,
    )
    if isolation_enabled():  # device ops on every call, no sync (isolation.py)
        return isolate_nonfinite(run, q, k, v, g, beta, cu_seqlens)
    return run(q, k, v, g, beta)


def _chunk_kda_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    safe_gate: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunk_kda` on checked inputs: pack, run the kernels, unpack the output."""
    B, T, H, _ = q.shape
    V = v.shape[-1]
    (pq, pk, pv, pg, pb), tables = pack(q, k, v, g, beta, cu_seqlens)
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    keep = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state)
    )
    o, final_state = ChunkKDAFunction.apply(
        pq, pk, pv, pg, pb, scale, h0, output_final_state, tables, keep, safe_gate
    )
    return o.view(B, T, H, V), final_state
