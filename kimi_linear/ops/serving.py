"""Serving-side KDA state: a pool of per-sequence states addressed by slot (vLLM's convention).

A server keeps the recurrent states of all live sequences in one pool
``[num_slots, H, K, V]`` (``H``: value heads) and tells each decode call where every sequence's
state lives with ``ssm_state_indices`` (vLLM's name):

* ``[N]``: sequence ``n`` starts from ``pool[idx[n]]``, and its state after its last token is
  written back there (in place).
* ``[N, S]`` (speculative decoding): a slot per token position. Sequence ``n`` starts from
  ``pool[idx[n, c]]`` with ``c = num_accepted_tokens[n] - 1`` (or ``c = 0``), and the state after
  its token ``j`` is written to ``pool[idx[n, j]]``: one call verifies up to ``S`` draft tokens
  and keeps every intermediate state, so that the next call continues from the state after the
  last token the sampler accepted (``num_accepted_tokens``), with nothing recomputed.

A negative slot is padding (vLLM's ``PAD_SLOT_ID = -1``): a sequence whose read slot is negative
is skipped (outputs 0; no state read or written), a negative write slot stores nothing. With
``inplace_final_state=False`` the pool is only read and the state after every token is returned
in a new ``[total_tokens, H, K, V]`` tensor instead.

This module holds the checks shared by the Triton kernel
(:func:`kimi_linear.kernels.fused_recurrent_kda`) and the pure-PyTorch reference
:func:`kda_pool_recurrent` (the ``torch`` backend of :func:`kimi_linear.backends.dispatch_decode_kda`).
"""

from __future__ import annotations

import torch

from kimi_linear.ops.checks import (
    autocast_disabled,
    check_kda_inputs,
    check_log_decay,
    scale_or_default,
)
from kimi_linear.ops.options import gate_check_enabled

__all__ = [
    "PAD_SLOT",
    "check_state_pool",
    "check_state_slots",
    "kda_pool_recurrent",
    "slot_checks_enabled",
]

#: The padding slot of ``ssm_state_indices`` (vLLM's ``PAD_SLOT_ID``); any negative slot pads.
PAD_SLOT = -1

POOL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_state_pool(
    pool: torch.Tensor | None,
    indices: object,
    accepted: object,
    N: int,
    HV: int,
    K: int,
    V: int,
    device: torch.device,
    state_v_first: bool = False,
) -> None:
    """Shapes, dtypes and devices of the serving arguments (their values:
    :func:`check_state_slots`).

    Args:
        pool: the state pool ``[num_slots, HV, K, V]`` (``[num_slots, HV, V, K]`` with
            ``state_v_first``): fp32 / bf16 / fp16, each state contiguous (any stride between
            slots, as a view into a larger cache), not requiring grad.
        indices: ``ssm_state_indices``, int32 / int64 ``[N]`` or ``[N, S]``.
        accepted: ``num_accepted_tokens``, int32 / int64 ``[N]`` (needs ``[N, S]`` indices).
        N: the number of sequences; HV, K, V: value heads and head dims.

    Raises:
        ValueError: naming the argument and what was expected.
    """
    if pool is None:
        raise ValueError(
            "ssm_state_indices addresses a pool of states: pass the pool [num_slots, HV, K, V] "
            "as initial_state"
        )
    inner = (HV, V, K) if state_v_first else (HV, K, V)
    layout = "[num_slots, HV, V, K]" if state_v_first else "[num_slots, HV, K, V]"
    if not isinstance(pool, torch.Tensor) or pool.dim() != 4 or tuple(pool.shape[1:]) != inner:
        shape = tuple(pool.shape) if isinstance(pool, torch.Tensor) else type(pool).__name__
        raise ValueError(
            f"initial_state (the state pool) must be {layout} = [num_slots, "
            f"{', '.join(map(str, inner))}], got {shape}"
        )
    if pool.dtype not in POOL_DTYPES:
        raise ValueError(f"the state pool must be float32, bfloat16 or float16, got {pool.dtype}")
    if pool.device != device:
        raise ValueError(f"the state pool is on {pool.device} but q is on {device}")
    if pool.shape[0] > 0 and pool[0].stride() != (K * V, inner[2], 1):
        raise ValueError(
            "each state of the pool must be contiguous (any stride between slots is fine), got "
            f"strides {tuple(pool.stride())}"
        )
    if pool.requires_grad and torch.is_grad_enabled():
        raise ValueError("the state pool requires grad, but it is updated in place: detach it")
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError("ssm_state_indices must be an int32 or int64 tensor")
    if indices.dim() not in (1, 2) or indices.shape[0] != N:
        raise ValueError(
            f"ssm_state_indices must be [N] or [N, S] with N={N} sequences, got "
            f"{tuple(indices.shape)}"
        )
    if indices.dim() == 2 and indices.shape[1] == 0:
        raise ValueError("ssm_state_indices [N, S] needs S >= 1 columns")
    if indices.device != device:
        raise ValueError(f"ssm_state_indices is on {indices.device} but q is on {device}")
    if accepted is None:
        return
    if indices.dim() != 2:
        raise ValueError(
            "num_accepted_tokens needs ssm_state_indices [N, S] (a slot per token position)"
        )
    if (
        not isinstance(accepted, torch.Tensor)
        or accepted.dtype not in (torch.int32, torch.int64)
        or tuple(accepted.shape) != (N,)
    ):
        raise ValueError(f"num_accepted_tokens must be an int32 or int64 tensor [N={N}]")
    if accepted.device != device:
        raise ValueError(f"num_accepted_tokens is on {accepted.device} but q is on {device}")


