"""Chunked KDA in pure PyTorch: the WY / UT-transform form, batched over all chunks.

This is the CPU training path of the model (and the reference the Triton kernels are checked
against at long lengths). It computes exactly what :func:`kimi_linear.ops.kda_recurrent`
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
   each term keeps full relative precision.
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
sum). ``g > 0`` (or NaN) is refused with ``ValueError``.

Autograd. Everything after the cumulative sum of ``g`` is one custom
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
``(I + M) X = rhs`` is solved through the inverse of ``I + M`` (one solve against the
identity, then a matmul; the backward reuses it), as fla's kernels do.
Computation runs with autocast disabled (float32 / float64).
"""

from __future__ import annotations

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
)

__all__ = ["kda_chunk"]

#: Default ``chunk_size`` of :func:`kda_chunk`: on CPU, the fastest of 16, 32 and 64 for training
#: shapes (``benchmarks/kda_cpu.py``; 64 does twice the intra-chunk matmul work per token).
DEFAULT_CHUNK_SIZE = 32
#: Width of the sub-chunks used for chunks with strong decay.
SUB_CHUNK = 16
#: Largest ``|G_r - R|`` (``R``: the middle of a block's ``G`` range, per channel) for which a
#: chunk or sub-chunk is computed in factored form, by dtype: ``exp(+-limit)``, and gradients
#: scaled by it, stay far from overflow and underflow. Stronger decay takes the next path.
FACTORED_LIMIT = {torch.float32: 50.0, torch.float64: 300.0}
#: Elements of one pairwise ``[group, s, c, c, K]`` temporary (64 MiB in fp32): bounds peak memory.
_GROUP_ELEMENTS = 1 << 24


def _sub_chunk_size(chunk_size: int) -> int:
    """The largest divisor of ``chunk_size`` that is at most :data:`SUB_CHUNK`."""
    return max(d for d in range(1, min(SUB_CHUNK, chunk_size) + 1) if chunk_size % d == 0)


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


