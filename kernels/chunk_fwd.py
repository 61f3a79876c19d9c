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
        h     = S                           (chunk-start state, stored fp32)
        delta = U - W S                     (the delta-rule residual, stored fp32)
        S     = exp(G_last) * S + kg^T delta
    then all chunks in parallel:                                     (_chunk_fwd_o_kernel)
        o     = qg h + Aqk delta

Numerics: every exponent is a difference ``G_a - G_b`` with ``a >= b`` (so ``<= 0``). For two
different sub-chunks the pairwise factor is split at a reference row ``ref`` between them,
``exp(G_r - G_i) = exp(G_r - G_ref) exp(G_ref - G_i)``, both factors in ``(0, 1]``, which keeps
the products on tensor-core matmuls; inside a 16-row diagonal sub-chunk the factor is formed
pair by pair. Nothing overflows however strong the decay; the tail chunk and sequence ends are
masked (padded rows have ``k = v = beta = 0`` and are never stored).

GPU layout: the sequential kernel keeps the state as up to four ``[64, BV]`` key-block register
tiles and does only the work that must be sequential; the outputs, which need no carried
state once ``h`` is stored, come from a fully parallel kernel (the stored ``h`` and ``delta``
are also what the backward reads). Register / spill figures per kernel:
``python -m kimi_linear.kernels.compile_check``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import CHUNK_SIZE, SUB_CHUNK_SIZE, autotune, config_space, dot_precision, next_pow2

