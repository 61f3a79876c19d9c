"""Forward kernels of chunked KDA (chunk ``BT = 64``, sub-chunk ``BC = 16``).

Per head and chunk (rows ``r`` of the chunk, ``G`` the within-chunk cumulative log decay,
``q^ = scale * q``), the pipeline computes::

    G        = cumsum(g)                                             (_chunk_cumsum_kernel)
    Akk[r,i] = beta_r sum_d k_r k_i exp(G_r - G_i),  i <  r          (_intra_fwd_kernel)
    Aqk[r,i] =        sum_d q^_r k_i exp(G_r - G_i),  i <= r
    qg       = q^ * exp(G),   kg = k * exp(G_last - G)               (decayed operands)
    N        = (I + Akk)^-1                 (16 x 16 block inversion) (_solve_wy_kernel)
    W        = N (beta * k * exp(G)),   U = N (beta * v) (in the state kernel) (WY / UT)
    per chunk, sequentially carrying the fp32 state S [K, V]:        (_chunk_fwd_state_kernel)
        h     = S                           (chunk-start state)
        delta = U - W S                     (the delta-rule residual, formed in fp32)
        S     = exp(G_last) * S + kg^T delta
    then all chunks in parallel:                                     (_chunk_fwd_o_kernel)
        o     = qg h + Aqk delta

Precision: for bf16 / fp16 inputs every tensor-core product takes operands in the input dtype
with fp32 accumulation (the GPU's full tensor-core rate), except the block inversion of the
``[BC, BC]`` tiles of ``(I + Akk)``, which is exact fp32 (forward substitution inside each
diagonal block, 16 small fp32 products for the blocks below; about 64K FMAs per chunk). The state is carried in fp32 registers
and ``G``, ``Akk`` stay fp32; what is only ever a product operand (``Aqk``, ``N``, ``W``,
``qg``, ``kg``, the chunk-start states ``h`` and residuals ``delta``) is stored in the input
dtype, so rounding it once on store changes nothing; the states ``h`` (and the backward's state
gradients) and the products with them use ``utils.state_dtype``: bf16 for fp16 inputs, whose
range (65504) a state can exceed. fp32 inputs run exact fp32 products
(``utils.dot_precision``).

Numerics: ``g`` is clamped per step at ``G_FLOOR = -128`` before the cumulative sum, where
``exp`` is exactly 0 in fp32: exact (a factor containing a clamped step is 0 either way) and it
keeps ``G`` finite, so ``g = -inf`` (complete forgetting) or a finite ``-1e30`` give the
recurrence's answer instead of ``-inf - (-inf) = NaN`` or a swallowed sum; the backward
recomputes ``G`` the same way (a clamped step's gradient is 0 up to rounding). ``g > 0`` is
outside the model (a decay factor above 1): the kernels do not check it (a check costs a device
sync; ``KIMI_LINEAR_CHECK_GATE=1`` turns it on) and factors ``exp(G_a - G_b)`` may then overflow
to inf / NaN. Every exponent is a difference ``G_a - G_b`` with ``a >= b`` (so ``<= 0``). For two
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

from kimi_linear.ops.checks import LOG_DECAY_FLOOR

from .utils import (
    CHUNK_SIZE,
    SUB_CHUNK_SIZE,
    autotune,
    config_space,
    dot_precision,
    next_pow2,
    state_dtype,
)

#: Per-step floor of the log decay in the kernels (they compute in fp32).
G_FLOOR = LOG_DECAY_FLOOR[torch.float32]

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
    g,
    G,
    Gl,
    cu_seqlens,
    chunk_indices,
    H,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    G_FLOOR: tl.constexpr,
):
    """G[r] = sum_{i <= r} max(g[i], G_FLOOR) within each chunk, in fp32, for BK key columns.

    The per-step floor (where ``exp`` is exactly 0 in fp32) is exact and keeps ``G`` finite for
    ``g = -inf`` (see :mod:`kimi_linear.ops.checks`). Also writes each chunk's last row,
    ``Gl [NT, H, K]``, for the state kernels' decay (so they never read ``G``). Grid
    ``(NT, H, cdiv(K, BK))``."""
    i_t, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    rows = start + tl.arange(0, BT)
    cols = i_k * BK + tl.arange(0, BK)
    mask = (rows < eos)[:, None] & (cols < K)[None, :]
    off = rows[:, None] * H * K + i_h * K + cols[None, :]
    b_g = tl.maximum(tl.load(g + off, mask=mask, other=0.0).to(tl.float32), G_FLOOR)
    b_cs = tl.cumsum(b_g, axis=0)
    tl.store(G + off, b_cs, mask=mask)
    last = tl.minimum(start + BT, eos) - 1
    b_last = tl.sum(tl.where((rows == last)[:, None], b_cs, 0.0), axis=0)
    tl.store(Gl + (i_t * H + i_h).to(tl.int64) * K + cols, b_last, mask=cols < K)


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
    # Tensor-core operands in the input dtype (fp32 accumulation): no-op casts for fp32 inputs.
    b_qe = (b_q * b_dr).to(q.dtype.element_ty)
    b_ke = (b_k * b_dr).to(q.dtype.element_ty)
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
        b_kj = (b_kj * tl.exp(tl.where(m_jk, b_ref[None, :] - b_gj, 0.0))).to(q.dtype.element_ty)
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


@triton.jit
def _akk_block(Akk, a_base, i, j, n_valid, H, BT: tl.constexpr, BC: tl.constexpr):
    """Block ``(i, j)`` ``[BC, BC]`` of a chunk's ``[BT, BT]`` matrix in a ``[TT, H, BT]`` buffer
    (fp32), rows past the chunk's ``n_valid`` rows read as 0."""
    o_c = tl.arange(0, BC)
    r = i * BC + o_c
    off = r[:, None] * (H * BT) + (j * BC + o_c)[None, :]
    return tl.load(Akk + a_base + off, mask=(r < n_valid)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_block(A, a_base, i, j, b_x, n_valid, H, BT: tl.constexpr, BC: tl.constexpr):
    """Store ``b_x`` as block ``(i, j)`` of a chunk's ``[BT, BT]`` matrix (valid rows only)."""
    o_c = tl.arange(0, BC)
    r = i * BC + o_c
    off = r[:, None] * (H * BT) + (j * BC + o_c)[None, :]
    tl.store(A + a_base + off, b_x.to(A.dtype.element_ty), mask=(r < n_valid)[:, None])


@triton.jit
def _inv_unit_lower(b_a, BC: tl.constexpr):
    """``(I + A)^-1`` of a strictly lower triangular ``[BC, BC]`` fp32 tile, by forward
    substitution row by row, ``N_r = e_r - sum_{j < r} A_rj N_j`` (elementwise, exact fp32)."""
    o = tl.arange(0, BC)
    b_n = tl.where(o[:, None] == o[None, :], 1.0, 0.0)
    for r in range(1, BC):
        a_r = tl.sum(tl.where(o[:, None] == r, b_a, 0.0), axis=0)
        row = tl.where(o == r, 1.0, 0.0) - tl.sum(a_r[:, None] * b_n, axis=0)
        b_n = tl.where(o[:, None] == r, row[None, :], b_n)
    return b_n


@autotune(_WARPS8, key=["K", "V"])
@triton.jit
def _solve_wy_kernel(
    k,
    G,
    beta,
    Akk,
    Ainv,
    W,
    Aqk,
    do,
    ddelta,
    q,
    qg,
    kg,
    Gl,
    cu_seqlens,
    chunk_indices,
    scale,
    H,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DO: tl.constexpr,
    SOLVE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """N = (I + Akk)^-1 by 16 x 16 block inversion, then W = N (beta k exp(G)).

    W is formed BK key columns at a time (``BK <= 64``); ``U = N (beta v)`` is not stored (the
    state kernel forms it where it is used). Grid ``(NT, H)``. Ainv ``[TT, H, BT]`` and W
    ``[TT, H, K]`` in the input dtype (the products' operand dtype). In the
    backward's recompute (``HAS_DO``) it also writes the chunk-local part of the residual
    gradient, ``ddelta = Aqk^T dO`` ``[TT, H, V]`` fp32, which the sequential backward kernel
    completes (so that kernel holds no ``[BT, BT]`` tile). Without ``SOLVE`` (the backward,
    given the forward's ``N``) it reads ``N`` from Ainv instead of forming it, and writes the
    decayed operands ``qg = scale q exp(G)``, ``kg = k exp(G_last - G)`` and the last rows
    ``Gl`` (as :func:`_intra_fwd_kernel` and the cumulative sum do in the forward; not kept
    between forward and backward).
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    o_t = tl.arange(0, BT)
    rows = start + o_t
    m_t = rows < eos
    a_off = rows[:, None] * H * BT + i_h * BT + o_t[None, :]
    if SOLVE:
        # N = (I + Akk)^-1 in 16 x 16 blocks (unit lower triangular, BT = 4 BC): the diagonal blocks
        # by forward substitution (elementwise, no tensor-core work), then the blocks below them by
        # block substitution, N_ij = -N_ii sum_{j <= m < i} Akk_im N_mj: 16 products of
        # [BC, BC] x [BC, BC] tiles in exact fp32 (CUDA-core FMAs, 64K per chunk: no TF32 and
        # no rounding of N before its single rounding to the input dtype).
        tl.static_assert(BT == 4 * BC)
        a_base = (start * H + i_h) * BT  # int64 scalar row base, int32 offsets inside the chunk
        n_valid = (eos - start).to(tl.int32)
        a10 = _akk_block(Akk, a_base, 1, 0, n_valid, H, BT, BC)
        a20 = _akk_block(Akk, a_base, 2, 0, n_valid, H, BT, BC)
        a21 = _akk_block(Akk, a_base, 2, 1, n_valid, H, BT, BC)
        a30 = _akk_block(Akk, a_base, 3, 0, n_valid, H, BT, BC)
        a31 = _akk_block(Akk, a_base, 3, 1, n_valid, H, BT, BC)
        a32 = _akk_block(Akk, a_base, 3, 2, n_valid, H, BT, BC)
        n00 = _inv_unit_lower(_akk_block(Akk, a_base, 0, 0, n_valid, H, BT, BC), BC)
        n11 = _inv_unit_lower(_akk_block(Akk, a_base, 1, 1, n_valid, H, BT, BC), BC)
        n22 = _inv_unit_lower(_akk_block(Akk, a_base, 2, 2, n_valid, H, BT, BC), BC)
        n33 = _inv_unit_lower(_akk_block(Akk, a_base, 3, 3, n_valid, H, BT, BC), BC)
        n10 = -tl.dot(n11, tl.dot(a10, n00, input_precision="ieee"), input_precision="ieee")
        n21 = -tl.dot(n22, tl.dot(a21, n11, input_precision="ieee"), input_precision="ieee")
        n32 = -tl.dot(n33, tl.dot(a32, n22, input_precision="ieee"), input_precision="ieee")
        b_t = tl.dot(a20, n00, input_precision="ieee") + tl.dot(a21, n10, input_precision="ieee")
        n20 = -tl.dot(n22, b_t, input_precision="ieee")
        b_t = tl.dot(a31, n11, input_precision="ieee") + tl.dot(a32, n21, input_precision="ieee")
        n31 = -tl.dot(n33, b_t, input_precision="ieee")
        b_t = tl.dot(a30, n00, input_precision="ieee") + tl.dot(a31, n10, input_precision="ieee")
        b_t += tl.dot(a32, n20, input_precision="ieee")
        n30 = -tl.dot(n33, b_t, input_precision="ieee")
        b_zero = tl.zeros([BC, BC], dtype=tl.float32)
        _store_block(Ainv, a_base, 0, 0, n00, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 0, 1, b_zero, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 0, 2, b_zero, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 0, 3, b_zero, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 1, 0, n10, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 1, 1, n11, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 1, 2, b_zero, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 1, 3, b_zero, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 2, 0, n20, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 2, 1, n21, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 2, 2, n22, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 2, 3, b_zero, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 3, 0, n30, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 3, 1, n31, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 3, 2, n32, n_valid, H, BT, BC)
        _store_block(Ainv, a_base, 3, 3, n33, n_valid, H, BT, BC)
        # Read N back whole (in the input dtype: the operand of the W product) after a barrier, so
        # every thread of the program sees every block.
        tl.debug_barrier()
    b_nl = tl.load(Ainv + a_off, mask=m_t[:, None], other=0.0)

    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        cols_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (cols_k < K)[None, :]
        off_k = rows[:, None] * H * K + i_h * K + cols_k[None, :]
        b_k = tl.load(k + off_k, mask=m_tk, other=0.0).to(tl.float32)
        b_g = tl.load(G + off_k, mask=m_tk, other=0.0)
        b_kb = (b_k * tl.exp(b_g) * b_beta[:, None]).to(k.dtype.element_ty)
        tl.store(W + off_k, tl.dot(b_nl, b_kb, input_precision=DOT_PREC), mask=m_tk)
        if not SOLVE:
            last = tl.minimum(start + BT, eos) - 1
            b_gl = tl.load(G + last * H * K + i_h * K + cols_k, mask=cols_k < K, other=0.0)
            tl.store(Gl + (i_t * H + i_h).to(tl.int64) * K + cols_k, b_gl, mask=cols_k < K)
            b_q = tl.load(q + off_k, mask=m_tk, other=0.0).to(tl.float32) * scale
            tl.store(qg + off_k, (b_q * tl.exp(b_g)).to(qg.dtype.element_ty), mask=m_tk)
            b_kg = b_k * tl.exp(tl.where(m_tk, b_gl[None, :] - b_g, 0.0))
            tl.store(kg + off_k, b_kg.to(kg.dtype.element_ty), mask=m_tk)
    if HAS_DO:
        # Aqk^T, loaded transposed (zero above the diagonal and in padded rows).
        b_at = tl.load(
            Aqk + rows[None, :] * H * BT + i_h * BT + o_t[:, None], mask=m_t[None, :], other=0.0
        ).to(k.dtype.element_ty)
        for i_v in range(0, tl.cdiv(V, BV)):
            cols_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (cols_v < V)[None, :]
            off_v = rows[:, None] * H * V + i_h * V + cols_v[None, :]
            b_do = tl.load(do + off_v, mask=m_tv, other=0.0).to(k.dtype.element_ty)
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
def _load_op(ptr, m_t, H, D: tl.constexpr, col0, BR: tl.constexpr, BD: tl.constexpr):
    """:func:`_load_tile` in the stored dtype (no fp32 conversion): a tensor-core operand of a
    tensor stored in the input dtype (``qg``, ``kg``, ``W``)."""
    o_r = tl.arange(0, BR)
    cols = col0 + tl.arange(0, BD)
    mask = m_t[:, None] & (cols < D)[None, :]
    return tl.load(ptr + o_r[:, None] * (H * D) + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _decay_row(G, last, i_h, H, K: tl.constexpr, col0, BD: tl.constexpr):
    """``exp(G[last])`` of a ``[*, H, K]`` tensor (``Gl``: row = global chunk index) for key
    columns ``col0 + [0, BD)`` (1 past ``K``, where states are 0)."""
    cols = col0 + tl.arange(0, BD)
    return tl.exp(tl.load(G + last * H * K + i_h * K + cols, mask=cols < K, other=0.0))


@triton.jit
def _state_block(base, row0, cols_v, K: tl.constexpr, V: tl.constexpr, BD: tl.constexpr):
    """Pointers and mask of the ``[BD, BV]`` block of a ``[K, V]`` fp32 state at key row ``row0``."""
    rows = row0 + tl.arange(0, BD)
    return base + rows[:, None] * V + cols_v[None, :], (rows < K)[:, None] & (cols_v < V)[None, :]


# The state is split along K into up to four [BKS, BV] blocks (BKS = min(BK, 64)), each its own
# register tile: no [BT, K] operand is ever live at once, which keeps K = 128 / 256 out of local
# memory. First config at K = V = 128 bf16 on sm_90: 20 KB shared memory, 8 spill bytes/thread
# (benchmarks/results/cpu/kernels.compile_sm90_bf16_k128.md). Configs that exceed a device's
# shared memory (e.g. the first one for fp32 at K = 128 on sm_80) are skipped by the autotuner.
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
    Ainv,
    v,
    beta,
    Gl,
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
    state ``h [NT, H, K, V]`` and the residual ``delta [TT, H, V]`` (in the input dtype), from
    which :func:`_chunk_fwd_o_kernel` forms the outputs of all chunks in parallel. The residual
    ``delta = U - W S`` is formed in fp32, with ``U = N (beta v)`` computed here from ``Ainv``
    (it does not depend on the state, so it is off the sequential path and never stored).
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
        p_c, m_c = _state_block(h_c, 0, cols_v, K, V, BKS)
        tl.store(p_c, b_s1, mask=m_c)
        if BK > BKS:
            p_c, m_c = _state_block(h_c, BKS, cols_v, K, V, BKS)
            tl.store(p_c, b_s2, mask=m_c)
        if BK > 2 * BKS:
            p_c, m_c = _state_block(h_c, 2 * BKS, cols_v, K, V, BKS)
            tl.store(p_c, b_s3, mask=m_c)
            p_c, m_c = _state_block(h_c, 3 * BKS, cols_v, K, V, BKS)
            tl.store(p_c, b_s4, mask=m_c)
        m_tv = m_t[:, None] & m_v[None, :]
        off_v = o_t[:, None] * (H * V) + cols_v[None, :]
        # delta = U - W S, one key block at a time, with U = N (beta v).
        a_c = (start * H + i_h) * BT
        b_n = tl.load(
            Ainv + a_c + o_t[:, None] * (H * BT) + o_t[None, :], mask=m_t[:, None], other=0.0
        )
        b_b = tl.load(beta + start * H + i_h + o_t * H, mask=m_t, other=0.0).to(tl.float32)
        b_v = tl.load(v + v_c + off_v, mask=m_tv, other=0.0).to(tl.float32) * b_b[:, None]
        b_d = tl.dot(b_n, b_v.to(kg.dtype.element_ty), input_precision=DOT_PREC)
        b_d -= tl.dot(
            _load_op(W + k_c, m_t, H, K, 0, BT, BKS).to(h.dtype.element_ty),
            b_s1.to(h.dtype.element_ty),
            input_precision=DOT_PREC,
        )
        if BK > BKS:
            b_d -= tl.dot(
                _load_op(W + k_c, m_t, H, K, BKS, BT, BKS).to(h.dtype.element_ty),
                b_s2.to(h.dtype.element_ty),
                input_precision=DOT_PREC,
            )
        if BK > 2 * BKS:
            b_d -= tl.dot(
                _load_op(W + k_c, m_t, H, K, 2 * BKS, BT, BKS).to(h.dtype.element_ty),
                b_s3.to(h.dtype.element_ty),
                input_precision=DOT_PREC,
            )
            b_d -= tl.dot(
                _load_op(W + k_c, m_t, H, K, 3 * BKS, BT, BKS).to(h.dtype.element_ty),
                b_s4.to(h.dtype.element_ty),
                input_precision=DOT_PREC,
            )
        tl.store(delta + v_c + off_v, b_d, mask=m_tv)
        # S = exp(G_last) S + kg^T delta
        last = boh + i_c  # row of Gl
        b_s1 = b_s1 * _decay_row(Gl, last, i_h, H, K, 0, BKS)[:, None]
        b_s1 += tl.dot(
            tl.trans(_load_op(kg + k_c, m_t, H, K, 0, BT, BKS)),
            b_d.to(kg.dtype.element_ty),
            input_precision=DOT_PREC,
        )
        if BK > BKS:
            b_s2 = b_s2 * _decay_row(Gl, last, i_h, H, K, BKS, BKS)[:, None]
            b_s2 += tl.dot(
                tl.trans(_load_op(kg + k_c, m_t, H, K, BKS, BT, BKS)),
                b_d.to(kg.dtype.element_ty),
                input_precision=DOT_PREC,
            )
        if BK > 2 * BKS:
            b_s3 = b_s3 * _decay_row(Gl, last, i_h, H, K, 2 * BKS, BKS)[:, None]
            b_s3 += tl.dot(
                tl.trans(_load_op(kg + k_c, m_t, H, K, 2 * BKS, BT, BKS)),
                b_d.to(kg.dtype.element_ty),
                input_precision=DOT_PREC,
            )
            b_s4 = b_s4 * _decay_row(Gl, last, i_h, H, K, 3 * BKS, BKS)[:, None]
            b_s4 += tl.dot(
                tl.trans(_load_op(kg + k_c, m_t, H, K, 3 * BKS, BT, BKS)),
                b_d.to(kg.dtype.element_ty),
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
    b_o = tl.dot(
        b_a.to(qg.dtype.element_ty),
        (tl.load(delta + v_c + off_v, mask=m_tv, other=0.0)).to(qg.dtype.element_ty),
        input_precision=DOT_PREC,
    )
    h_c = h + (i_t * H + i_h).to(tl.int64) * K * V
    for i_k in range(0, tl.cdiv(K, BKS)):
        p, m = _state_block(h_c, i_k * BKS, cols_v, K, V, BKS)
        b_h = tl.load(p, mask=m, other=0.0)
        b_o += tl.dot(
            _load_op(qg + k_c, m_t, H, K, i_k * BKS, BT, BKS).to(h.dtype.element_ty),
            b_h.to(h.dtype.element_ty),
            input_precision=DOT_PREC,
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
    Gl: torch.Tensor | None = None


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
    keep: bool = False,
    saved: tuple[torch.Tensor, ...] | None = None,
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
        keep: also return the intermediates the backward would otherwise recompute with the
            most work, ``G`` (fp32) and ``Aqk``, ``Ainv`` (input dtype), with the output.
        saved: ``(G, Aqk, Ainv)`` kept by a forward with ``keep``: skips the cumulative sum,
            the intra-chunk kernel and the inversion (the backward then forms only ``Gl``,
            ``qg``, ``kg``, ``W``, the states and the residuals).
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
    # Intermediates used only as tensor-core operands are stored in the input dtype (they are
    # rounded to it before every product anyway); G, Akk (the solve's input) and the carried
    # state stay fp32; U = N (beta v), the base of the residual, is formed in fp32 registers.
    io = dict(dtype=q.dtype, device=dev)
    if saved is None:
        G = torch.empty(TT, H, K, **f32)
        Gl = torch.empty(num_chunks, H, K, **f32)
        Akk = torch.empty(TT, H, BT, **f32)
        Aqk = torch.empty(TT, H, BT, **io)
        Ainv = torch.empty(TT, H, BT, **io)
        qg, kg = torch.empty_like(q), torch.empty_like(k)
    else:
        (G, Aqk, Ainv), Akk = saved, None
        Gl = torch.empty(num_chunks, H, K, **f32)
        qg, kg = torch.empty_like(q), torch.empty_like(k)
    W = torch.empty(TT, H, K, **io)
    ddelta = None if do is None else torch.empty(TT, H, V, **f32)
    if num_chunks > 0 and saved is None:
        BKC = min(BK, 64)
        _chunk_cumsum_kernel[(num_chunks, H, triton.cdiv(K, BKC))](
            g, G, Gl, cu_seqlens, chunk_indices, H, K=K, BT=BT, BK=BKC, G_FLOOR=G_FLOOR
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
    if num_chunks > 0:
        recompute = saved is not None  # the backward: also form qg, kg, Gl
        _solve_wy_kernel[(num_chunks, H)](
            k,
            G,
            beta,
            Akk,
            Ainv,
            W,
            Aqk,
            do,
            ddelta,
            q if recompute else None,
            qg if recompute else None,
            kg if recompute else None,
            Gl if recompute else None,
            cu_seqlens,
            chunk_indices,
            scale,
            H,
            K=K,
            V=V,
            BT=BT,
            BC=BC,
            BK=min(BK, 64),
            BV=BVW,
            HAS_DO=do is not None,
            SOLVE=saved is None,
            DOT_PREC=prec,
        )
    ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
    h = torch.empty(num_chunks, H, K, V, dtype=state_dtype(q.dtype), device=dev)
    delta = torch.empty(TT, H, V, **io)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * H)
    _chunk_fwd_state_kernel[grid](
        kg,
        W,
        Ainv,
        v,
        beta,
        Gl,
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
        return ChunkForward(o, ht, G, Aqk, Ainv, W, qg, kg, h, delta, ddelta, Gl)
    if keep:
        return ChunkForward(o, ht, G, Aqk, Ainv)
    return ChunkForward(o, ht)
