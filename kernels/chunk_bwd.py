"""Backward kernels of chunked KDA.

Notation of :mod:`kimi_linear.kernels.chunk_fwd` (per head and chunk; ``S0`` the chunk-start
state, ``S1`` the chunk-end state, ``q^ = scale * q``, ``E = exp(G)``, ``El = exp(G_last - G)``,
``R = v - (k E) S0`` so that ``delta = N diag(beta) R``). Given ``dO`` and the gradient ``dS1``
of the chunk-end state:

1. ``_chunk_bwd_state_kernel`` walks the chunks backwards (fp32 state gradient in registers)::

       d_delta = Aqk^T dO + kg dS1                  (kg = k El, qg = q^ E from the forward)
       dS0     = exp(G_last) dS1 + qg^T dO - W^T d_delta

2. ``_bwd_local_kernel`` (one program per chunk), with ``dRt = N^T d_delta``::

       dv = beta dRt,   dbeta += rowsum(R * dRt)
       dAqk = tril(dO delta^T),   dL = -strict_tril(dRt delta^T)
       X1 = dO S0^T, X2 = delta dS1^T, X3 = (beta dRt) S0^T
       dq^ += X1 E,   dk += X2 El - X3 E,   dG += X1 q^ E - X2 k El - X3 k E
       dG_last += colsum(X2 k El) + exp(G_last) rowsum(S0 * dS1)

3. ``_intra_bwd_kernel`` (one program per 16-row sub-chunk) applies the pairwise matrices,
   ``P(D, X)[r] = sum_i D[r, i] X_i exp(G_r - G_i)`` and its transpose ``P^T``::

       Yq = P(dAqk, k), Yk = P(dL, k), Zq = P^T(dAqk, q^), Zk = P^T(dL, beta k)
       dq = scale (dq^ + Yq),  dk += beta Yk + Zq + Zk,  dbeta += rowsum(k Yk)
       dG += q^ Yq + beta k Yk - k (Zq + Zk)

   with the same overflow-free factorisation as the forward (reference row between
   sub-chunks, pairwise exponents inside a diagonal sub-chunk; the diagonal of Aqk contributes
   to dq and dk but cancels exactly in dG).
4. ``_reverse_cumsum_kernel``: ``dg = reverse cumsum of dG`` within each chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_fwd import _STATE_CONFIGS, _WARPS, _chunk_bounds, chunk_kda_fwd
from .utils import CHUNK_SIZE, SUB_CHUNK_SIZE, autotune, dot_precision, next_pow2


@autotune(_STATE_CONFIGS, key=["K", "V"])
@triton.jit
def _chunk_bwd_state_kernel(
    qg, kg, W, G, Aqk, do, dh, dht, dh0, ddelta, cu_seqlens, chunk_offsets, H,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Reverse pass over the chunks: chunk-end state gradients ``dh`` and ``d_delta``.

    Grid ``(cdiv(V, BV), N * H)``; ``dh [NT, H, K, V]`` and ``ddelta [TT, H, V]`` fp32.
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
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_ds += tl.load(dht + (i_n * H + i_h).to(tl.int64) * K * V + s_off, mask=m_s, other=0.0)
    for i_r in range(0, num_chunks):
        i_c = num_chunks - 1 - i_r
        start = bos + i_c * BT
        rows = start + o_t
        m_t = rows < eos
        tl.store(dh + ((boh + i_c) * H + i_h) * K * V + s_off, b_ds, mask=m_s)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        off_k = rows[:, None] * H * K + i_h * K + cols_k[None, :]
        off_v = rows[:, None] * H * V + i_h * V + cols_v[None, :]
        b_do = tl.load(do + off_v, mask=m_tv, other=0.0).to(tl.float32)
        b_a = tl.load(Aqk + rows[:, None] * H * BT + i_h * BT + o_t[None, :], mask=m_t[:, None], other=0.0)
        last = tl.minimum(start + BT, eos) - 1
        b_gl = tl.load(G + last * H * K + i_h * K + cols_k, mask=m_k, other=0.0)
        b_k = tl.load(kg + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_dd = tl.dot(tl.trans(b_a), b_do, input_precision=DOT_PREC)
        b_dd += tl.dot(b_k, b_ds, input_precision=DOT_PREC)
        tl.store(ddelta + off_v, b_dd, mask=m_tv)
        b_q = tl.load(qg + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_w = tl.load(W + off_k, mask=m_tk, other=0.0)
        b_ds = b_ds * tl.exp(b_gl)[:, None]
        b_ds += tl.dot(tl.trans(b_q), b_do, input_precision=DOT_PREC)
        b_ds -= tl.dot(tl.trans(b_w), b_dd, input_precision=DOT_PREC)
    if STORE_DH0:
        tl.store(dh0 + (i_n * H + i_h).to(tl.int64) * K * V + s_off, b_ds, mask=m_s)


_LOCAL_CONFIGS = [
    triton.Config({"BV": bv}, num_warps=w, num_stages=s) for bv in (32, 64, 16) for w in (4, 8) for s in (1, 2)
]


@autotune(_LOCAL_CONFIGS, key=["K", "V"])
@triton.jit
def _bwd_local_kernel(
    q, k, v, G, beta, Ainv, h, dh, delta, ddelta, do, dq, dk, dv, dG, dbeta, dAqk, dL,
    cu_seqlens, chunk_indices, scale, H,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Per-chunk gradients through the WY form and the inter-chunk terms. Grid ``(NT, H)``.

    Writes dv (final), the fp32 partials dq^ / dk / dG / dbeta, and dAqk, dL ``[TT, H, BT]``.
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    o_t = tl.arange(0, BT)
    rows = start + o_t
    m_t = rows < eos
    cols_k = tl.arange(0, BK)
    m_k = cols_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    off_k = rows[:, None] * H * K + i_h * K + cols_k[None, :]
    b_k = tl.load(k + off_k, mask=m_tk, other=0.0).to(tl.float32)
    b_g = tl.load(G + off_k, mask=m_tk, other=0.0)
    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    a_off = rows[:, None] * H * BT + i_h * BT + o_t[None, :]
    b_n = tl.load(Ainv + a_off, mask=m_t[:, None], other=0.0)
    b_ke = b_k * tl.exp(b_g)

    b_x1 = tl.zeros([BT, BK], dtype=tl.float32)
    b_x2 = tl.zeros([BT, BK], dtype=tl.float32)
    b_x3 = tl.zeros([BT, BK], dtype=tl.float32)
    b_daqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dl = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    b_sds = tl.zeros([BK], dtype=tl.float32)
    h_base = (i_t * H + i_h).to(tl.int64) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        m_v = cols_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        off_v = rows[:, None] * H * V + i_h * V + cols_v[None, :]
        s_off = h_base + cols_k[:, None] * V + cols_v[None, :]
        m_s = m_k[:, None] & m_v[None, :]
        b_h = tl.load(h + s_off, mask=m_s, other=0.0)
        b_dh = tl.load(dh + s_off, mask=m_s, other=0.0)
        b_d = tl.load(delta + off_v, mask=m_tv, other=0.0)
        b_dd = tl.load(ddelta + off_v, mask=m_tv, other=0.0)
        b_do = tl.load(do + off_v, mask=m_tv, other=0.0).to(tl.float32)
        b_v = tl.load(v + off_v, mask=m_tv, other=0.0).to(tl.float32)
        b_drt = tl.dot(tl.trans(b_n), b_dd, input_precision=DOT_PREC)
        b_dr = b_drt * b_beta[:, None]
        tl.store(dv + off_v, b_dr.to(dv.dtype.element_ty), mask=m_tv)
        b_r = b_v - tl.dot(b_ke, b_h, input_precision=DOT_PREC)
        b_dbeta += tl.sum(b_r * b_drt, axis=1)
        b_daqk += tl.dot(b_do, tl.trans(b_d), input_precision=DOT_PREC)
        b_dl += tl.dot(b_drt, tl.trans(b_d), input_precision=DOT_PREC)
        b_x1 += tl.dot(b_do, tl.trans(b_h), input_precision=DOT_PREC)
        b_x2 += tl.dot(b_d, tl.trans(b_dh), input_precision=DOT_PREC)
        b_x3 += tl.dot(b_dr, tl.trans(b_h), input_precision=DOT_PREC)
        b_sds += tl.sum(b_h * b_dh, axis=1)
    tl.store(dAqk + a_off, tl.where(o_t[:, None] >= o_t[None, :], b_daqk, 0.0), mask=m_t[:, None])
    tl.store(dL + a_off, tl.where(o_t[:, None] > o_t[None, :], -b_dl, 0.0), mask=m_t[:, None])
    b_q = tl.load(q + off_k, mask=m_tk, other=0.0).to(tl.float32) * scale
    last = tl.minimum(start + BT, eos) - 1
    b_gl = tl.load(G + last * H * K + i_h * K + cols_k, mask=m_k, other=0.0)
    b_e = tl.exp(b_g)
    b_el = tl.exp(tl.where(m_tk, b_gl[None, :] - b_g, 0.0))
    b_x2k = b_x2 * b_k * b_el
    b_dq = b_x1 * b_e
    b_dk = b_x2 * b_el - b_x3 * b_e
    b_dg = b_x1 * b_q * b_e - b_x2k - b_x3 * b_k * b_e
    b_dgl = tl.sum(b_x2k, axis=0) + tl.exp(b_gl) * b_sds
    b_dg = tl.where((rows == last)[:, None], b_dg + b_dgl[None, :], b_dg)
    tl.store(dq + off_k, b_dq, mask=m_tk)
    tl.store(dk + off_k, b_dk, mask=m_tk)
    tl.store(dG + off_k, b_dg, mask=m_tk)
    tl.store(dbeta + rows * H + i_h, b_dbeta, mask=m_t)


@autotune(_WARPS, key=["K"], restore_value=["dG", "dbeta"])
@triton.jit
def _intra_bwd_kernel(
    q, k, G, beta, dAqk, dL, dq, dk, dG, dbeta, dq_out, dk_out, cu_seqlens, chunk_indices,
    scale, H, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BKD: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Pairwise (intra-chunk) gradient terms for the rows of sub-chunk ``i_i``; finalises dq, dk,
    dbeta and the per-position dG (before the reverse cumsum). Grid ``(NT, BT // BC, H)``."""
    i_t, i_i, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    HK = H * K
    NC: tl.constexpr = BT // BC
    row0 = start + i_i * BC
    o_c = tl.arange(0, BC)
    rows = row0 + o_c
    m_r = rows < eos
    b_beta = tl.load(beta + rows * H + i_h, mask=m_r, other=0.0).to(tl.float32)
    a_rows = rows[:, None] * H * BT + i_h * BT
    d_off = a_rows + i_i * BC + o_c[None, :]
    b_daqk_d = tl.load(dAqk + d_off, mask=m_r[:, None], other=0.0)
    b_dl_d = tl.load(dL + d_off, mask=m_r[:, None], other=0.0)
    # Reference rows: first row of this sub-chunk (row ops), its last valid row (column ops).
    last_c = tl.minimum(row0 + BC, eos) - 1
    m_pair = (o_c[:, None] >= o_c[None, :]) & m_r[:, None] & m_r[None, :]
    b_dbeta = tl.zeros([BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BKD)):
        cols = i_k * BKD + tl.arange(0, BKD)
        m_d = cols < K
        m_rd = m_r[:, None] & m_d[None, :]
        off_r = rows[:, None] * HK + i_h * K + cols[None, :]
        b_q = tl.load(q + off_r, mask=m_rd, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + off_r, mask=m_rd, other=0.0).to(tl.float32)
        b_g = tl.load(G + off_r, mask=m_rd, other=0.0)
        b_ref = tl.load(G + row0 * HK + i_h * K + cols, mask=m_d & (row0 + cols * 0 < eos), other=0.0)
        b_refc = tl.load(G + last_c * HK + i_h * K + cols, mask=m_d & (last_c + cols * 0 >= row0), other=0.0)

        # Row side: Y[r] = sum_{i <= r} D[r, i] k_i exp(G_r - G_i).
        b_yq = tl.zeros([BC, BKD], dtype=tl.float32)
        b_yk = tl.zeros([BC, BKD], dtype=tl.float32)
        for i_j in range(0, tl.where(row0 < eos, i_i, 0)):
            rows_j = start + i_j * BC + o_c
            m_jd = (rows_j < eos)[:, None] & m_d[None, :]
            off_j = rows_j[:, None] * HK + i_h * K + cols[None, :]
            b_kj = tl.load(k + off_j, mask=m_jd, other=0.0).to(tl.float32)
            b_gj = tl.load(G + off_j, mask=m_jd, other=0.0)
            b_kj = b_kj * tl.exp(tl.where(m_jd, b_ref[None, :] - b_gj, 0.0))
            j_off = a_rows + i_j * BC + o_c[None, :]
            b_da = tl.load(dAqk + j_off, mask=m_r[:, None], other=0.0)
            b_dl = tl.load(dL + j_off, mask=m_r[:, None], other=0.0)
            b_yq += tl.dot(b_da, b_kj, input_precision=DOT_PREC)
            b_yk += tl.dot(b_dl, b_kj, input_precision=DOT_PREC)
        b_er = tl.exp(tl.where(m_rd, b_g - b_ref[None, :], 0.0))
        b_yq *= b_er
        b_yk *= b_er
        # Diagonal sub-chunk, pairwise: b_e[r, i, d] = exp(G_r - G_i) for i <= r.
        m_3 = m_pair[:, :, None] & m_d[None, None, :]
        b_e = tl.exp(tl.where(m_3, b_g[:, None, :] - b_g[None, :, :], float("-inf")))
        b_ke3 = b_k[None, :, :] * b_e
        b_yq += tl.sum(b_daqk_d[:, :, None] * b_ke3, axis=1)
        b_yk += tl.sum(b_dl_d[:, :, None] * b_ke3, axis=1)

        # Column side: Z[i] = sum_{r >= i} D[r, i] X_r exp(G_r - G_i).
        b_zq = tl.zeros([BC, BKD], dtype=tl.float32)
        b_zk = tl.zeros([BC, BKD], dtype=tl.float32)
        for i_j in range(i_i + 1, NC):
            rows_j = start + i_j * BC + o_c
            m_j = rows_j < eos
            m_jd = m_j[:, None] & m_d[None, :]
            off_j = rows_j[:, None] * HK + i_h * K + cols[None, :]
            b_gj = tl.load(G + off_j, mask=m_jd, other=0.0)
            b_f = tl.exp(tl.where(m_jd, b_gj - b_refc[None, :], 0.0))
            b_qj = tl.load(q + off_j, mask=m_jd, other=0.0).to(tl.float32) * scale * b_f
            b_kj = tl.load(k + off_j, mask=m_jd, other=0.0).to(tl.float32) * b_f
            b_bj = tl.load(beta + rows_j * H + i_h, mask=m_j, other=0.0).to(tl.float32)
            j_off = rows_j[:, None] * H * BT + i_h * BT + i_i * BC + o_c[None, :]
            b_da = tl.load(dAqk + j_off, mask=m_j[:, None], other=0.0)
            b_dl = tl.load(dL + j_off, mask=m_j[:, None], other=0.0)
            b_zq += tl.dot(tl.trans(b_da), b_qj, input_precision=DOT_PREC)
            b_zk += tl.dot(tl.trans(b_dl), b_kj * b_bj[:, None], input_precision=DOT_PREC)
        b_ec = tl.exp(tl.where(m_rd, b_refc[None, :] - b_g, 0.0))
        b_zq *= b_ec
        b_zk *= b_ec
        b_zq += tl.sum(b_daqk_d[:, :, None] * b_q[:, None, :] * b_e, axis=0)
        b_zk += tl.sum(b_dl_d[:, :, None] * (b_k * b_beta[:, None])[:, None, :] * b_e, axis=0)

        b_dq = tl.load(dq + off_r, mask=m_rd, other=0.0) + b_yq
        b_dk = tl.load(dk + off_r, mask=m_rd, other=0.0) + b_beta[:, None] * b_yk + b_zq + b_zk
        b_dg = tl.load(dG + off_r, mask=m_rd, other=0.0)
        b_dg += b_q * b_yq + b_beta[:, None] * b_k * b_yk - b_k * (b_zq + b_zk)
        b_dbeta += tl.sum(b_k * b_yk, axis=1)
        tl.store(dq_out + off_r, (b_dq * scale).to(dq_out.dtype.element_ty), mask=m_rd)
        tl.store(dk_out + off_r, b_dk.to(dk_out.dtype.element_ty), mask=m_rd)
        tl.store(dG + off_r, b_dg, mask=m_rd)
    b_db = tl.load(dbeta + rows * H + i_h, mask=m_r, other=0.0) + b_dbeta
    tl.store(dbeta + rows * H + i_h, b_db, mask=m_r)