def check_state_slots(
    indices: torch.Tensor,
    accepted: torch.Tensor | None,
    offsets: list[int],
    num_slots: int,
    writes: bool,
) -> None:
    """The values of the serving arguments (one small device-to-host copy): slots below
    ``num_slots``, accepted counts in ``[1, S]``, a column per token with ``[N, S]`` indices,
    and, when the pool is written (``writes``), no slot used by two sequences (their updates
    would race). Sequences may share a read slot when the pool is only read.

    Args:
        offsets: the ``N + 1`` token offsets of the sequences (``cu_seqlens`` as a list).

    Raises:
        ValueError: naming the sequence and slot.
    """
    idx = indices.tolist()
    acc = None if accepted is None else accepted.tolist()
    owner: dict[int, int] = {}
    for n, row in enumerate(idx):
        row = row if isinstance(row, list) else [row]
        length = offsets[n + 1] - offsets[n]
        if acc is not None and not 1 <= acc[n] <= len(row):
            raise ValueError(
                f"num_accepted_tokens[{n}] = {acc[n]} must be in [1, S={len(row)}] (the column "
                "of ssm_state_indices holding the state to continue from, plus one)"
            )
        if indices.dim() == 2 and length > len(row):
            raise ValueError(
                f"sequence {n} has {length} tokens but ssm_state_indices has S={len(row)} "
                "columns (one state slot per token)"
            )
        read = row[acc[n] - 1 if acc is not None else 0]
        used = {read}
        if indices.dim() == 2 and writes and read >= 0:
            used |= set(row[:length])
        for s in used:
            if s >= num_slots:
                raise ValueError(
                    f"ssm_state_indices holds slot {s} (sequence {n}), but the pool has "
                    f"{num_slots} slots"
                )
            if s < 0 or not writes:
                continue  # padding, or a read-only pool
            if owner.setdefault(s, n) != n:
                raise ValueError(
                    f"state slot {s} is used by sequences {owner[s]} and {n}: each sequence "
                    "needs its own slots"
                )


