"""Backward kernels of chunked KDA.

One job: the backward pass's Triton kernels and their launcher (:func:`chunk_kda_bwd`).

Notation of :mod:`kimi_linear.kernels.chunk_fwd` (per head and chunk; ``S0`` the chunk-start
state, ``S1`` the chunk-end state, ``q^ = scale * q``, ``E = exp(G)``, ``El = exp(G_last - G)``,
``R = v - (k E) S0`` so that ``delta = N diag(beta) R``). Given ``dO`` and the gradient ``dS1``
of the chunk-end state:

1. ``_chunk_bwd_state_kernel`` walks the chunks backwards (fp32 state gradient in registers,
   split into key blocks of at most 64 rows; one program per sequence, head, value block)::

       d_delta = Aqk^T dO + kg dS1                  (kg = k El, qg = q^ E from the forward)
       dS0     = exp(G_last) dS1 + qg^T dO - W^T d_delta

   (``Aqk^T dO`` comes from the forward's recompute kernel; ``d_delta`` is stored in the input
   dtype, the dtype of its one use; no kernel updates a ``[TT, H, V]`` buffer in place, so
   autotuning never copies one)

2. ``_bwd_dv_kernel`` (one program per chunk), the terms that contract over V, with
   ``dRt = N^T d_delta``::

       dv = beta dRt,   dbeta = rowsum(R * dRt),   dR = beta dRt (kept, fp32)
       dAqk = tril(dO delta^T),   dL = -strict_tril(dRt delta^T)

3. ``_intra_bwd_kernel`` (one program per 16-row sub-chunk) applies the pairwise matrices,
   ``P(D, X)[r] = sum_i D[r, i] X_i exp(G_r - G_i)`` and its transpose ``P^T``::

       Yq = P(dAqk, k), Yk = P(dL, k), Zq = P^T(dAqk, q^), Zk = P^T(dL, beta k)
       partials: dq^ = Yq,  dk = beta Yk + Zq + Zk,  dG = q^ Yq + beta k Yk - k (Zq + Zk)
       dbeta += rowsum(k Yk)

   with the same overflow-free factorisation as the forward (reference row between
   sub-chunks, pairwise exponents inside a diagonal sub-chunk, formed one partner row at a time
   on ``[16, BKD]`` tiles; the diagonal of Aqk contributes to dq and dk but cancels exactly in
   dG).
4. ``_bwd_dqkg_kernel`` (one program per chunk and block of key columns) adds the inter-chunk
   terms and finishes dq, dk, dg::

       X1 = dO S0^T, X2 = delta dS1^T, X3 = dR S0^T
       dq = scale (dq^ + X1 E),   dk += X2 El - X3 E,   dG += X1 q^ E - X2 k El - X3 k E
       dG_last += colsum(X2 k El) + exp(G_last) rowsum(S0 * dS1)
       dg = reverse cumsum of dG within the chunk

GPU layout (guided by ``compile_check``'s register / spill report, no GPU needed): sequential
state kernels hold the state as ``[64, BV]`` key blocks; per-chunk work that would hold several
``[BT, K]`` fp32 tiles is split by what it contracts over (V in step 2, key blocks in step 4);
in-chunk addresses are int32 offsets from an int64 scalar row base. First autotune configs
(what the interpreter runs and ``compile_check`` reports) are one warpgroup (4 warps): at
K = V = 128 bf16 on sm_90 every kernel is spill-free with at least 2 CTAs per SM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk_fwd import (
    InKernelGate,
    _chunk_bounds,
    _decay_row,
    _load_op,
    _load_tile,
    _softplus,
    _state_block,
    chunk_kda_fwd,
    gate_constexprs,
    gate_launch_args,
)
from .split import SegmentPlan, fold_states
from .utils import (
    CHUNK_SIZE,
    NO_SPECIALIZE,
    SUB_CHUNK_SIZE,
    TUNE_KEYS,
    autotune,
    checked_grid,
    config_space,
    dot_precision,
    next_pow2,
    state_dtype,
    tune_buckets,
)

# First configs of the backward kernels: one warpgroup (4 warps) wherever the tiles fit it
# without spills, so that at least two CTAs share an SM (compile_check --targets at
# K = V = 128 bf16 on sm_90; also spill-free on sm_80).
_BWD_STATE_CONFIGS = config_space(
    triton.Config({"BV": 16}, num_warps=4, num_stages=2),
    BV=(16, 32, 64),
    num_warps=(4, 8),
    num_stages=(2, 3, 1),
)


@autotune(_BWD_STATE_CONFIGS, key=["K", "V", *TUNE_KEYS, "STORE_CHUNKS"], suite=(0, 8))  # +BV32
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _chunk_bwd_state_kernel(
    qg,
    kg,
    W,
    Gl,
    do,
    dh,
    dht,
    dh0,
    ddelta,
    dd,
    cu_seqlens,
    chunk_offsets,
    H,
    T_BUCKET,
    NH_BUCKET,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BKS: tl.constexpr,
    BV: tl.constexpr,
    USE_DHT: tl.constexpr,
    STORE_DH0: tl.constexpr,
    DOT_PREC: tl.constexpr,
    STORE_CHUNKS: tl.constexpr = True,
):
    """Reverse pass over the chunks: chunk-end state gradients ``dh`` and ``d_delta``.

    Grid ``(cdiv(V, BV) * N * H,)``, value blocks fastest (``utils.checked_grid``);
    ``dh [NT, H, K, V]`` in the input dtype (the state gradient is carried in fp32 registers).
    Reads the chunk-local ``ddelta = Aqk^T dO [TT, H, V]`` (fp32) and writes the complete
    ``dd = ddelta + kg dS1`` to a separate buffer in the input dtype (its one consumer,
    :func:`_bwd_dv_kernel`, rounds it to that dtype for a tensor-core product anyway). Nothing is
    updated in place, so the autotuner's repeated benchmark launches need no copy of a
    ``[TT, H, V]`` buffer (``restore_value``). The state gradient ``[BK, BV]`` is held as
    ``BK // BKS`` key blocks ``b_ds1 .. b_ds4`` (as the forward state), so only ``[BT, BKS]``
    operands are live at a time.

    ``STORE_CHUNKS=False`` (the first pass of a split run, :mod:`kimi_linear.kernels.split`):
    nothing per chunk is stored, only the gradient at the start (``dh0``).
    """
    NV: tl.constexpr = (V + BV - 1) // BV
    i_v, i_nh = tl.program_id(0) % NV, tl.program_id(0) // NV
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    o_t = tl.arange(0, BT)
    cols_v = i_v * BV + tl.arange(0, BV)
    m_v = cols_v < V
    seq_state = (i_n * H + i_h).to(tl.int64) * K * V
    b_ds1 = tl.zeros([BKS, BV], dtype=tl.float32)
    if BK > BKS:
        b_ds2 = tl.zeros([BKS, BV], dtype=tl.float32)
    if BK > 2 * BKS:
        b_ds3 = tl.zeros([BKS, BV], dtype=tl.float32)
        b_ds4 = tl.zeros([BKS, BV], dtype=tl.float32)
    if USE_DHT:
        p, m = _state_block(dht + seq_state, 0, cols_v, K, V, BKS)
        b_ds1 += tl.load(p, mask=m, other=0.0)
        if BK > BKS:
            p, m = _state_block(dht + seq_state, BKS, cols_v, K, V, BKS)
            b_ds2 += tl.load(p, mask=m, other=0.0)
        if BK > 2 * BKS:
            p, m = _state_block(dht + seq_state, 2 * BKS, cols_v, K, V, BKS)
            b_ds3 += tl.load(p, mask=m, other=0.0)
            p, m = _state_block(dht + seq_state, 3 * BKS, cols_v, K, V, BKS)
            b_ds4 += tl.load(p, mask=m, other=0.0)
    for i_r in range(0, num_chunks):
        i_c = num_chunks - 1 - i_r
        start = bos + i_c * BT
        m_t = o_t < (eos - start).to(tl.int32)
        k_c = (start * H + i_h) * K  # int64 scalar row bases, int32 offsets inside the chunk
        v_c = (start * H + i_h) * V
        if STORE_CHUNKS:
            dh_c = dh + ((boh + i_c) * H + i_h) * K * V
            p_c, m_c = _state_block(dh_c, 0, cols_v, K, V, BKS)
            tl.store(p_c, b_ds1, mask=m_c)
            if BK > BKS:
                p_c, m_c = _state_block(dh_c, BKS, cols_v, K, V, BKS)
                tl.store(p_c, b_ds2, mask=m_c)
            if BK > 2 * BKS:
                p_c, m_c = _state_block(dh_c, 2 * BKS, cols_v, K, V, BKS)
                tl.store(p_c, b_ds3, mask=m_c)
                p_c, m_c = _state_block(dh_c, 3 * BKS, cols_v, K, V, BKS)
                tl.store(p_c, b_ds4, mask=m_c)
        m_tv = m_t[:, None] & m_v[None, :]
        off_v = o_t[:, None] * (H * V) + cols_v[None, :]
        b_do = tl.load(do + v_c + off_v, mask=m_tv, other=0.0).to(tl.float32)
        # d_delta = Aqk^T dO + kg dS1 (the first term, chunk-local, is already in ddelta)
        b_dd = tl.load(ddelta + v_c + off_v, mask=m_tv, other=0.0)
        b_dd += tl.dot(
            _load_op(kg + k_c, m_t, H, K, 0, BT, BKS).to(dh.dtype.element_ty),
            b_ds1.to(dh.dtype.element_ty),
            input_precision=DOT_PREC,
        )
        if BK > BKS:
            b_dd += tl.dot(
                _load_op(kg + k_c, m_t, H, K, BKS, BT, BKS).to(dh.dtype.element_ty),
                b_ds2.to(dh.dtype.element_ty),
                input_precision=DOT_PREC,
            )
        if BK > 2 * BKS:
            b_dd += tl.dot(
                _load_op(kg + k_c, m_t, H, K, 2 * BKS, BT, BKS).to(dh.dtype.element_ty),
                b_ds3.to(dh.dtype.element_ty),
                input_precision=DOT_PREC,
            )
            b_dd += tl.dot(
                _load_op(kg + k_c, m_t, H, K, 3 * BKS, BT, BKS).to(dh.dtype.element_ty),
                b_ds4.to(dh.dtype.element_ty),
                input_precision=DOT_PREC,
            )
        if STORE_CHUNKS:
            tl.store(dd + v_c + off_v, b_dd.to(dd.dtype.element_ty), mask=m_tv)
        # dS0 = exp(G_last) dS1 + qg^T dO - W^T d_delta
        last = boh + i_c  # row of Gl
        b_ds1 = _state_grad_step(
            b_ds1, qg + k_c, W + k_c, dh, Gl, m_t, last, i_h, H, b_do, b_dd, K, 0, BT, BKS, DOT_PREC
        )
        if BK > BKS:
            b_ds2 = _state_grad_step(
                b_ds2,
                qg + k_c,
                W + k_c,
                dh,
                Gl,
                m_t,
                last,
                i_h,
                H,
                b_do,
                b_dd,
                K,
                BKS,
                BT,
                BKS,
                DOT_PREC,
            )
        if BK > 2 * BKS:
            b_ds3 = _state_grad_step(
                b_ds3,
                qg + k_c,
                W + k_c,
                dh,
                Gl,
                m_t,
                last,
                i_h,
                H,
                b_do,
                b_dd,
                K,
                2 * BKS,
                BT,
                BKS,
                DOT_PREC,
            )
            b_ds4 = _state_grad_step(
                b_ds4,
                qg + k_c,
                W + k_c,
                dh,
                Gl,
                m_t,
                last,
                i_h,
                H,
                b_do,
                b_dd,
                K,
                3 * BKS,
                BT,
                BKS,
                DOT_PREC,
            )
    if STORE_DH0:
        p, m = _state_block(dh0 + seq_state, 0, cols_v, K, V, BKS)
        tl.store(p, b_ds1, mask=m)
        if BK > BKS:
            p, m = _state_block(dh0 + seq_state, BKS, cols_v, K, V, BKS)
            tl.store(p, b_ds2, mask=m)
        if BK > 2 * BKS:
            p, m = _state_block(dh0 + seq_state, 2 * BKS, cols_v, K, V, BKS)
            tl.store(p, b_ds3, mask=m)
            p, m = _state_block(dh0 + seq_state, 3 * BKS, cols_v, K, V, BKS)
            tl.store(p, b_ds4, mask=m)


@triton.jit
def _state_grad_step(
    b_ds,
    qg,
    W,
    dh,
    G,
    m_t,
    last,
    i_h,
    H,
    b_do,
    b_dd,
    K: tl.constexpr,
    col0,
    BT: tl.constexpr,
    BKS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One key block of ``dS0 = exp(G_last) dS1 + qg^T dO - W^T d_delta`` (``qg``, ``W`` point at
    the chunk's first row in the head; ``dh`` only gives the
    operand dtype of the state-gradient products)."""
    b_ds = b_ds * _decay_row(G, last, i_h, H, K, col0, BKS)[:, None]
    b_ds += tl.dot(
        tl.trans(_load_op(qg, m_t, H, K, col0, BT, BKS)),
        b_do.to(qg.dtype.element_ty),
        input_precision=DOT_PREC,
    )
    b_ds -= tl.dot(
        tl.trans(_load_op(W, m_t, H, K, col0, BT, BKS)).to(dh.dtype.element_ty),
        b_dd.to(dh.dtype.element_ty),
        input_precision=DOT_PREC,
    )
    return b_ds