@autotune(_WARPS, key=["K"])
@triton.jit
def _reverse_cumsum_kernel(
    dG, dg, cu_seqlens, chunk_indices, H, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr
):
    """dg[r] = sum_{i >= r} dG[i] within each chunk. Grid ``(NT, H)``."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    rows = start + tl.arange(0, BT)
    cols = tl.arange(0, BK)
    mask = (rows < eos)[:, None] & (cols < K)[None, :]
    off = rows[:, None] * H * K + i_h * K + cols[None, :]
    b = tl.load(dG + off, mask=mask, other=0.0)
    b_rev = tl.sum(b, axis=0)[None, :] - tl.cumsum(b, axis=0) + b
    tl.store(dg + off, b_rev.to(dg.dtype.element_ty), mask=mask)


def chunk_kda_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    do: torch.Tensor,
    dht: torch.Tensor | None,
    cu_seqlens: torch.Tensor,
    chunk_indices: torch.Tensor,
    chunk_offsets: torch.Tensor,
    num_chunks: int,
) -> tuple[torch.Tensor, ...]:
    """Gradients of chunked KDA on packed, contiguous inputs (layout of ``chunk_kda_fwd``).

    Recomputes the forward intermediates (``G``, ``Aqk``, ``N``, ``W``, states, residuals) rather
    than keeping them from the forward. ``do``: ``[TT, H, V]``; ``dht``: ``[N, H, K, V]`` or None.

    Returns:
        ``(dq, dk, dv, dg, dbeta, dh0)`` in the dtypes of their inputs (dh0 fp32, or None
        without an initial state).
    """
    TT, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    BT, BC = CHUNK_SIZE, SUB_CHUNK_SIZE
    BK = next_pow2(K)
    prec = dot_precision(q.dtype)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    fwd = chunk_kda_fwd(
        q, k, v, g, beta, scale, initial_state, False, cu_seqlens, chunk_indices, chunk_offsets,
        num_chunks, for_backward=True,
    )
    dh = torch.empty(num_chunks, H, K, V, **f32)
    ddelta = torch.empty(TT, H, V, **f32)
    dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * H)
    _chunk_bwd_state_kernel[grid](
        fwd.qg, fwd.kg, fwd.W, fwd.G, fwd.Aqk, do, dh, dht, dh0, ddelta, cu_seqlens, chunk_offsets, H,
        K=K, V=V, BT=BT, BK=BK, USE_DHT=dht is not None, STORE_DH0=dh0 is not None, DOT_PREC=prec,
    )
    dq, dk, dv, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g)
    dbeta = torch.zeros(TT, H, **f32)
    if num_chunks > 0:
        dq_p, dk_p, dG = (torch.empty(TT, H, K, **f32) for _ in range(3))
        dAqk = torch.empty(TT, H, BT, **f32)
        dL = torch.empty(TT, H, BT, **f32)
        _bwd_local_kernel[(num_chunks, H)](
            q, k, v, fwd.G, beta, fwd.Ainv, fwd.h, dh, fwd.delta, ddelta, do, dq_p, dk_p, dv, dG,
            dbeta, dAqk, dL, cu_seqlens, chunk_indices, scale, H,
            K=K, V=V, BT=BT, BK=BK, DOT_PREC=prec,
        )
        _intra_bwd_kernel[(num_chunks, BT // BC, H)](
            q, k, fwd.G, beta, dAqk, dL, dq_p, dk_p, dG, dbeta, dq, dk, cu_seqlens, chunk_indices,
            scale, H, K=K, BT=BT, BC=BC, BKD=min(BK, 32), DOT_PREC=prec,
        )
        _reverse_cumsum_kernel[(num_chunks, H)](dG, dg, cu_seqlens, chunk_indices, H, K=K, BT=BT, BK=BK)
    return dq, dk, dv, dg, dbeta.to(beta.dtype), dh0
