"""Optimizers of the kit: MuonClip (Muon + AdamW + per-head QK-Clip) and plain AdamW, by name.

Modules, one job each (top imports bottom):

* :mod:`~kimi_linear.optim.build`: ``build_optimizer(model, "muonclip" | "adamw", **kwargs)``;
* :mod:`~kimi_linear.optim.muonclip`: :class:`MuonClip`, the optimizer and its step;
* :mod:`~kimi_linear.optim.sharded_muon`: Muon on FSDP2 / HSDP row-sharded (DTensor) parameters;
* :mod:`~kimi_linear.optim.qk_clip`: per-head QK-Clip of MLA layers and the one max-logit
  all-reduce across ranks;
* :mod:`~kimi_linear.optim.groups`: which parameter goes to Muon, AdamW or AdamW without decay.
"""

from kimi_linear.optim.build import build_optimizer
from kimi_linear.optim.groups import GROUP_NAMES, param_group_name
from kimi_linear.optim.muonclip import MuonClip
from kimi_linear.optim.qk_clip import apply_qk_clip_, find_mla_modules, mla_head_dims

__all__ = [
    "GROUP_NAMES",
    "MuonClip",
    "apply_qk_clip_",
    "build_optimizer",
    "find_mla_modules",
    "mla_head_dims",
    "param_group_name",
]