_DV_CONFIGS = config_space(
    triton.Config({"BV": 32}, num_warps=4, num_stages=2),
    BV=(32, 16, 64),
    num_warps=(4, 8),
    num_stages=(2, 1),
)


@autotune(_DV_CONFIGS, key=["K", "V", *TUNE_KEYS], suite=(0, 4))  # + BV=16 w4 s2
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_dv_kernel(
    k,
    v,
    G,
    beta,
    Ainv,
    h,
    delta,
    dd,
    dr,
    do,
    dv,
    dbeta,
    dAqk,
    dL,
    cu_seqlens,
    chunk_indices,
    H,
    HQ,
    T_BUCKET,
    NH_BUCKET,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BKS: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Per-chunk terms that contract over the value dim. Grid ``(NT, H)``.

    With ``dRt = N^T d_delta`` per value block: ``dv = beta dRt`` (final), the first dbeta
    partial ``rowsum(R * dRt)`` with ``R = v - (k E) S0`` (stored, the intra kernel adds to it),
    ``dAqk = tril(dO delta^T)`` and ``dL = -strict_tril(dRt delta^T)`` ``[TT, H, BT]`` fp32.
    ``R`` is formed key block by key block, so no ``[BT, K]`` operand is held across the loop.
    Reads ``dd`` (``d_delta``, input dtype) and writes ``dr = beta dRt`` in fp32 (to the buffer
    that held ``Aqk^T dO``), the operand :func:`_bwd_dqkg_kernel` needs: nothing in place.
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    o_t = tl.arange(0, BT)
    m_t = o_t < (eos - start).to(tl.int32)
    b_beta = tl.load(beta + start * H + i_h + o_t * H, mask=m_t, other=0.0).to(tl.float32)
    k_c, v_c = (start * H + i_h) * K, (start * H + i_h) * V
    kq_c = (start * HQ + i_h // (H // HQ)) * K  # k has HQ heads (GVA)
    a_base = (start * H + i_h) * BT  # int64 scalar row bases, int32 offsets inside the chunk
    a_off = o_t[:, None] * (H * BT) + o_t[None, :]
    b_n = tl.load(Ainv + a_base + a_off, mask=m_t[:, None], other=0.0)
    b_daqk = tl.zeros([BT, BT], dtype=tl.float32)
    b_dl = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    h_c = h + (i_t * H + i_h).to(tl.int64) * K * V
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (cols_v < V)[None, :]
        off_v = o_t[:, None] * (H * V) + cols_v[None, :]
        b_d = tl.load(delta + v_c + off_v, mask=m_tv, other=0.0)
        b_do = tl.load(do + v_c + off_v, mask=m_tv, other=0.0).to(tl.float32)
        b_daqk += tl.dot(
            b_do.to(k.dtype.element_ty),
            (tl.trans(b_d)).to(k.dtype.element_ty),
            input_precision=DOT_PREC,
        )
        b_drt = tl.dot(
            (tl.trans(b_n)).to(k.dtype.element_ty),
            (tl.load(dd + v_c + off_v, mask=m_tv, other=0.0)).to(k.dtype.element_ty),
            input_precision=DOT_PREC,
        )
        b_dl += tl.dot(
            b_drt.to(k.dtype.element_ty),
            (tl.trans(b_d)).to(k.dtype.element_ty),
            input_precision=DOT_PREC,
        )
        b_dr = b_drt * b_beta[:, None]
        tl.store(dv + v_c + off_v, b_dr.to(dv.dtype.element_ty), mask=m_tv)
        tl.store(dr + v_c + off_v, b_dr, mask=m_tv)
        b_r = tl.load(v + v_c + off_v, mask=m_tv, other=0.0).to(tl.float32)
        for i_k in range(0, tl.cdiv(K, BKS)):
            b_k = _load_tile(k + kq_c, m_t, HQ, K, i_k * BKS, BT, BKS)
            b_g = _load_tile(G + k_c, m_t, H, K, i_k * BKS, BT, BKS)
            p, m = _state_block(h_c, i_k * BKS, cols_v, K, V, BKS)
            b_r -= tl.dot(
                (b_k * tl.exp(b_g)).to(h.dtype.element_ty),
                tl.load(p, mask=m, other=0.0).to(h.dtype.element_ty),
                input_precision=DOT_PREC,
            )
        b_dbeta += tl.sum(b_r * b_drt, axis=1)
    tl.store(
        dAqk + a_base + a_off,
        tl.where(o_t[:, None] >= o_t[None, :], b_daqk, 0.0),
        mask=m_t[:, None],
    )
    tl.store(
        dL + a_base + a_off, tl.where(o_t[:, None] > o_t[None, :], -b_dl, 0.0), mask=m_t[:, None]
    )
    tl.store(dbeta + start * H + i_h + o_t * H, b_dbeta, mask=m_t)


_DQKG_CONFIGS = config_space(
    triton.Config({"BKB": 32, "BV": 32}, num_warps=4, num_stages=2),
    BKB=(32, 64),
    BV=(32, 64),
    num_warps=(4, 8),
    num_stages=(2, 1),
)


@autotune(_DQKG_CONFIGS, key=["K", "V", *TUNE_KEYS], suite=(0, 4))  # + BV=64
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _bwd_dqkg_kernel(
    q,
    k,
    G,
    h,
    dh,
    delta,
    dr,
    do,
    dq_p,
    dk_p,
    dG_p,
    dq,
    dk,
    dg,
    g,
    A_log,
    dt_bias,
    dA_p,
    dbias_p,
    cu_seqlens,
    chunk_indices,
    scale,
    lower_bound,
    H,
    HQ,
    T_BUCKET,
    NH_BUCKET,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BKB: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
    GATE: tl.constexpr = 0,
    HAS_A: tl.constexpr = False,
    HAS_BIAS: tl.constexpr = False,
):
    """Inter-chunk terms of dq, dk, dg for a block of BKB key columns; finalises all three.

    Grid ``(NT * cdiv(K, BKB), H)``, key blocks fastest: the chunk count is on axis 0 (limit
    2**31 - 1 blocks; axis 1 allows 65,535), see ``utils.checked_grid``. With
    ``X1 = dO S0^T``, ``X2 = delta dS1^T``, ``X3 = dR S0^T`` (``dR = beta N^T d_delta``, left by :func:`_bwd_dv_kernel`) accumulated
    over value blocks, adds the pairwise partials of the
    intra kernel (``dq_p``, ``dk_p``, ``dG_p``), writes dq, dk in the input dtype, and
    ``dg`` = the reverse cumulative sum of dG within the chunk.

    With the in-kernel gate (``GATE``, ``g`` the raw gate projection), ``dg`` is chained
    through the gate (:func:`_gate_bwd`) into the raw gate's gradient, and the column sums over
    the chunk's rows of the ``A_log`` and ``dt_bias`` gradients go to ``dA_p`` / ``dbias_p``
    (``[NT, H, K]`` fp32; the caller sums them over chunks and columns).
    """
    NK: tl.constexpr = (K + BKB - 1) // BKB
    i_k, i_t, i_h = tl.program_id(0) % NK, tl.program_id(0) // NK, tl.program_id(1)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    o_t = tl.arange(0, BT)
    rows = start + o_t
    m_t = rows < eos
    cols_k = i_k * BKB + tl.arange(0, BKB)
    m_k = cols_k < K
    b_x1 = tl.zeros([BT, BKB], dtype=tl.float32)
    b_x2 = tl.zeros([BT, BKB], dtype=tl.float32)
    b_x3 = tl.zeros([BT, BKB], dtype=tl.float32)
    b_sds = tl.zeros([BKB], dtype=tl.float32)
    s_base = (i_t * H + i_h).to(tl.int64) * K * V
    v_c = (start * H + i_h) * V  # int64 scalar row base, int32 offsets inside the chunk
    for i_v in range(0, tl.cdiv(V, BV)):
        cols_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (cols_v < V)[None, :]
        off_v = o_t[:, None] * (H * V) + cols_v[None, :]
        p, m_s = _state_block(h + s_base, i_k * BKB, cols_v, K, V, BKB)
        b_h = tl.load(p, mask=m_s, other=0.0).to(tl.float32)
        p, m_s = _state_block(dh + s_base, i_k * BKB, cols_v, K, V, BKB)
        b_dh = tl.load(p, mask=m_s, other=0.0).to(tl.float32)
        b_do = tl.load(do + v_c + off_v, mask=m_tv, other=0.0).to(tl.float32)
        b_x1 += tl.dot(
            b_do.to(h.dtype.element_ty),
            tl.trans(b_h).to(h.dtype.element_ty),
            input_precision=DOT_PREC,
        )
        b_d = tl.load(delta + v_c + off_v, mask=m_tv, other=0.0)
        b_x2 += tl.dot(
            b_d.to(dh.dtype.element_ty),
            tl.trans(b_dh).to(dh.dtype.element_ty),
            input_precision=DOT_PREC,
        )
        b_dr = tl.load(dr + v_c + off_v, mask=m_tv, other=0.0)
        b_x3 += tl.dot(
            b_dr.to(h.dtype.element_ty),
            tl.trans(b_h).to(h.dtype.element_ty),
            input_precision=DOT_PREC,
        )
        b_sds += tl.sum(b_h * b_dh, axis=1)
    m_tk = m_t[:, None] & m_k[None, :]
    off_k = rows[:, None] * H * K + i_h * K + cols_k[None, :]
    off_kq = rows[:, None] * HQ * K + (i_h // (H // HQ)) * K + cols_k[None, :]
    b_k = tl.load(k + off_kq, mask=m_tk, other=0.0).to(tl.float32)
    b_g = tl.load(G + off_k, mask=m_tk, other=0.0)
    last = tl.minimum(start + BT, eos) - 1
    b_gl = tl.load(G + last * H * K + i_h * K + cols_k, mask=m_k, other=0.0)
    b_e = tl.exp(b_g)
    b_el = tl.exp(tl.where(m_tk, b_gl[None, :] - b_g, 0.0))
    b_x2k = b_x2 * b_k * b_el
    b_x3e = b_x3 * b_e
    b_q = tl.load(q + off_kq, mask=m_tk, other=0.0).to(tl.float32) * scale
    b_dq = b_x1 * b_e + tl.load(dq_p + off_k, mask=m_tk, other=0.0)
    tl.store(dq + off_k, (b_dq * scale).to(dq.dtype.element_ty), mask=m_tk)
    b_dk = b_x2 * b_el - b_x3e + tl.load(dk_p + off_k, mask=m_tk, other=0.0)
    tl.store(dk + off_k, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    b_dg = b_x1 * b_q * b_e - b_x2k - b_x3e * b_k + tl.load(dG_p + off_k, mask=m_tk, other=0.0)
    b_dgl = tl.sum(b_x2k, axis=0) + tl.exp(b_gl) * b_sds
    b_dg = tl.where((rows == last)[:, None], b_dg + b_dgl[None, :], b_dg)
    # dg = reverse cumulative sum of dG within the chunk (padded rows hold 0).
    b_dg = tl.sum(b_dg, axis=0)[None, :] - tl.cumsum(b_dg, axis=0) + b_dg
    if GATE > 0:
        b_f = tl.load(g + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_dg, b_da = _gate_bwd(
            b_f, b_dg, A_log, dt_bias, lower_bound, i_h, cols_k, K, GATE, HAS_A, HAS_BIAS
        )
        b_dg = tl.where(m_tk, b_dg, 0.0)
        p_part = (i_t * H + i_h).to(tl.int64) * K + cols_k
        tl.store(dA_p + p_part, tl.sum(tl.where(m_tk, b_da, 0.0), axis=0), mask=m_k)
        tl.store(dbias_p + p_part, tl.sum(b_dg, axis=0), mask=m_k)
    tl.store(dg + off_k, b_dg.to(dg.dtype.element_ty), mask=m_tk)


@triton.jit
def _gate_bwd(
    b_f,
    b_dy,
    A_log,
    dt_bias,
    lower_bound,
    i_h,
    cols,
    K: tl.constexpr,
    GATE: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Chain the log decay's gradient ``b_dy`` through the gate of ``chunk_fwd._gate_fwd``:
    returns ``(d f, d A_log)`` elementwise (fp32 tiles). With ``x = f + dt_bias``, ``a =
    exp(A_log)``: softplus gate ``y = -a softplus(x)``, ``dy/dx = -a sigmoid(x)``,
    ``dy/dA_log = y``; safe gate ``y = lb sigmoid(a x)``, ``dy/dx = lb s (1 - s) a``,
    ``dy/dA_log = lb s (1 - s) a x``. ``d dt_bias`` is ``d f`` summed over tokens."""
    b_x = b_f
    if HAS_BIAS:
        b_x += tl.load(dt_bias + i_h * K + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    b_a = 1.0
    if HAS_A:
        b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    if GATE == 1:
        b_df = b_dy * (-b_a * tl.sigmoid(b_x))
        b_da = b_dy * (-b_a * _softplus(b_x))
    else:
        b_s = tl.sigmoid(b_a * b_x)
        b_ds = b_dy * (lower_bound * b_s * (1.0 - b_s))
        b_df = b_ds * b_a
        b_da = b_ds * b_a * b_x
    return b_df, b_da


_INTRA_BWD_CONFIGS = config_space(
    triton.Config({}, num_warps=4, num_stages=1),
    num_warps=(4, 8, 2),
    num_stages=(1, 2),
)


@triton.jit
def _pair_dot(a, b, like):
    """``a @ b`` of fp32 tiles at about fp32 accuracy, for the safe-gate diagonal sub-chunk of
    :func:`_intra_bwd_kernel`. fp32 inputs (``like``'s element type): one exact ("ieee") product.
    16-bit inputs: three bf16 tensor-core products of the split operands ``x = x_hi + x_lo``
    (``a_hi b_hi + a_hi b_lo + a_lo b_hi``, relative error about 2^-16; Triton's "bf16x3"),
    written out so that the interpreter rounds the operands as the GPU does."""
    if like.dtype.element_ty == tl.float32:
        acc = tl.dot(a, b, input_precision="ieee")
    else:
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        acc = tl.dot(a_lo, b_hi)
        acc = tl.dot(a_hi, b_lo, acc)
        acc = tl.dot(a_hi, b_hi, acc)
    return acc


@autotune(_INTRA_BWD_CONFIGS, key=["K", *TUNE_KEYS], restore_value=["dbeta"])
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _intra_bwd_kernel(
    q,
    k,
    G,
    beta,
    dAqk,
    dL,
    dq_p,
    dk_p,
    dG_p,
    dbeta,
    cu_seqlens,
    chunk_indices,
    scale,
    H,
    HQ,
    T_BUCKET,
    NH_BUCKET,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BKD: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SAFE_GATE: tl.constexpr,
):
    """Pairwise (intra-chunk) gradient terms for the rows of sub-chunk ``i_i``. Grid
    ``(NT, BT // BC, H)``. ``SAFE_GATE`` (``g >= -5``): the diagonal sub-chunk by tensor-core
    products split at the reference rows, as the forward's (else pair by pair, exact for any g).

    Writes the fp32 partials ``dq_p = Yq`` (of dq^), ``dk_p = beta Yk + Zq + Zk`` and
    ``dG_p = q^ Yq + beta k Yk - k (Zq + Zk)``, which :func:`_bwd_dqkg_kernel` completes, and
    adds ``rowsum(k Yk)`` to dbeta (finished here)."""
    i_t, i_i, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    HK = H * K
    # q and k have HQ heads (GVA: value head i_h reads key head i_h // (H // HQ))
    HQK = HQ * K
    i_hq = i_h // (H // HQ)
    NC: tl.constexpr = BT // BC
    row0 = start + i_i * BC
    o_c = tl.arange(0, BC)
    rows = row0 + o_c
    m_r = rows < eos
    b_beta = tl.load(beta + rows * H + i_h, mask=m_r, other=0.0).to(tl.float32)
    a_rows = rows[:, None] * H * BT + i_h * BT
    # Reference rows: first row of this sub-chunk (row ops), its last valid row (column ops).
    last_c = tl.minimum(row0 + BC, eos) - 1
    n_valid = tl.minimum(tl.maximum(eos - row0, 0), BC).to(tl.int32)  # valid rows of sub-chunk
    a_diag = (row0 * H + i_h) * BT + i_i * BC  # int64 scalar: entry (row0, first column) of D
    b_dbeta = tl.zeros([BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BKD)):
        cols = i_k * BKD + tl.arange(0, BKD)
        m_d = cols < K
        m_rd = m_r[:, None] & m_d[None, :]
        off_r = rows[:, None] * HK + i_h * K + cols[None, :]
        off_rq = rows[:, None] * HQK + i_hq * K + cols[None, :]
        b_q = tl.load(q + off_rq, mask=m_rd, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + off_rq, mask=m_rd, other=0.0).to(tl.float32)
        b_g = tl.load(G + off_r, mask=m_rd, other=0.0)
        b_ref = tl.load(
            G + row0 * HK + i_h * K + cols, mask=m_d & (row0 + cols * 0 < eos), other=0.0
        )
        b_refc = tl.load(
            G + last_c * HK + i_h * K + cols, mask=m_d & (last_c + cols * 0 >= row0), other=0.0
        )

        # Row side: Y[r] = sum_{i <= r} D[r, i] k_i exp(G_r - G_i).
        b_yq = tl.zeros([BC, BKD], dtype=tl.float32)
        b_yk = tl.zeros([BC, BKD], dtype=tl.float32)
        for i_j in range(0, tl.where(row0 < eos, i_i, 0)):
            rows_j = start + i_j * BC + o_c
            m_jd = (rows_j < eos)[:, None] & m_d[None, :]
            off_j = rows_j[:, None] * HK + i_h * K + cols[None, :]
            off_jq = rows_j[:, None] * HQK + i_hq * K + cols[None, :]
            b_kj = tl.load(k + off_jq, mask=m_jd, other=0.0).to(tl.float32)
            b_gj = tl.load(G + off_j, mask=m_jd, other=0.0)
            b_kj = b_kj * tl.exp(tl.where(m_jd, b_ref[None, :] - b_gj, 0.0))
            j_off = a_rows + i_j * BC + o_c[None, :]
            b_da = tl.load(dAqk + j_off, mask=m_r[:, None], other=0.0)
            b_dl = tl.load(dL + j_off, mask=m_r[:, None], other=0.0)
            b_yq += tl.dot(
                b_da.to(q.dtype.element_ty),
                b_kj.to(q.dtype.element_ty),
                input_precision=DOT_PREC,
            )
            b_yk += tl.dot(
                b_dl.to(q.dtype.element_ty),
                b_kj.to(q.dtype.element_ty),
                input_precision=DOT_PREC,
            )
        b_er = tl.exp(tl.where(m_rd, b_g - b_ref[None, :], 0.0))
        b_yq *= b_er
        b_yk *= b_er

        # Column side: Z[i] = sum_{r >= i} D[r, i] X_r exp(G_r - G_i).
        b_zq = tl.zeros([BC, BKD], dtype=tl.float32)
        b_zk = tl.zeros([BC, BKD], dtype=tl.float32)
        for i_j in range(i_i + 1, NC):
            rows_j = start + i_j * BC + o_c
            m_j = rows_j < eos
            m_jd = m_j[:, None] & m_d[None, :]
            off_j = rows_j[:, None] * HK + i_h * K + cols[None, :]
            off_jq = rows_j[:, None] * HQK + i_hq * K + cols[None, :]
            b_gj = tl.load(G + off_j, mask=m_jd, other=0.0)
            b_f = tl.exp(tl.where(m_jd, b_gj - b_refc[None, :], 0.0))
            b_qj = tl.load(q + off_jq, mask=m_jd, other=0.0).to(tl.float32) * scale * b_f
            b_kj = tl.load(k + off_jq, mask=m_jd, other=0.0).to(tl.float32) * b_f
            b_bj = tl.load(beta + rows_j * H + i_h, mask=m_j, other=0.0).to(tl.float32)
            j_off = rows_j[:, None] * H * BT + i_h * BT + i_i * BC + o_c[None, :]
            b_da = tl.load(dAqk + j_off, mask=m_j[:, None], other=0.0)
            b_dl = tl.load(dL + j_off, mask=m_j[:, None], other=0.0)
            b_zq += tl.dot(
                (tl.trans(b_da)).to(q.dtype.element_ty),
                b_qj.to(q.dtype.element_ty),
                input_precision=DOT_PREC,
            )
            b_zk += tl.dot(
                (tl.trans(b_dl)).to(q.dtype.element_ty),
                (b_kj * b_bj[:, None]).to(q.dtype.element_ty),
                input_precision=DOT_PREC,
            )
        b_ec = tl.exp(tl.where(m_rd, b_refc[None, :] - b_g, 0.0))
        b_zq *= b_ec
        b_zk *= b_ec

        if SAFE_GATE:
            # Bounded gate: the diagonal sub-chunk split at the same reference rows (factors
            # within e^{+-75}, finite in fp32 / bf16), D the block's strictly lower triangle
            # (dL's is all of it): Y += exp(G - G_ref) D (k exp(G_ref - G)),
            # Z += exp(G_refc - G) D^T (X exp(G - G_refc)). dAqk's diagonal (factor 1) is added
            # elementwise in fp32, as the pairwise path does, so that it still cancels exactly
            # in dG (q Yq - k Zq): with 16-bit operands it would leave a rounding residue of
            # the size of dAqk q k, far above dg itself under strong decay. The same holds for
            # every pair of the block: its term enters dG on the row side (+) and the column
            # side (-) from different operands, and the reverse cumsum adds any residue to
            # every earlier row of the chunk (a bias, not noise, in dg summed over tokens: the
            # gate parameters' gradient). So these products take fp32 operands at about fp32
            # accuracy (_pair_dot), as the pairwise path computes them.
            d_off = a_rows + i_i * BC + o_c[None, :]
            b_da = tl.load(dAqk + d_off, mask=m_r[:, None], other=0.0)
            b_dag = tl.sum(tl.where(o_c[:, None] == o_c[None, :], b_da, 0.0), axis=1)
            b_dad = tl.where(o_c[:, None] > o_c[None, :], b_da, 0.0)
            b_dld = tl.load(dL + d_off, mask=m_r[:, None], other=0.0)
            b_kn = b_k * tl.exp(tl.where(m_rd, b_ref[None, :] - b_g, 0.0))
            b_yq += b_er * _pair_dot(b_dad, b_kn, q) + b_dag[:, None] * b_k
            b_yk += b_er * _pair_dot(b_dld, b_kn, q)
            b_rn = tl.exp(tl.where(m_rd, b_g - b_refc[None, :], 0.0))
            b_zq += b_ec * _pair_dot(tl.trans(b_dad), b_q * b_rn, q)
            b_zq += b_dag[:, None] * b_q
            b_zk += b_ec * _pair_dot(tl.trans(b_dld), b_k * b_beta[:, None] * b_rn, q)
        # Diagonal sub-chunk, exact pairwise exponents, one partner row j at a time (only
        # [BC, BKD] tiles live; no [BC, BC, BKD] tensor): row side
        # Y[r] += D[r, j] k_j exp(G_r - G_j) for r >= j, column side
        # Z[i] += D[j, i] X_j exp(G_j - G_i) for i <= j (j a valid row). None with SAFE_GATE.
        for j in range(0, 0 if SAFE_GATE else n_valid):
            off_jr = (row0 + j) * HK + i_h * K + cols
            off_jrq = (row0 + j) * HQK + i_hq * K + cols
            b_kj = tl.load(k + off_jrq, mask=m_d, other=0.0).to(tl.float32)
            b_gj = tl.load(G + off_jr, mask=m_d, other=0.0)
            b_qj = tl.load(q + off_jrq, mask=m_d, other=0.0).to(tl.float32) * scale
            b_bj = tl.load(beta + (row0 + j) * H + i_h).to(tl.float32)
            # column j of D (rows r of the sub-chunk) and row j of D (columns i)
            col_j = a_diag + o_c * (H * BT) + j
            row_j = a_diag + j * (H * BT) + o_c
            b_dacol = tl.load(dAqk + col_j, mask=m_r, other=0.0)
            b_dlcol = tl.load(dL + col_j, mask=m_r, other=0.0)
            b_darow = tl.load(dAqk + row_j)
            b_dlrow = tl.load(dL + row_j)
            m_lo = ((o_c >= j) & m_r)[:, None] & m_d[None, :]
            b_kej = b_kj[None, :] * tl.exp(tl.where(m_lo, b_g - b_gj[None, :], float("-inf")))
            b_yq += b_dacol[:, None] * b_kej
            b_yk += b_dlcol[:, None] * b_kej
            m_up = (o_c <= j)[:, None] & m_d[None, :]
            b_fj = tl.exp(tl.where(m_up, b_gj[None, :] - b_g, float("-inf")))
            b_zq += b_darow[:, None] * b_qj[None, :] * b_fj
            b_zk += b_dlrow[:, None] * (b_kj * b_bj)[None, :] * b_fj

        b_dbeta += tl.sum(b_k * b_yk, axis=1)
        tl.store(dq_p + off_r, b_yq, mask=m_rd)
        tl.store(dk_p + off_r, b_beta[:, None] * b_yk + b_zq + b_zk, mask=m_rd)
        tl.store(
            dG_p + off_r, b_q * b_yq + b_beta[:, None] * b_k * b_yk - b_k * (b_zq + b_zk), mask=m_rd
        )
    b_db = tl.load(dbeta + rows * H + i_h, mask=m_r, other=0.0) + b_dbeta
    tl.store(dbeta + rows * H + i_h, b_db, mask=m_r)


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
    saved: tuple[torch.Tensor, ...] | None = None,
    safe_gate: bool = False,
    gate: InKernelGate | None = None,
    fp32_dqk: bool = False,
    segments: SegmentPlan | None = None,
) -> tuple[torch.Tensor, ...]:
    """Gradients of chunked KDA on packed, contiguous inputs (layout of ``chunk_kda_fwd``).

    Takes ``saved = (G, Aqk, N)`` from a forward run with ``keep=True`` (or recomputes
    them when None) and recomputes the rest of the forward (``qg``, ``kg``, ``W``, chunk-start
    states, residuals). ``do``: ``[TT, H, V]``; ``dht``: ``[N, H, K, V]`` or None.
    ``safe_gate``: the caller promises ``g >= -5`` (the safe gate): the tensor-core path for the
    diagonal sub-chunks (see :func:`kimi_linear.kernels.chunk_fwd.chunk_kda_fwd`).

    ``segments``: split the sequential passes (forward recompute and reverse) into these
    segments (:mod:`kimi_linear.kernels.split`; same results to rounding).

    ``fp32_dqk``: return dq, dk in fp32 (for a backward that continues through them, the L2
    norm's: no rounding to the input dtype in between).
    ``gate``: ``g`` is the raw gate projection (fla's ``use_gate_in_kernel``): ``dg`` is its
    gradient, and the gradients of ``gate.A_log`` and ``gate.dt_bias`` are returned too.

    Returns:
        ``(dq, dk, dv, dg, dbeta, dh0, dA_log, ddt_bias)`` in the dtypes of their inputs (dh0
        fp32, or None without an initial state; ``dA_log [H]`` and ``ddt_bias [H * K]`` fp32,
        None without the in-kernel gate or without that argument).
    """
    TT, HQ, K = q.shape
    H = g.shape[1]  # value heads (GVA: a multiple of q and k's HQ)
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    buckets = tune_buckets(TT, N * H)  # autotune-key size buckets (utils.tune_buckets)
    BT, BC = CHUNK_SIZE, SUB_CHUNK_SIZE
    BK = next_pow2(K)
    BKS = min(BK, 64)
    prec = dot_precision(q.dtype)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    fwd = chunk_kda_fwd(
        q,
        k,
        v,
        g,
        beta,
        scale,
        initial_state,
        False,
        cu_seqlens,
        chunk_indices,
        chunk_offsets,
        num_chunks,
        for_backward=True,
        do=do,
        saved=saved,
        safe_gate=safe_gate,
        gate=gate,
        segments=segments,
    )
    # Chunk-end state gradients: carried in fp32 registers, stored in the input dtype (their
    # only consumer rounds them to it for the tensor-core products).
    dh = torch.empty(num_chunks, H, K, V, dtype=state_dtype(q.dtype), device=dev)
    # d_delta = Aqk^T dO (fp32, from the recompute) + kg dS1, written to its own buffer in the
    # input dtype; the dv kernel then writes dR (fp32) over Aqk^T dO. No kernel updates a
    # [TT, H, V] buffer in place, so autotuning copies none (restore_value).
    ddelta = fwd.ddelta
    dd = torch.empty_like(v)

    def reverse_pass(grid, *args, **meta):  # the reverse state kernel on this call's tensors
        _chunk_bwd_state_kernel[grid](
            fwd.qg, fwd.kg, fwd.W, fwd.Gl, do, dh, *args, K=K, V=V, BT=BT, BK=BK, BKS=BKS, **meta
        )

    if segments is None:
        dh0 = torch.empty(N, H, K, V, **f32) if initial_state is not None else None
        grid = lambda meta: checked_grid(triton.cdiv(V, meta["BV"]) * N * H)
        reverse_pass(
            grid,
            dht,
            dh0,
            ddelta,
            dd,
            cu_seqlens,
            chunk_offsets,
            H,
            **buckets,
            USE_DHT=dht is not None,
            STORE_DH0=dh0 is not None,
            DOT_PREC=prec,
            STORE_CHUNKS=True,
        )
    else:  # split (kimi_linear.kernels.split): per-segment offsets, reverse fold, then dh
        NS = segments.num_segments
        seg_args = (ddelta, dd, segments.cu_seqlens, segments.chunk_offsets, H)
        seg_buckets = tune_buckets(TT, NS * H)
        grid = lambda meta: checked_grid(triton.cdiv(V, meta["BV"]) * NS * H)
        E = torch.empty(NS, H, K, V, **f32)  # each segment's start gradient from a zero end
        reverse_pass(
            grid,
            None,
            E,
            *seg_args,
            **seg_buckets,
            USE_DHT=False,
            STORE_DH0=True,
            DOT_PREC=prec,
            STORE_CHUNKS=False,
        )
        ends, dh0 = fold_states(
            fwd.HM[..., V:], E, dht, segments, N, initial_state is not None, reverse=True
        )
        reverse_pass(
            grid,
            ends,
            None,
            *seg_args,
            **seg_buckets,
            USE_DHT=True,
            STORE_DH0=False,
            DOT_PREC=prec,
            STORE_CHUNKS=True,
        )
    # dq, dk per value head (GVA: fp32, then summed over each key head's group)
    dqk = dict(dtype=q.dtype if H == HQ and not fp32_dqk else torch.float32, device=dev)
    dq, dk = torch.empty(TT, H, K, **dqk), torch.empty(TT, H, K, **dqk)
    dv, dg = torch.empty_like(v), torch.empty_like(g)
    dbeta = torch.empty(TT, H, **f32)
    if num_chunks > 0:
        dAqk = torch.empty(TT, H, BT, **f32)
        dL = torch.empty(TT, H, BT, **f32)
        _bwd_dv_kernel[(num_chunks, H)](
            k,
            v,
            fwd.G,
            beta,
            fwd.Ainv,
            fwd.h,
            fwd.delta,
            dd,
            ddelta,
            do,
            dv,
            dbeta,
            dAqk,
            dL,
            cu_seqlens,
            chunk_indices,
            H,
            HQ,
            **buckets,
            K=K,
            V=V,
            BT=BT,
            BKS=BKS,
            DOT_PREC=prec,
        )
        dq_p, dk_p, dG_p = (torch.empty(TT, H, K, **f32) for _ in range(3))
        _intra_bwd_kernel[(num_chunks, BT // BC, H)](
            q,
            k,
            fwd.G,
            beta,
            dAqk,
            dL,
            dq_p,
            dk_p,
            dG_p,
            dbeta,
            cu_seqlens,
            chunk_indices,
            scale,
            H,
            HQ,
            **buckets,
            K=K,
            BT=BT,
            BC=BC,
            BKD=min(BK, 32),
            DOT_PREC=prec,
            SAFE_GATE=bool(safe_gate),
        )
        del dd
        if gate is not None:
            dA_p, dbias_p = (torch.empty(num_chunks, H, K, **f32) for _ in range(2))
        else:
            dA_p = dbias_p = cu_seqlens
        grid = lambda meta: checked_grid(num_chunks * triton.cdiv(K, meta["BKB"]), H)
        _bwd_dqkg_kernel[grid](
            q,
            k,
            fwd.G,
            fwd.h,
            dh,
            fwd.delta,
            ddelta,
            do,
            dq_p,
            dk_p,
            dG_p,
            dq,
            dk,
            dg,
            g,
            *gate_launch_args(gate, cu_seqlens),
            dA_p,
            dbias_p,
            cu_seqlens,
            chunk_indices,
            scale,
            0.0 if gate is None else gate.lower_bound,
            H,
            HQ,
            **buckets,
            K=K,
            V=V,
            BT=BT,
            DOT_PREC=prec,
            **gate_constexprs(gate),
        )
    if H != HQ:
        dq, dk = (x.view(TT, HQ, H // HQ, K).sum(2) for x in (dq, dk))
        if not fp32_dqk:
            dq, dk = dq.to(q.dtype), dk.to(k.dtype)
    dA_log = ddt_bias = None
    if gate is not None:
        if num_chunks == 0:
            dA_p = dbias_p = torch.zeros(1, H, K, **f32)
        if gate.A_log is not None:
            dA_log = dA_p.sum(dim=(0, 2))
        if gate.dt_bias is not None:
            ddt_bias = dbias_p.sum(dim=0).reshape(-1)
    return dq, dk, dv, dg, dbeta.to(beta.dtype), dh0, dA_log, ddt_bias
