"""Causal isolation of non-finite inputs for the chunked KDA forms (torch, Triton and fla).

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

So the chunked entry points run the op through :func:`isolate_nonfinite` on **every** call,
without looking first whether something is non-finite (that look is a device-to-host sync per
layer and step on CUDA, and a data-dependent branch no CUDA graph can capture):

1. the inputs' non-finite values are replaced by 0 (``nan_to_num``, so nothing multiplies
   them; for ``g`` NaN and ``+inf``, ``-inf`` being a valid complete decay) and each token and
   head is flagged from ``amax`` / ``amin`` over the head dim (they propagate NaN);
2. the op runs on the cleaned inputs;
3. the outputs from the first poisoned token of each sequence and head on, and the final state
   of that sequence and head, are set to NaN with ``torch.where`` (a ``cumsum`` over ``T`` finds
   them, per ``cu_seqlens`` document), exactly the positions the recurrence makes non-finite (a
   superset where only some value columns of ``v`` are NaN: there the recurrence poisons only
   those columns, here the whole output row).

All of it runs on the device: no ``.item()``, no host read, no branch on the data, so training
and serving never stall on it and CUDA-graph capture works. On finite inputs it changes nothing
(the cleaned copies equal the inputs and the mask is empty). Gradients flow to the finite
outputs only and are exact, so a loss over the other tokens, documents or rows stays finite.
The MLA layer isolates its keys and queries with the same helpers (:func:`zero_nonfinite`,
:func:`nonfinite_rows`; :func:`kimi_linear.layers.mla.poisoned_queries`).

The cost is a few elementwise passes over the inputs (``benchmarks/isolation_cpu.py`` measures
it). ``KIMI_LINEAR_ISOLATE_NONFINITE=0`` turns it off (:func:`isolation_enabled`): the ops then
run on their inputs as given, and a NaN may reach earlier tokens of its chunk.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

__all__ = [
    "ISOLATION_ENV",
    "has_nonfinite",
    "isolate_nonfinite",
    "isolation_enabled",
    "nonfinite_isolation",
    "nonfinite_rows",
    "poison_chunk_starts",
    "poisoned_tokens",
    "zero_nonfinite",
]

#: Environment variable: ``0`` turns the isolation of non-finite inputs off (default ``1``).
ISOLATION_ENV = "KIMI_LINEAR_ISOLATE_NONFINITE"

KDARun = Callable[..., "tuple[torch.Tensor, torch.Tensor | None]"]

_INF = float("inf")
_NAN = float("nan")


#: set by :func:`nonfinite_isolation` (``None``: the environment decides)
_override: bool | None = None


@contextlib.contextmanager
def nonfinite_isolation(enabled: bool) -> Iterator[None]:
    """Turn the isolation on or off inside a ``with`` block (this process, every thread), over
    :data:`ISOLATION_ENV`; e.g. to time the kernels alone (the GPU suite does)."""
    global _override
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    previous, _override = _override, enabled
    try:
        yield
    finally:
        _override = previous


def isolation_enabled() -> bool:
    """Whether the chunked KDA ops isolate non-finite inputs (default yes; ``0`` in
    :data:`ISOLATION_ENV` turns it off; :func:`nonfinite_isolation` overrides both). Other
    values than ``0`` / ``1`` raise ``ValueError``."""
    if _override is not None:
        return _override
    value = os.environ.get(ISOLATION_ENV, "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{ISOLATION_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


class _ZeroNonfinite(torch.autograd.Function):
    """``nan_to_num`` to 0 (one pass) whose gradient goes straight through: a replaced value
    gets the gradient of the 0 that replaced it. (``nan_to_num``'s own backward multiplies by
    ``isfinite(x)``: five more passes, and ``NaN * 0 = NaN``.) In the isolated ops that gradient
    is exactly 0: a replaced value belongs to a poisoned token, and every output it reaches is
    poisoned and passes no gradient back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep_neginf: bool) -> torch.Tensor:
        return torch.nan_to_num(x, 0.0, 0.0, -_INF if keep_neginf else 0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def zero_nonfinite(x: torch.Tensor, keep_neginf: bool = False) -> torch.Tensor:
    """``x`` with NaN and +-inf replaced by 0 (``-inf`` kept with ``keep_neginf``: a valid log
    decay), the gradient passed straight through (:class:`_ZeroNonfinite`). One elementwise
    pass forward, none backward; no sync."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ZeroNonfinite.apply(x, keep_neginf)
    return torch.nan_to_num(x, 0.0, 0.0, -_INF if keep_neginf else 0.0)


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """``[...]`` bool: whether ``x[..., :]`` holds a NaN or +-inf. Exact (nothing is summed, so
    nothing overflows); two reductions (``amax`` and ``amin`` propagate NaN), no temporary of
    ``x``'s size, no sync. An empty last dim holds nothing non-finite."""
    if x.shape[-1] == 0:
        return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
    return ~((x.amax(dim=-1) < _INF) & (x.amin(dim=-1) > -_INF))


def has_nonfinite(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor
) -> bool:
    """Whether some input holds NaN / inf where the op cannot take it (``g = -inf`` is a valid
    decay). A host read (a device sync on CUDA): the ops never call it (they isolate on every
    call); kept for callers that want to ask, e.g. ``torch_chunk_kda`` of earlier revisions loaded by
    ``benchmarks/kda_cpu.py --baseline``."""
    if q.numel() == 0 or q.device.type == "meta":
        return False
    out_bad, _, token_bad = _poison_masks(q, k, v, g, beta, None)
    return bool(out_bad.any() | token_bad.any())


def _poison_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out_bad [B, T, H], state_bad [N, H], token_bad [B, T, H])``; see
    :func:`poisoned_tokens`."""
    # a NaN / inf in k, v or beta, a NaN / +inf in g (amax propagates NaN; -inf is valid)
    # GVA (v, g, beta on HV = G * H heads, q and k on H): a key head's flags reach its group
    group = v.shape[2] // max(k.shape[2], 1)
    heads = (lambda m: m) if group == 1 else (lambda m: m.repeat_interleave(group, dim=2))
    token_bad = heads(nonfinite_rows(k)) | nonfinite_rows(v) | ~torch.isfinite(beta)
    token_bad = token_bad | ~(g.amax(dim=-1) < _INF)
    count = token_bad.cumsum(dim=1, dtype=torch.int32)  # poisoning tokens up to t: [B, T, H]
    if cu_seqlens is None:
        after = count > 0
        state_bad = token_bad.any(dim=1)
    else:
        B, T, H = token_bad.shape
        offsets = cu_seqlens.to(device=count.device, dtype=torch.long)
        before = torch.cat([count.new_zeros(B, 1, H), count], dim=1)  # count before token t
        # each token's sequence: the number of sequences that end at or before it
        tokens = torch.arange(T, device=count.device)
        seq = torch.searchsorted(offsets[1:].contiguous(), tokens, right=True)
        start = offsets[:-1].index_select(0, seq.clamp(max=offsets.numel() - 2))
        after = (count - before.index_select(1, start)) > 0
        at = before[0]  # [T + 1, H]
        state_bad = (at.index_select(0, offsets[1:]) - at.index_select(0, offsets[:-1])) > 0
    out_bad = after | heads(nonfinite_rows(q))
    return out_bad, state_bad, token_bad


def poisoned_tokens(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the recurrence is non-finite, per token and head (device ops only, no sync).

    Args:
        q, k, g: ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (``B == 1``), or ``None``.

    Returns:
        ``out_bad [B, T, H]`` bool (outputs that are NaN: from the first token of the sequence
        with a non-finite ``k``, ``v``, ``beta`` or a NaN / +inf ``g`` on, and tokens with a
        non-finite ``q``), ``state_bad [N, H]`` bool (sequences whose final state is NaN;
        ``N = B`` without ``cu_seqlens``) and ``token_bad [B, T, H]`` bool (the poisoning
        tokens themselves).
    """
    return _poison_masks(q, k, v, g, beta, cu_seqlens)