# First configs: picked from the sm_90 compile report (compile_check) at K = V = 128, bf16.
_WARPS = config_space(triton.Config({}, num_warps=4, num_stages=2), num_warps=(4, 2, 8))
_WARPS8 = config_space(triton.Config({}, num_warps=8, num_stages=2), num_warps=(8, 4))


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
    """G[r] = sum_{i <= r} g[i] within each chunk, in fp32, for BK key columns.

    Grid ``(NT, H, cdiv(K, BK))``."""
    i_t, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    rows = start + tl.arange(0, BT)
    cols = i_k * BK + tl.arange(0, BK)
    mask = (rows < eos)[:, None] & (cols < K)[None, :]
    off = rows[:, None] * H * K + i_h * K + cols[None, :]
    b_g = tl.load(g + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(G + off, tl.cumsum(b_g, axis=0), mask=mask)


@autotune(_WARPS, key=["K"])
@triton.jit
def _intra_fwd_kernel(
    q,
    k,
    G,
    beta,
    Akk,
    Aqk,
    qg,
    kg,
    cu_seqlens,
    chunk_indices,
    scale,
    H,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BKD: tl.constexpr,
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
        b_e = tl.exp(
            tl.where(m_pair[:, :, None], b_gd[:, None, :] - b_gd[None, :, :], float("-inf"))
        )
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


@autotune(_WARPS8, key=["K", "V"])
@triton.jit
def _solve_wy_kernel(
    k,
    v,
    G,
    beta,
    Akk,
    Ainv,
    W,
    U,
    Aqk,
    do,
    ddelta,
    cu_seqlens,
    chunk_indices,
    H,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DO: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """N = (I + Akk)^-1 by (block) forward substitution, then W = N (beta k exp(G)), U = N (beta v).

    W is formed BK key columns at a time (``BK <= 64``), U BV value columns at a time. Grid
    ``(NT, H)``. Ainv ``[TT, H, BT]``, W ``[TT, H, K]``, U ``[TT, H, V]``, all fp32. In the
    backward's recompute (``HAS_DO``) it also writes the chunk-local part of the residual
    gradient, ``ddelta = Aqk^T dO`` ``[TT, H, V]`` fp32, which the sequential backward kernel
    completes (so that kernel holds no ``[BT, BT]`` tile).
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
    # (The block masks are recomputed from b_a in each step rather than kept as extra [BT, BT]
    # register tiles.)
    blk = o_t // BC
    diag = blk[:, None] == blk[None, :]
    b_nd = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0)
    for r in range(1, BC):
        sel = ((o_t % BC) == r)[:, None]
        upd = tl.dot(tl.where(sel & diag, b_a, 0.0), b_nd, input_precision=DOT_PREC)
        b_nd = tl.where(sel, b_nd - upd, b_nd)
    # Then block forward substitution: N_b = Nd_b (e_b - sum_{j < b} Akk_bj N_j).
    b_n = b_nd
    for b in range(1, BT // BC):
        sel = (blk == b)[:, None] & (blk[None, :] < b)
        b_t = tl.dot(tl.where(sel, b_a, 0.0), b_n, input_precision=DOT_PREC)
        b_n -= tl.dot(b_nd, b_t, input_precision=DOT_PREC)
    tl.store(Ainv + a_off, b_n, mask=m_t[:, None])

    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
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
    if HAS_DO:
        # Aqk^T, loaded transposed (zero above the diagonal and in padded rows).
        b_at = tl.load(
            Aqk + rows[None, :] * H * BT + i_h * BT + o_t[:, None], mask=m_t[None, :], other=0.0
        )
        for i_v in range(0, tl.cdiv(V, BV)):
            cols_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (cols_v < V)[None, :]
            off_v = rows[:, None] * H * V + i_h * V + cols_v[None, :]
            b_do = tl.load(do + off_v, mask=m_tv, other=0.0).to(tl.float32)
            tl.store(ddelta + off_v, tl.dot(b_at, b_do, input_precision=DOT_PREC), mask=m_tv)


@triton.jit
def _load_tile(ptr, m_t, H, D: tl.constexpr, col0, BR: tl.constexpr, BD: tl.constexpr):
    """``[BR, BD]`` fp32 tile of a packed ``[TT, H, D]`` tensor; ``ptr`` points at the tile's first
    row in the head (``base + (row * H + i_h) * D``): a scalar int64 base with int32 in-tile
    offsets, so no 64-bit address tensor is held in registers. Rows outside ``m_t`` and columns
    ``col0 + j >= D`` read as 0."""
    o_r = tl.arange(0, BR)
    cols = col0 + tl.arange(0, BD)
    mask = m_t[:, None] & (cols < D)[None, :]
    return tl.load(ptr + o_r[:, None] * (H * D) + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )


@triton.jit
def _decay_row(G, last, i_h, H, K: tl.constexpr, col0, BD: tl.constexpr):
    """``exp(G_last)`` for key columns ``col0 + [0, BD)`` (1 past ``K``, where states are 0)."""
    cols = col0 + tl.arange(0, BD)
    return tl.exp(tl.load(G + last * H * K + i_h * K + cols, mask=cols < K, other=0.0))


@triton.jit
def _state_block(base, row0, cols_v, K: tl.constexpr, V: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask of the ``[BD, BV]`` block of a ``[K, V]`` fp32 state at key row ``row0``."""
    rows = row0 + tl.arange(0, BD)
    return base + rows[:, None] * V + cols_v[None, :], (rows < K)[:, None] & (cols_v < V)[None, :]


# The state is split along K into up to four [BKS, BV] blocks (BKS = min(BK, 64)), each its own
# register tile: no [BT, K] operand is ever live at once, which keeps K = 128 / 256 out of local
# memory. First config: no spills at K = V = 128 on sm_90 (139 KB shared memory); at K = 256 the
# 3-stage configs exceed an H100's shared memory and the autotuner skips them (num_stages=1 fits).
_STATE_CONFIGS = config_space(
    triton.Config({"BV": 32}, num_warps=8, num_stages=3),
    BV=(32, 64, 16),
    num_warps=(8, 4),
    num_stages=(3, 2, 1),
)


@autotune(_STATE_CONFIGS, key=["K", "V"])
@triton.jit
def _chunk_fwd_state_kernel(
    kg,
    W,
    U,
    G,
    h,
    h0,
    ht,
    delta,
    cu_seqlens,
    chunk_offsets,
    H,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BKS: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Sequential pass over the chunks of one sequence and head, for a block of BV value columns.

    Grid ``(cdiv(V, BV), N * H)``. The state ``[BK, BV]`` stays in fp32 registers as
    ``BK // BKS`` (1, 2 or 4) key blocks ``b_s1 .. b_s4``; per chunk it writes the chunk-start
    state ``h [NT, H, K, V]`` and the residual ``delta [TT, H, V]`` (both fp32), from which
    :func:`_chunk_fwd_o_kernel` forms the outputs of all chunks in parallel.
    """
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    o_t = tl.arange(0, BT)
    cols_v = i_v * BV + tl.arange(0, BV)
    m_v = cols_v < V
    seq_state = (i_n * H + i_h).to(tl.int64) * K * V
    b_s1 = tl.zeros([BKS, BV], dtype=tl.float32)
    if BK > BKS:
        b_s2 = tl.zeros([BKS, BV], dtype=tl.float32)
    if BK > 2 * BKS:
        b_s3 = tl.zeros([BKS, BV], dtype=tl.float32)
        b_s4 = tl.zeros([BKS, BV], dtype=tl.float32)
    if USE_H0:
        p, m = _state_block(h0 + seq_state, 0, cols_v, K, V, BKS)
        b_s1 += tl.load(p, mask=m, other=0.0)
        if BK > BKS:
            p, m = _state_block(h0 + seq_state, BKS, cols_v, K, V, BKS)
            b_s2 += tl.load(p, mask=m, other=0.0)
        if BK > 2 * BKS:
            p, m = _state_block(h0 + seq_state, 2 * BKS, cols_v, K, V, BKS)
            b_s3 += tl.load(p, mask=m, other=0.0)
            p, m = _state_block(h0 + seq_state, 3 * BKS, cols_v, K, V, BKS)
            b_s4 += tl.load(p, mask=m, other=0.0)
    for i_c in range(0, num_chunks):
        start = bos + i_c * BT
        m_t = o_t < (eos - start).to(tl.int32)
        k_c = (start * H + i_h) * K  # int64 scalar row bases, int32 offsets inside the chunk
        v_c = (start * H + i_h) * V
        h_c = h + ((boh + i_c) * H + i_h) * K * V
        p, m = _state_block(h_c, 0, cols_v, K, V, BKS)
        tl.store(p, b_s1, mask=m)
        if BK > BKS:
            p, m = _state_block(h_c, BKS, cols_v, K, V, BKS)
            tl.store(p, b_s2, mask=m)
        if BK > 2 * BKS:
            p, m = _state_block(h_c, 2 * BKS, cols_v, K, V, BKS)
            tl.store(p, b_s3, mask=m)
            p, m = _state_block(h_c, 3 * BKS, cols_v, K, V, BKS)
            tl.store(p, b_s4, mask=m)
        m_tv = m_t[:, None] & m_v[None, :]
        off_v = o_t[:, None] * (H * V) + cols_v[None, :]
        # delta = U - W S, one key block at a time.
        b_d = tl.load(U + v_c + off_v, mask=m_tv, other=0.0)
        b_d -= tl.dot(_load_tile(W + k_c, m_t, H, K, 0, BT, BKS), b_s1, input_precision=DOT_PREC)
        if BK > BKS:
            b_d -= tl.dot(
                _load_tile(W + k_c, m_t, H, K, BKS, BT, BKS), b_s2, input_precision=DOT_PREC
            )
        if BK > 2 * BKS:
            b_d -= tl.dot(
                _load_tile(W + k_c, m_t, H, K, 2 * BKS, BT, BKS), b_s3, input_precision=DOT_PREC
            )
            b_d -= tl.dot(
                _load_tile(W + k_c, m_t, H, K, 3 * BKS, BT, BKS), b_s4, input_precision=DOT_PREC
            )
        tl.store(delta + v_c + off_v, b_d, mask=m_tv)
        # S = exp(G_last) S + kg^T delta
        last = tl.minimum(start + BT, eos) - 1
        b_s1 = b_s1 * _decay_row(G, last, i_h, H, K, 0, BKS)[:, None]
        b_s1 += tl.dot(
            tl.trans(_load_tile(kg + k_c, m_t, H, K, 0, BT, BKS)), b_d, input_precision=DOT_PREC
        )
        if BK > BKS:
            b_s2 = b_s2 * _decay_row(G, last, i_h, H, K, BKS, BKS)[:, None]
            b_s2 += tl.dot(
                tl.trans(_load_tile(kg + k_c, m_t, H, K, BKS, BT, BKS)),
                b_d,
                input_precision=DOT_PREC,
            )
        if BK > 2 * BKS:
            b_s3 = b_s3 * _decay_row(G, last, i_h, H, K, 2 * BKS, BKS)[:, None]
            b_s3 += tl.dot(
                tl.trans(_load_tile(kg + k_c, m_t, H, K, 2 * BKS, BT, BKS)),
                b_d,
                input_precision=DOT_PREC,
            )
            b_s4 = b_s4 * _decay_row(G, last, i_h, H, K, 3 * BKS, BKS)[:, None]
            b_s4 += tl.dot(
                tl.trans(_load_tile(kg + k_c, m_t, H, K, 3 * BKS, BT, BKS)),
                b_d,
                input_precision=DOT_PREC,
            )
    if STORE_FINAL:
        p, m = _state_block(ht + seq_state, 0, cols_v, K, V, BKS)
        tl.store(p, b_s1, mask=m)
        if BK > BKS:
            p, m = _state_block(ht + seq_state, BKS, cols_v, K, V, BKS)
            tl.store(p, b_s2, mask=m)
        if BK > 2 * BKS:
            p, m = _state_block(ht + seq_state, 2 * BKS, cols_v, K, V, BKS)
            tl.store(p, b_s3, mask=m)
            p, m = _state_block(ht + seq_state, 3 * BKS, cols_v, K, V, BKS)
            tl.store(p, b_s4, mask=m)


_O_CONFIGS = config_space(
    triton.Config({"BV": 64}, num_warps=8, num_stages=2),
    BV=(64, 32, 128),
    num_warps=(8, 4),
    num_stages=(2, 3),
)


@autotune(_O_CONFIGS, key=["K", "V"])
@triton.jit
def _chunk_fwd_o_kernel(
    qg,
    Aqk,
    h,
    delta,
    o,
    cu_seqlens,
    chunk_indices,
    H,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BKS: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Outputs of one chunk and value block, ``o = qg h + Aqk delta``. Grid ``(cdiv(V, BV), NT, H)``.

    Every chunk is independent once the sequential kernel has stored the chunk-start states
    ``h`` and residuals ``delta``, so this runs with full parallelism; the key dimension is
    walked in ``BKS`` blocks (a ``[BT, BKS]`` and a ``[BKS, BV]`` operand live at a time).
    """
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < (eos - start).to(tl.int32)
    k_c, v_c, a_c = (start * H + i_h) * K, (start * H + i_h) * V, (start * H + i_h) * BT
    cols_v = i_v * BV + tl.arange(0, BV)
    m_tv = m_t[:, None] & (cols_v < V)[None, :]
    off_v = o_t[:, None] * (H * V) + cols_v[None, :]
    b_a = tl.load(Aqk + a_c + o_t[:, None] * (H * BT) + o_t[None, :], mask=m_t[:, None], other=0.0)
    b_o = tl.dot(b_a, tl.load(delta + v_c + off_v, mask=m_tv, other=0.0), input_precision=DOT_PREC)
    h_c = h + (i_t * H + i_h).to(tl.int64) * K * V
    for i_k in range(0, tl.cdiv(K, BKS)):
        p, m = _state_block(h_c, i_k * BKS, cols_v, K, V, BKS)
        b_h = tl.load(p, mask=m, other=0.0)
        b_o += tl.dot(
            _load_tile(qg + k_c, m_t, H, K, i_k * BKS, BT, BKS), b_h, input_precision=DOT_PREC
        )
    tl.store(o + v_c + off_v, b_o.to(o.dtype.element_ty), mask=m_tv)


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
    ddelta: torch.Tensor | None = None


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
    do: torch.Tensor | None = None,
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
            residuals ``delta [TT, H, V]``). Either way the chunk-start states are materialised
            (fp32, ``NT * H * K * V * 4`` bytes; freed on return when not for the backward): the
            output kernel reads them, in parallel over chunks.
        do: ``[TT, H, V]`` output gradient (backward only): also return ``ddelta = Aqk^T dO``
            per chunk (``[TT, H, V]`` fp32), the chunk-local part of the residual gradient.
    """
    TT, H, K = q.shape
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    BT, BC = CHUNK_SIZE, SUB_CHUNK_SIZE
    BK, BVW = next_pow2(K), min(next_pow2(V), 64)
    BKS = min(BK, 64)  # key block of the state kernels
    prec = dot_precision(q.dtype)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    G = torch.empty(TT, H, K, **f32)
    Akk = torch.empty(TT, H, BT, **f32)
    Aqk = torch.empty(TT, H, BT, **f32)
    Ainv = torch.empty(TT, H, BT, **f32)
    W = torch.empty(TT, H, K, **f32)
    U = torch.empty(TT, H, V, **f32)
    ddelta = None if do is None else torch.empty(TT, H, V, **f32)
    qg, kg = torch.empty_like(q), torch.empty_like(k)
    if num_chunks > 0:
        BKC = min(BK, 64)
        _chunk_cumsum_kernel[(num_chunks, H, triton.cdiv(K, BKC))](
            g, G, cu_seqlens, chunk_indices, H, K=K, BT=BT, BK=BKC
        )
        _intra_fwd_kernel[(num_chunks, BT // BC, H)](
            q,
            k,
            G,
            beta,
            Akk,
            Aqk,
            qg,
            kg,
            cu_seqlens,
            chunk_indices,
            scale,
            H,
            K=K,
            BT=BT,
            BC=BC,
            BK=BK,
            BKD=min(BK, 32),
            DOT_PREC=prec,
        )
        _solve_wy_kernel[(num_chunks, H)](
            k,
            v,
            G,
            beta,
            Akk,
            Ainv,
            W,
            U,
            Aqk,
            do,
            ddelta,
            cu_seqlens,
            chunk_indices,
            H,
            K=K,
            V=V,
            BT=BT,
            BC=BC,
            BK=min(BK, 64),
            BV=BVW,
            HAS_DO=do is not None,
            DOT_PREC=prec,
        )
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    h = torch.empty(num_chunks, H, K, V, **f32)
    delta = torch.empty(TT, H, V, **f32)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * H)
    _chunk_fwd_state_kernel[grid](
        kg,
        W,
        U,
        G,
        h,
        initial_state,
        ht,
        delta,
        cu_seqlens,
        chunk_offsets,
        H,
        K=K,
        V=V,
        BT=BT,
        BK=BK,
        BKS=BKS,
        USE_H0=initial_state is not None,
        STORE_FINAL=output_final_state,
        DOT_PREC=prec,
    )
    o = torch.empty(0, device=dev)
    if not for_backward:
        o = torch.empty_like(v)
        if num_chunks > 0:
            grid = lambda meta: (triton.cdiv(V, meta["BV"]), num_chunks, H)
            _chunk_fwd_o_kernel[grid](
                qg,
                Aqk,
                h,
                delta,
                o,
                cu_seqlens,
                chunk_indices,
                H,
                K=K,
                V=V,
                BT=BT,
                BKS=BKS,
                DOT_PREC=prec,
            )
    if for_backward:
        return ChunkForward(o, ht, G, Aqk, Ainv, W, qg, kg, h, delta, ddelta)
    return ChunkForward(o, ht)
