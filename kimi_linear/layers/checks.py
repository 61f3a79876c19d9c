"""The input check every layer shares: hidden states that match the layer's weights."""

from __future__ import annotations

import torch

__all__ = ["check_features"]


def check_features(x: torch.Tensor, dim: int, weight: torch.Tensor, what: str) -> None:
    """ValueError unless ``x`` is a floating point ``[..., dim]`` tensor on ``weight``'s device
    and, outside autocast, in ``weight``'s dtype. ``what`` names the layer in the message."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor [..., {dim}], got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"x must be [..., hidden={dim}] for {what}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating point tensor, got dtype {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but {what}'s weights are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"x has dtype {x.dtype} but {what}'s weights are {weight.dtype} (outside autocast); "
            "cast the input or the module"
        )
