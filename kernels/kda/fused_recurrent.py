"""Token-by-token KDA in one Triton launch: the decode kernel (forward only).

One program per (value block, sequence, head) keeps its ``[K, BV]`` slice of the fp32 state in
registers and walks the tokens of its sequence: decay the key rows, delta-rule update with the
fp32 residual ``v - S^T k``, read out ``S^T q``. All heads and sequences (packed with
``cu_seqlens``, or a dense batch) go in a single launch; with ``inplace_state=True`` the final
state is written over the initial-state tensor, so a decode step allocates no new state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kimi_linear.ops.backend import gate_check_enabled
from kimi_linear.ops.checks import check_log_decay

from .utils import NO_SPECIALIZE, check_kernel_inputs, checked_grid, next_pow2, pack


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _fused_recurrent_kernel(
    q,
    k,
    v,
    g,
    beta,
    o,
    h0,
    ht,
    cu_seqlens,
    scale,
    H,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    """Grid ``(cdiv(V, BV) * N * H,)``, value blocks fastest (``utils.checked_grid``: no 65,535
    limit on sequences x heads); inputs packed ``[TT, H, D]``, states ``[N, H, K, V]``."""
    NV: tl.constexpr = (V + BV - 1) // BV
    i_v, i_nh = tl.program_id(0) % NV, tl.program_id(0) // NV
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    cols_k = tl.arange(0, BK)
    m_k = cols_k < K
    cols_v = i_v * BV + tl.arange(0, BV)
    m_v = cols_v < V
    s_off = (i_n * H + i_h).to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_s += tl.load(h0 + s_off, mask=m_s, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        off_k = (t * H + i_h) * K + cols_k
        off_v = (t * H + i_h) * V + cols_v
        b_q = tl.load(q + off_k, mask=m_k, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + off_k, mask=m_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + off_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + off_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + t * H + i_h).to(tl.float32)
        b_s = b_s * tl.exp(b_g)[:, None]
        b_r = b_v - tl.sum(b_s * b_k[:, None], axis=0)
        b_s += b_k[:, None] * (b_beta * b_r)[None, :]
        b_o = tl.sum(b_s * b_q[:, None], axis=0)
        tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        tl.store(ht + s_off, b_s, mask=m_s)


def _launch(q, k, v, g, beta, scale, h0, ht, cu_seqlens, o) -> None:
    TT, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    BK = next_pow2(K)
    BV = min(next_pow2(V), 32 if BK >= 128 else 64)
    _fused_recurrent_kernel[checked_grid(triton.cdiv(V, BV) * N * H)](
        q,
        k,
        v,
        g,
        beta,
        o,
        h0,
        ht,
        cu_seqlens,
        scale,
        H,
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        USE_H0=h0 is not None,
        STORE_FINAL=ht is not None,
        num_warps=1 if BK * BV <= 1024 else 4,
    )


class _ForwardOnly(torch.autograd.Function):
    """Runs the kernel under autograd and raises if a gradient ever comes back through ``o``."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, h0, ht, cu_seqlens):
        o = torch.empty_like(v)
        _launch(q, k, v, g, beta, scale, h0, ht, cu_seqlens, o)
        return o

    @staticmethod
    def backward(ctx, do):
        raise RuntimeError(
            "fused_recurrent_kda is forward-only (decode); use kimi_linear.kernels.chunk_kda "
            "for gradients"
        )


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    inplace_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention token by token, one kernel launch for all heads and sequences.

    **Forward only**: meant for decoding. Under autograd the call works, but back-propagating
    through its output raises ``RuntimeError`` (use :func:`kimi_linear.kernels.chunk_kda`); the
    returned state never carries gradients, and a differentiable initial_state is refused.

    Args:
        q, k: ``[B, T, H, K]``; v ``[B, T, H, V]``; g ``[B, T, H, K]`` log decay;
            beta ``[B, T, H]``: as in :func:`kimi_linear.ops.kda_recurrent`; ``T > 1`` allowed.
        scale: factor on q, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` state before the first token.
        output_final_state: return the ``[N, H, K, V]`` fp32 final state.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (``B == 1``).
        inplace_state: write the final state over ``initial_state`` (which must then be a
            contiguous fp32 tensor not requiring grad) and return that tensor as the final state
            (whatever ``output_final_state``): no state allocation per decode step.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state or None)``.

    ``g = -inf`` forgets exactly (``exp(-inf) = 0``); ``g > 0`` is not checked unless
    ``KIMI_LINEAR_CHECK_GATE=1`` (a device sync) and grows the state without bound.

    Raises:
        ValueError: the checks of :func:`chunk_kda`, plus ``inplace_state`` without a suitable
            ``initial_state``.
    """
    B, T, H, K, V, N = check_kernel_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if gate_check_enabled():  # opt-in: one reduction and a device sync
        check_log_decay(g)
    scale = K**-0.5 if scale is None else float(scale)
    if inplace_state:
        if initial_state is None:
            raise ValueError("inplace_state=True needs an initial_state tensor to update")
        if initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError(
                "inplace_state=True needs initial_state to be a contiguous float32 tensor, got "
                f"dtype {initial_state.dtype}, contiguous={initial_state.is_contiguous()}"
            )
    if initial_state is not None and initial_state.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "initial_state requires grad, but fused_recurrent_kda is forward-only: use chunk_kda "
            "for gradients, or pass initial_state.detach()"
        )
    (pq, pk, pv, pg, pb), tables = pack(q, k, v, g, beta, cu_seqlens)
    cu = tables.cu_seqlens
    if inplace_state:
        h0 = ht = initial_state
    else:
        h0 = None if initial_state is None else initial_state.contiguous()
        ht = pq.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta)):
        o = _ForwardOnly.apply(pq, pk, pv, pg, pb, scale, h0, ht, cu)
    else:
        o = torch.empty_like(pv)
        _launch(pq, pk, pv, pg, pb, scale, h0, ht, cu, o)
    return o.view(B, T, H, V), ht