def poison_chunk_starts(
    h: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    cu_seqlens: torch.Tensor | None,
    offsets: tuple[int, ...] | None,
    chunk_size: int,
) -> torch.Tensor:
    """Chunk-start states computed on cleaned inputs, with every state after a poisoning token
    of its sequence and head set to NaN, as the recurrence has it (the rule
    :func:`isolate_nonfinite` applies to the final state).

    Args:
        h: ``[B, NT, H, K, V]`` states (or ``[..., V, K]``), ``h[:, i]`` the state before token
            ``i * chunk_size`` of its sequence; packed (``cu_seqlens``): ``[1, NT, H, ...]``,
            each sequence's ``ceil(length / chunk_size)`` states in sequence order.
        inputs: the raw ``(q, k, v, g, beta)`` of the call (:func:`poisoned_tokens`).
        cu_seqlens: ``[N + 1]`` offsets of packed sequences, or ``None``.
        offsets: ``cu_seqlens`` on the host (required with it).
        chunk_size: tokens per chunk.
    """
    _, _, token_bad = poisoned_tokens(*inputs, cu_seqlens)  # [B, T, H]
    count = token_bad.to(torch.int32).cumsum(dim=1)
    B, T, H = token_bad.shape
    padded = torch.cat([count.new_zeros(B, 1, H), count], dim=1)  # poisoning tokens before t
    if cu_seqlens is None:
        starts = [list(range(0, T, chunk_size))]
        before = [0]
    else:
        if offsets is None:
            raise ValueError("poison_chunk_starts: offsets (cu_seqlens on the host) are required")
        starts = [list(range(a, b, chunk_size)) for a, b in zip(offsets[:-1], offsets[1:])]
        before = offsets[:-1]
    pos = torch.tensor([p for s in starts for p in s], dtype=torch.long, device=h.device)
    first = torch.tensor(
        [b for s, b in zip(starts, before) for _ in s], dtype=torch.long, device=h.device
    )
    bad = (padded[:, pos] - padded[:, first]) > 0  # [B or 1, NT, H]
    return h.masked_fill(bad[..., None, None], float("nan"))


