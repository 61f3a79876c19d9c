"""Rotary position embedding (RoPE) in the interleaved-pair convention of DeepSeek-V2/V3 and Kimi K2.

The rope slice of a query/key vector ``x [..., P]`` is read as ``P / 2`` adjacent pairs
``(x[2i], x[2i + 1])``; pair ``i`` at position ``t`` is rotated by the angle
``t * theta ** (-2i / P)``.  This is the layout the released DeepSeek-V3 / Kimi K2 MLA weights
were trained with (HF's ``rope_interleave=True``).  Kimi Linear's MLA layers are NoPE: the rope
slice exists in the weights but is never rotated, so this module is only used when
``config.mla_use_nope`` is False.

Angles are computed in float64 (float32 on devices without it) so that positions near the
1M-token context keep full precision; cos/sin are returned in float32.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables of interleaved RoPE for a rope slice of ``dim`` channels.

    No buffers: the ``dim / 2`` inverse frequencies are recomputed per call (cheap) so that
    casting the model to bf16 cannot degrade them.
    """

    def __init__(self, dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even int, got {dim!r}")
        if not (isinstance(theta, (int, float)) and theta > 0):
            raise ValueError(f"theta must be a positive number, got {theta!r}")
        self.dim = dim
        self.theta = float(theta)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Integer ``positions`` of any shape ``[...]`` (``[T]`` for one layout shared by the
        batch, ``[B, T]`` per row) -> ``(cos, sin)``, each ``[..., dim / 2]`` float32."""
        if not isinstance(positions, torch.Tensor) or positions.dim() == 0:
            raise ValueError("positions must be an integer tensor [T] or [B, T]")
        if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
            raise ValueError(f"positions must have an integer dtype, got {positions.dtype}")
        wide = torch.float32 if positions.device.type == "mps" else torch.float64
        exponents = torch.arange(0, self.dim, 2, device=positions.device, dtype=wide) / self.dim
        inv_freq = self.theta**-exponents  # [dim / 2]
        angles = positions.to(wide)[..., None] * inv_freq  # [..., dim / 2]
        return angles.cos().float(), angles.sin().float()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, theta={self.theta}"


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` (computed in fp32, returned in ``x.dtype``).

    Args:
        x: ``[..., P]``, with the position axis wherever ``cos`` broadcasts to it, e.g.
            queries ``[B, T, H, P]`` with ``cos, sin: [T, 1, P / 2]`` or the shared rope key
            ``[B, T, P]`` with ``cos, sin: [T, P / 2]``.
        cos, sin: float32 tables from :class:`RotaryEmbedding`, broadcastable to
            ``x[..., ::2]``.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dim (pairs are rotated), got {tuple(x.shape)}")
    xf = x.float()
    x_even, x_odd = xf[..., 0::2], xf[..., 1::2]
    out_even = x_even * cos - x_odd * sin
    out_odd = x_even * sin + x_odd * cos
    return torch.stack((out_even, out_odd), dim=-1).flatten(-2).to(x.dtype)


__all__ = ["RotaryEmbedding", "apply_rotary"]