def slot_checks_enabled(indices: torch.Tensor) -> bool:
    """Whether to check the slot values (:func:`check_state_slots`): where it costs no device
    sync (CPU tensors), and on a GPU with ``KIMI_LINEAR_CHECK_GATE=1`` (the kit's opt-in for
    device-syncing checks); never while ``torch.compile`` traces or a CUDA graph is captured.
    Unchecked, the kernel still never reads or writes outside the pool (a slot out of range is
    treated as padding)."""
    if indices.device.type == "meta" or torch.compiler.is_compiling():
        return False
    if indices.is_cuda:
        return gate_check_enabled() and not torch.cuda.is_current_stream_capturing()
    return True


def kda_pool_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    inplace_final_state: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The state-pool semantics of :func:`kimi_linear.kernels.fused_recurrent_kda` in pure
    PyTorch, token by token (module docstring): the ``torch`` backend of
    :func:`kimi_linear.backends.dispatch_decode_kda` with ``ssm_state_indices``, and the reference the kernel
    is tested against. Forward only (no gradient reaches the pool).

    Args:
        q, k, g: ``[B, T, H, K]``; v ``[B, T, H, V]``; beta ``[B, T, H]``: as
            :func:`kimi_linear.ops.naive_recurrent_kda` (``N = B`` sequences, or packed with
            ``cu_seqlens``).
        initial_state: the pool ``[num_slots, H, K, V]``.
        ssm_state_indices, num_accepted_tokens, inplace_final_state: as
            :func:`kimi_linear.kernels.fused_recurrent_kda`.

    Returns:
        ``(o [B, T, H, V], pool)`` (updated in place), or with ``inplace_final_state=False``
        ``(o, states [B * T, H, K, V] fp32)``: the state after every token; skipped (padding)
        sequences get zero outputs (and zero states).

    Raises:
        ValueError: the checks of :func:`naive_recurrent_kda` (the pool aside) and of
            :func:`check_state_pool` / :func:`check_state_slots`.
    """
    B, T, H, K, V, N = check_kda_inputs(q, k, v, g, beta, scale, None, cu_seqlens)
    check_state_pool(initial_state, ssm_state_indices, num_accepted_tokens, N, H, K, V, q.device)
    check_log_decay(g)
    offsets = list(range(0, (B + 1) * T, T)) if cu_seqlens is None else cu_seqlens.tolist()
    pool = initial_state
    in_place = inplace_final_state is None or bool(inplace_final_state)
    num_slots = pool.shape[0]
    check_state_slots(ssm_state_indices, num_accepted_tokens, offsets, num_slots, in_place)
    scale = scale_or_default(scale, K)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    q, k, v, g, beta = (x.detach().flatten(0, 1).to(compute) for x in (q, k, v, g, beta))
    o = torch.zeros_like(v)
    tokens = None if in_place else q.new_zeros(B * T, H, K, V, dtype=torch.float32)
    idx = ssm_state_indices.tolist()
    acc = None if num_accepted_tokens is None else num_accepted_tokens.tolist()
    with torch.no_grad(), autocast_disabled(q.device):
        for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
            row = idx[n] if isinstance(idx[n], list) else [idx[n]]
            read = row[acc[n] - 1 if acc is not None else 0]
            if read < 0:
                continue  # padding
            S = pool[read].to(compute)
            for j, t in enumerate(range(bos, eos)):
                S = S * g[t].exp().unsqueeze(-1)
                residual = v[t] - torch.einsum("hkv,hk->hv", S, k[t])
                S = S + torch.einsum("hk,hv->hkv", beta[t].unsqueeze(-1) * k[t], residual)
                o[t] = torch.einsum("hkv,hk->hv", S, q[t] * scale)
                if not in_place:
                    tokens[t] = S
                elif ssm_state_indices.dim() == 2 and row[j] >= 0:
                    pool[row[j]] = S
            if in_place and ssm_state_indices.dim() == 1:
                pool[read] = S
    return o.to(out_dtype).view(B, T, H, V), (pool if in_place else tokens)
