"""Forward kernels of chunked KDA (chunk ``BT = 64``, sub-chunk ``BC = 16``).

One job: the forward pass's Triton kernels and their launcher (:func:`chunk_kda_fwd`); the
backward is :mod:`kimi_linear.kernels.chunk_bwd`, the autograd wrapper
:mod:`kimi_linear.kernels.chunk`.

Per head and chunk (rows ``r`` of the chunk, ``G`` the within-chunk cumulative log decay,
``q^ = scale * q``), the pipeline computes::

    G        = cumsum(g)                                             (_chunk_cumsum_kernel)
    Akk[r,i] = beta_r sum_d k_r k_i exp(G_r - G_i),  i <  r          (_intra_solve_fwd_kernel,
    Aqk[r,i] =        sum_d q^_r k_i exp(G_r - G_i),  i <= r           one program per chunk;
    qg       = q^ * exp(G),   kg = k * exp(G_last - G)                 Akk stays in registers)
    N        = (I + Akk)^-1                 (16 x 16 block inversion)
    W        = N (beta * k * exp(G)),   U = N (beta * v) (in the state kernel) (WY / UT)
    per chunk, sequentially carrying the fp32 state S [K, V]:        (_chunk_fwd_state_kernel)
        h     = S                           (chunk-start state)
        delta = U - W S                     (the delta-rule residual, formed in fp32)
        S     = exp(G_last) * S + kg^T delta
    then all chunks in parallel:                                     (_chunk_fwd_o_kernel)
        o     = qg h + Aqk delta

Fusion: the intra-chunk pairs, the solve and ``W`` run in one kernel per (chunk, head). It walks
the four 16-row sub-chunks in order; the ten nonzero ``[16, 16]`` blocks of ``Akk`` (fp32) are
consumed by the block inversion as soon as their block row exists, so ``Akk`` never goes to
global memory (the unfused pipeline wrote and re-read it in fp32, ``TT * H * 64 * 4`` bytes
each way); ``N`` is stored once (input dtype, what the state kernel and the backward read) and
re-read whole, after a barrier, for the ``[64, 64] x [64, BK]`` tensor-core product ``W``
(whose rows hold the column-side factors ``kc`` of the default gate path until then). The
backward re-forms ``W``, ``qg``, ``kg`` from the kept ``G`` and ``N`` in
:func:`_recompute_wy_kernel` (with its ``Aqk^T dO`` term).

Precision: for bf16 / fp16 inputs every tensor-core product takes operands in the input dtype
with fp32 accumulation (the GPU's full tensor-core rate), except the block inversion of the
``[BC, BC]`` tiles of ``(I + Akk)``, which is exact fp32 (forward substitution inside each
diagonal block, 16 small fp32 products for the blocks below; about 64K FMAs per chunk). The
state is carried in fp32 registers and ``G``, ``Akk`` stay fp32 (``Akk`` only in registers);
what is only ever a product operand (``Aqk``, ``N``, ``W``,
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
the products on tensor-core matmuls. Inside a 16-row diagonal sub-chunk a pair ``r > i`` is
split the same way at the middle row of the smallest aligned block of 16, 8, 4 or 2 rows that
holds both (four levels, each one exponential tile and two products); the diagonal of ``Aqk``
(factor 1) is formed exactly in fp32. A column-side factor is formed once per chunk, ``kc_i =
k_i exp(G_n - G_i)`` up to the next sub-chunk's first row ``n``, and reused for every later row
sub-chunk with a ``[K]`` factor ``exp(G_ref - G_n) <= 1`` (and for ``kg``). Nothing overflows
however strong the decay; the tail chunk and sequence ends are masked (padded rows have ``k =
v = beta = 0`` and are never stored). Exponentials on this default path: about ``8.7 K`` per
token and head in the intra kernel, fla's whole forward ``14.8 K`` (``python -m
benchmarks.kernel_cost``).

Safe-gate fast path (``safe_gate`` / ``chunk_kda(gate_lower_bound=...)``, a constexpr
``SAFE_GATE`` of the intra kernels, forward and backward): when the caller promises every
``g >= lower_bound`` with ``lower_bound`` in ``[-5, 0)`` (the bounded safe gate,
``lower_bound * sigmoid(...)``), a 16-row sub-chunk accumulates at most ``15 * 5 = 75`` of log
decay from its first row to its last, so the diagonal sub-chunk's factor is split at its first
row too, ``exp(G_r - G_i) = exp(G_r - G_0) exp(G_0 - G_i)``, factors in ``[e^-75, 1]`` and
``[1, e^75]`` (finite in fp32 and bf16; fp16 inputs take bf16 operands there, since e^75 is
past fp16's range), and the block becomes one tensor-core product instead of four levels.
Pairs above the diagonal (also finite) are masked. The diagonal of ``Aqk`` (factor 1) is
formed exactly in fp32 (on both paths), and the backward adds its ``dAqk`` diagonal
elementwise, so its exact cancellation in ``dg`` (``q Yq - k Zq``) survives 16-bit operands.
The results match the exact path to rounding (``tests/test_kernels_safe_gate.py``). The
promise is checked only with ``KIMI_LINEAR_CHECK_GATE=1``: a broken one whose 15 steps in a
sub-chunk sum below about -88 (e.g. ``g = -6.5`` throughout) overflows the split factors and
gives NaN; ``g = -5.5`` throughout still matches the reference (interpreter check).

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


#: ``GATE`` of the cumulative-sum kernel (and of the backward's gate gradient): ``g`` is the
#: log decay itself (0), or the raw gate projection of fla's ``use_gate_in_kernel``, formed into
#: ``-exp(A_log) * softplus(g + dt_bias)`` (1) or ``lower_bound * sigmoid(exp(A_log) * (g +
#: dt_bias))`` (2, the safe gate; ``A_log`` optional there).
GATE_NONE, GATE_SOFTPLUS, GATE_LOWER_BOUND = 0, 1, 2


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))`` without overflow, with ``log1p``'s accuracy for small ``exp(-|x|)``
    (Kahan: ``log(w) * u / (w - 1)``, ``w = 1 + u``); the decode kernel's formula."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    log1p_u = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
    return tl.maximum(x, 0.0) + log1p_u


@triton.jit
def _gate_fwd(
    b_f,
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
    """The log decay from the raw gate ``b_f`` (fp32 tile, key columns ``cols`` of head
    ``i_h``): ``-exp(A_log) softplus(f + dt_bias)`` or ``lower_bound sigmoid(exp(A_log)
    (f + dt_bias))``, in fp32 (:func:`kimi_linear.ops.gate.kda_gate`)."""
    b_x = b_f
    if HAS_BIAS:
        b_x += tl.load(dt_bias + i_h * K + cols, mask=cols < K, other=0.0).to(tl.float32)[None, :]
    b_a = 1.0
    if HAS_A:
        b_a = tl.exp(tl.load(A_log + i_h).to(tl.float32))
    if GATE == 1:
        b_out = -b_a * _softplus(b_x)
    else:
        b_out = lower_bound * tl.sigmoid(b_a * b_x)
    return b_out


@autotune(_WARPS, key=["K", *TUNE_KEYS])
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _chunk_cumsum_kernel(
    g,
    G,
    Gl,
    A_log,
    dt_bias,
    cu_seqlens,
    chunk_indices,
    lower_bound,
    H,
    T_BUCKET,
    NH_BUCKET,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    G_FLOOR: tl.constexpr,
    GATE: tl.constexpr = 0,
    HAS_A: tl.constexpr = False,
    HAS_BIAS: tl.constexpr = False,
):
    """G[r] = sum_{i <= r} max(g[i], G_FLOOR) within each chunk, in fp32, for BK key columns.

    The per-step floor (where ``exp`` is exactly 0 in fp32) is exact and keeps ``G`` finite for
    ``g = -inf`` (see :mod:`kimi_linear.ops.checks`). Also writes each chunk's last row,
    ``Gl [NT, H, K]``, for the state kernels' decay (so they never read ``G``). Grid
    ``(NT, H, cdiv(K, BK))``.

    ``GATE`` (:data:`GATE_SOFTPLUS`, :data:`GATE_LOWER_BOUND`): ``g`` is the raw gate
    projection and the log decay is formed here first (:func:`_gate_fwd`)."""
    i_t, i_h, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    rows = start + tl.arange(0, BT)
    cols = i_k * BK + tl.arange(0, BK)
    mask = (rows < eos)[:, None] & (cols < K)[None, :]
    off = rows[:, None] * H * K + i_h * K + cols[None, :]
    b_g = tl.load(g + off, mask=mask, other=0.0).to(tl.float32)
    if GATE > 0:
        b_g = _gate_fwd(b_g, A_log, dt_bias, lower_bound, i_h, cols, K, GATE, HAS_A, HAS_BIAS)
        b_g = tl.where(mask, b_g, 0.0)
    b_g = tl.maximum(b_g, G_FLOOR)
    b_cs = tl.cumsum(b_g, axis=0)
    tl.store(G + off, b_cs, mask=mask)
    last = tl.minimum(start + BT, eos) - 1
    b_last = tl.sum(tl.where((rows == last)[:, None], b_cs, 0.0), axis=0)
    tl.store(Gl + (i_t * H + i_h).to(tl.int64) * K + cols, b_last, mask=cols < K)


@triton.jit
def _fast_operand(x, like):
    """``x`` as an operand of a safe-gate product: in ``like``'s element dtype, but bf16 for fp16
    (the split factors of a diagonal sub-chunk reach ``e^75``, past fp16's range of 65504; bf16
    has fp32's)."""
    if like.dtype.element_ty == tl.float16:
        return x.to(tl.bfloat16)
    else:
        return x.to(like.dtype.element_ty)


@triton.jit
def _intra_rows(
    q,
    k,
    G,
    beta,
    Aqk,
    qg,
    kg,
    W,
    start,
    eos,
    i_h,
    scale,
    H,
    HQ,
    I: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BKD: tl.constexpr,
    BKW: tl.constexpr,
    SAFE_GATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Row sub-chunk ``I`` (rows ``I * BC ..``) of a chunk: stores its rows of ``qg``, ``kg``
    and of ``Aqk`` (all ``BT`` columns, zeros right of the diagonal block) and returns its four
    ``[BC, BC]`` blocks of ``Akk`` (fp32, beta-scaled, strictly lower; zero right of the diagonal
    block and in rows past the sequence end), which stay in registers for the solve.
    :func:`_intra_rows_exact` (any decay) or :func:`_intra_rows_safe` (``SAFE_GATE``)."""
    if SAFE_GATE:
        a_0, a_1, a_2, a_3 = _intra_rows_safe(
            q, k, G, beta, Aqk, qg, kg, start, eos, i_h, scale, H, HQ, I, K, BT, BC, BKW,
            DOT_PREC,
        )  # fmt: skip
    else:
        a_0, a_1, a_2, a_3 = _intra_rows_exact(
            q, k, G, beta, Aqk, qg, kg, W, start, eos, i_h, scale, H, HQ, I, K, BT, BC, BKW,
            DOT_PREC,
        )  # fmt: skip
    return a_0, a_1, a_2, a_3


@triton.jit
def _finish_diag(b_akd, b_aqd, b_qk, b_beta, m_r, BC: tl.constexpr):
    """The diagonal block of row sub-chunk ``I``: ``Aqk``'s diagonal (factor 1) exactly from
    ``b_qk = sum q k`` (a 16-bit product of split factors would round it, and the backward's
    dG relies on its exact cancellation), ``Akk`` strictly lower and beta-scaled, ``Aqk`` lower;
    returns ``(Akk block, Aqk block)``."""
    o_c = tl.arange(0, BC)
    b_aqd = tl.where(o_c[:, None] == o_c[None, :], b_qk[:, None], b_aqd)
    b_akd = tl.where((o_c[:, None] > o_c[None, :]) & m_r[:, None], b_akd * b_beta[:, None], 0.0)
    return b_akd, tl.where(o_c[:, None] >= o_c[None, :], b_aqd, 0.0)


@triton.jit
def _partner_block(Aqk, a_rows, m_r, b_akk, b_aqk, b_beta, j, a_0, a_1, a_2, BC: tl.constexpr):
    """Store the ``Aqk`` block of partner sub-chunk ``j`` and put its beta-scaled ``Akk`` block
    into ``a_j``; returns ``(a_0, a_1, a_2)``."""
    o_c = tl.arange(0, BC)
    tl.store(
        Aqk + a_rows + j * BC + o_c[None, :], b_aqk.to(Aqk.dtype.element_ty), mask=m_r[:, None]
    )
    b_akk = b_akk * b_beta[:, None]
    return (
        tl.where(j == 0, b_akk, a_0),
        tl.where(j == 1, b_akk, a_1),
        tl.where(j == 2, b_akk, a_2),
    )


@triton.jit
def _place_diag(a_0, a_1, a_2, a_3, b_akd, I: tl.constexpr):
    """``(a_0, .., a_3)`` with the diagonal ``Akk`` block in ``a_I``."""
    if I == 0:
        a_0 = b_akd
    elif I == 1:
        a_1 = b_akd
    elif I == 2:
        a_2 = b_akd
    else:
        a_3 = b_akd
    return a_0, a_1, a_2, a_3


@triton.jit
def _store_rows_aqk(Aqk, a_rows, m_r, b_aqd, I: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """Store row sub-chunk ``I``'s diagonal ``Aqk`` block and the zero blocks right of it (so
    the buffer needs no memset)."""
    o_c = tl.arange(0, BC)
    tl.store(
        Aqk + a_rows + I * BC + o_c[None, :], b_aqd.to(Aqk.dtype.element_ty), mask=m_r[:, None]
    )
    for j in tl.static_range(I + 1, BT // BC):
        tl.store(
            Aqk + a_rows + j * BC + o_c[None, :],
            tl.zeros([BC, BC], dtype=Aqk.dtype.element_ty),
            mask=m_r[:, None],
        )


@triton.jit
def _diag_level(
    q,
    p_g,
    b_g,
    b_q,
    b_k,
    m_rk,
    m_k,
    row0,
    eos,
    HK,
    S: tl.constexpr,
    BC: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One level of a diagonal ``[BC, BC]`` block on a ``[BC, BKW]`` slice: the pairs ``r > i``
    whose smallest aligned block of ``S`` rows holds both (``r`` in its upper half, ``i`` in its
    lower), ``exp(G_r - G_i) = exp(G_r - G_m) exp(G_m - G_i)`` split at that block's middle row
    ``m`` (both factors <= 1 for any decay). One tensor-core product each for ``Akk`` and
    ``Aqk`` (operands in the input dtype); returns their ``[BC, BC]`` contributions, zero
    outside the level's pairs. ``p_g``: ``G``'s pointers of the slice's columns in row 0."""
    o_c = tl.arange(0, BC)
    up = ((o_c % S) >= S // 2)[:, None]
    m_ref = tl.minimum(row0 + (o_c // S) * S + S // 2, eos - 1)
    b_gm = tl.load(p_g[None, :] + m_ref[:, None] * HK, mask=m_k[None, :], other=0.0)
    b_d = b_g - b_gm
    b_s = tl.exp(tl.where(m_rk, tl.where(up, b_d, -b_d), 0.0))
    b_ks = b_k * b_s
    dt = q.dtype.element_ty
    b_kl = tl.trans(tl.where(up, 0.0, b_ks).to(dt))
    b_a = tl.dot(tl.where(up, b_ks, 0.0).to(dt), b_kl, input_precision=DOT_PREC)
    b_b = tl.dot(tl.where(up, b_q * b_s, 0.0).to(dt), b_kl, input_precision=DOT_PREC)
    # pairs across two S-blocks belong to a coarser level
    same = (o_c[:, None] // S) == (o_c[None, :] // S)
    return tl.where(same, b_a, 0.0), tl.where(same, b_b, 0.0)


@triton.jit
def _intra_rows_exact(
    q,
    k,
    G,
    beta,
    Aqk,
    qg,
    kg,
    W,
    start,
    eos,
    i_h,
    scale,
    H,
    HQ,
    I: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BKW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """:func:`_intra_rows` for any decay: every exponent a difference ``G_a - G_b``, ``a >= b``,
    every pair's factor a product of such exponentials (each <= 1), which puts every block on
    the tensor cores (operands in the input dtype, fp32 accumulation).

    About ``8.7 K`` exponentials per row of the chunk with the WY pass (fla's default path
    ``14.8 K``; the full ``[16, 16, BKD]`` pair cube and per-partner factors were ``22 K``):

    * ``qg = q exp(G)``; column side ``kc_i = k_i exp(G_n - G_i)``, ``n`` the next sub-chunk's
      first row (the chunk's last row for the last sub-chunk): ``kg = kc exp(G_last - G_n)``
      (a ``[K]`` factor), and ``kc`` is kept in ``W`` (scratch until the WY pass overwrites it)
      for the later row sub-chunks, which read it after a barrier;
    * the block of partner sub-chunk ``j < I``: ``(k_r exp(G_r - G_ref)) (kc_j exp(G_ref -
      G_n(j)))^T`` (``ref`` the first row; the middle factor a ``[K]`` vector, 1 for ``j = I -
      1``); the row factor is formed per partner, which keeps the kernel spill-free (all
      partners in one pass over K would hold six accumulators);
    * the diagonal block by levels (:func:`_diag_level`): a pair ``r > i`` is split at the
      middle row of the smallest aligned block of 16, 8, 4 or 2 rows that holds both, one
      ``[BC, BKW]`` exponential tile and two products per level (64 exponentials per key column
      for the block's 120 pairs, not 256); the diagonal of ``Aqk`` (factor 1) exactly in fp32.
    """
    HK = H * K
    # q and k have HQ heads (GVA: H = G * HQ value heads; head i_h reads key head i_h // G)
    HQK = HQ * K
    i_hq = i_h // (H // HQ)
    dt = q.dtype.element_ty
    row0 = start + I * BC
    o_c = tl.arange(0, BC)
    rows = row0 + o_c
    m_r = rows < eos
    b_beta = tl.load(beta + rows * H + i_h, mask=m_r, other=0.0).to(tl.float32)
    # References (clamped to the sequence's last row, which keeps every factor <= 1 in a tail
    # chunk): the first row (row side), the next sub-chunk's first row or the chunk's last row
    # (column side).
    last = tl.minimum(start + BT, eos) - 1
    ref = tl.minimum(row0, eos - 1)
    nxt = tl.minimum(row0 + BC, last)
    a_rows = rows[:, None] * H * BT + i_h * BT
    if I > 0:
        tl.debug_barrier()  # the earlier sub-chunks' kc (in W) visible to every thread
    b_akd = tl.zeros([BC, BC], dtype=tl.float32)
    b_aqd = tl.zeros([BC, BC], dtype=tl.float32)
    b_qk = tl.zeros([BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BKW)):
        cols = i_k * BKW + tl.arange(0, BKW)
        m_k = cols < K
        m_rk = m_r[:, None] & m_k[None, :]
        off_r = rows[:, None] * HK + i_h * K + cols[None, :]
        off_rq = rows[:, None] * HQK + i_hq * K + cols[None, :]
        b_q = tl.load(q + off_rq, mask=m_rk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + off_rq, mask=m_rk, other=0.0).to(tl.float32)
        b_g = tl.load(G + off_r, mask=m_rk, other=0.0)
        tl.store(qg + off_r, (b_q * tl.exp(b_g)).to(qg.dtype.element_ty), mask=m_rk)
        b_gn = tl.load(G + nxt * HK + i_h * K + cols, mask=m_k, other=0.0)
        b_kc = b_k * tl.exp(tl.where(m_rk, b_gn[None, :] - b_g, 0.0))
        if I == BT // BC - 1:
            b_kg = b_kc
        else:
            b_gl = tl.load(G + last * HK + i_h * K + cols, mask=m_k, other=0.0)
            b_kg = b_kc * tl.exp(b_gl - b_gn)[None, :]
            tl.store(W + off_r, b_kc.to(W.dtype.element_ty), mask=m_rk)
        tl.store(kg + off_r, b_kg.to(kg.dtype.element_ty), mask=m_rk)
        # The diagonal block: its pairs r > i split level by level (blocks of 16, 8, 4, 2
        # rows); its diagonal (factor 1) exactly, as on the safe-gate path.
        p_g = G + i_h * K + cols
        for lv in range(0, 4):
            b_x, b_y = _diag_level(
                q, p_g, b_g, b_q, b_k, m_rk, m_k, row0, eos, HK, BC >> lv, BC, DOT_PREC
            )
            b_akd += b_x
            b_aqd += b_y
        b_qk += tl.sum(b_q * b_k, axis=1)
    b_akd, b_aqd = _finish_diag(b_akd, b_aqd, b_qk, b_beta, m_r, BC)
    _store_rows_aqk(Aqk, a_rows, m_r, b_aqd, I, BT, BC)
    a_0 = tl.zeros([BC, BC], dtype=tl.float32)
    a_1 = tl.zeros([BC, BC], dtype=tl.float32)
    a_2 = tl.zeros([BC, BC], dtype=tl.float32)
    a_3 = tl.zeros([BC, BC], dtype=tl.float32)
    # Blocks left of the diagonal, one partner sub-chunk j at a time (a loop, not unrolled):
    # exp(G_r - G_i) = exp(G_r - G_ref) exp(G_ref - G_n(j)) exp(G_n(j) - G_i), the last
    # factor in kc_j (from W), the middle one a [K] vector (1 for j = I - 1).
    for j in range(0, I):
        rows_j = start + j * BC + o_c
        m_j = rows_j < eos
        nxt_j = tl.minimum(start + (j + 1) * BC, last)
        b_akk = tl.zeros([BC, BC], dtype=tl.float32)
        b_aqk = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BKW)):
            cols = i_k * BKW + tl.arange(0, BKW)
            m_k = cols < K
            m_rk = m_r[:, None] & m_k[None, :]
            off_r = rows[:, None] * HK + i_h * K + cols[None, :]
            off_rq = rows[:, None] * HQK + i_hq * K + cols[None, :]
            b_gr = tl.load(G + ref * HK + i_h * K + cols, mask=m_k, other=0.0)
            b_rf = tl.load(G + off_r, mask=m_rk, other=0.0)
            b_rf = tl.exp(tl.where(m_rk, b_rf - b_gr[None, :], 0.0))
            b_qr = tl.load(q + off_rq, mask=m_rk, other=0.0).to(tl.float32) * scale * b_rf
            b_kr = tl.load(k + off_rq, mask=m_rk, other=0.0).to(tl.float32) * b_rf
            b_gj = tl.load(G + nxt_j * HK + i_h * K + cols, mask=m_k, other=0.0)
            b_kj = tl.load(
                W + rows_j[:, None] * HK + i_h * K + cols[None, :],
                mask=m_j[:, None] & m_k[None, :],
                other=0.0,
            )
            b_kj = tl.trans((b_kj.to(tl.float32) * tl.exp(b_gr - b_gj)[None, :]).to(dt))
            b_akk += tl.dot(b_kr.to(dt), b_kj, input_precision=DOT_PREC)
            b_aqk += tl.dot(b_qr.to(dt), b_kj, input_precision=DOT_PREC)
        a_0, a_1, a_2 = _partner_block(Aqk, a_rows, m_r, b_akk, b_aqk, b_beta, j, a_0, a_1, a_2, BC)
    return _place_diag(a_0, a_1, a_2, a_3, b_akd, I)


@triton.jit
def _intra_rows_safe(
    q,
    k,
    G,
    beta,
    Aqk,
    qg,
    kg,
    start,
    eos,
    i_h,
    scale,
    H,
    HQ,
    I: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BC: tl.constexpr,
    BKW: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """:func:`_intra_rows` for the bounded safe gate (``g >= -5``): the diagonal block by
    tensor-core products of factors split at the sub-chunk's first row (see the module
    docstring). The head dim is walked in ``BKW``-column slices (only ``[BC, BKW]`` tiles
    live)."""
    HK = H * K
    # q and k have HQ heads (GVA: H = G * HQ value heads; head i_h reads key head i_h // G)
    HQK = HQ * K
    i_hq = i_h // (H // HQ)
    row0 = start + I * BC
    o_c = tl.arange(0, BC)
    rows = row0 + o_c
    m_r = rows < eos
    b_beta = tl.load(beta + rows * H + i_h, mask=m_r, other=0.0).to(tl.float32)
    # Reference: the sub-chunk's first row (the chunk's last row when the sub-chunk is past the
    # sequence end, which keeps every factor finite); G_r - G_ref <= 0 for its rows, >= 0 before.
    ref = tl.minimum(row0, eos - 1)
    last = tl.minimum(start + BT, eos) - 1
    a_rows = rows[:, None] * H * BT + i_h * BT
    # qg, kg rows and (safe gate) the diagonal block, slice by slice.
    b_akd = tl.zeros([BC, BC], dtype=tl.float32)
    b_aqd = tl.zeros([BC, BC], dtype=tl.float32)
    b_qk = tl.zeros([BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BKW)):
        cols = i_k * BKW + tl.arange(0, BKW)
        m_k = cols < K
        m_rk = m_r[:, None] & m_k[None, :]
        off_r = rows[:, None] * HK + i_h * K + cols[None, :]
        off_rq = rows[:, None] * HQK + i_hq * K + cols[None, :]
        b_q = tl.load(q + off_rq, mask=m_rk, other=0.0).to(tl.float32) * scale
        b_k = tl.load(k + off_rq, mask=m_rk, other=0.0).to(tl.float32)
        b_g = tl.load(G + off_r, mask=m_rk, other=0.0)
        b_gl = tl.load(G + last * HK + i_h * K + cols, mask=m_k, other=0.0)
        tl.store(qg + off_r, (b_q * tl.exp(b_g)).to(qg.dtype.element_ty), mask=m_rk)
        b_kg = b_k * tl.exp(tl.where(m_rk, b_gl[None, :] - b_g, 0.0))
        tl.store(kg + off_r, b_kg.to(kg.dtype.element_ty), mask=m_rk)
        # Bounded gate (every g >= lower_bound >= -5): inside the sub-chunk
        # G_ref - G_i <= 75, so the split at the first row stays finite (factors in
        # [e^-75, e^75]) and the diagonal block is one more tensor-core product; the upper
        # triangle (finite too) is masked below.
        b_ref = tl.load(G + ref * HK + i_h * K + cols, mask=m_k, other=0.0)
        b_dr = tl.exp(tl.where(m_rk, b_g - b_ref[None, :], 0.0))
        b_kc = b_k * tl.exp(tl.where(m_rk, b_ref[None, :] - b_g, 0.0))
        b_kc = tl.trans(_fast_operand(b_kc, q))
        b_akd += tl.dot(_fast_operand(b_k * b_dr, q), b_kc, input_precision=DOT_PREC)
        b_aqd += tl.dot(_fast_operand(b_q * b_dr, q), b_kc, input_precision=DOT_PREC)
        b_qk += tl.sum(b_q * b_k, axis=1)
    b_akd, b_aqd = _finish_diag(b_akd, b_aqd, b_qk, b_beta, m_r, BC)
    _store_rows_aqk(Aqk, a_rows, m_r, b_aqd, I, BT, BC)
    a_0 = tl.zeros([BC, BC], dtype=tl.float32)
    a_1 = tl.zeros([BC, BC], dtype=tl.float32)
    a_2 = tl.zeros([BC, BC], dtype=tl.float32)
    a_3 = tl.zeros([BC, BC], dtype=tl.float32)
    # Blocks left of the diagonal: exp(G_r - G_i) = exp(G_r - G_ref) exp(G_ref - G_i), both <= 1,
    # one partner sub-chunk j at a time (a loop, not unrolled), slice by slice.
    for j in range(0, I):
        rows_j = start + j * BC + o_c
        m_j = rows_j < eos
        b_akk = tl.zeros([BC, BC], dtype=tl.float32)
        b_aqk = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BKW)):
            cols = i_k * BKW + tl.arange(0, BKW)
            m_k = cols < K
            m_rk = m_r[:, None] & m_k[None, :]
            m_jk = m_j[:, None] & m_k[None, :]
            off_r = rows[:, None] * HK + i_h * K + cols[None, :]
            off_j = rows_j[:, None] * HK + i_h * K + cols[None, :]
            b_ref = tl.load(G + ref * HK + i_h * K + cols, mask=m_k, other=0.0)
            b_dr = tl.exp(tl.where(m_rk, tl.load(G + off_r, mask=m_rk, other=0.0) - b_ref, 0.0))
            off_rq = rows[:, None] * HQK + i_hq * K + cols[None, :]
            off_jq = rows_j[:, None] * HQK + i_hq * K + cols[None, :]
            b_qe = tl.load(q + off_rq, mask=m_rk, other=0.0).to(tl.float32) * scale * b_dr
            b_ke = tl.load(k + off_rq, mask=m_rk, other=0.0).to(tl.float32) * b_dr
            b_gj = tl.load(G + off_j, mask=m_jk, other=0.0)
            b_kj = tl.load(k + off_jq, mask=m_jk, other=0.0).to(tl.float32)
            b_kj = b_kj * tl.exp(tl.where(m_jk, b_ref[None, :] - b_gj, 0.0))
            # Tensor-core operands in the input dtype (fp32 accumulation).
            b_kj = tl.trans(b_kj.to(q.dtype.element_ty))
            b_akk += tl.dot(b_ke.to(q.dtype.element_ty), b_kj, input_precision=DOT_PREC)
            b_aqk += tl.dot(b_qe.to(q.dtype.element_ty), b_kj, input_precision=DOT_PREC)
        a_0, a_1, a_2 = _partner_block(Aqk, a_rows, m_r, b_akk, b_aqk, b_beta, j, a_0, a_1, a_2, BC)
    return _place_diag(a_0, a_1, a_2, a_3, b_akd, I)


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


# One warpgroup, no software pipelining of the loops' loads (num_stages=2 adds buffers that
# push the sm_90 bf16 K = 128 build to 255 registers and a few spilled bytes; 1 stage compiles
# spill-free at ~245 registers, 2 CTAs/SM).
_INTRA_CONFIGS = config_space(
    triton.Config({}, num_warps=4, num_stages=1), num_warps=(4, 8), num_stages=(1, 2)
)


@autotune(_INTRA_CONFIGS, key=["K", *TUNE_KEYS])
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _intra_solve_fwd_kernel(
    q,
    k,
    G,
    beta,
    Aqk,
    Ainv,
    W,
    qg,
    kg,
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
    BK: tl.constexpr,
    BKD: tl.constexpr,
    BKW: tl.constexpr,
    SAFE_GATE: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Intra-chunk pairs, solve and WY operands of one chunk and head. Grid ``(NT, H)``.

    Per 16-row sub-chunk (:func:`_intra_rows`): the rows of ``Aqk`` (scaled, lower),
    ``qg = scale q exp(G)`` and ``kg = k exp(G_last - G)``, and the ten nonzero ``[BC, BC]``
    blocks of ``Akk`` (beta-scaled, strictly lower), which stay in fp32 registers (no ``Akk``
    buffer). Then ``N = (I + Akk)^-1`` by 16 x 16 block inversion and ``W = N (beta k exp(G))``,
    ``BKW`` key columns at a time. Aqk, Ainv ``[TT, H, BT]`` and W, qg, kg ``[TT, H, K]`` in
    the input dtype. ``SAFE_GATE``: the diagonal sub-chunk blocks by tensor-core products (valid
    only for ``g >= -5``; see the module docstring), else in 8 x 8 quadrants
    (:func:`_intra_rows_exact`; ``W`` is its scratch until the WY pass).
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    tl.static_assert(BT == 4 * BC)
    a_base = (start * H + i_h) * BT  # int64 scalar row base, int32 offsets inside the chunk
    n_valid = (eos - start).to(tl.int32)
    b_zero = tl.zeros([BC, BC], dtype=tl.float32)
    # N = (I + Akk)^-1 in 16 x 16 blocks (unit lower triangular, BT = 4 BC), one block row as
    # soon as its Akk blocks exist (so at most six N blocks and four Akk blocks are live): the
    # diagonal blocks by forward substitution (elementwise, no tensor-core work), the blocks
    # below them by block substitution, N_ij = -N_ii sum_{j <= m < i} Akk_im N_mj: 16 products
    # of [BC, BC] x [BC, BC] tiles in exact fp32 (CUDA-core FMAs, 64K per chunk: no TF32 and no
    # rounding of N before its single rounding to the input dtype, on store).
    a00, _, _, _ = _intra_rows(
        q, k, G, beta, Aqk, qg, kg, W, start, eos, i_h, scale, H, HQ, 0, K, BT, BC, BKD, BKW,
        SAFE_GATE, DOT_PREC,
    )  # fmt: skip
    n00 = _inv_unit_lower(a00, BC)
    _store_block(Ainv, a_base, 0, 0, n00, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 0, 1, b_zero, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 0, 2, b_zero, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 0, 3, b_zero, n_valid, H, BT, BC)
    a10, a11, _, _ = _intra_rows(
        q, k, G, beta, Aqk, qg, kg, W, start, eos, i_h, scale, H, HQ, 1, K, BT, BC, BKD, BKW,
        SAFE_GATE, DOT_PREC,
    )  # fmt: skip
    n11 = _inv_unit_lower(a11, BC)
    n10 = -tl.dot(n11, tl.dot(a10, n00, input_precision="ieee"), input_precision="ieee")
    _store_block(Ainv, a_base, 1, 0, n10, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 1, 1, n11, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 1, 2, b_zero, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 1, 3, b_zero, n_valid, H, BT, BC)
    a20, a21, a22, _ = _intra_rows(
        q, k, G, beta, Aqk, qg, kg, W, start, eos, i_h, scale, H, HQ, 2, K, BT, BC, BKD, BKW,
        SAFE_GATE, DOT_PREC,
    )  # fmt: skip
    n22 = _inv_unit_lower(a22, BC)
    n21 = -tl.dot(n22, tl.dot(a21, n11, input_precision="ieee"), input_precision="ieee")
    b_t = tl.dot(a20, n00, input_precision="ieee") + tl.dot(a21, n10, input_precision="ieee")
    n20 = -tl.dot(n22, b_t, input_precision="ieee")
    _store_block(Ainv, a_base, 2, 0, n20, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 2, 1, n21, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 2, 2, n22, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 2, 3, b_zero, n_valid, H, BT, BC)
    a30, a31, a32, a33 = _intra_rows(
        q, k, G, beta, Aqk, qg, kg, W, start, eos, i_h, scale, H, HQ, 3, K, BT, BC, BKD, BKW,
        SAFE_GATE, DOT_PREC,
    )  # fmt: skip
    n33 = _inv_unit_lower(a33, BC)
    n32 = -tl.dot(n33, tl.dot(a32, n22, input_precision="ieee"), input_precision="ieee")
    b_t = tl.dot(a31, n11, input_precision="ieee") + tl.dot(a32, n21, input_precision="ieee")
    n31 = -tl.dot(n33, b_t, input_precision="ieee")
    b_t = tl.dot(a30, n00, input_precision="ieee") + tl.dot(a31, n10, input_precision="ieee")
    b_t += tl.dot(a32, n20, input_precision="ieee")
    n30 = -tl.dot(n33, b_t, input_precision="ieee")
    _store_block(Ainv, a_base, 3, 0, n30, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 3, 1, n31, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 3, 2, n32, n_valid, H, BT, BC)
    _store_block(Ainv, a_base, 3, 3, n33, n_valid, H, BT, BC)
    # Read N back whole (in the input dtype: the operand of the W product) after a barrier, so
    # every thread of the program sees every block (an L1/L2 hit: the tile was just written).
    tl.debug_barrier()
    o_t = tl.arange(0, BT)
    rows = start + o_t
    m_t = rows < eos
    b_nl = tl.load(
        Ainv + a_base + o_t[:, None] * (H * BT) + o_t[None, :], mask=m_t[:, None], other=0.0
    )
    b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    for i_k in range(0, tl.cdiv(K, BKW)):
        cols_k = i_k * BKW + tl.arange(0, BKW)
        m_tk = m_t[:, None] & (cols_k < K)[None, :]
        off_k = rows[:, None] * H * K + i_h * K + cols_k[None, :]
        off_kq = rows[:, None] * HQ * K + (i_h // (H // HQ)) * K + cols_k[None, :]
        b_k = tl.load(k + off_kq, mask=m_tk, other=0.0).to(tl.float32)
        b_g = tl.load(G + off_k, mask=m_tk, other=0.0)
        b_kb = (b_k * tl.exp(b_g) * b_beta[:, None]).to(k.dtype.element_ty)
        b_w = tl.dot(b_nl, b_kb, input_precision=DOT_PREC)
        tl.store(W + off_k, b_w.to(W.dtype.element_ty), mask=m_tk)


@autotune(_WARPS8, key=["K", "V", *TUNE_KEYS])
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _recompute_wy_kernel(
    k,
    G,
    beta,
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
    HQ,
    T_BUCKET,
    NH_BUCKET,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    HAS_DO: tl.constexpr,
    DOT_PREC: tl.constexpr,
    GVA: tl.constexpr = False,
):
    """The backward's per-chunk operands from what the forward kept (``G``, ``Aqk``, ``N``).
    Grid ``(NT, H)``.

    ``RECOMPUTE``: ``W = N (beta k exp(G))`` ``[TT, H, K]`` (BK key columns at a time,
    ``BK <= 64``), the decayed operands ``qg = scale q exp(G)``, ``kg = k exp(G_last - G)`` (input
    dtype) and the chunks' last rows ``Gl [NT, H, K]`` (fp32), as the forward's
    :func:`_intra_solve_fwd_kernel` and cumulative sum form them (not kept between forward and
    backward). ``HAS_DO``: the chunk-local part of the residual gradient,
    ``ddelta = Aqk^T dO`` ``[TT, H, V]`` fp32, which the sequential backward kernel completes
    (so that kernel holds no ``[BT, BT]`` tile).
    """
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    _, start, eos = _chunk_bounds(cu_seqlens, chunk_indices, i_t, BT)
    o_t = tl.arange(0, BT)
    rows = start + o_t
    m_t = rows < eos
    if RECOMPUTE:
        a_off = rows[:, None] * H * BT + i_h * BT + o_t[None, :]
        b_nl = tl.load(Ainv + a_off, mask=m_t[:, None], other=0.0)
        b_beta = tl.load(beta + rows * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        last = tl.minimum(start + BT, eos) - 1
        for i_k in range(0, tl.cdiv(K, BK)):
            cols_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (cols_k < K)[None, :]
            off_k = rows[:, None] * H * K + i_h * K + cols_k[None, :]
            off_kq = off_k
            if GVA:  # q, k on HQ heads (a separate offset tile only when it differs)
                off_kq = rows[:, None] * HQ * K + (i_h // (H // HQ)) * K + cols_k[None, :]
            b_k = tl.load(k + off_kq, mask=m_tk, other=0.0).to(tl.float32)
            b_g = tl.load(G + off_k, mask=m_tk, other=0.0)
            b_kb = (b_k * tl.exp(b_g) * b_beta[:, None]).to(k.dtype.element_ty)
            b_w = tl.dot(b_nl, b_kb, input_precision=DOT_PREC)
            tl.store(W + off_k, b_w.to(W.dtype.element_ty), mask=m_tk)
            b_gl = tl.load(G + last * H * K + i_h * K + cols_k, mask=cols_k < K, other=0.0)
            tl.store(Gl + (i_t * H + i_h).to(tl.int64) * K + cols_k, b_gl, mask=cols_k < K)
            b_q = tl.load(q + off_kq, mask=m_tk, other=0.0).to(tl.float32) * scale
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
# memory. First config at K = V = 128 bf16 on sm_90 (one warpgroup, loads of the next chunk
# prefetched by a 2-stage pipeline): 168 registers, no spills, 96 KB shared memory, 2 CTAs/SM
# (benchmarks/results/cpu/kernels.compile_sm90_bf16_k128.md). Configs that exceed a device's
# shared memory are skipped by the autotuner.
_STATE_CONFIGS = config_space(
    triton.Config({"BV": 32}, num_warps=4, num_stages=2),
    BV=(32, 64, 16),
    num_warps=(4, 8),
    num_stages=(2, 3, 1),
)


@autotune(_STATE_CONFIGS, key=["K", "V", *TUNE_KEYS, "SEGMENT_PASS"], suite=(0, 12))  # +BV16 w4 s2
@triton.jit(do_not_specialize=NO_SPECIALIZE)
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
    T_BUCKET,
    NH_BUCKET,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BKS: tl.constexpr,
    BV: tl.constexpr,
    USE_H0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    SEGMENT_PASS: tl.constexpr = False,
):
    """Sequential pass over the chunks of one sequence and head, for a block of BV value columns.

    Grid ``(cdiv(V, BV) * N * H,)``, value blocks fastest (axis 0: no 65,535 limit on the
    number of sequences x heads, ``utils.checked_grid``). The state ``[BK, BV]`` stays in fp32
    registers as ``BK // BKS`` (1, 2 or 4) key blocks ``b_s1 .. b_s4``; per chunk it writes the
    chunk-start state ``h [NT, H, K, V]`` and the residual ``delta [TT, H, V]`` (in the input
    dtype), from which :func:`_chunk_fwd_o_kernel` forms the outputs of all chunks in
    parallel. The residual ``delta = U - W S`` is formed in fp32, with ``U = N (beta v)``
    computed here from ``Ainv`` (it does not depend on the state, so it is off the sequential
    path and never stored).

    ``SEGMENT_PASS`` (in-device sequence splitting, :mod:`kimi_linear.kernels.split`): the
    "sequences" are segments; nothing per chunk is stored; the grid has ``cdiv(K, BV)`` more
    blocks per segment and head, whose programs start from the identity on their columns and
    drop the ``U`` term, so they carry the segment's transition ``M`` while the others carry
    ``H`` (from a zero state); both go to ``ht`` as ``[NS, H, K, V + K]`` (``H | M``).
    """
    NV: tl.constexpr = (V + BV - 1) // BV
    NB: tl.constexpr = NV + SEGMENT_PASS * ((K + BV - 1) // BV)  # + transition blocks
    i_v, i_nh = tl.program_id(0) % NB, tl.program_id(0) // NB
    i_n, i_h = i_nh // H, i_nh % H
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    num_chunks = tl.cdiv(eos - bos, BT)
    o_t = tl.arange(0, BT)
    is_m = i_v >= NV  # a transition program (SEGMENT_PASS only)
    cols_v = tl.where(is_m, i_v - NV, i_v) * BV + tl.arange(0, BV)
    m_v = cols_v < tl.where(is_m, 0, V)  # transition programs read no v
    seq_state = (i_n * H + i_h).to(tl.int64) * K * V
    b_s1 = tl.zeros([BKS, BV], dtype=tl.float32)
    if BK > BKS:
        b_s2 = tl.zeros([BKS, BV], dtype=tl.float32)
    if BK > 2 * BKS:
        b_s3 = tl.zeros([BKS, BV], dtype=tl.float32)
        b_s4 = tl.zeros([BKS, BV], dtype=tl.float32)
    if SEGMENT_PASS:  # transition programs start from the identity's columns
        n_id = tl.where(is_m, K, 0)
        b_s1 += _identity_block(0, cols_v, n_id, BKS)
        if BK > BKS:
            b_s2 += _identity_block(BKS, cols_v, n_id, BKS)
        if BK > 2 * BKS:
            b_s3 += _identity_block(2 * BKS, cols_v, n_id, BKS)
            b_s4 += _identity_block(3 * BKS, cols_v, n_id, BKS)
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
        if not SEGMENT_PASS:
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
        # delta = U - W S, one key block at a time, with U = N (beta v) (none in a transition
        # program: it neither loads N, beta, v nor runs their product).
        if SEGMENT_PASS:
            b_d = tl.zeros([BT, BV], dtype=tl.float32)
            if i_v < NV:
                b_d = _residual_base(
                    Ainv, beta, v + v_c + off_v, kg, start, i_h, H, m_t, m_tv, BT, DOT_PREC
                )
        else:
            b_d = _residual_base(
                Ainv, beta, v + v_c + off_v, kg, start, i_h, H, m_t, m_tv, BT, DOT_PREC
            )
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
        if not SEGMENT_PASS:
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
    if SEGMENT_PASS:  # H | M of the segment: [K, V + K] rows
        seg = ht + (i_n * H + i_h).to(tl.int64) * K * (V + K)
        cols_out = cols_v + tl.where(is_m, V, 0)
        m_out = cols_v < tl.where(is_m, K, V)
        _store_rows(seg, 0, cols_out, m_out, b_s1, K, V + K, BKS)
        if BK > BKS:
            _store_rows(seg, BKS, cols_out, m_out, b_s2, K, V + K, BKS)
        if BK > 2 * BKS:
            _store_rows(seg, 2 * BKS, cols_out, m_out, b_s3, K, V + K, BKS)
            _store_rows(seg, 3 * BKS, cols_out, m_out, b_s4, K, V + K, BKS)
    elif STORE_FINAL:
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


@triton.jit
def _residual_base(
    Ainv, beta, p_v, like, start, i_h, H, m_t, m_tv, BT: tl.constexpr, DOT_PREC: tl.constexpr
):
    """``U = N (beta v)`` of a chunk for one value block (``p_v``: the block's pointers),
    fp32; the product takes operands of ``like``'s dtype."""
    o_t = tl.arange(0, BT)
    a_c = (start * H + i_h) * BT
    b_n = tl.load(Ainv + a_c + o_t[:, None] * (H * BT) + o_t[None, :], mask=m_t[:, None], other=0.0)
    b_b = tl.load(beta + start * H + i_h + o_t * H, mask=m_t, other=0.0).to(tl.float32)
    b_v = tl.load(p_v, mask=m_tv, other=0.0).to(tl.float32) * b_b[:, None]
    return tl.dot(b_n, b_v.to(like.dtype.element_ty), input_precision=DOT_PREC)


@triton.jit
def _identity_block(row0, cols, n, BD: tl.constexpr):
    """Rows ``row0 + [0, BD)`` at columns ``cols`` of the identity's first ``n`` columns."""
    rows = row0 + tl.arange(0, BD)
    return tl.where((rows[:, None] == cols[None, :]) & (cols < n)[None, :], 1.0, 0.0)


@triton.jit
def _store_rows(base, row0, cols, m_cols, b_x, K: tl.constexpr, LD: tl.constexpr, BD: tl.constexpr):
    """Store the ``[BD, BV]`` block ``b_x`` at key rows ``row0 ..`` of a ``[K, LD]`` matrix."""
    rows = row0 + tl.arange(0, BD)
    mask = (rows < K)[:, None] & m_cols[None, :]
    tl.store(base + rows[:, None] * LD + cols[None, :], b_x, mask=mask)


_O_CONFIGS = config_space(
    triton.Config({"BV": 64}, num_warps=8, num_stages=2),
    BV=(64, 32, 128),
    num_warps=(8, 4),
    num_stages=(2, 3),
)


@autotune(_O_CONFIGS, key=["K", "V", *TUNE_KEYS], suite=(0, 6))  # + BV=32 w4 s2
@triton.jit(do_not_specialize=NO_SPECIALIZE)
def _chunk_fwd_o_kernel(
    qg,
    Aqk,
    h,
    delta,
    o,
    cu_seqlens,
    chunk_indices,
    H,
    T_BUCKET,
    NH_BUCKET,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BKS: tl.constexpr,
    BV: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Outputs of one chunk and value block, ``o = qg h + Aqk delta``. Grid
    ``(NT * cdiv(V, BV), H)``, value blocks fastest: the chunk count is on axis 0, whose limit
    is 2**31 - 1 blocks (axis 1 allows 65,535: ~4.19M packed tokens), see ``utils.checked_grid``.

    Every chunk is independent once the sequential kernel has stored the chunk-start states
    ``h`` and residuals ``delta``, so this runs with full parallelism; the key dimension is
    walked in ``BKS`` blocks (a ``[BT, BKS]`` and a ``[BKS, BV]`` operand live at a time).
    """
    NV: tl.constexpr = (V + BV - 1) // BV
    i_v, i_t, i_h = tl.program_id(0) % NV, tl.program_id(0) // NV, tl.program_id(1)
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


class InKernelGate(NamedTuple):
    """fla's ``use_gate_in_kernel``: ``g`` is the raw gate projection, formed into the log decay
    by the cumulative-sum kernel (forward) and differentiated in the backward's last kernel."""

    kind: int  #: :data:`GATE_SOFTPLUS` or :data:`GATE_LOWER_BOUND`
    A_log: torch.Tensor | None  #: ``[H]`` contiguous (optional with the lower bound)
    dt_bias: torch.Tensor | None  #: ``[H * K]`` contiguous, or None
    lower_bound: float  #: the safe gate's bound (unused by the softplus gate)


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
    #: ``[NS, H, K, V + K]`` fp32 per-segment ``H | M`` of a split run (``split.SegmentPlan``)
    HM: torch.Tensor | None = None


def gate_launch_args(
    gate: InKernelGate | None, dummy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_log, dt_bias)`` pointers of a gate-aware launch (``dummy`` where absent)."""
    if gate is None:
        return dummy, dummy
    return (
        dummy if gate.A_log is None else gate.A_log,
        dummy if gate.dt_bias is None else gate.dt_bias,
    )


def gate_constexprs(gate: InKernelGate | None) -> dict[str, int | bool]:
    """``GATE``, ``HAS_A``, ``HAS_BIAS`` of a gate-aware launch."""
    if gate is None:
        return dict(GATE=GATE_NONE, HAS_A=False, HAS_BIAS=False)
    return dict(GATE=gate.kind, HAS_A=gate.A_log is not None, HAS_BIAS=gate.dt_bias is not None)


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
    safe_gate: bool = False,
    gate: InKernelGate | None = None,
    return_states: bool = False,
    segments: SegmentPlan | None = None,
) -> ChunkForward:
    """Run the forward pipeline on packed, contiguous, checked inputs.

    Args:
        q, k: ``[TT, HQ, K]``; g ``[TT, H, K]``; v ``[TT, H, V]``; beta ``[TT, H]`` (TT = total
            tokens; GVA: ``H`` a multiple of ``HQ``, value head ``i`` reads key head
            ``i // (H // HQ)`` in place).
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
        saved: ``(G, Aqk, Ainv)`` kept by a forward with ``keep``: skips the cumulative sum
            and the intra-chunk / solve kernel (the backward then forms only ``Gl``, ``qg``,
            ``kg``, ``W``, the states and the residuals).
        safe_gate: the caller promises ``g >= -5`` everywhere (the bounded safe gate): the
            diagonal sub-chunk blocks run as tensor-core products (module docstring).
        gate: ``g`` is the raw gate projection; the cumulative-sum kernel forms the log decay
            first (:class:`InKernelGate`). ``G`` is then the cumulated log decay.
        return_states: also return the chunk-start states ``h [NT, H, K, V]`` (in
            ``utils.state_dtype``) with the output (fla's ``return_intermediate_states``: the
            states the output kernel reads anyway, no extra work).
        segments: split every sequence's state pass into these segments
            (:mod:`kimi_linear.kernels.split`: transitions, fold, states; same results to
            rounding). With ``for_backward`` the result's ``HM`` holds the segments' ``H | M``,
            whose ``M`` the backward's reverse fold reuses.
    """
    TT, HQ, K = q.shape
    H = g.shape[1]  # value heads (GVA: a multiple of q and k's HQ)
    V = v.shape[-1]
    N = cu_seqlens.numel() - 1
    buckets = tune_buckets(TT, N * H)  # autotune-key size buckets (utils.tune_buckets)
    BT, BC = CHUNK_SIZE, SUB_CHUNK_SIZE
    BK, BVW = next_pow2(K), min(next_pow2(V), 64)
    BKS = min(BK, 64)  # key block of the state kernels
    prec = dot_precision(q.dtype)
    dev = q.device
    f32 = dict(dtype=torch.float32, device=dev)
    # Intermediates used only as tensor-core operands are stored in the input dtype (they are
    # rounded to it before every product anyway); G and the carried state stay fp32, Akk never
    # leaves the registers of the intra / solve kernel; U = N (beta v), the base of the
    # residual, is formed in fp32 registers.
    io = dict(dtype=q.dtype, device=dev)
    if saved is None:
        G = torch.empty(TT, H, K, **f32)
        Aqk = torch.empty(TT, H, BT, **io)
        Ainv = torch.empty(TT, H, BT, **io)
    else:
        G, Aqk, Ainv = saved
    Gl = torch.empty(num_chunks, H, K, **f32)
    qg, kg = (torch.empty(TT, H, K, dtype=q.dtype, device=dev) for _ in range(2))
    W = torch.empty(TT, H, K, **io)
    ddelta = None if do is None else torch.empty(TT, H, V, **f32)
    if num_chunks > 0 and saved is None:
        BKC = min(BK, 32)  # [64, 32] tiles: spill-free with 4 warps on sm_80 and sm_90
        _chunk_cumsum_kernel[(num_chunks, H, triton.cdiv(K, BKC))](
            g,
            G,
            Gl,
            *gate_launch_args(gate, cu_seqlens),
            cu_seqlens,
            chunk_indices,
            0.0 if gate is None else gate.lower_bound,
            H,
            **buckets,
            K=K,
            BT=BT,
            BK=BKC,
            G_FLOOR=G_FLOOR,
            **gate_constexprs(gate),
        )
        _intra_solve_fwd_kernel[(num_chunks, H)](
            q,
            k,
            G,
            beta,
            Aqk,
            Ainv,
            W,
            qg,
            kg,
            cu_seqlens,
            chunk_indices,
            scale,
            H,
            HQ,
            **buckets,
            K=K,
            BT=BT,
            BC=BC,
            BK=BK,
            BKD=min(BK, 32),
            BKW=min(BK, 64),
            SAFE_GATE=bool(safe_gate),
            DOT_PREC=prec,
        )
    if num_chunks > 0 and (saved is not None or do is not None):
        _recompute_wy_kernel[(num_chunks, H)](
            k,
            G,
            beta,
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
            HQ,
            **buckets,
            K=K,
            V=V,
            BT=BT,
            BK=min(BK, 64),
            BV=BVW,
            RECOMPUTE=saved is not None,  # the backward: form qg, kg, Gl, W from G and N
            HAS_DO=do is not None,
            DOT_PREC=prec,
            GVA=H != HQ,
        )
    h = torch.empty(num_chunks, H, K, V, dtype=state_dtype(q.dtype), device=dev)
    delta = torch.empty(TT, H, V, **io)

    def state_pass(grid, *args, **meta):  # the state kernel on this call's tensors
        _chunk_fwd_state_kernel[grid](
            kg, W, Ainv, v, beta, Gl, h, *args, K=K, V=V, BT=BT, BK=BK, BKS=BKS, **meta
        )

    HM = None
    if segments is None:
        ht = torch.empty(N, H, K, V, **f32) if output_final_state else None
        grid = lambda meta: checked_grid(triton.cdiv(V, meta["BV"]) * N * H)
        state_pass(
            grid,
            initial_state,
            ht,
            delta,
            cu_seqlens,
            chunk_offsets,
            H,
            **buckets,
            USE_H0=initial_state is not None,
            STORE_FINAL=output_final_state,
            DOT_PREC=prec,
            SEGMENT_PASS=False,
        )
    else:  # in-device sequence splitting (kimi_linear.kernels.split): three launches
        NS = segments.num_segments
        seg_buckets = tune_buckets(TT, NS * H)
        seg_tables = (segments.cu_seqlens, segments.chunk_offsets, H)
        HM = torch.empty(NS, H, K, V + K, **f32)  # per segment [H | M]
        grid = lambda meta: checked_grid(
            (triton.cdiv(V, meta["BV"]) + triton.cdiv(K, meta["BV"])) * NS * H
        )
        state_pass(
            grid,
            None,
            HM,
            delta,
            *seg_tables,
            **seg_buckets,
            USE_H0=False,
            STORE_FINAL=False,
            DOT_PREC=prec,
            SEGMENT_PASS=True,
        )
        entry, ht = fold_states(
            HM[..., V:], HM[..., :V], initial_state, segments, N, output_final_state
        )
        grid = lambda meta: checked_grid(triton.cdiv(V, meta["BV"]) * NS * H)
        state_pass(
            grid,
            entry,
            None,
            delta,
            *seg_tables,
            **seg_buckets,
            USE_H0=True,
            STORE_FINAL=False,
            DOT_PREC=prec,
            SEGMENT_PASS=False,
        )
    o = torch.empty(0, device=dev)
    if not for_backward:
        o = torch.empty_like(v)
        if num_chunks > 0:
            grid = lambda meta: checked_grid(num_chunks * triton.cdiv(V, meta["BV"]), H)
            _chunk_fwd_o_kernel[grid](
                qg,
                Aqk,
                h,
                delta,
                o,
                cu_seqlens,
                chunk_indices,
                H,
                **buckets,
                K=K,
                V=V,
                BT=BT,
                BKS=BKS,
                DOT_PREC=prec,
            )
    if for_backward:
        return ChunkForward(o, ht, G, Aqk, Ainv, W, qg, kg, h, delta, ddelta, Gl, HM)
    states = h if return_states else None
    if keep:
        return ChunkForward(o, ht, G, Aqk, Ainv, h=states)
    return ChunkForward(o, ht, h=states)
