"""The KDA decay gate: the one place where the per-channel log decay ``g`` is formed.

Two forms, chosen by ``KimiLinearConfig.kda_gate_lower_bound`` (``lower_bound`` below)::

    release gate (lower_bound None):  g = -exp(A_log) * softplus(f + dt_bias)
    safe gate   (lower_bound < 0):     g = lower_bound * sigmoid(exp(A_log) * (f + dt_bias))

``f`` is the low-rank projection of the token (``f_b_proj(f_a_proj(x))``).  The release gate is
the one of the released Kimi-Linear-48B-A3B (Moonshot's ``modeling_kimi.py``, fla's
``naive_kda_gate``, transformers' ``KimiLinearForgetGate``); it is unbounded below.  The safe gate
(fla's ``lower_bound`` / ``safe_gate``, Kimi K3's ``linear_attn_config.gate_lower_bound``, and the
gate FlashKDA and cuLA require) keeps every ``g`` in ``(lower_bound, 0)``, so a 16-token
sub-chunk accumulates at most ``16 * lower_bound`` and kernels may skip overflow guards.

Everything is computed in float32 (float64 when an input is float64: the references of the
tests chain the gate in float64).  ``softplus`` is PyTorch's stable one
(``log1p(exp(-|x|)) + max(x, 0)``); transformers' pure-PyTorch fallback computes
``log(1 + exp(x))`` for ``x <= 20``, which loses relative precision as ``x`` falls (``1 + exp(x)``
rounds in fp32; below ``x ~ -16.6`` it returns 0 where the true value is ``exp(x)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the allowed ``lower_bound`` of the safe gate, ``[-5, 0)``: one rule with the config's check
from kimi_linear.ops.options import SAFE_GATE_LOWER_BOUND_RANGE, check_safe_gate_bound

__all__ = ["SAFE_GATE_LOWER_BOUND_RANGE", "kda_gate"]


def kda_gate(
    f: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor | None = None,
    lower_bound: float | None = None,
) -> torch.Tensor:
    """Log-space decay ``g <= 0`` (float32; float64 if an input is) from the gate projection ``f``.

    Args:
        f: ``[B, T, H, K]`` (per-channel gate) or ``[B, T, H, 1]`` (one gate per head).
        A_log: ``H`` values, any shape that flattens to ``[H]`` (the release stores
            ``[1, 1, H, 1]``).
        dt_bias: ``H * f.shape[-1]`` values (flattened ``[H, K]`` or ``[H]``), or ``None`` for
            no bias (fla's ``naive_kda_gate`` / ``fused_kda_gate`` allow it; the layer always
            has one).
        lower_bound: ``None`` for the release gate; a number in ``[-5, 0)`` for the safe gate.

    Returns:
        ``g`` with ``f``'s shape, float32 (float64 when ``f``, ``A_log`` or ``dt_bias`` is):
        ``-exp(A_log) * softplus(f + dt_bias)`` or
        ``lower_bound * sigmoid(exp(A_log) * (f + dt_bias))``.
    """
    if not isinstance(f, torch.Tensor) or f.dim() != 4:
        shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"f must be a [B, T, H, K] tensor, got {shape}")
    H, K = f.shape[-2:]
    if A_log.numel() != H:
        raise ValueError(f"A_log must hold H={H} values, got shape {tuple(A_log.shape)}")
    if dt_bias is not None and dt_bias.numel() != H * K:
        raise ValueError(f"dt_bias must hold H*K={H * K} values, got shape {tuple(dt_bias.shape)}")
    lower_bound = check_safe_gate_bound(lower_bound, "lower_bound")
    dtypes = (f.dtype, A_log.dtype) + (() if dt_bias is None else (dt_bias.dtype,))
    dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    x = f.to(dtype)
    if dt_bias is not None:
        x = x + dt_bias.to(dtype).reshape(H, K)
    A = A_log.to(dtype).reshape(H, 1).exp()
    if lower_bound is None:
        return -A * F.softplus(x)
    return float(lower_bound) * torch.sigmoid(A * x)
