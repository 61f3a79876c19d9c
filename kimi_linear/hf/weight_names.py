"""Weight names: the kit's parameter names <-> the release's and transformers' names.

The kit's modules carry the release names, except that MoE experts are stacked
(``experts.w1 [E, I, D]``) where the release stores ``experts.{e}.w1.weight``.  The loader also
reads what transformers writes: its default ``save_pretrained`` (release names, but dense-layer
MLPs as ``block_sparse_moe.{gate,up,down}_proj``) and its internal layout
(``save_original_format=False``: ``mlp.experts.gate_up_proj``, one packed ``conv1d``,
``forget_gate.*``).  :func:`route_weight` says where a stored tensor lands in the kit's state
dict; :func:`release_state_dict` / :func:`to_release_state_dict` give the release names for
saving.  The per-expert key format itself (stacking and splitting) belongs to the experts'
weights: :mod:`kimi_linear.layers.experts`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.experts import (
    PER_EXPERT_KEY,
    stack_release_expert_keys,
    to_release_state_dict,
)

__all__ = [
    "FULL",
    "Part",
    "release_state_dict",
    "route_weight",
    "stack_release_expert_keys",
    "to_release_state_dict",
]

_LAYER = r"^(?P<p>model\.layers\.\d+\.)"
_TF_DENSE = re.compile(_LAYER + r"block_sparse_moe\.(?P<rest>(?:gate|up|down)_proj\.weight)$")
_TF_GATE_UP = re.compile(_LAYER + r"mlp\.experts\.gate_up_proj$")
_TF_DOWN = re.compile(_LAYER + r"mlp\.experts\.down_proj$")
_TF_MOE = re.compile(_LAYER + r"mlp\.(?P<rest>(?:gate|shared_experts)\..+)$")
_TF_CONV = re.compile(_LAYER + r"self_attn\.conv1d\.weight$")
_TF_FORGET = re.compile(_LAYER + r"self_attn\.forget_gate\.(?P<rest>.+)$")

#: how a stored tensor lands in a kit tensor: ("full",) the whole of it; ("index", e) as its
#: row ``e`` (one expert of a stacked tensor); ("narrow", dim, start, n) the stored tensor's slice
#: ``narrow(dim, start, n)`` is the whole kit tensor (one part of a packed tensor)
Part = tuple[Any, ...]
FULL: Part = ("full",)


def _view(t: torch.Tensor, part: Part) -> torch.Tensor:
    """The part of kit tensor ``t`` that a stored tensor fills (all of it unless ``index``)."""
    return t[part[1]] if part[0] == "index" else t


_SHARED_EXPERT = re.compile(
    r"^model\.layers\.(?P<i>\d+)\.(?:block_sparse_moe|mlp)\.shared_experts\.[a-z_]+\.weight$"
)


def _no_shared_expert(
    name: str, shape: tuple[int, ...], config: KimiLinearConfig, path: Path
) -> bool:
    """Whether the stored tensor ``name`` (no place in the model) is a shared-expert tensor of
    zero size in a MoE layer of a model with ``num_shared_experts == 0``: transformers and the
    release code build the shared expert at width ``moe_intermediate_size * n_shared_experts``,
    so they save ``[0, D]`` / ``[D, 0]`` tensors where the kit has no module (nothing to load).
    A non-empty one there is a ``ValueError`` naming the count in config.json."""
    m = _SHARED_EXPERT.match(name)
    if m is None or config.num_shared_experts != 0:
        return False
    i = int(m["i"])
    if i >= config.num_hidden_layers or not config.is_moe_layer(i):
        return False
    if math.prod(shape) == 0:
        return True
    raise ValueError(
        f"{path}: tensor {name!r} has shape {list(shape)}, a shared expert, but config.json has "
        "num_shared_experts=0 (n_shared_experts; no shared expert); does config.json match the "
        "weights?"
    )


def route_weight(name: str, targets: Mapping[str, torch.Tensor]) -> list[tuple[str, Part]] | None:
    """Where the stored tensor ``name`` goes among the kit's state-dict tensors ``targets``.

    Returns ``[(kit_name, part), ...]`` (one entry, or several for a packed tensor) or ``None``
    when ``name`` has no place in this model.  Handles, in this order: the kit's own names (the
    release names with stacked experts); the release's per-expert ``experts.{e}.w{1,2,3}.weight``;
    transformers' default save of dense MLPs as ``block_sparse_moe.{gate,up,down}_proj``; and
    transformers' internal layout (``mlp.experts.gate_up_proj`` = ``[w1 | w3]`` on dim 1,
    ``mlp.experts.down_proj`` = ``w2``, ``mlp.gate.*`` / ``mlp.shared_experts.*``, the packed
    ``self_attn.conv1d`` = ``[q | k | v]`` on dim 0, ``self_attn.forget_gate.*``).
    """
    if name in targets:
        return [(name, FULL)]
    m = PER_EXPERT_KEY.match(name)
    if m:
        t = m["prefix"] + m["w"]
        return [(t, ("index", int(m["e"])))] if t in targets else None
    m = _TF_DENSE.match(name)
    if m:
        t = m["p"] + "mlp." + m["rest"]
        return [(t, FULL)] if t in targets else None
    m = _TF_GATE_UP.match(name)
    if m:
        w1, w3 = (m["p"] + f"block_sparse_moe.experts.{w}" for w in ("w1", "w3"))
        if w1 not in targets or w3 not in targets:
            return None
        inter = targets[w1].shape[1]
        return [(w1, ("narrow", 1, 0, inter)), (w3, ("narrow", 1, inter, inter))]
    m = _TF_DOWN.match(name)
    if m:
        t = m["p"] + "block_sparse_moe.experts.w2"
        return [(t, FULL)] if t in targets else None
    m = _TF_MOE.match(name)
    if m:
        t = m["p"] + "block_sparse_moe." + m["rest"]
        return [(t, FULL)] if t in targets else None
    m = _TF_CONV.match(name)
    if m:
        convs = [m["p"] + f"self_attn.{x}_conv1d.weight" for x in "qkv"]
        if any(c not in targets for c in convs):
            return None
        P = targets[convs[0]].shape[0]
        return [(c, ("narrow", 0, j * P, P)) for j, c in enumerate(convs)]
    m = _TF_FORGET.match(name)
    if m:
        t = m["p"] + "self_attn." + m["rest"]
        return [(t, FULL)] if t in targets else None
    return None


def release_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights (a :class:`~kimi_linear.model.KimiLinearForCausalLM`) under the release names (per-expert keys).  With tied embeddings
    ``lm_head.weight`` is written too (an equal copy), since transformers' KimiLinear does not
    tie and would otherwise start from a random head."""
    return to_release_state_dict(model.state_dict())
