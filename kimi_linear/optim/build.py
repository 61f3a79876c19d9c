"""The optimizer factory: ``build_optimizer(model, "muonclip" | "adamw", **kwargs)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kimi_linear.optim.groups import grouped_named_parameters
from kimi_linear.optim.muonclip import MuonClip, _check_number


def _adamw_only(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_eps: float = 1e-8,
) -> torch.optim.AdamW:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_number("lr", lr, 0.0)
    _check_number("weight_decay", weight_decay, 0.0)
    named = grouped_named_parameters(model)
    decay = named["muon"] + named["adamw"]
    groups = []
    if decay:
        groups.append({"params": decay, "name": "adamw", "weight_decay": weight_decay})
    if named["adamw_no_decay"]:
        groups.append(
            {"params": named["adamw_no_decay"], "name": "adamw_no_decay", "weight_decay": 0.0}
        )
    if not groups:
        raise ValueError("model has no trainable parameters (requires_grad=True)")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(adamw_betas), eps=adamw_eps)


def build_optimizer(
    model: nn.Module, name: str = "muonclip", **kwargs: Any
) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``model``.

    * ``"muonclip"``: :class:`MuonClip` (``kwargs`` are its arguments).
    * ``"adamw"``: :class:`torch.optim.AdamW` with two named groups, ``"adamw"`` (matrices,
      embeddings, LM head, gates, convs; decayed) and ``"adamw_no_decay"`` (norms, biases,
      ``A_log``, ``dt_bias``); ``kwargs``: ``lr``, ``weight_decay``, ``adamw_betas``, ``adamw_eps``.
    """
    builders: dict[str, Callable[..., torch.optim.Optimizer]] = {
        "muonclip": MuonClip,
        "adamw": _adamw_only,
    }
    if name not in builders:
        raise ValueError(f"optimizer name must be one of {sorted(builders)}, got {name!r}")
    accepted = set(inspect.signature(builders[name]).parameters) - {"model"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"build_optimizer(name={name!r}) got unexpected arguments {unknown}; "
            f"accepted: {sorted(accepted)}"
        )
    return builders[name](model, **kwargs)
