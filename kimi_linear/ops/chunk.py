"""Chunked KDA in pure PyTorch: the WY / UT-transform form, batched over all chunks.

One job: :func:`torch_chunk_kda`, the ``"torch"`` backend's chunked op, with its hand-written
backward and its numerics (Gram paths, sub-chunk factors, varlen), which read as one piece.

This is the CPU training path of the model (and the reference the Triton kernels are checked
against at long lengths). It computes exactly what :func:`kimi_linear.ops.naive_recurrent_kda`
computes, in the form of the Kimi Linear paper (eqs. 1-9). Per head, chunk of ``C`` tokens,
cumulative log decay ``G_r = sum_{i <= r} g_i`` inside the chunk (a ``K``-vector per token)::

    A_kk[r, i] = beta_r sum_d k_r[d] k_i[d] exp(G_r[d] - G_i[d])    i <  r   (strictly lower)
    A_qk[r, i] =        sum_d q_r[d] k_i[d] exp(G_r[d] - G_i[d])    i <= r   (diagonal included)
    W = (I + A_kk)^-1 diag(beta) (exp(G) * K),   U = (I + A_kk)^-1 diag(beta) V

and then, one chunk after the other (the only sequential part)::

    V' = U - W S
    O  = (exp(G) * Q) S + A_qk V'
    S  = diag(exp(G_C)) S + (exp(G_C - G) * K)^T V'

Everything except the ``S`` recurrence is batched over ``[chunks, batch, heads]``; the outputs
``O`` are computed after the loop from the stacked per-chunk start states.

Numerics. ``exp(G)`` and ``exp(-G)`` are never formed as separate factors of one product:
with decay down to ``g = -20`` per step, ``G`` reaches ``-1280`` within a chunk and
``exp(-G)`` overflows even float64. The intra-chunk Gram matrices need ``exp(G_r - G_i)`` for
``i <= r``; they are computed on the first of three paths that is safe for each chunk:

1. **Factored over the whole chunk**, around a reference ``R`` (per channel, the middle of the
   chunk's range of ``G``): ``exp(G_r - G_i) = exp(G_r - R) * exp(R - G_i)``, so
   ``A = tril((q * up) (k * down)^T)`` is one matmul. Taken when ``|G - R| <= FACTORED_LIMIT``
   (50 in float32, 300 in float64) over the chunk, i.e. a decay span of at most 100 (about
   ``|g| <= 1.5`` per step on average in a 64-token chunk, which covers the KDA layer at
   initialisation); the factors then stay far from overflow and underflow (gradients too) and
   each term keeps full relative precision. When every ``|G| <= FACTORED_LIMIT`` (the usual
   case) ``R = 0`` is used instead: ``up = exp(G)`` is then itself the factor the rest of the
   chunk needs (``exp(G) q``, ``exp(G) k``), which saves two passes.
2. **Sub-chunks** of ``c = 16`` tokens otherwise. A query sub-chunk ``a`` against the keys of
   earlier sub-chunks uses the reference point ``E_a`` (``G`` at the last token before ``a``):
   ``exp(G_r - G_i) = exp(G_r - E_a) * exp(E_a - G_i)``, both factors in ``(0, 1]`` whatever
   the decay (a factor that underflows means the true product is smaller still). Diagonal
   ``c x c`` blocks are factored as in 1 when within the limit (in float32 that allows
   ``|g| <= 6`` per step on average, above the bound of fla's "safe gate", -5) ...
3. ... and else formed **pairwise**, ``exp(G_r - G_i)`` masked to ``i <= r`` *before* the exp.

Any log decay in ``[-inf, 0]`` is exact: ``g`` is clamped per step at
:data:`~kimi_linear.ops.checks.LOG_DECAY_FLOOR` (``-128`` in float32, ``-1024`` in float64)
before the cumulative sum. Every factor above is ``exp`` of a sum of steps ``<= 0``, so one that
contains a clamped step underflows to exactly 0 with or without the clamp, and the sums stay
finite (``-inf - (-inf)`` would be NaN; a finite ``-1e30`` would swallow the other terms of a
sum). ``g > 0`` is refused with ``ValueError``. NaN / inf inputs are isolated causally (a
poisoned token never reaches an earlier token, another sequence or head): every call runs on
cleaned inputs and sets the poisoned outputs to NaN, on the device (no sync;
:mod:`kimi_linear.ops.isolation`): every intra-chunk matrix product would otherwise carry a NaN
row into the earlier rows of its chunk (``0 * NaN = NaN``).

Autograd. The cumulative sum of ``g`` is a small custom function (:class:`_ChunkCumsum`: one
addition per token slice, written straight into the chunk layout; ``torch.cumsum`` along that
axis is 2x slower on one thread and can be 10x slower on two under load), and everything after
it is one custom
:class:`torch.autograd.Function` (:class:`_ChunkedKDA`) with a hand-written backward: the
state pass backward is one reverse loop of two fused multiply-adds per chunk, everything else
is batched over all chunks, and gradients are accumulated in place (autograd through the same
computation records about ten nodes per chunk). The Gram matrices' backward uses the decay
factors saved by the forward when every chunk is on path 1, and recomputes them from ``q``,
``k`` and ``G`` otherwise, where ``dG = q * dq + k * dk_row - k * dk_col``
(each term of ``A[r, i]`` enters ``G_r`` with + and ``G_i`` with -); their temporaries are
bounded by processing the chunks in groups (the pairwise path's ``[c, c, K]`` blocks are 16x
the inputs). Saved for the backward: ``O(T (K + V + C))`` per head plus one ``[K, V]`` state per
chunk; no ``[chunks, C, C, K]`` tensor is ever stored. The unit lower-triangular system
``(I + M) X = rhs`` is solved through the inverse of ``I + M`` (solves of its two diagonal
blocks against the identity and two matmuls for the third block, then one matmul; the backward
reuses it), as fla's kernels do. ``q``, ``k`` and ``v`` are never copied into the chunk layout:
the first product that reads each one reads the ``[B, T, H, *]`` input, and their gradients are
written in that layout. Computation runs with autocast disabled (float32 / float64).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from einops import rearrange
from torch.autograd.function import once_differentiable

from kimi_linear.ops.checks import (
    LOG_DECAY_FLOOR,
    autocast_disabled,
    check_kda_inputs,
    check_log_decay,
    compute_dtype,
    empty_outputs,
    host_offsets,
    scale_or_default,
)
from kimi_linear.ops.isolation import (
    isolate_nonfinite,
    isolation_enabled,
    poison_chunk_starts,
)

__all__ = ["torch_chunk_kda"]

#: Default ``chunk_size`` of :func:`torch_chunk_kda`: on CPU, the fastest of 16, 32 and 64 for training
#: shapes (``benchmarks/kda_cpu.py``; 64 does twice the intra-chunk matmul work per token).
DEFAULT_CHUNK_SIZE = 32
#: Width of the sub-chunks used for chunks with strong decay.
SUB_CHUNK = 16
#: Largest ``|G_r - R|`` (``R``: the middle of a block's ``G`` range, per channel) for which a
#: chunk or sub-chunk is computed in factored form, by dtype: ``exp(+-limit)``, and gradients
#: scaled by it, stay far from overflow and underflow. Stronger decay takes the next path.
FACTORED_LIMIT = {torch.float32: 50.0, torch.float64: 300.0}
#: Longest chunk whose cumulative sums are formed by one addition per token slice
#: (:class:`_ChunkCumsum`); longer chunks use ``torch.cumsum``.
_CUMSUM_LOOP_MAX = 64
#: Elements of one pairwise ``[group, s, c, c, K]`` temporary (64 MiB in fp32): bounds peak memory.
_GROUP_ELEMENTS = 1 << 24


def _sub_chunk_size(chunk_size: int) -> int:
    """The largest divisor of ``chunk_size`` that is at most :data:`SUB_CHUNK`."""
    return max(d for d in range(1, min(SUB_CHUNK, chunk_size) + 1) if chunk_size % d == 0)


def _gram_mask(C: int, device: torch.device) -> torch.Tensor:
    """``[2C, C]`` bool: True where ``[A_qk; A_kk]`` is zero (above the diagonal of ``A_qk``,
    on and above it for ``A_kk``)."""
    upper = torch.ones(C, C, dtype=torch.bool, device=device).triu(1)
    return torch.cat([upper, upper | torch.eye(C, dtype=torch.bool, device=device)])


def _unit_lower_inverse_t(M: torch.Tensor) -> torch.Tensor:
    """``(I + M)^-T`` for strictly lower-triangular ``M: [N, C, C]`` (contiguous).

    LAPACK solves the batch one matrix at a time, against the identity (in the transposed
    right-sided form it takes without copies). For even ``C >= 16`` the two diagonal
    ``C/2``-blocks are solved that way (half the work: a cost cubic in the size) and the
    off-diagonal block of the transposed inverse is ``-L11^-T L21^T L22^-T`` (two batched
    matmuls), about 1.2x (one thread) to 1.7x (two) faster than one solve of the whole.
    """
    N, C, _ = M.shape
    if C < 16 or C % 2:
        eye = torch.eye(C, dtype=M.dtype, device=M.device).expand(N, C, C)
        return torch.linalg.solve_triangular(
            M.transpose(-1, -2), eye, upper=True, left=False, unitriangular=True
        )
    h = C // 2
    blocks = M.view(N, 2, h, 2, h)
    diag = torch.stack([blocks[:, 0, :, 0], blocks[:, 1, :, 1]], dim=1)  # [N, 2, h, h]
    eye = torch.eye(h, dtype=M.dtype, device=M.device).expand(N, 2, h, h)
    inv_t = torch.linalg.solve_triangular(
        diag.transpose(-1, -2), eye, upper=True, left=False, unitriangular=True
    )  # (I + M_jj)^-T
    out = M.new_zeros(N, 2, h, 2, h)
    out[:, 0, :, 0] = inv_t[:, 0]
    out[:, 1, :, 1] = inv_t[:, 1]
    upper = inv_t[:, 0] @ blocks[:, 1, :, 0].transpose(-1, -2) @ inv_t[:, 1]
    out[:, 0, :, 1] = upper.neg_()
    return out.view(N, C, C)


def _gram_path(G_first: torch.Tensor, G_last: torch.Tensor, limit: float) -> str:
    """How :class:`_ChunkedKDA` forms the Gram matrices of all chunks, from the first and last
    cumulative log decay of each chunk (``G`` is non-increasing along a chunk): ``"zero"``
    (path 1 around ``R = 0``: every ``|G| <= limit``), ``"mid"`` (path 1 around the middle of
    each chunk's range: every decay span within ``2 * limit``) or ``"sub"`` (paths 2 and 3)."""
    if not bool(((G_first - G_last) <= 2 * limit).all()):  # False for NaN too
        return "sub"
    return "zero" if bool((G_last >= -limit).all()) else "mid"


def _pairwise_decay(Gb: torch.Tensor) -> torch.Tensor:
    """Exact pairwise decay inside blocks.

    Args:
        Gb: ``[m, c, K]`` cumulative log decay of ``m`` blocks of ``c`` tokens.

    Returns:
        ``P: [m, c, c, K]`` with ``P[:, r, i] = exp(G_r - G_i)`` for ``i <= r`` and 0 above the
        diagonal (masked before the exp, so it never overflows).
    """
    c = Gb.shape[-2]
    upper = torch.ones(c, c, dtype=torch.bool, device=Gb.device).triu(1)
    D = Gb.unsqueeze(-2) - Gb.unsqueeze(-3)  # [m, r, i, K]
    return D.masked_fill_(upper.unsqueeze(-1), float("-inf")).exp_()


def _diag_forward_pairwise(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal blocks from the pairwise decay; ``[m, c, K]`` in, two ``[m, c, c]`` out."""
    Pk = _pairwise_decay(G).mul_(k.unsqueeze(-3))  # [m, r, i, K]: P[r, i] k_i
    both = Pk @ torch.stack([q, k], dim=-1)  # [m, r, i, 2]
    return both[..., 0], both[..., 1].tril(-1)


def _diag_backward_pairwise(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, dA_qk: torch.Tensor, dA_kk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_diag_forward_pairwise` (``dA`` already masked to the lower parts).

    For a block ``A[r, i] = sum_d a_r b_i P[r, i]``: ``da_r = sum_i dA[r, i] P[r, i] b_i`` and
    ``db_i = sum_r dA[r, i] P[r, i] a_r``. Returns ``(dq, dk as row, dk as column)``.
    """
    P = _pairwise_decay(G)  # [m, r, i, K]
    dA = torch.stack([dA_qk, dA_kk], dim=-1)  # [m, r, i, 2]
    d_rows = dA.transpose(-1, -2) @ (P * k.unsqueeze(-3))  # [m, r, 2, K]
    Z = dA @ torch.stack([q, k], dim=-2)  # [m, r, i, K]: dA_qk[r, i] q_r + dA_kk[r, i] k_r
    dk_col = P.mul_(Z).sum(dim=-3)  # [m, i, K]
    return d_rows[..., 0, :], d_rows[..., 1, :], dk_col


def _factored_gram_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    dA_qk: torch.Tensor,
    dA_kk: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``A_qk = (q * up)(k * down)^T`` and ``A_kk = (k * up)(k * down)^T``.

    Returns ``dq``, ``dk_row`` (k as the row operand of A_kk) and ``dk_col`` (k as the column
    operand of both), all ``[..., C, K]``; dA_* already carry their triangular masks.
    """
    lq, lk, rk = q * up, k * up, k * down
    dq = (dA_qk @ rk).mul_(up)
    dk_row = (dA_kk @ rk).mul_(up)
    dk_col = (dA_qk.transpose(-1, -2) @ lq + dA_kk.transpose(-1, -2) @ lk).mul_(down)
    return dq, dk_row, dk_col


def _diag_factors(
    Gb: torch.Tensor, limit: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors of the diagonal blocks around a reference point ``R`` per block and channel.

    ``exp(G_r - G_i) = up_r * down_i`` with ``up = exp(G - R)``, ``down = exp(R - G)``. ``R`` is
    the middle of each channel's range of ``G`` over the block, so ``|G - R|`` is at most half
    the block's decay span; the factors are exact (to rounding) where ``|G - R| <= limit``
    (``ok``).

    Args:
        Gb: ``[n, s, c, K]`` cumulative log decay split into blocks.

    Returns:
        ``up, down: [n, s, c, K]`` (exponents clamped to ``+-limit``, so always finite) and
        ``ok: [n, s]`` bool.
    """
    # G is a cumulative sum of steps <= 0, so each block's range is [last, first] (no reduction)
    hi, lo = Gb[..., :1, :], Gb[..., -1:, :]
    ok = (hi - lo).amax(dim=(-1, -2)) <= 2 * limit  # False for NaN / inf too
    up = (Gb - (hi + lo) / 2).clamp_(-limit, limit).exp_()
    return up, up.reciprocal(), ok


def _off_diag_factors(Gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column decay factors of the off-diagonal sub-chunk blocks (needs ``s >= 2``).

    For query sub-chunk ``a >= 1`` the reference point is ``E_a``, the cumulative decay at the
    last token of sub-chunk ``a - 1``; then ``exp(G_r - G_i) = row[a, r] * col[a, i]``.

    Args:
        Gb: ``[n, s, c, K]`` cumulative log decay split into sub-chunks.

    Returns:
        ``row: [n, s-1, c, K] = exp(G_r - E_a)`` for the tokens ``r`` of sub-chunk ``a``;
        ``col: [n, s-1, (s-1) c, K] = exp(E_a - G_i)`` for the tokens ``i < a c`` of the chunk,
        0 for ``i >= a c`` (those belong to the diagonal block or come later).
    """
    n, s, c, K = Gb.shape
    E = Gb[:, :-1, -1]  # [n, s-1, K]
    row = (Gb[:, 1:] - E.unsqueeze(-2)).exp()
    keys = Gb[:, :-1].reshape(n, 1, (s - 1) * c, K)
    D = E.unsqueeze(-2) - keys  # [n, s-1, (s-1) c, K]
    a = torch.arange(1, s, device=Gb.device)
    i = torch.arange((s - 1) * c, device=Gb.device)
    later = i.unsqueeze(0) >= (a * c).unsqueeze(1)  # [s-1, (s-1) c]
    col = D.masked_fill_(later.unsqueeze(-1), float("-inf")).exp_()
    return row, col


def _diag_blocks(A: torch.Tensor, s: int, c: int) -> torch.Tensor:
    """``[n, C, C] -> [n, s, c, c]`` view of the diagonal sub-chunk blocks (writable)."""
    n = A.shape[0]
    return A.view(n, s, c, s, c).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def _gram_forward_sub(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both decayed Gram matrices of chunks, from sub-chunks of ``sub`` tokens.

    Args:
        q, k, G: ``[n, C, K]`` (scaled queries, keys, cumulative log decay); ``C % sub == 0``.

    Returns:
        ``A_qk: [n, C, C]`` (lower triangle, diagonal included) and ``A_kk: [n, C, C]`` (strictly
        lower, not yet multiplied by beta).
    """
    n, C, K = q.shape
    s, c = C // sub, sub
    qb, kb, Gb = (x.reshape(n, s, c, K) for x in (q, k, G))
    A_qk = q.new_zeros(n, C, C)
    A_kk = q.new_zeros(n, C, C)
    if s > 1:
        row, col = _off_diag_factors(Gb)
        keys = (kb[:, :-1].reshape(n, 1, (s - 1) * c, K) * col).transpose(-1, -2)
        rows = (s - 1) * c
        for A, x in ((A_qk, qb), (A_kk, kb)):  # [n, s-1, c, K] @ [n, s-1, K, (s-1) c]
            A[:, c:, : C - c] = ((x[:, 1:] * row) @ keys).view(n, rows, rows)
    # Diagonal blocks: factored (one matmul) where the decay allows, exact pairwise elsewhere.
    up, down, ok = _diag_factors(Gb, FACTORED_LIMIT[q.dtype])
    keys = (kb * down).transpose(-1, -2)  # [n, s, K, c]
    diag_qk = ((qb * up) @ keys).tril_()  # [n, s, c, c]
    diag_kk = ((kb * up) @ keys).tril_(-1)
    if not bool(ok.all()):
        bad = ~ok
        diag_qk[bad], diag_kk[bad] = _diag_forward_pairwise(qb[bad], kb[bad], Gb[bad])
    _diag_blocks(A_qk, s, c).copy_(diag_qk)
    _diag_blocks(A_kk, s, c).copy_(diag_kk)
    return A_qk, A_kk


def _gram_backward_sub(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor,
    dA_qk: torch.Tensor,
    dA_kk: torch.Tensor,
    sub: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_gram_forward_sub` w.r.t. ``q``, ``k``, ``G`` (all ``[n, C, K]``);
    ``dA_qk`` and ``dA_kk`` already masked to their lower parts. Returns ``(dq, dk as the row
    operand, dk as the column operand)``."""
    n, C, K = q.shape
    s, c = C // sub, sub
    qb, kb, Gb = (x.reshape(n, s, c, K) for x in (q, k, G))

    # Diagonal blocks, factored: A = tril((a * up) (k * down)^T).
    dD_qk, dD_kk = _diag_blocks(dA_qk, s, c), _diag_blocks(dA_kk, s, c)  # [n, s, r, i]
    up, down, ok = _diag_factors(Gb, FACTORED_LIMIT[q.dtype])
    dq, dk_row, dk_col = _factored_gram_backward(qb, kb, up, down, dD_qk, dD_kk)
    if not bool(ok.all()):
        bad = ~ok
        dq[bad], dk_row[bad], dk_col[bad] = _diag_backward_pairwise(
            qb[bad], kb[bad], Gb[bad], dD_qk[bad], dD_kk[bad]
        )

    if s > 1:
        row, col = _off_diag_factors(Gb)
        lq, lk = qb[:, 1:] * row, kb[:, 1:] * row  # [n, s-1, c, K]
        keys = kb[:, :-1].reshape(n, 1, (s - 1) * c, K) * col  # [n, s-1, (s-1) c, K]
        dO_q = dA_qk[:, c:, : C - c].reshape(n, s - 1, c, (s - 1) * c)
        dO_k = dA_kk[:, c:, : C - c].reshape(n, s - 1, c, (s - 1) * c)
        dq[:, 1:] += (dO_q @ keys) * row
        dk_row[:, 1:] += (dO_k @ keys) * row
        d_keys = dO_q.transpose(-1, -2) @ lq + dO_k.transpose(-1, -2) @ lk  # [n, s-1, (s-1) c, K]
        dk_col[:, :-1] += (d_keys * col).sum(dim=1).reshape(n, s - 1, c, K)

    return tuple(x.reshape(n, C, K) for x in (dq, dk_row, dk_col))  # type: ignore[return-value]


def _gram_forward(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both decayed Gram matrices of one group of chunks.

    Chunks whose decay spans at most ``2 * FACTORED_LIMIT`` (in every channel) take one
    factored matmul over the whole chunk, ``tril((q * up) (k * down)^T)``; the others go
    through sub-chunks (:func:`_gram_forward_sub`).

    Args:
        q, k, G: ``[n, C, K]`` (scaled queries, keys, cumulative log decay); ``C % sub == 0``.

    Returns:
        ``A_qk: [n, C, C]`` (lower triangle, diagonal included) and ``A_kk: [n, C, C]`` (strictly
        lower, not yet multiplied by beta).
    """
    up, down, ok = _diag_factors(G.unsqueeze(1), FACTORED_LIMIT[q.dtype])
    up, down, ok = up.squeeze(1), down.squeeze(1), ok.squeeze(1)
    keys = (k * down).transpose(-1, -2)  # [n, K, C]
    A_qk = ((q * up) @ keys).tril_()
    A_kk = ((k * up) @ keys).tril_(-1)
    if not bool(ok.all()):
        bad = ~ok
        A_qk[bad], A_kk[bad] = _gram_forward_sub(q[bad], k[bad], G[bad], sub)
    return A_qk, A_kk


def _gram_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor,
    dA_qk: torch.Tensor,
    dA_kk: torch.Tensor,
    sub: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_gram_forward` w.r.t. ``q``, ``k`` and ``G`` (all ``[n, C, K]``).

    For ``A[r, i] = sum_d a_r[d] b_i[d] exp(G_r[d] - G_i[d])`` (masked) the decay gradient is
    ``dG = a * da - b * db``: each pair's term enters ``G_r`` with + and ``G_i`` with -.
    """
    dA_qk = dA_qk.tril()
    dA_kk = dA_kk.tril(-1)
    up, down, ok = _diag_factors(G.unsqueeze(1), FACTORED_LIMIT[q.dtype])
    up, down, ok = up.squeeze(1), down.squeeze(1), ok.squeeze(1)
    dq, dk_row, dk_col = _factored_gram_backward(q, k, up, down, dA_qk, dA_kk)
    if not bool(ok.all()):
        bad = ~ok
        dq[bad], dk_row[bad], dk_col[bad] = _gram_backward_sub(
            q[bad], k[bad], G[bad], dA_qk[bad], dA_kk[bad], sub
        )
    dG = q * dq + k * (dk_row - dk_col)
    return dq, dk_row + dk_col, dG


def _group_size(C: int, sub: int, K: int) -> int:
    return max(1, _GROUP_ELEMENTS // (C * sub * K))


def _gram_grouped(
    q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_gram_forward` over ``[N, C, K]`` inputs, in groups of chunks that bound the
    temporaries (one call when all fit)."""
    N, C, K = q.shape
    step = _group_size(C, sub, K)
    if step >= N:
        return _gram_forward(q, k, G, sub)
    A_qk = q.new_empty(N, C, C)
    A_kk = q.new_empty(N, C, C)
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        A_qk[lo:hi], A_kk[lo:hi] = _gram_forward(q[lo:hi], k[lo:hi], G[lo:hi], sub)
    return A_qk, A_kk


def _gram_backward_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor,
    dA_qk: torch.Tensor,
    dA_kk: torch.Tensor,
    sub: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_gram_backward` over ``[N, C, K]`` inputs, grouped as :func:`_gram_grouped`."""
    N, C, K = q.shape
    step = _group_size(C, sub, K)
    if step >= N:
        return _gram_backward(q, k, G, dA_qk, dA_kk, sub)
    dq, dk, dG = torch.empty_like(q), torch.empty_like(k), torch.empty_like(G)
    for lo in range(0, N, step):
        hi = min(N, lo + step)
        dq[lo:hi], dk[lo:hi], dG[lo:hi] = _gram_backward(
            q[lo:hi], k[lo:hi], G[lo:hi], dA_qk[lo:hi], dA_kk[lo:hi], sub
        )
    return dq, dk, dG


class _DecayedGram(torch.autograd.Function):
    """``(q, k, G) -> (A_qk, A_kk)``, each ``[N, C, C]`` from ``[N, C, K]`` inputs; saves only
    its inputs and recomputes the decay factors in its backward. (:class:`_ChunkedKDA` uses the
    same two helpers inside its own forward and backward.)"""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int):  # type: ignore[override]
        ctx.save_for_backward(q, k, G)
        ctx.sub = sub
        return _gram_grouped(q, k, G, sub)

    @staticmethod
    @once_differentiable
    def backward(ctx, dA_qk: torch.Tensor, dA_kk: torch.Tensor):  # type: ignore[override]
        q, k, G = ctx.saved_tensors
        with autocast_disabled(q.device):  # keep fp32 / fp64
            dq, dk, dG = _gram_backward_grouped(q, k, G, dA_qk, dA_kk, ctx.sub)
        return dq, dk, dG, None


class _ChunkCumsum(torch.autograd.Function):
    """Cumulative sum along the chunk axis: ``g [n, *batch, C, K]`` (any strides, e.g. a
    permuted view of the ``[B, T, H, K]`` input) to a contiguous ``G`` of the same shape.

    One pass that also lays ``G`` out chunk by chunk (instead of a copy into that layout and a
    cumulative sum after it, which is about 2.5x slower on CPU): ``C - 1`` additions of whole
    token slices, each ``G_r = G_{r-1} + g_r`` (the same sequential order as a cumulative sum).
    The backward is the reverse cumulative sum, written straight into ``g``'s layout.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        C = g.shape[-2]
        G = torch.empty(g.shape, dtype=g.dtype, device=g.device)
        if C > _CUMSUM_LOOP_MAX:
            torch.cumsum(g, dim=-2, out=G)
        else:
            G.select(-2, 0).copy_(g.select(-2, 0))
            for r in range(1, C):
                torch.add(G.select(-2, r - 1), g.select(-2, r), out=G.select(-2, r))
        ctx.layout = (g.shape, g.stride())  # g is a dense (permuted) view: _kda_chunk
        return G

    @staticmethod
    @once_differentiable
    def backward(ctx, dG: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        shape, stride = ctx.layout
        C = shape[-2]
        dg = torch.empty_strided(shape, stride, dtype=dG.dtype, device=dG.device)
        if C > _CUMSUM_LOOP_MAX:
            dg.copy_(dG.flip(-2).cumsum(-2).flip(-2))
        else:
            dg.select(-2, C - 1).copy_(dG.select(-2, C - 1))
            for r in range(C - 2, -1, -1):
                torch.add(dg.select(-2, r + 1), dG.select(-2, r), out=dg.select(-2, r))
        return dg


class _ChunkedKDA(torch.autograd.Function):
    """Everything of :func:`torch_chunk_kda` after the cumulative sum of the log decay, with a
    hand-written backward.

    Inputs (``n`` chunks of ``C`` tokens, batch dims ``*batch`` (``(B, H)`` from
    :func:`torch_chunk_kda`), ``b`` their product): ``q, k: [n, *batch, C, K]`` (unscaled queries,
    keys; any strides, e.g. permuted views of the ``[B, T, H, K]`` inputs: they are only read
    element-wise), ``v: [n, *batch, C, V]`` (likewise), ``G: [n, *batch, C, K]`` (cumulative
    log decay per chunk) and ``beta: [n, *batch, C, 1]`` (both contiguous), ``S0: [b, K, V]``
    (the state before the first chunk), ``scale`` and the sub-chunk width ``sub``. Returns
    ``(O: [n, *batch, C, V], S_final: [b, K, V])``.

    Forward, per chunk (batched over all chunks except the state pass)::

        A_qk, A_kk = decayed Gram matrices;                   M = diag(beta) A_kk
        [W | U] = (I + M)^-1 diag(beta) [exp(G) k | v]          (through the inverse)
        V'_i = U_i - W_i S_i,   S_{i+1} = diag(exp(G_C)) S_i + (exp(G_C - G) k)_i^T V'_i
        O = scale (exp(G) q S_i + A_qk V')                     (after the pass, batched)

    Backward: the batched parts ``dA_qk = dO V'^T``, ``d(exp(G) q) = dO S_i^T``,
    ``dV' = A_qk^T dO``, ``P_i = (exp(G) q)_i^T dO_i`` (``dO`` times ``scale``), one reverse
    pass ``dV'_i += (exp(G_C - G) k)_i dS_{i+1}``, ``dS_i = diag(exp(G_C)) dS_{i+1} + P_i -
    W_i^T dV'_i``, then again batched the gradients of the state-pass operands, the solve
    (``drhs = (I + M)^-T [dW | dV']``, ``dM = -tril(drhs [W | U]^T)``), the element-wise
    factors, and the Gram matrices. When every chunk is on the factored path 1 (the common
    case: a decay span within ``2 * FACTORED_LIMIT``; :func:`_gram_path` says which) the Gram
    matrices are formed here (``(q up) (k down)^T``, ``(k up) (k down)^T``) and their factors
    ``exp(+-(G - R))`` saved, so the backward accumulates their gradients in place without
    recomputing anything; otherwise :func:`_gram_grouped` and :func:`_gram_backward_grouped`
    take every chunk through the three paths. Every per-chunk step is two fused multiply-adds
    into preallocated buffers (autograd through the same loop records about ten nodes per
    chunk), and the gradients are accumulated in place. ``q``, ``k`` and ``v`` are never copied into the chunk layout: each
    is read where it is first multiplied, and their gradients are written in their own layout.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        G: torch.Tensor,
        beta: torch.Tensor,
        S0: torch.Tensor,
        scale: float,
        sub: int,
        keep_states: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        n, *bd, C, K = k.shape
        V = v.shape[-1]
        b = S0.shape[0]
        flat = lambda x: x.reshape(n * b, x.shape[-2], x.shape[-1])  # a view where contiguous
        G_first, G_last = G[..., :1, :], G[..., -1:, :]
        path = _gram_path(G_first, G_last, FACTORED_LIMIT[k.dtype])
        k_to_end = torch.empty_like(G)  # exp(G_C - G) k
        rhs = k.new_empty(n, *bd, C, K + V)  # [exp(G) k | v]; beta goes into the inverse
        exp_mid = None
        if path == "zero":
            # Path 1 around R = 0 (|G| <= limit: the usual case at initialisation): up = exp(G)
            # itself, so exp(G) q and exp(G) k are the Gram matrices' row operands.
            up = G.exp()
            down = up.reciprocal()
            q_exp = torch.mul(q, up, out=torch.empty_like(up))
            k_exp = torch.mul(k, up, out=rhs[..., :K])
            torch.mul(k, down, out=k_to_end)  # k down, for now
            keys = flat(k_to_end).transpose(-1, -2)
            A_qk = torch.bmm(flat(q_exp), keys).view(n, *bd, C, C).tril_()
            A_kk = torch.bmm(flat(k_exp), keys).view(n, *bd, C, C).tril_(-1)
            G_exp = up
            decay = tail = G_last.exp()  # exp(G_C) = exp(G_C - R)
            k_to_end.mul_(tail)
        elif path == "mid":
            # Every chunk on path 1 (module docstring) around the middle R of its range: the
            # factors are computed here once and saved. They also give exp(G) = up * exp(R) and
            # exp(G_C - G) = down * exp(G_C - R): the first product underflows only where exp(G)
            # is far below the other terms of its sums (exp(R) <= 1 and up <= exp(limit)), the
            # second neither overflows nor loses precision (both factors within exp(+-limit)).
            mid = (G_first + G_last) * 0.5  # R: [n, *batch, 1, K]
            up = torch.sub(G, mid).exp_()
            down = up.reciprocal()
            rows = G.new_empty(n, *bd, 2 * C, K)  # [q up; k up]: one matmul for both Grams
            q_up, k_up = rows[..., :C, :], rows[..., C:, :]
            torch.mul(q, up, out=q_up)
            torch.mul(k, up, out=k_up)
            torch.mul(k, down, out=k_to_end)  # k down, for now
            A = torch.bmm(flat(rows), flat(k_to_end).transpose(-1, -2))  # [A_qk; A_kk]
            A = A.view(n, *bd, 2 * C, C)
            A_qk, A_kk = A[..., :C, :], A[..., C:, :]
            # tril(A_qk), strict tril(A_kk): one strict tril over the [C, C] blocks of the
            # contiguous buffer, A_qk's diagonal put back
            diag = A_qk.diagonal(dim1=-2, dim2=-1).clone()
            A.view(-1, C, C).tril_(-1)
            A_qk.diagonal(dim1=-2, dim2=-1).copy_(diag)
            tail = (G_last - mid).exp_()
            k_to_end.mul_(tail)
            exp_mid = mid.exp_()
            q_exp = q_up.mul_(exp_mid)  # exp(G) q
            torch.mul(k_up, exp_mid, out=rhs[..., :K])  # exp(G) k
            G_exp = None  # the backward forms it from up and exp(R)
            decay = G_last.exp()  # exp(G_C)
        else:
            A_qk, A_kk = (
                x.view(n, *bd, C, C) for x in _gram_grouped(flat(q), flat(k), flat(G), sub)
            )
            up = down = tail = None
            torch.sub(G_last, G, out=k_to_end).exp_().mul_(k)  # exp(G_C - G) k: never overflows
            G_exp = G.exp()
            q_exp = torch.mul(q, G_exp, out=torch.empty_like(G_exp))
            torch.mul(G_exp, k, out=rhs[..., :K])
            decay = G_exp[..., -1:, :]
        M = A_kk * beta  # row r scaled by beta_r
        rhs[..., K:] = v
        T_inv_t = _unit_lower_inverse_t(flat(M)).view(n, *bd, C, C)  # (I + M)^-T
        del M
        X = (T_inv_t * beta).transpose(-1, -2) @ rhs  # [W | U]: [n, *batch, C, K + V]
        del rhs
        W, U = flat(X).view(n, b, C, K + V).split([K, V], dim=-1)
        states = k.new_empty(n + 1, b, K, V)  # S_i entering chunk i; states[n]: final
        states[0] = S0
        v_new = k.new_empty(n, b, C, V)
        decay = decay.reshape(n, b, K, 1)  # exp(G_C): [n, b, K, 1]
        k_t = k_to_end.view(n, b, C, K).transpose(-1, -2)
        # per-chunk views made once (unbind), not by indexing inside the loop
        S_i, V_i = states.unbind(0), v_new.unbind(0)
        operands = zip(U.unbind(0), W.unbind(0), decay.unbind(0), k_t.unbind(0))
        for i, (U_i, W_i, decay_i, kt_i) in enumerate(operands):
            torch.baddbmm(U_i, W_i, S_i[i], alpha=-1.0, out=V_i[i])
            torch.mul(S_i[i], decay_i, out=S_i[i + 1])
            S_i[i + 1].baddbmm_(kt_i, V_i[i])
        o = torch.bmm(flat(q_exp), flat(states[:n]))
        o = o.baddbmm_(flat(A_qk), flat(v_new), beta=scale, alpha=scale)
        v_new = v_new.view(n, *bd, C, V)
        ctx.save_for_backward(
            q, k, v, G, beta, A_qk, A_kk, G_exp, k_to_end, q_exp, T_inv_t, X, states, v_new,
            up, down, tail, exp_mid,
        )  # fmt: skip
        ctx.scale, ctx.sub = scale, sub
        if keep_states:  # the chunk-start states [n, b, K, V], for serving (no gradient)
            starts = states[:n].clone()
            ctx.mark_non_differentiable(starts)
            return o.view(n, *bd, C, V), states[n].clone(), starts
        return o.view(n, *bd, C, V), states[n].clone()

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx, dO: torch.Tensor, dS_final: torch.Tensor | None, *_: torch.Tensor | None
    ):
        # ctx.saved_tensors unpacks (and, under activation checkpointing, recomputes) on every
        # access: read it exactly once.
        (q, k, v, G, beta, A_qk, A_kk, G_exp, k_to_end, q_exp, T_inv_t, X, states, v_new, up, down,
         tail, exp_mid) = ctx.saved_tensors  # fmt: skip
        n, *bd, C, K = k.shape
        V = v.shape[-1]
        b = states.shape[1]
        flat = lambda x: x.reshape(n * b, x.shape[-2], x.shape[-1])
        per_chunk = lambda x: x.view(n, b, x.shape[-2], x.shape[-1])  # views only
        dO = dO.reshape(n, *bd, C, V)  # often a permuted view: made contiguous, and scaled
        dO = torch.mul(dO, ctx.scale, out=dO.new_empty(dO.shape))
        W = X[..., :K]
        starts = states[:n].view(n, *bd, K, V)
        if G_exp is None:  # factored path: exp(G) = up * exp(R), as in the forward
            G_exp = up * exp_mid

        # outputs: O = exp(G) q S_i + A_qk V'
        dA_qk = (dO @ v_new.transpose(-1, -2)).tril_()
        d_q_exp = dO @ starts.transpose(-1, -2)  # [n, *batch, C, K]
        dX = X.new_empty(n, *bd, C, K + V)  # [dW | dU]; dU == dV', accumulated in place below
        d_v_new = dX[..., K:]
        torch.matmul(A_qk.transpose(-1, -2), dO, out=d_v_new)
        dS = q_exp.transpose(-1, -2) @ dO  # P_i; becomes dS_i (the gradient of S_i) below
        dS_flat = per_chunk(dS)
        last = torch.zeros_like(dS_flat[0]) if dS_final is None else dS_final
        decay = per_chunk(G_exp[..., -1:, :].transpose(-1, -2))  # exp(G_C): [n, b, K, 1]
        dS_i, dV_i, K_i = dS_flat.unbind(0), per_chunk(d_v_new).unbind(0), per_chunk(k_to_end)
        decay_i, Wt_i = decay.unbind(0), per_chunk(W).transpose(-1, -2).unbind(0)
        K_i = K_i.unbind(0)
        nxt = last
        for i in range(n - 1, -1, -1):
            dV_i[i].baddbmm_(K_i[i], nxt)
            nxt = dS_i[i].addcmul_(decay_i[i], nxt).baddbmm_(Wt_i[i], dV_i[i], alpha=-1.0)
        # with dS_{i+1} (dS[1:], then the final state's gradient), without concatenating them
        d_k_to_end = k.new_empty(n, *bd, C, K)  # V' dS_{i+1}^T
        d_decay = k.new_empty(n, b, 1, K)  # rowsum(S_i * dS_{i+1})
        dkte, vn, st = per_chunk(d_k_to_end), per_chunk(v_new), states[:n]
        for lo, hi, nxt in ((0, n - 1, dS_flat[1:]), (n - 1, n, last.unsqueeze(0))):
            if hi > lo:
                torch.matmul(vn[lo:hi], nxt.transpose(-1, -2), out=dkte[lo:hi])
                d_decay[lo:hi] = (st[lo:hi] * nxt).sum(dim=-1).unsqueeze(-2)
        d_decay = d_decay.view(n, *bd, 1, K)
        dX[..., :K] = (d_v_new @ starts.transpose(-1, -2)).neg_()  # dW = -dV' S_i^T

        # the solve: X = (I + M)^-1 rhs, so drhs = (I + M)^-T dX and dM = -drhs X^T (strictly
        # lower part: the unit diagonal and the zeros above it are constants)
        d_rhs = T_inv_t @ dX  # [n, *batch, C, K + V]
        dM = (d_rhs @ X.transpose(-1, -2)).neg_().tril_(-1)
        del dX
        # rhs = diag(beta) [exp(G) k | v]
        d_rk, d_rv = d_rhs[..., :K], d_rhs[..., K:]
        dk = torch.mul(d_rk, G_exp, out=torch.empty_like(k))  # of exp(G) k, before beta
        d_beta = (dk * k).sum(dim=-1, keepdim=True).add_((d_rv * v).sum(dim=-1, keepdim=True))
        dk.mul_(beta)
        dG_exp = (d_rk * k).mul_(beta)
        dv = torch.mul(d_rv, beta, out=torch.empty_like(v))
        del d_rhs, d_rk, d_rv
        # M = diag(beta) A_kk
        d_beta.add_((dM * A_kk).sum(dim=-1, keepdim=True))
        dA_kk = dM.mul_(beta)
        # exp(G) q, exp(G_C - G) k, exp(G_C) and exp(G): dG collects d(log factor)
        dq = torch.mul(d_q_exp, G_exp, out=torch.empty_like(q))
        dG_exp.addcmul_(d_q_exp, q)
        # exp(G_C - G), formed here (the forward needs only its product with k)
        to_end = (G[..., -1:, :] - G).exp_() if tail is None else down * tail
        dk.addcmul_(d_k_to_end, to_end)
        d_to_end = d_k_to_end.mul_(k).mul_(to_end)  # gradient of G_C - G
        dG = dG_exp.mul_(G_exp).sub_(d_to_end)
        dG[..., -1:, :] += d_to_end.sum(dim=-2, keepdim=True) + d_decay * G_exp[..., -1:, :]
        # the Gram matrices
        if up is None:
            gq, gk, gG = _gram_backward_grouped(
                flat(q), flat(k), flat(G), flat(dA_qk), flat(dA_kk), ctx.sub
            )
            dq += gq.view_as(dq)
            dk += gk.view_as(dk)
            dG += gG.view_as(dG)
        else:  # factored: A_qk = (q up)(k down)^T, A_kk = (k up)(k down)^T, masked
            k_down = k * down
            part = (dA_qk @ k_down).mul_(up)  # into q
            dq += part
            dG.addcmul_(q, part)
            part = (dA_kk @ k_down).mul_(up)  # into k as the row operand
            dk += part
            dG.addcmul_(k, part)
            del k_down
            part = dA_qk.transpose(-1, -2) @ (q * up)  # into k as the column operand
            part.add_(dA_kk.transpose(-1, -2) @ (k * up)).mul_(down)
            dk += part
            dG.addcmul_(k, part, value=-1.0)
        return dq, dk, dv, dG, d_beta, dS_flat[0], None, None, None


def torch_chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    cu_seqlens: torch.Tensor | None = None,
    return_intermediate_states: bool = False,
    cu_seqlens_cpu: torch.Tensor | Sequence[int] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Kimi Delta Attention in the chunked (WY / UT-transform) form; pure PyTorch, autograd.

    Same semantics, layout and dtypes as :func:`kimi_linear.ops.naive_recurrent_kda`; gradients flow
    to ``q, k, v, g, beta`` and ``initial_state``.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys, L2-normalised per head (as the KDA layer does;
            un-normalised keys make the delta rule, and so both forms, unstable).
        v: ``[B, T, HV, V]`` values (same dtype as q and k). GVA: ``HV = G * H`` value heads,
            value head ``i`` reads key head ``i // G``; g, beta, the states and o are on the
            ``HV`` heads (written ``H`` below); ``HV == H`` is plain KDA.
        g: ``[B, T, H, K]`` log-space per-channel decay in ``[-inf, 0]`` (``-inf``: complete
            forgetting); any floating dtype. Values below
            :data:`kimi_linear.ops.checks.LOG_DECAY_FLOOR` are clamped there, which changes no
            decay factor (all underflow to exactly 0) and gives them a zero gradient.
        beta: ``[B, T, H]`` delta-rule step sizes in ``(0, 1)``; any floating dtype.
        scale: factor on q; defaults to ``K ** -0.5``.
        initial_state: optional ``[N, H, K, V]`` state before the first token (``N = B``, or
            the number of sequences with ``cu_seqlens``).
        output_final_state: also return the ``[N, H, K, V]`` state after the last token.
        chunk_size: tokens per chunk of the sequential state pass (a positive int; default
            :data:`DEFAULT_CHUNK_SIZE`). The intra-chunk work grows with it, the number of
            sequential steps shrinks; on CPU 32 was the fastest of 16, 32 and 64 at T = 4K
            (``benchmarks/kda_cpu.py --chunk-size``; ``KimiLinearConfig.kda_chunk_size``
            defaults to it). Any ``T`` works: the tail chunk is zero-padded, and sequences
            shorter than a chunk use a chunk of ``T`` rounded up to 16. The result does not
            depend on it beyond rounding.
        cu_seqlens: optional ``[N + 1]`` int32/int64 offsets of sequences packed along T
            (needs ``B == 1``); each sequence starts from its own initial-state row, as if run
            alone. Sequences of similar padded length are batched together (one dense pass per
            distinct padded length), so many short documents cost about what one batch does.
        return_intermediate_states: also return the state at every chunk start (prefix
            caching: the state after the first ``i * chunk_size`` tokens of a sequence, from
            which a later call resumes exactly as a full recompute would). Computed by the
            forward anyway; returned without gradient, in the compute dtype.
        cu_seqlens_cpu: the offsets of ``cu_seqlens`` on the host (a CPU tensor, fla's
            argument, or a sequence of ints), when the caller has them (a model forward checks
            ``cu_seqlens`` once and hands them down): the offsets are then never read back from
            the device. Without it they are read (a sync on CUDA).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[N, H, K, V]`` in
        float32 (float64 for float64 inputs) when ``output_final_state``, else ``None``. With
        ``return_intermediate_states``, ``(o, final_state, h)``: ``h [B, NT, H, K, V]`` (fla's
        layout) with ``h[:, i]`` the state after ``i * chunk_size`` tokens (``h[:, 0]``: the
        initial state), ``NT = ceil(T / chunk_size)``; packed (``cu_seqlens``): ``[1, NT, H, K,
        V]`` with each sequence's ``ceil(length / chunk_size)`` states in sequence order.
        Empty inputs (``B == 0`` or ``T == 0``) give empty outputs (the final state is then the
        initial state, or zeros); inputs on the ``meta`` device give meta outputs of the right
        shapes.

    Computation runs in float32 for float16 / bfloat16 / float32 inputs and in float64 for
    float64 inputs. Double backward is not supported.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``scale``, ``initial_state``, ``cu_seqlens``
            or ``chunk_size``, or a ``g`` value above 0.

    Non-finite inputs are isolated as the recurrence isolates them: a NaN / inf in ``k``,
    ``v``, ``beta`` or a NaN ``g`` at token ``t`` makes the outputs of that sequence and head
    NaN from ``t`` on (and its final state), a non-finite ``q`` only ``o_t``; earlier tokens,
    other sequences and heads are exact (:mod:`kimi_linear.ops.isolation`; device ops on every
    call, no sync; ``KIMI_LINEAR_ISOLATE_NONFINITE=0`` turns it off).
    """
    B, T, H, K, V, N = check_kda_inputs(
        q,
        k,
        v,
        g,
        beta,
        scale,
        initial_state,
        cu_seqlens,
        cu_seqlens_cpu=cu_seqlens_cpu,
        allow_gva=True,
    )
    HV = v.shape[2]
    if HV != H and q.device.type != "meta":
        # GVA: the chunked form's key-side products are per value head anyway (k * exp(g) with
        # g on HV heads), so q and k are repeated once onto the value heads (one [B, T, HV, K]
        # copy each, the size of g); autograd sums their gradients over each group.
        q, k = (x.repeat_interleave(HV // H, dim=2) for x in (q, k))
    H = HV
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    compute = compute_dtype(q.dtype)
    clamp = _check_log_decay(g, compute)
    if q.device.type == "meta":
        o, S = empty_outputs(v, N, K, output_final_state, compute)
        if not return_intermediate_states:
            return o, S
        if cu_seqlens is not None:
            raise ValueError(
                "return_intermediate_states with cu_seqlens needs the offsets' values (not meta)"
            )
        return o, S, q.new_empty(B, -(-T // chunk_size), H, K, V, dtype=compute)
    scale = scale_or_default(scale, K)
    offsets = None if cu_seqlens is None else host_offsets(cu_seqlens, cu_seqlens_cpu)
    if return_intermediate_states:
        box: dict = {}
        run = functools.partial(
            _kda_chunk_clean,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=chunk_size,
            cu_seqlens=cu_seqlens,
            offsets=offsets,
            states_out=box,  # clamp recomputed from the cleaned g
        )
        # always isolated: the states after a poisoned token are NaN, the others exact
        o, S = isolate_nonfinite(run, q, k, v, g, beta, cu_seqlens)
        h = poison_chunk_starts(box["h"], (q, k, v, g, beta), cu_seqlens, offsets, chunk_size)
        return o, S, h
    if isolation_enabled():
        # NaN / inf inputs: the intra-chunk products would carry them to earlier tokens of the
        # chunk (0 * NaN = NaN); always run on cleaned inputs and put the NaNs where the
        # recurrence has them, on the device (kimi_linear.ops.isolation). ``clamp`` also holds
        # for the cleaned g (it is True whenever g holds a NaN).
        run = functools.partial(
            _kda_chunk_clean,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            chunk_size=chunk_size,
            cu_seqlens=cu_seqlens,
            offsets=offsets,
            clamp=clamp,
        )
        return isolate_nonfinite(run, q, k, v, g, beta, cu_seqlens)
    return _kda_chunk_clean(
        q,
        k,
        v,
        g,
        beta,
        scale,
        initial_state,
        output_final_state,
        chunk_size,
        cu_seqlens,
        clamp,
        offsets=offsets,
    )


def _kda_chunk_clean(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
    cu_seqlens: torch.Tensor | None,
    clamp: bool | None = None,
    states_out: dict | None = None,
    offsets: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`torch_chunk_kda` on checked, finite inputs (``clamp``: :func:`_check_log_decay`'s
    answer, recomputed when ``None``; ``states_out``: a dict that receives ``"h"``, the
    chunk-start states of :func:`torch_chunk_kda`'s ``return_intermediate_states``;
    ``offsets``: ``cu_seqlens`` on the host, read from it when ``None``)."""
    compute = compute_dtype(q.dtype)
    if clamp is None:
        clamp = _check_log_decay(g, compute)
    args = (q, k, v, g, beta, scale, initial_state, chunk_size, compute)
    # Autocast would run the matmuls in bf16 / fp16 and cancel the fp32 compute guarantee.
    with autocast_disabled(q.device):
        if cu_seqlens is None:
            o, S = _kda_chunk(*args, clamp, states_out)
        else:
            if offsets is None:
                offsets = host_offsets(cu_seqlens, None)
            o, S = _kda_chunk_varlen(*args, offsets, clamp, states_out)
    return o, (S if output_final_state else None)


def _check_log_decay(g: torch.Tensor, compute: torch.dtype) -> bool:
    """:func:`~kimi_linear.ops.checks.check_log_decay` and whether some ``g`` lies below
    ``LOG_DECAY_FLOOR[compute]`` (so that it must be clamped), from one ``aminmax`` pass.
    While ``torch.compile`` traces (no data-dependent branch) it says True: always clamp."""
    if g.device.type == "meta" or g.numel() == 0:
        return False
    if torch.compiler.is_compiling():
        return True
    lo, hi = torch.aminmax(g)
    if not bool(hi <= 0):  # some g > 0 (refused) or NaN (isolated by torch_chunk_kda)
        check_log_decay(g)  # raises for g > 0, with the message
    # NaN (aminmax propagates it) says clamp too: the cleaned g may hold values below the floor
    return not bool(lo >= LOG_DECAY_FLOOR[compute])


def _padded_length(length: int, chunk_size: int) -> int:
    """The length :func:`_kda_chunk` pads a sequence of ``length`` tokens to (0 for 0)."""
    C = min(chunk_size, -(-length // SUB_CHUNK) * SUB_CHUNK)
    return -(-length // C) * C if length else 0


def _kda_chunk_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    compute: torch.dtype,
    offsets: tuple[int, ...],
    clamp: bool,
    states_out: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`torch_chunk_kda` over packed sequences (``B == 1``, host ``offsets`` of
    ``cu_seqlens``); returns ``(o, final_states)``
    (and into ``states_out["h"]`` the chunk-start states ``[1, NT, H, K, V]``, sequence by
    sequence, when given).

    Sequences are grouped by the length :func:`_kda_chunk` would pad them to anyway; each group
    is gathered into a dense zero-padded batch (padded tokens have ``g = 0``, ``beta = 0``,
    ``k = 0``: they neither decay nor write the state, so final states are exact) and run as
    one :func:`_kda_chunk` call. Outputs are scattered back by one differentiable gather.
    """
    _, T, H, K = q.shape
    V = v.shape[-1]
    N = len(offsets) - 1
    dev = q.device
    groups: dict[int, list[int]] = {}
    for n in range(N):
        groups.setdefault(_padded_length(offsets[n + 1] - offsets[n], chunk_size), []).append(n)
    # one zero row appended at index T: the source of every padded position
    ext = [
        torch.cat([x[0], x.new_zeros(1, *x.shape[2:])]) for x in (q, k, v, g, beta)
    ]  # [T + 1, H, ...]
    outs, out_pos, states, state_seq = [], [], [], []
    starts: dict[int, torch.Tensor] = {}  # sequence -> its chunk-start states [n, H, K, V]
    for L, seqs in groups.items():
        h0 = None if initial_state is None else initial_state[seqs]
        if L == 0:  # empty sequences: the state passes through
            states.append(
                q.new_zeros(len(seqs), H, K, V, dtype=compute) if h0 is None else h0.to(compute)
            )
            state_seq.extend(seqs)
            continue
        idx = torch.full((len(seqs), L), T, dtype=torch.long)
        valid = torch.zeros(len(seqs), L, dtype=torch.bool)
        for j, n in enumerate(seqs):
            length = offsets[n + 1] - offsets[n]
            idx[j, :length] = torch.arange(offsets[n], offsets[n + 1])
            valid[j, :length] = True
        idx, valid = idx.to(dev), valid.to(dev)
        dense = [x[idx] for x in ext]  # [b, L, H, ...]
        group_states = None if states_out is None else {}
        o_g, S_g = _kda_chunk(*dense, scale, h0, chunk_size, compute, clamp, group_states)
        if group_states is not None:
            starts.update(zip(seqs, group_states["h"].unbind(0)))
        outs.append(o_g[valid])  # [tokens of the group, H, V], in sequence order
        out_pos.append(idx[valid])
        states.append(S_g)
        state_seq.extend(seqs)
    pos = torch.cat(out_pos) if out_pos else torch.zeros(0, dtype=torch.long, device=dev)
    o_all = torch.cat(outs) if outs else v.new_zeros(0, H, V)
    o = o_all[torch.argsort(pos)].unsqueeze(0)  # back to packed order: [1, T, H, V]
    S = torch.cat(states)[torch.argsort(torch.tensor(state_seq, device=dev))]
    if states_out is not None:
        empty = q.new_zeros(0, H, K, V, dtype=compute)
        states_out["h"] = torch.cat([starts.get(n, empty) for n in range(N)]).unsqueeze(0)
    return o, S


def _kda_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    chunk_size: int,
    compute: torch.dtype,
    clamp: bool,
    states_out: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The computation of :func:`torch_chunk_kda` on validated inputs; returns ``(o, final_state)``.
    ``clamp``: some ``g`` lies below ``LOG_DECAY_FLOOR[compute]`` (:func:`_check_log_decay`).
    ``states_out``: a dict that receives ``"h"``, the chunk-start states
    ``[B, ceil(T / chunk_size), H, K, V]`` (no gradient)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    S = (
        q.new_zeros(B, H, K, V, dtype=compute)
        if initial_state is None
        else initial_state.to(compute)
    )
    if T == 0 or B == 0:
        if states_out is not None:
            states_out["h"] = S.new_zeros(B, 0, H, K, V)
        return v.new_zeros(B, T, H, V), S.clone()

    C = min(chunk_size, -(-T // SUB_CHUNK) * SUB_CHUNK)
    sub = _sub_chunk_size(C)
    n = -(-T // C)
    pad = n * C - T

    def chunked(x: torch.Tensor, floor: float | None = None) -> torch.Tensor:
        # [B, T, H, ...] -> [n, B, H, C, ...], zero-padded at the end (g = 0, beta = 0, k = 0
        # there: padded tokens neither decay nor write the state). A permuted view of a dense
        # tensor, not a copy: q, k, v are read in this layout where they are first multiplied.
        x = x.to(compute)
        # clamped only when some value is below the floor (``clamp``, from the read-only check
        # in torch_chunk_kda: cheaper than the clamp and the mask its backward keeps)
        if floor is not None and clamp:
            x = x.clamp(min=floor)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        x = x.contiguous()  # a no-op for the usual contiguous inputs
        return x.view(B, n, C, *x.shape[2:]).movedim(0, 1).transpose(2, 3)

    q, k, v = (chunked(x) for x in (q, k, v))
    # The log decay is clamped per step at a floor where exp underflows to exactly 0, which is
    # exact (kimi_linear.ops.checks) and keeps the cumulative sums finite: with g = -inf, or a
    # finite -1e30 that swallows its neighbours, G_r - G_i would be NaN or wrong.
    G = _ChunkCumsum.apply(chunked(g, LOG_DECAY_FLOOR[compute]))  # [n, B, H, C, K]
    beta = chunked(beta.unsqueeze(-1)).contiguous()  # [n, B, H, C, 1]

    # q enters both A_qk and exp(G) * q linearly, so ``scale`` is applied to the outputs (a
    # matmul's alpha) instead of to q (a pass over q and over its gradient).
    # A chunk is C = chunk_size tokens, or one chunk of T rounded up to 16 when T is shorter:
    # either way the chunk starts are the multiples of chunk_size below T.
    keep = states_out is not None
    o, S, *starts = _ChunkedKDA.apply(q, k, v, G, beta, S.reshape(B * H, K, V), scale, sub, keep)
    if keep:
        states_out["h"] = starts[0].view(n, B, H, K, V).transpose(0, 1).contiguous()
    o = rearrange(o, "n b h c v -> b (n c) h v")[:, :T]
    return o.to(out_dtype).contiguous(), S.view(B, H, K, V)
