"""Forward kernels of chunked KDA (chunk ``BT = 64``, sub-chunk ``BC = 16``).

Per head and chunk (rows ``r`` of the chunk, ``G`` the within-chunk cumulative log decay,
``q^ = scale * q``), the pipeline computes::

    G        = cumsum(g)                                             (_chunk_cumsum_kernel)
    Akk[r,i] = beta_r sum_d k_r k_i exp(G_r - G_i),  i <  r          (_intra_fwd_kernel)
    Aqk[r,i] =        sum_d q^_r k_i exp(G_r - G_i),  i <= r
    qg       = q^ * exp(G),   kg = k * exp(G_last - G)               (decayed operands)
    N        = (I + Akk)^-1                 (forward substitution)  (_solve_wy_kernel)
    W        = N (beta * k * exp(G)),   U = N (beta * v)             (WY / UT form)
    per chunk, sequentially carrying the fp32 state S [K, V]:        (_chunk_fwd_state_kernel)
        delta = U - W S                     (the delta-rule residual, fp32)
        o     = qg S + Aqk delta
        S     = exp(G_last) * S + kg^T delta

Numerics: every exponent is a difference ``G_a - G_b`` with ``a >= b`` (so ``<= 0``). For two
different sub-chunks the pairwise factor is split at a reference row ``ref`` between them,
``exp(G_r - G_i) = exp(G_r - G_ref) exp(G_ref - G_i)``, both factors in ``(0, 1]``, which keeps
the products on tensor-core matmuls; inside a 16-row diagonal sub-chunk the factor is formed
pair by pair. Nothing overflows however strong the decay; the tail chunk and sequence ends are
masked (padded rows have ``k = v = beta = 0`` and are never stored).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import CHUNK_SIZE, SUB_CHUNK_SIZE, autotune, dot_precision, next_pow2

_WARPS = [triton.Config({}, num_warps=w, num_stages=2) for w in (4, 2, 8)]


@triton.jit
def _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT: tl.constexpr):
    """(sequence index, first row of chunk ``i_t``, end row of its sequence) as int64 rows."""
    i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
    i_c = tl.load(chunk_indices + i_t * 2 + 1).to(tl.int64)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    return i_n, bos + i_c * BT, eos


@autotune(_WARPS, key=["K"])
@triton.jit
def _chunk_cumsum_kernel(
    g, G, cu_seqlens, chunk_indices, H, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr
):
    """G[r] = sum_{i <= r} g[i] within each chunk, in fp32. Grid ``(NT, H)``."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    rows = start + tl.arange(0, BT)
    cols = tl.arange(0, BK)
    mask = (rows < eos)[:, None] & (cols < K)[None, :]
    off = rows[:, None] * H * K + i_h * K + cols[None, :]
    b_g = tl.load(g + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(G + off, tl.cumsum(b_g, axis=0), mask=mask)


@autotune(_WARPS, key=["K"])
@triton.jit
def _intra_fwd_kernel(
    q, k, G, beta, Akk, Aqk, qg, kg, cu_seqlens, chunk_indices, scale, H,
    K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BKD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Rows of sub-chunk ``i_i`` of Akk (beta-scaled, strictly lower) and Aqk (scaled, lower).

    Also writes the decayed operands of the sequential kernels for these rows,
    ``qg = scale q exp(G)`` and ``kg = k exp(G_last - G)`` (in q's dtype), so those kernels need
    no per-row exponentials. Grid ``(NT, BT // BC, H)``. Akk, Aqk ``[TT, H, BT]``
    fp32; every entry of a valid row is written (zeros above the diagonal block).
    """
    i_t, i_i, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    HK = H * K
    row0 = start + i_i * BC
    o_c = tl.arange(0, BC)
    rows = row0 + o_c
    m_r = rows < eos
    cols = tl.arange(0, BK)
    m_k = cols < K
    m_rk = m_r[:, None] & m_k[None, :]
    off_r = rows[:, None] * HK + i_h * K + cols[None, :]
    b_q = tl.load(q + off_r, mask=m_rk, other=0.0).to(tl.float32) * scale
    b_k = tl.load(k + off_r, mask=m_rk, other=0.0).to(tl.float32)
    b_g = tl.load(G + off_r, mask=m_rk, other=0.0)
    b_beta = tl.load(beta + rows * H + i_h, mask=m_r, other=0.0).to(tl.float32)
    # Reference: the sub-chunk's first row; G_r - G_ref <= 0 for its rows, >= 0 for earlier ones.
    b_ref = tl.load(G + row0 * HK + i_h * K + cols, mask=m_k & (row0 + cols * 0 < eos), other=0.0)
    b_dr = tl.exp(tl.where(m_rk, b_g - b_ref[None, :], 0.0))
    b_qe = b_q * b_dr
    b_ke = b_k * b_dr
    last = tl.minimum(start + BT, eos) - 1
    b_gl = tl.load(G + last * HK + i_h * K + cols, mask=m_k, other=0.0)
    tl.store(qg + off_r, (b_q * tl.exp(b_g)).to(qg.dtype.element_ty), mask=m_rk)
    b_kg = b_k * tl.exp(tl.where(m_rk, b_gl[None, :] - b_g, 0.0))
    tl.store(kg + off_r, b_kg.to(kg.dtype.element_ty), mask=m_rk)
    a_rows = rows[:, None] * H * BT + i_h * BT
    for i_j in range(0, tl.where(row0 < eos, i_i, 0)):  # none if the sub-chunk is empty
        rows_j = start + i_j * BC + o_c
        m_jk = (rows_j < eos)[:, None] & m_k[None, :]
        off_j = rows_j[:, None] * HK + i_h * K + cols[None, :]
        b_kj = tl.load(k + off_j, mask=m_jk, other=0.0).to(tl.float32)
        b_gj = tl.load(G + off_j, mask=m_jk, other=0.0)
        b_kj = b_kj * tl.exp(tl.where(m_jk, b_ref[None, :] - b_gj, 0.0))
        b_akk = tl.dot(b_ke, tl.trans(b_kj), input_precision=DOT_PREC) * b_beta[:, None]
        b_aqk = tl.dot(b_qe, tl.trans(b_kj), input_precision=DOT_PREC)
        a_off = a_rows + i_j * BC + o_c[None, :]
        tl.store(Akk + a_off, b_akk, mask=m_r[:, None])
        tl.store(Aqk + a_off, b_aqk, mask=m_r[:, None])
    # Diagonal sub-chunk: exponents formed pair by pair on [BC, BC, BKD] slices of the head dim.
    b_akk = tl.zeros([BC, BC], dtype=tl.float32)
    b_aqk = tl.zeros([BC, BC], dtype=tl.float32)
    m_pair = (o_c[:, None] >= o_c[None, :]) & m_r[:, None] & m_r[None, :]
    for i_k in range(0, tl.cdiv(K, BKD)):
        cols_d = i_k * BKD + tl.arange(0, BKD)
        m_rd = m_r[:, None] & (cols_d < K)[None, :]
        off_d = rows[:, None] * HK + i_h * K + cols_d[None, :]
        b_qd = tl.load(q + off_d, mask=m_rd, other=0.0).to(tl.float32) * scale
        b_kd = tl.load(k + off_d, mask=m_rd, other=0.0).to(tl.float32)
        b_gd = tl.load(G + off_d, mask=m_rd, other=0.0)
        b_e = tl.exp(tl.where(m_pair[:, :, None], b_gd[:, None, :] - b_gd[None, :, :], float("-inf")))
        b_ke3 = b_kd[None, :, :] * b_e
        b_akk += tl.sum(b_kd[:, None, :] * b_ke3, axis=2)
        b_aqk += tl.sum(b_qd[:, None, :] * b_ke3, axis=2)
    b_akk = tl.where(o_c[:, None] > o_c[None, :], b_akk * b_beta[:, None], 0.0)
    a_off = a_rows + i_i * BC + o_c[None, :]
    tl.store(Akk + a_off, b_akk, mask=m_r[:, None])
    tl.store(Aqk + a_off, b_aqk, mask=m_r[:, None])
    # Upper blocks are zero: written here so the buffers need no memset.
    b_zero = tl.zeros([BC, BC], dtype=tl.float32)
    for i_j in range(i_i + 1, BT // BC):
        a_off = a_rows + i_j * BC + o_c[None, :]
        tl.store(Akk + a_off, b_zero, mask=m_r[:, None])
        tl.store(Aqk + a_off, b_zero, mask=m_r[:, None])


@autotune(_WARPS, key=["K", "V"])
@triton.jit
def _solve_wy_kernel(
    k, v, G, beta, Akk, Ainv, W, U, cu_seqlens, chunk_indices, H,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """N = (I + Akk)^-1 by (block) forward substitution, then W = N (beta k exp(G)), U = N (beta v).

    Grid ``(NT, H)``. Ainv ``[TT, H, BT]``, W ``[TT, H, K]``, U ``[TT, H, V]``, all fp32.
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    o_t = tl.arange(0, BT)
    rows = start + o_t
    m_t = rows < eos
    a_off = rows[:, None] * H * BT + i_h * BT + o_t[None, :]
    b_a = tl.load(Akk + a_off, mask=m_t[:, None], other=0.0)
    # Diagonal 16 x 16 blocks first: forward substitution on row r of every block at once
    # (rows below r are still identity rows, and Akk[r, j] != 0 only for j < r).
    blk = o_t // BC
    b_abd = tl.where(blk[:, None] == blk[None, :], b_a, 0.0)
    b_nd = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    for r in range(1, BC):
        sel = ((o_t % BC) == r)[:, None]
        upd = tl.dot(tl.where(sel, b_abd, 0.0), b_nd, input_precision=DOT_PREC)
        b_nd = tl.where(sel, b_nd - upd, b_nd)
    # Then block forward substitution: N_b = Nd_b (e_b - sum_{j < b} Akk_bj N_j).
    b_off = b_a - b_abd
    b_n = b_nd
    for b in range(1, BT // BC):
        sel = (blk == b)[:, None]
        b_t = tl.dot(tl.where(sel, b_off, 0.0), b_n, input_precision=DOT_PREC)
        b_n -= tl.dot(b_nd, b_t, input_precision=DOT_PREC)
    tl.store(Ainv + a_off, b_n, mask=m_t[:, None])

    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    cols_k = tl.arange(0, BK)
    m_tk = m_t[:, None] & (cols_k < K)[None, :]
    off_k = rows[:, None] * H * K + i_h * K + cols_k[None, :]
    b_k = tl.load(k + off_k, mask=m_tk, other=0.0).to(tl.float32)
    b_g = tl.load(G + off_k, mask=m_tk, other=0.0)
    b_kb = b_k * tl.exp(b_g) * b_beta[:, None]
    tl.store(W + off_k, tl.dot(b_n, b_kb, input_precision=DOT_PREC), mask=m_tk)
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (cols_v < V)[None, :]
        off_v = rows[:, None] * H * V + i_h * V + cols_v[None, :]
        b_v = tl.load(v + off_v, mask=m_tv, other=0.0).to(tl.float32) * b_beta[:, None]
        tl.store(U + off_v, tl.dot(b_n, b_v, input_precision=DOT_PREC), mask=m_tv)


# num_stages=1 keeps the K = 256 variants within the shared memory of an A100 / H100.
_STATE_CONFIGS = [
    triton.Config({"BV": bv}, num_warps=w, num_stages=s)
    for bv in (32, 64, 16)
    for w in (4, 8)
    for s in (2, 3, 1)
]


@autotune(_STATE_CONFIGS, key=["K", "V"])
@triton.jit
def _chunk_fwd_state_kernel(
    qg, kg, W, U, G, Aqk, o, h, h0, ht, delta, cu_seqlens, chunk_offsets, H,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, STORE_H: tl.constexpr,
    STORE_DELTA: tl.constexpr, COMPUTE_O: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Sequential pass over the chunks of one sequence and head, for a block of BV value columns.

    Grid ``(cdiv(V, BV), N * H)``. The state block ``[BK, BV]`` stays in fp32 registers; per chunk
    it writes the residual ``delta`` and the output, optionally the chunk-start state ``h``.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    o_t = tl.arange(0, BT)
    cols_k = tl.arange(0, BK)
    m_k = cols_k < K
    cols_v = i_v * BV + tl.arange(0, BV)
    m_v = cols_v < V
    s_off = cols_k[:, None] * V + cols_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_s += tl.load(h0 + (i_n * H + i_h).to(tl.int64) * K * V + s_off, mask=m_s, other=0.0)
    for i_c in range(0, num_chunks):
        start = bos + i_c * BT
        rows = start + o_t
        m_t = rows < eos
        if STORE_H:
            tl.store(h + ((boh + i_c) * H + i_h) * K * V + s_off, b_s, mask=m_s)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        off_k = rows[:, None] * H * K + i_h * K + cols_k[None, :]
        off_v = rows[:, None] * H * V + i_h * V + cols_v[None, :]
        b_w = tl.load(W + off_k, mask=m_tk, other=0.0)
        b_d = tl.load(U + off_v, mask=m_tv, other=0.0) - tl.dot(b_w, b_s, input_precision=DOT_PREC)
        if STORE_DELTA:
            tl.store(delta + off_v, b_d, mask=m_tv)
        if COMPUTE_O:
            b_q = tl.load(qg + off_k, mask=m_tk, other=0.0).to(tl.float32)
            a_off = rows[:, None] * H * BT + i_h * BT + o_t[None, :]
            b_a = tl.load(Aqk + a_off, mask=m_t[:, None], other=0.0)
            b_o = tl.dot(b_q, b_s, input_precision=DOT_PREC)
            b_o += tl.dot(b_a, b_d, input_precision=DOT_PREC)
            tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=m_tv)
        last = tl.minimum(start + BT, eos) - 1
        b_gl = tl.load(G + last * H * K + i_h * K + cols_k, mask=m_k, other=0.0)
        b_k = tl.load(kg + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_s = b_s * tl.exp(b_gl)[:, None] + tl.dot(tl.trans(b_k), b_d, input_precision=DOT_PREC)
    if STORE_FINAL:
        tl.store(ht + (i_n * H + i_h).to(tl.int64) * K * V + s_off, b_s, mask=m_s)


class ChunkForward(NamedTuple):
    """Outputs of :func:`chunk_kda_fwd`; the intermediates are ``None`` unless asked for."""

    o: torch.Tensor
    final_state: torch.Tensor | None
    G: torch.Tensor | None = None
    Aqk: torch.Tensor | None = None
    Ainv: torch.Tensor | None = None
    W: torch.Tensor | None = None
    qg: torch.Tensor | None = None
    kg: torch.Tensor | None = None
    h: torch.Tensor | None = None
    delta: torch.Tensor | None = None


def chunk_kda_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor,
    chunk_indices: torch.Tensor,
    chunk_offsets: torch.Tensor,
    num_chunks: int,
    for_backward: bool = False,
) -> ChunkForward:
    """Run the forward pipeline on packed, contiguous, checked inputs.

    Args:
        q, k, g: ``[TT, H, K]``; v ``[TT, H, V]``; beta ``[TT, H]`` (TT = total tokens).
        scale: factor on q.
        initial_state: ``[N, H, K, V]`` fp32 or None.
        output_final_state: also return the ``[N, H, K, V]`` fp32 final states.
        cu_seqlens: ``[N + 1]`` int32 offsets; chunk_indices, chunk_offsets, num_chunks from
            :func:`kimi_linear.kernels.utils.chunk_tables`.
        for_backward: skip the output and return what the backward needs instead (``G``,
            ``Aqk``, ``Ainv``, ``W``, ``qg``, ``kg``, chunk-start states ``h [NT, H, K, V]``,
            residuals ``delta [TT, H, V]``).
    """
    TT, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    BT, BC = CHUNK_SIZE, SUB_CHUNK_SIZE
    BK, BVW = next_pow2(K), min(next_pow2(V), 64)
    prec = dot_precision(q.dtype)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    G = torch.empty(TT, H, K, **f32)
    Akk = torch.empty(TT, H, BT, **f32)
    Aqk = torch.empty(TT, H, BT, **f32)
    Ainv = torch.empty(TT, H, BT, **f32)
    W = torch.empty(TT, H, K, **f32)
    U = torch.empty(TT, H, V, **f32)
    qg, kg = torch.empty_like(q), torch.empty_like(k)
    if num_chunks > 0:
        _chunk_cumsum_kernel[(num_chunks, H)](g, G, cu_seqlens, chunk_indices, H, K=K, BT=BT, BK=BK)
        _intra_fwd_kernel[(num_chunks, BT // BC, H)](
            q, k, G, beta, Akk, Aqk, qg, kg, cu_seqlens, chunk_indices, scale, H,
            K=K, BT=BT, BC=BC, BK=BK, BKD=min(BK, 32), DOT_PREC=prec,
        )
        _solve_wy_kernel[(num_chunks, H)](
            k, v, G, beta, Akk, Ainv, W, U, cu_seqlens, chunk_indices, H,
            K=K, V=V, BT=BT, BC=BC, BK=BK, BV=BVW, DOT_PREC=prec,
        )
    o = torch.empty(0, device=dev) if for_backward else torch.empty_like(v)
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    h = torch.empty(num_chunks, H, K, V, **f32) if for_backward else None
    delta = torch.empty(TT, H, V, **f32) if for_backward else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * H)
    _chunk_fwd_state_kernel[grid](
        qg, kg, W, U, G, Aqk, o, h, initial_state, ht, delta, cu_seqlens, chunk_offsets, H,
        K=K, V=V, BT=BT, BK=BK,
        USE_H0=initial_state is not None, STORE_FINAL=output_final_state, STORE_H=for_backward,
        STORE_DELTA=for_backward, COMPUTE_O=not for_backward, DOT_PREC=prec,
    )
    if for_backward:
        return ChunkForward(o, ht, G, Aqk, Ainv, W, qg, kg, h, delta)
    return ChunkForward(o, ht)
