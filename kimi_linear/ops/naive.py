"""Readable token-by-token KDA: the specification every faster implementation is tested against.

Per head, with state ``S`` of shape ``[K, V]`` and per-channel log decay ``g_t`` (``<= 0``)::

    S = diag(exp(g_t)) S                       # decay each key row
    S = S + beta_t k_t (v_t - S^T k_t)^T        # delta rule on the decayed state
    o_t = S^T (scale * q_t)

Computation runs in float64 for float64 inputs and in float32 otherwise; outputs come back in
the dtype of ``v``; the final state is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from kimi_linear.ops.checks import check_kda_inputs


def kda_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention, one token at a time.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (L2-normalised keys keep the recurrence stable).
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H, K]`` log-space per-channel decay (``<= 0``).
        beta: ``[B, T, H]`` delta-rule step sizes in ``(0, 1)``.
        scale: factor on q; defaults to ``K ** -0.5``.
        initial_state: optional ``[B, H, K, V]`` state before the first token.
        output_final_state: also return the ``[B, H, K, V]`` state after the last token.

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state or ``None``.
    """
    B, T, H, K, V, _ = check_kda_inputs(q, k, v, g, beta, scale, initial_state)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = K**-0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(compute) for x in (q, k, v, g, beta))
    q = q * scale
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(compute).clone()
    o = q.new_empty(B, T, H, V)
    for t in range(T):
        S = S * g[:, t].exp().unsqueeze(-1)
        kt = k[:, t]  # [B, H, K]
        residual = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt)
        S = S + torch.einsum("bhk,bhv->bhkv", beta[:, t].unsqueeze(-1) * kt, residual)
        o[:, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, t])
    return o.to(v.dtype if v.dtype != torch.float64 else torch.float64), (S if output_final_state else None)
