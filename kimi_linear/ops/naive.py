"""Readable token-by-token KDA: the specification every faster implementation is tested against.

Per head, with state ``S`` of shape ``[K, V]`` and per-channel log decay ``g_t`` (in
``[-inf, 0]``; ``-inf`` forgets the key row completely)::

    S = diag(exp(g_t)) S                       # decay each key row
    S = S + beta_t k_t (v_t - S^T k_t)^T        # delta rule on the decayed state
    o_t = S^T (scale * q_t)

Computation runs in float64 for float64 inputs and in float32 otherwise; outputs come back in
the dtype of ``v``; the final state is float32 (float64 for float64 inputs).

* :func:`naive_recurrent_kda`: any number of tokens, dense or packed (``cu_seqlens``).
* :func:`naive_kda_step`: one token per sequence, the cheap decode update.
"""

from __future__ import annotations

import torch

from kimi_linear.ops.checks import (
    autocast_disabled,
    check_kda_inputs,
    check_log_decay,
    compute_dtype,
    empty_outputs,
    scale_or_default,
)

__all__ = ["naive_kda_step", "naive_recurrent_kda"]


def naive_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention, one token at a time.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (L2-normalised keys keep the recurrence stable).
        v: ``[B, T, HV, V]`` values. GVA: ``HV = G * H`` value heads (``G >= 1``), value head
            ``i`` reads key head ``i // G``; q and k are not repeated, their gradients sum over
            the group. ``HV == H`` is plain KDA.
        g: ``[B, T, HV, K]`` log-space per-channel decay in ``[-inf, 0]``.
        beta: ``[B, T, HV]`` delta-rule step sizes in ``(0, 1)``.
        scale: factor on q; defaults to ``K ** -0.5``.
        initial_state: optional ``[N, HV, K, V]`` state before the first token (``N = B``, or
            the number of sequences with ``cu_seqlens``).
        output_final_state: also return the ``[N, HV, K, V]`` state after the last token.
        cu_seqlens: optional ``[N + 1]`` int32/int64 offsets of sequences packed along T
            (needs ``B == 1``); each sequence starts from its own initial-state row.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state or ``None``.

    Raises:
        ValueError: bad shapes, dtypes, devices, ``scale``, ``initial_state``, ``cu_seqlens``,
            or a ``g`` value above 0 (NaN is not refused: it poisons its sequence from that
            token on, as any non-finite input).
    """
    B, T, H, K, V, N = check_kda_inputs(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, allow_gva=True
    )
    check_log_decay(g)
    compute = compute_dtype(q.dtype)
    if q.device.type == "meta":
        return empty_outputs(v, N, K, output_final_state, compute)
    scale = scale_or_default(scale, K)
    # Autocast would run the einsums in bf16 / fp16: keep the stated compute dtype.
    with autocast_disabled(q.device):
        if cu_seqlens is None:
            return _recurrent(q, k, v, g, beta, scale, initial_state, output_final_state, compute)
        offsets = cu_seqlens.tolist()
        outputs, states = [], []
        for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
            h0 = None if initial_state is None else initial_state[n : n + 1]
            o_n, S_n = _recurrent(
                *(x[:, bos:eos] for x in (q, k, v, g, beta)), scale, h0, True, compute
            )
            outputs.append(o_n)
            states.append(S_n)
        o = torch.cat(outputs, dim=1)
        return o, (torch.cat(states) if output_final_state else None)


def _recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    compute: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence of :func:`naive_recurrent_kda` on validated dense inputs."""
    B, T, H, K = q.shape
    HV, V = v.shape[2:]
    G = HV // H  # GVA: value heads per key head (value head i reads key head i // G)
    out_dtype = v.dtype
    q, k, v, g, beta = (x.to(compute) for x in (q, k, v, g, beta))
    q = q * scale
    # Value-head tensors viewed as [.., H, G, ..]: q and k are read once per group, never repeated.
    v, g, beta = v.view(B, T, H, G, V), g.view(B, T, H, G, K), beta.view(B, T, H, G)
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.to(compute)
    if T == 0:  # no step makes a new state: never hand back the caller's tensor
        S = S.clone()
    S = S.reshape(B, H, G, K, V)
    outputs = []
    # Slices come from unbind and outputs are stacked once: writing o[:, t] in place would make
    # autograd copy the whole output gradient at every step (a backward quadratic in T).
    for q_t, k_t, v_t, g_t, b_t in zip(*(x.unbind(1) for x in (q, k, v, g, beta))):
        S = S * g_t.exp().unsqueeze(-1)  # decay the key rows; k_t: [B, H, K], g_t: [B, H, G, K]
        residual = v_t - torch.einsum("bhgkv,bhk->bhgv", S, k_t)
        S = S + torch.einsum("bhg,bhk,bhgv->bhgkv", b_t, k_t, residual)
        outputs.append(torch.einsum("bhgkv,bhk->bhgv", S, q_t))
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, G, V)
    S = S.reshape(B, HV, K, V)
    return o.reshape(B, T, HV, V).to(out_dtype), (S if output_final_state else None)


def naive_kda_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One KDA token per sequence: the cheap decode update, differentiable.

    Same layout and semantics as :func:`naive_recurrent_kda` restricted to one step: q, k, g
    ``[B, 1, H, K]``, v ``[B, 1, H, V]``, beta ``[B, 1, H]``, state ``[B, H, K, V]`` (GVA: v,
    g, beta and the state on ``HV = G * H`` heads, as there). With
    ``cu_seqlens`` (``[N + 1]`` offsets, ``B == 1``) the tokens are packed ``[1, N, ...]``, one
    per sequence (``cu_seqlens == [0, 1, ..., N]``), and the state is ``[N, H, K, V]``.
    Computes in float32 (float64 for float64 inputs).

    Returns:
        ``(o [B, 1, HV, V] in v's dtype, new_state or None)``.

    Raises:
        ValueError: the checks of :func:`naive_recurrent_kda`, or more than one token per sequence.
    """
    B, T, H, K, V, N = check_kda_inputs(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, allow_gva=True
    )
    if cu_seqlens is None and T != 1:
        raise ValueError(
            f"q must hold exactly one token per sequence [B, 1, H, K], got {tuple(q.shape)}"
        )
    if cu_seqlens is not None and cu_seqlens.device.type != "meta":
        offsets = cu_seqlens.tolist()
        if offsets != list(range(N + 1)):
            raise ValueError(
                "naive_kda_step takes exactly one token per sequence: cu_seqlens must be "
                f"[0, 1, ..., N], got {offsets}"
            )
    check_log_decay(g)
    compute = compute_dtype(q.dtype)
    if q.device.type == "meta":
        return empty_outputs(v, N, K, output_final_state, compute)
    scale = scale_or_default(scale, K)
    if cu_seqlens is not None:  # [1, N, ...] -> [N, 1, ...]: one token per sequence
        q, k, v, g, beta = (x.transpose(0, 1) for x in (q, k, v, g, beta))
    with autocast_disabled(q.device):  # one step of the recurrence
        o, S = _recurrent(q, k, v, g, beta, scale, initial_state, True, compute)
    if cu_seqlens is not None:
        o = o.transpose(0, 1)
    return o, (S if output_final_state else None)