def isolate_nonfinite(
    run: KDARun,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``run(q, k, v, g, beta) -> (o [B, T, H, V], final_state [N, H, K, V] | None)`` with
    non-finite inputs isolated, whether there are any or not (no sync, no data-dependent
    branch: see the module docstring).

    The inputs' non-finite values (NaN, +-inf; for ``g`` NaN and +inf, ``-inf`` being a valid
    complete decay) are replaced by 0 (:func:`zero_nonfinite`) before ``run``, then the
    outputs and final states the recurrence makes non-finite (:func:`poisoned_tokens`) are set
    to NaN with ``torch.where``. Differentiable: the NaN outputs pass no gradient back (not
    even a NaN one), so the replaced values, which reach only those, get exactly 0 (passed
    straight through :func:`zero_nonfinite`). Inputs without elements (or on the ``meta``
    device) go to ``run`` as they are.
    """
    if q.numel() == 0 or q.device.type == "meta":
        return run(q, k, v, g, beta)
    out_bad, state_bad, _ = _poison_masks(q, k, v, g, beta, cu_seqlens)
    o, state = run(
        zero_nonfinite(q),
        zero_nonfinite(k),
        zero_nonfinite(v),
        zero_nonfinite(g, keep_neginf=True),
        zero_nonfinite(beta),
    )
    # (the op's output first: its autograd node is then the where's first input)
    o = torch.where(~out_bad.unsqueeze(-1), o, _NAN)
    if state is not None:
        state = torch.where(~state_bad[..., None, None], state, _NAN)
    return o, state
