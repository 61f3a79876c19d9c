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
    outputs = []
    # Autocast would run the einsums in bf16 / fp16: keep the stated compute dtype. Slices come
    # from unbind and outputs are stacked once: writing o[:, t] in place would make autograd
    # copy the whole output gradient at every step (a backward quadratic in T).
    with torch.autocast(device_type=q.device.type, enabled=False):
        for q_t, k_t, v_t, g_t, b_t in zip(*(x.unbind(1) for x in (q, k, v, g, beta))):
            S = S * g_t.exp().unsqueeze(-1)  # decay the key rows; k_t: [B, H, K]
            residual = v_t - torch.einsum("bhkv,bhk->bhv", S, k_t)
            S = S + torch.einsum("bhk,bhv->bhkv", b_t.unsqueeze(-1) * k_t, residual)
            outputs.append(torch.einsum("bhkv,bhk->bhv", S, q_t))
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(B, 0, H, V)
    return o.to(v.dtype), (S if output_final_state else None)
