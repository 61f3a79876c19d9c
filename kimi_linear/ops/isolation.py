"""Causal isolation of non-finite inputs for the chunked KDA forms (torch and Triton).

The recurrence is causal: a NaN (or inf) in ``k``, ``v``, ``beta`` or ``g`` at token ``t``
poisons the state from ``t`` on, so outputs ``t, t+1, ...`` of that sequence and head are NaN
and nothing before ``t`` (nor another sequence, packed or batched, nor another head) changes.
A NaN in ``q`` at ``t`` touches only ``o_t``. The chunked forms break that: every intra-chunk
quantity is a matrix product whose masked-out (zero) entries still multiply the poisoned row,
and ``0 * NaN = NaN``. With a NaN key at token ``t`` the triangular inverse, the WY operands
``W = (I + A)^-1 (beta k exp(G))`` and ``U`` and so the outputs of every *earlier* token of the
chunk become NaN (the Triton kernels also clamp ``g`` with a NaN-dropping ``max``, which turns
a NaN gate into silent complete forgetting). Masking the Gram matrices with ``where`` instead
of a multiply is not enough: the products with the poisoned rows remain.

So the chunked entry points check their inputs (one reduction each, one host sync: see
:func:`has_nonfinite`) and, only when something is not finite, run :func:`isolate_nonfinite`:
the op on inputs whose non-finite values are replaced by 0 (a ``where``, so nothing multiplies
them), then every output from the first poisoned token of its sequence and head on set to NaN
(and the final state of that sequence and head), exactly the positions the recurrence makes
non-finite (a superset where only some value columns of ``v`` are NaN: there the recurrence
poisons only those columns, here the whole output row). Gradients flow to the finite outputs
only, so a loss over the other tokens, documents or rows gets finite, exact gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["has_nonfinite", "isolate_nonfinite", "poisoned_tokens"]

KDARun = Callable[..., "tuple[torch.Tensor, torch.Tensor | None]"]


def has_nonfinite(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> bool:
    """Whether some input holds NaN / inf where the op cannot take it (``g = -inf`` is a valid
    decay; ``g = +inf`` or NaN is not), from one fused scalar: the sums of ``q``, ``k``, ``v``,
    ``beta`` (accumulated in fp32 or wider) and the maximum of ``g`` (propagates NaN). A sum
    that overflows with finite inputs says True too; the isolated path is then run for nothing
    but gives the same result. One device sync on CUDA. True while ``torch.compile`` traces (no
    data-dependent branch there: always isolate); False for data-less (meta) and empty inputs and
    during a CUDA graph capture (no sync possible).
    """
    if q.device.type == "meta" or q.numel() == 0:
        return False
    if torch.compiler.is_compiling():
        return True
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # no sync inside a CUDA graph capture: the kernels run as they are
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    total = q.sum(dtype=acc) + k.sum(dtype=acc) + v.sum(dtype=acc)
    total = total + beta.sum(dtype=acc) + g.amax().to(acc).clamp(min=-1.0)  # -inf g is valid
    return not bool(torch.isfinite(total))


def _bad(x: torch.Tensor, reduce: bool) -> torch.Tensor:
    """True where ``x`` is not finite, reduced over the last (head) dim when ``reduce``."""
    bad = ~torch.isfinite(x)
    return bad.any(dim=-1) if reduce else bad


def poisoned_tokens(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the recurrence is non-finite, per token and head.

    Args:
        q, k, g: ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (``B == 1``), or ``None``.

    Returns:
        ``out_bad [B, T, H]`` bool (outputs that are NaN: from the first token of the sequence
        with a non-finite ``k``, ``v``, ``beta`` or a NaN / +inf ``g`` on, and tokens with a
        non-finite ``q``), ``state_bad [N, H]`` bool (sequences whose final state is NaN) and
        ``token_bad [B, T, H]`` bool (the poisoning tokens themselves).
    """
    g_bad = torch.isnan(g) | torch.isposinf(g)
    token_bad = _bad(k, True) | _bad(v, True) | _bad(beta, False) | g_bad.any(dim=-1)
    count = token_bad.to(torch.int32).cumsum(dim=1)  # poisoning tokens up to t: [B, T, H]
    if cu_seqlens is None:
        after = count > 0
        state_bad = count[:, -1] > 0
    else:
        B, T, H = token_bad.shape
        offsets = cu_seqlens.to(device=count.device, dtype=torch.long)
        padded = torch.cat([count.new_zeros(B, 1, H), count], dim=1)  # count before token t
        lengths = offsets[1:] - offsets[:-1]
        seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=count.device), lengths)
        before_seq = padded[:, offsets[:-1]]  # [1, N, H]: count before each sequence starts
        after = (count - before_seq[:, seq]) > 0
        state_bad = (padded[0, offsets[1:]] - padded[0, offsets[:-1]]) > 0  # [N, H]
    out_bad = after | _bad(q, True)
    return out_bad, state_bad, token_bad


def isolate_nonfinite(
    run: KDARun,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``run(q, k, v, g, beta) -> (o, final_state | None)`` with non-finite inputs isolated.

    The inputs' non-finite values (NaN, +-inf; for ``g`` NaN and +inf, ``-inf`` being a valid
    complete decay) are replaced by 0 with ``torch.where`` before ``run``, then the outputs and
    final states the recurrence makes non-finite (:func:`poisoned_tokens`) are set to NaN.
    Differentiable: the replaced values get a zero gradient, the NaN outputs pass none back.
    """
    out_bad, state_bad, _ = poisoned_tokens(q, k, v, g, beta, cu_seqlens)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)

    def clean(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, x, zero.to(x.dtype))

    g_ok = ~(torch.isnan(g) | torch.isposinf(g))
    o, state = run(
        clean(q, torch.isfinite(q)),
        clean(k, torch.isfinite(k)),
        clean(v, torch.isfinite(v)),
        clean(g, g_ok),
        clean(beta, torch.isfinite(beta)),
    )
    o = o.masked_fill(out_bad.unsqueeze(-1), float("nan"))
    if state is not None:
        state = state.masked_fill(state_bad[..., None, None], float("nan"))
    return o, state