class _ChunkedKDA(torch.autograd.Function):
    """Everything of :func:`kda_chunk` after the cumulative sum of the log decay, with a
    hand-written backward.

    Inputs (``b = B * H``, ``n`` chunks of ``C`` tokens; contiguous): ``q, k, G: [n, b, C, K]``
    (unscaled queries, keys, cumulative log decay per chunk), ``v: [n, b, C, V]``,
    ``beta: [n, b, C, 1]``, ``S0: [b, K, V]`` (the state before the first chunk), ``scale`` and
    the sub-chunk width ``sub``. Returns ``(O: [n, b, C, V], S_final: [b, K, V])``.

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
    case: a decay span within ``2 * FACTORED_LIMIT``) the Gram matrices are formed here and
    their factors ``exp(+-(G - R))`` saved, so the backward accumulates their gradients in
    place without recomputing anything; otherwise :func:`_gram_grouped` and
    :func:`_gram_backward_grouped` take every chunk through the three paths. Every per-chunk step is
    two fused multiply-adds into preallocated buffers (autograd through the same loop records
    about ten nodes per chunk), and the gradients are accumulated in place.
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, b, C, K = k.shape
        V = v.shape[-1]
        flat = lambda x: x.reshape(n * b, x.shape[-2], x.shape[-1])
        per_chunk = lambda x: x.view(n, b, C, x.shape[-1])
        G_first, G_last = G[..., :1, :], G[..., -1:, :]
        limit = FACTORED_LIMIT[k.dtype]
        factored = bool(((G_first - G_last) <= 2 * limit).all())  # G is non-increasing
        if factored:
            # Every chunk on path 1 (module docstring): the factors are computed here once and
            # saved, and also give exp(G_C - G) = down * exp(G_C - R) (both factors within
            # exp(+-limit), so the product neither overflows nor loses precision).
            mid = (G_first + G_last) * 0.5  # R: [n, b, 1, K]
            up = (G - mid).exp_()
            down = up.reciprocal()
            k_down = k * down
            keys = k_down.transpose(-1, -2)
            A_qk = ((q * up) @ keys).tril_()
            A_kk = ((k * up) @ keys).tril_(-1)
            tail = (G_last - mid).exp_()
            k_to_end = k_down.mul_(tail)
            del k_down, keys
        else:
            A_qk, A_kk = (per_chunk(A) for A in _gram_grouped(flat(q), flat(k), flat(G), sub))
            up = down = tail = None
            k_to_end = (G_last - G).exp_().mul_(k)  # exp(G_C - G) k: never overflows
        M = A_kk * beta  # row r scaled by beta_r
        G_exp = G.exp()
        q_exp = q * G_exp
        decay = G_exp[..., -1:, :].transpose(-1, -2)  # exp(G_C): [n, b, K, 1]
        rhs = k.new_empty(n, b, C, K + V)
        torch.mul(G_exp, k, out=rhs[..., :K]).mul_(beta)
        torch.mul(v, beta, out=rhs[..., K:])
        # (I + M) X = rhs with I + M unit lower-triangular, through its inverse: one solve
        # against the identity (C columns instead of K + V, in the transposed right-sided form
        # that LAPACK takes without copies), then a batched matmul; the backward reuses the
        # inverse instead of a second solve. About 1.5x faster than solving for X directly.
        eye = torch.eye(C, dtype=k.dtype, device=k.device).expand(n, b, C, C)
        T_inv_t = torch.linalg.solve_triangular(
            M.transpose(-1, -2), eye, upper=True, left=False, unitriangular=True
        )  # (I + M)^-T: [n, b, C, C]
        X = T_inv_t.transpose(-1, -2) @ rhs  # [W | U]: [n, b, C, K + V]
        del rhs
        W, U = X[..., :K], X[..., K:]
        states = k.new_empty(n + 1, b, K, V)  # S_i entering chunk i; states[n]: final
        states[0] = S0
        v_new = k.new_empty(n, b, C, V)
        # per-chunk views made once (unbind), not by indexing inside the loop
        S_i, V_i = states.unbind(0), v_new.unbind(0)
        operands = zip(
            U.unbind(0), W.unbind(0), decay.unbind(0), k_to_end.transpose(-1, -2).unbind(0)
        )
        for i, (U_i, W_i, decay_i, kt_i) in enumerate(operands):
            torch.baddbmm(U_i, W_i, S_i[i], alpha=-1.0, out=V_i[i])
            torch.mul(S_i[i], decay_i, out=S_i[i + 1])
            S_i[i + 1].baddbmm_(kt_i, V_i[i])
        o = torch.bmm(flat(A_qk), flat(v_new))
        o = o.baddbmm_(flat(q_exp), flat(states[:n]), beta=scale, alpha=scale)
        ctx.save_for_backward(
            q, k, v, G, beta, A_qk, A_kk, G_exp, k_to_end, q_exp, T_inv_t, X, states, v_new,
            up, down, tail,
        )  # fmt: skip
        ctx.scale, ctx.sub = scale, sub
        return o.view(n, b, C, V), states[n].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dO: torch.Tensor, dS_final: torch.Tensor | None):  # type: ignore[override]
        # ctx.saved_tensors unpacks (and, under activation checkpointing, recomputes) on every
        # access: read it exactly once.
        (q, k, v, G, beta, A_qk, A_kk, G_exp, k_to_end, q_exp, T_inv_t, X, states, v_new, up, down,
         tail) = ctx.saved_tensors  # fmt: skip
        n, b, C, K = k.shape
        V = v.shape[-1]
        flat = lambda x: x.reshape(n * b, x.shape[-2], x.shape[-1])
        dO = dO.reshape(n, b, C, V) * ctx.scale
        W = X[..., :K]
        starts = states[:n]

        # outputs: O = exp(G) q S_i + A_qk V'
        dA_qk = (dO @ v_new.transpose(-1, -2)).tril_()
        d_q_exp = dO @ starts.transpose(-1, -2)  # [n, b, C, K]
        dX = X.new_empty(n, b, C, K + V)  # [dW | dU]; dU == dV', accumulated in place below
        d_v_new = dX[..., K:]
        d_v_new.copy_(A_qk.transpose(-1, -2) @ dO)
        dS = q_exp.transpose(-1, -2) @ dO  # P_i; becomes dS_i (the gradient of S_i) below
        last = torch.zeros_like(dS[0]) if dS_final is None else dS_final
        decay = G_exp[..., -1:, :].transpose(-1, -2)  # exp(G_C): [n, b, K, 1]
        dS_i, dV_i, K_i = dS.unbind(0), d_v_new.unbind(0), k_to_end.unbind(0)
        decay_i, Wt_i = decay.unbind(0), W.transpose(-1, -2).unbind(0)
        nxt = last
        for i in range(n - 1, -1, -1):
            dV_i[i].baddbmm_(K_i[i], nxt)
            nxt = dS_i[i].addcmul_(decay_i[i], nxt).baddbmm_(Wt_i[i], dV_i[i], alpha=-1.0)
        # with dS_{i+1} (dS[1:], then the final state's gradient), without concatenating them
        d_k_to_end = torch.empty_like(k_to_end)  # V' dS_{i+1}^T: [n, b, C, K]
        d_decay = k.new_empty(n, b, 1, K)  # rowsum(S_i * dS_{i+1})
        for lo, hi, nxt in ((0, n - 1, dS[1:]), (n - 1, n, last.unsqueeze(0))):
            if hi > lo:
                torch.matmul(v_new[lo:hi], nxt.transpose(-1, -2), out=d_k_to_end[lo:hi])
                d_decay[lo:hi] = (starts[lo:hi] * nxt).sum(dim=-1).unsqueeze(-2)
        dX[..., :K] = (d_v_new @ starts.transpose(-1, -2)).neg_()  # dW = -dV' S_i^T

        # the solve: X = (I + M)^-1 rhs, so drhs = (I + M)^-T dX and dM = -drhs X^T (strictly
        # lower part: the unit diagonal and the zeros above it are constants)
        d_rhs = T_inv_t @ dX  # [n, b, C, K + V]
        dM = (d_rhs @ X.transpose(-1, -2)).neg_().tril_(-1)
        del dX
        # rhs = diag(beta) [exp(G) k | v]
        d_rk, d_rv = d_rhs[..., :K], d_rhs[..., K:]
        dk = d_rk * G_exp  # gradient of exp(G) k, before beta
        d_beta = (dk * k).sum(dim=-1, keepdim=True).add_((d_rv * v).sum(dim=-1, keepdim=True))
        dk.mul_(beta)
        dG_exp = (d_rk * k).mul_(beta)
        dv = d_rv * beta
        del d_rhs, d_rk, d_rv
        # M = diag(beta) A_kk
        d_beta.add_((dM * A_kk).sum(dim=-1, keepdim=True))
        dA_kk = dM.mul_(beta)
        # exp(G) q, exp(G_C - G) k, exp(G_C) and exp(G): dG collects d(log factor)
        dq = d_q_exp * G_exp
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
        return dq, dk, dv, dG, d_beta, dS[0], None, None


def kda_chunk(
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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention in the chunked (WY / UT-transform) form; pure PyTorch, autograd.

    Same semantics, layout and dtypes as :func:`kimi_linear.ops.kda_recurrent`; gradients flow
    to ``q, k, v, g, beta`` and ``initial_state``.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys, L2-normalised per head (as the KDA layer does;
            un-normalised keys make the delta rule, and so both forms, unstable).
        v: ``[B, T, H, V]`` values (same dtype as q and k).
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
            (``benchmarks/kda_cpu.py --chunk-size``). Any ``T`` works: the tail chunk is zero-padded, and sequences
            shorter than a chunk use a chunk of ``T`` rounded up to 16. The result does not
            depend on it beyond rounding.
        cu_seqlens: optional ``[N + 1]`` int32/int64 offsets of sequences packed along T
            (needs ``B == 1``); each sequence starts from its own initial-state row, as if run
            alone. Sequences of similar padded length are batched together (one dense pass per
            distinct padded length), so many short documents cost about what one batch does.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[N, H, K, V]`` in
        float32 (float64 for float64 inputs) when ``output_final_state``, else ``None``.
        Empty inputs (``B == 0`` or ``T == 0``) give empty outputs (the final state is then the
        initial state, or zeros); inputs on the ``meta`` device give meta outputs of the right
        shapes.

    Computation runs in float32 for float16 / bfloat16 / float32 inputs and in float64 for
    float64 inputs. Double backward is not supported.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``scale``, ``initial_state``, ``cu_seqlens``
            or ``chunk_size``, or a ``g`` value above 0 (or NaN).
    """
    B, T, H, K, V, N = check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    check_log_decay(g)
    compute = compute_dtype(q.dtype)
    if q.device.type == "meta":
        return empty_outputs(v, N, K, output_final_state, compute)
    scale = K**-0.5 if scale is None else float(scale)
    # Autocast would run the matmuls in bf16 / fp16 and cancel the fp32 compute guarantee.
    with autocast_disabled(q.device):
        if cu_seqlens is None:
            o, S = _kda_chunk(q, k, v, g, beta, scale, initial_state, chunk_size, compute)
        else:
            o, S = _kda_chunk_varlen(
                q, k, v, g, beta, scale, initial_state, chunk_size, compute, cu_seqlens
            )
    return o, (S if output_final_state else None)


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
    cu_seqlens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kda_chunk` over packed sequences (``B == 1``); returns ``(o, final_states)``.

    Sequences are grouped by the length :func:`_kda_chunk` would pad them to anyway; each group
    is gathered into a dense zero-padded batch (padded tokens have ``g = 0``, ``beta = 0``,
    ``k = 0``: they neither decay nor write the state, so final states are exact) and run as
    one :func:`_kda_chunk` call. Outputs are scattered back by one differentiable gather.
    """
    _, T, H, K = q.shape
    V = v.shape[-1]
    offsets = cu_seqlens.tolist()
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
        o_g, S_g = _kda_chunk(*dense, scale, h0, chunk_size, compute)
        outs.append(o_g[valid])  # [tokens of the group, H, V], in sequence order
        out_pos.append(idx[valid])
        states.append(S_g)
        state_seq.extend(seqs)
    pos = torch.cat(out_pos) if out_pos else torch.zeros(0, dtype=torch.long, device=dev)
    o_all = torch.cat(outs) if outs else v.new_zeros(0, H, V)
    o = o_all[torch.argsort(pos)].unsqueeze(0)  # back to packed order: [1, T, H, V]
    S = torch.cat(states)[torch.argsort(torch.tensor(state_seq, device=dev))]
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The computation of :func:`kda_chunk` on validated inputs; returns ``(o, final_state)``."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    S = (
        q.new_zeros(B, H, K, V, dtype=compute)
        if initial_state is None
        else initial_state.to(compute)
    )
    if T == 0 or B == 0:
        return v.new_zeros(B, T, H, V), S.clone()

    C = min(chunk_size, -(-T // SUB_CHUNK) * SUB_CHUNK)
    sub = _sub_chunk_size(C)
    n = -(-T // C)
    pad = n * C - T

    def chunked(x: torch.Tensor, floor: float | None = None) -> torch.Tensor:
        # [B, T, H, ...] -> [n, B, H, C, ...], zero-padded at the end (g = 0, beta = 0, k = 0
        # there: padded tokens neither decay nor write the state).
        x = x.to(compute)
        # clamped only when some value is below the floor (a read-only check is cheaper than
        # the clamp and the mask its backward keeps)
        if floor is not None and (torch.compiler.is_compiling() or bool(x.amin() < floor)):
            x = x.clamp(min=floor)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        # contiguous once here, so that every batched matmul below gets dense operands
        return rearrange(x, "b (n c) h ... -> n b h c ...", c=C).contiguous()

    q, k, v = (chunked(x) for x in (q, k, v))
    # The log decay is clamped per step at a floor where exp underflows to exactly 0, which is
    # exact (kimi_linear.ops.checks) and keeps the cumulative sums finite: with g = -inf, or a
    # finite -1e30 that swallows its neighbours, G_r - G_i would be NaN or wrong.
    g = chunked(g, LOG_DECAY_FLOOR[compute])
    beta = chunked(beta.unsqueeze(-1))  # [n, B, H, C, 1]
    G = g.cumsum(dim=-2)  # [n, B, H, C, K]

    # q enters both A_qk and exp(G) * q linearly, so ``scale`` is applied to the outputs (a
    # matmul's alpha) instead of to q (a pass over q and over its gradient).
    per_chunk = lambda x: x.view(n, B * H, C, x.shape[-1])
    o, S = _ChunkedKDA.apply(
        per_chunk(q),
        per_chunk(k),
        per_chunk(v),
        per_chunk(G),
        per_chunk(beta),
        S.reshape(B * H, K, V),
        scale,
        sub,
    )
    o = rearrange(o, "n (b h) c v -> b (n c) h v", b=B)[:, :T]
    return o.to(out_dtype).contiguous(), S.view(B, H, K, V)
