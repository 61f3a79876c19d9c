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

Memory. ``A_qk`` and ``A_kk`` come from one custom :class:`torch.autograd.Function` that saves
only ``q``, ``k`` and ``G`` and recomputes the decay factors in its backward, where
``dG = q * dq + k * dk_row - k * dk_col`` (each term of ``A[r, i]`` enters ``G_r`` with + and
``G_i`` with -). Its temporaries are bounded by processing the chunks in groups (the pairwise
path's ``[c, c, K]`` blocks are 16x the inputs), so autograd keeps ``O(T (K + V + C))`` per
head: no ``[chunks, C, C, K]`` tensor is ever stored. The rest (triangular solve, state pass,
outputs) is plain autograd. Computation runs with autocast disabled (float32 / float64).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch.autograd.function import once_differentiable

from kimi_linear.ops.checks import check_kda_inputs

__all__ = ["kda_chunk"]

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
    lo, hi = torch.aminmax(Gb, dim=-2, keepdim=True)
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


class _DecayedGram(torch.autograd.Function):
    """``(q, k, G) -> (A_qk, A_kk)``; saves only its inputs, recomputes decay factors backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, G: torch.Tensor, sub: int):  # type: ignore[override]
        N, C, K = q.shape
        A_qk = q.new_empty(N, C, C)
        A_kk = q.new_empty(N, C, C)
        step = _group_size(C, sub, K)
        for lo in range(0, N, step):
            hi = min(N, lo + step)
            A_qk[lo:hi], A_kk[lo:hi] = _gram_forward(q[lo:hi], k[lo:hi], G[lo:hi], sub)
        ctx.save_for_backward(q, k, G)
        ctx.sub = sub
        return A_qk, A_kk

    @staticmethod
    @once_differentiable
    def backward(ctx, dA_qk: torch.Tensor, dA_kk: torch.Tensor):  # type: ignore[override]
        q, k, G = ctx.saved_tensors
        N, C, K = q.shape
        dq, dk, dG = torch.empty_like(q), torch.empty_like(k), torch.empty_like(G)
        step = _group_size(C, ctx.sub, K)
        with torch.autocast(device_type=q.device.type, enabled=False):  # keep fp32 / fp64
            for lo in range(0, N, step):
                hi = min(N, lo + step)
                dq[lo:hi], dk[lo:hi], dG[lo:hi] = _gram_backward(
                    q[lo:hi], k[lo:hi], G[lo:hi], dA_qk[lo:hi], dA_kk[lo:hi], ctx.sub
                )
        return dq, dk, dG, None


def kda_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention in the chunked (WY / UT-transform) form; pure PyTorch, autograd.

    Same semantics, layout and dtypes as :func:`kimi_linear.ops.kda_recurrent`; gradients flow
    to ``q, k, v, g, beta`` and ``initial_state``.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys, L2-normalised per head (as the KDA layer does;
            un-normalised keys make the delta rule, and so both forms, unstable).
        v: ``[B, T, H, V]`` values (same dtype as q and k).
        g: ``[B, T, H, K]`` log-space per-channel decay (``<= 0``); any floating dtype.
        beta: ``[B, T, H]`` delta-rule step sizes in ``(0, 1)``; any floating dtype.
        scale: factor on q; defaults to ``K ** -0.5``.
        initial_state: optional ``[B, H, K, V]`` state before the first token.
        output_final_state: also return the ``[B, H, K, V]`` state after the last token.
        chunk_size: tokens per chunk of the sequential state pass (a positive int; 64 is a good
            default on CPU). Any ``T`` works: the tail chunk is zero-padded, and sequences
            shorter than a chunk use a chunk of ``T`` rounded up to 16. The result does not
            depend on it beyond rounding.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state ``[B, H, K, V]`` in
        float32 (float64 for float64 inputs) when ``output_final_state``, else ``None``.

    Computation runs in float32 for float16 / bfloat16 / float32 inputs and in float64 for
    float64 inputs. Double backward is not supported.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``scale``, ``initial_state`` or ``chunk_size``.
    """
    B, T, H, K, V, _ = check_kda_inputs(q, k, v, g, beta, scale, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K**-0.5 if scale is None else float(scale)
    # Autocast would run the matmuls in bf16 / fp16 and cancel the fp32 compute guarantee.
    with torch.autocast(device_type=q.device.type, enabled=False):
        o, S = _kda_chunk(q, k, v, g, beta, scale, initial_state, chunk_size, compute)
    return o, (S if output_final_state else None)


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
    if T == 0:
        return v.new_zeros(B, 0, H, V), S.clone()

    C = min(chunk_size, -(-T // SUB_CHUNK) * SUB_CHUNK)
    sub = _sub_chunk_size(C)
    n = -(-T // C)
    pad = n * C - T

    def chunked(x: torch.Tensor) -> torch.Tensor:
        # [B, T, H, ...] -> [n, B, H, C, ...], zero-padded at the end (g = 0, beta = 0, k = 0
        # there: padded tokens neither decay nor write the state).
        x = x.to(compute)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        # contiguous once here, so that every batched matmul below gets dense operands
        return rearrange(x, "b (n c) h ... -> n b h c ...", c=C).contiguous()

    q, k, v, g = (chunked(x) for x in (q, k, v, g))
    beta = chunked(beta.unsqueeze(-1))  # [n, B, H, C, 1]
    q = q * scale
    G = g.cumsum(dim=-2)  # [n, B, H, C, K]

    flat = lambda x: x.reshape(n * B * H, C, x.shape[-1])
    A_qk, A_kk = _DecayedGram.apply(flat(q), flat(k), flat(G), sub)
    A_qk = A_qk.view(n, B, H, C, C)
    A_kk = A_kk.view(n, B, H, C, C) * beta  # row r scaled by beta_r

    # (I + A_kk) [W | U] = diag(beta) [exp(G) k | v]: unit lower-triangular, forward substitution.
    # Solved in the transposed form [W | U]^T (I + A_kk)^T = rhs^T (left=False), whose layout
    # LAPACK takes with fewer copies (about 2x faster on CPU than the left-sided solve).
    G_exp = G.exp()
    rhs = beta * torch.cat([G_exp * k, v], dim=-1)
    WU_t = torch.linalg.solve_triangular(
        A_kk.transpose(-1, -2), rhs.transpose(-1, -2), upper=True, left=False, unitriangular=True
    )  # [n, B, H, K + V, C]
    G_last = G[..., -1:, :]  # [n, B, H, 1, K]
    k_to_end = k * (G_last - G).exp()  # [n, B, H, C, K]
    chunk_decay = G_last.exp()  # [n, B, H, 1, K]

    # The state pass, on the transposed state S^T [V, K] so that every operand is a dense slice
    # of the tensors above (W^T, U^T are row blocks of the solve's output):
    #     V'^T = U^T - S^T W^T,    S^T <- S^T diag(exp(G_C)) + V'^T (exp(G_C - G) * K)
    # as fused multiply-adds (baddbmm) over [B * H] matrices. unbind (not x[i]): its backward
    # stacks the slices instead of scattering each into a full-size zero tensor, which would
    # make the backward quadratic in the number of chunks.
    mats = lambda x: x.reshape(n, B * H, x.shape[-2], x.shape[-1]).unbind(0)
    W_t, U_t = WU_t.split([K, V], dim=-2)
    S_t = S.transpose(-1, -2).reshape(B * H, V, K)
    starts, v_new = [], []  # S^T at the start of each chunk, V'^T
    for U_i, W_i, decay_i, k_i in zip(mats(U_t), mats(W_t), mats(chunk_decay), mats(k_to_end)):
        starts.append(S_t)
        u_t = torch.baddbmm(U_i, S_t, W_i, alpha=-1.0)  # [B * H, V, C]
        v_new.append(u_t)
        S_t = torch.baddbmm(S_t * decay_i, u_t, k_i)

    # O^T = S^T (exp(G) * Q)^T + V'^T A_qk^T: [n * B * H, V, C]
    o_t = torch.cat(v_new) @ flat(A_qk).transpose(-1, -2)
    o_t = torch.baddbmm(o_t, torch.cat(starts), flat(q * G_exp).transpose(-1, -2))
    o = rearrange(o_t, "(n b h) v c -> b (n c) h v", n=n, b=B)[:, :T]
    S = S_t.view(B, H, V, K).transpose(-1, -2).contiguous()
    return o.to(out_dtype).contiguous(), S
