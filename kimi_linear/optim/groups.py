"""Parameter groups of the optimizers: what Muon updates and what AdamW does (decayed or not)."""

from __future__ import annotations

from torch import Tensor, nn

#: Names of the parameter groups, in the order they appear in ``param_groups``.
GROUP_NAMES: tuple[str, ...] = ("muon", "adamw", "adamw_no_decay")


# Stacked expert matrices [E, out, in] (GroupedExperts in kimi_linear.layers.moe).
_EXPERT_PARAM_NAMES = frozenset({"w1", "w2", "w3"})


def _is_norm(module: nn.Module) -> bool:
    norm_types: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm)
    if hasattr(nn, "RMSNorm"):
        norm_types = norm_types + (nn.RMSNorm,)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def param_group_name(module_name: str, module: nn.Module, param_name: str, param: Tensor) -> str:
    """The optimizer group of one parameter: ``"muon"``, ``"adamw"`` or ``"adamw_no_decay"``.

    Args:
        module_name: dotted name of the module that owns the parameter (``""`` for the root).
        module: that module.
        param_name: the parameter's attribute name in ``module`` (``"weight"``, ``"A_log"``...).
        param: the parameter.

    Rules, first match wins:

    1. embeddings (``nn.Embedding``) and the LM head (a module named ``lm_head``): ``"adamw"``;
    2. anything inside a norm module, biases (``bias``, ``*_bias``: ``dt_bias``,
       ``e_score_correction_bias``), the names in the owning module's ``no_weight_decay``
       attribute (the KDA layer's ``A_log``, ``dt_bias``) and every 0-/1-D parameter:
       ``"adamw_no_decay"``;
    3. the MoE router (a module named ``gate``) and convolution filters (``nn.Conv*``, e.g. the
       KDA short convs ``[D, 1, W]``): ``"adamw"``;
    4. 2-D matrices and stacked expert matrices (3-D ``w1 / w2 / w3`` or any 3-D parameter of a
       module whose name or type mentions experts): ``"muon"``;
    5. anything else: ``"adamw"``.
    """
    leaf = module_name.rsplit(".", 1)[-1]
    if isinstance(module, nn.Embedding) or leaf == "lm_head":
        return "adamw"
    if (
        _is_norm(module)
        or param_name in getattr(module, "no_weight_decay", ())
        or param_name == "bias"
        or param_name.endswith("_bias")
        or param.ndim <= 1
    ):
        return "adamw_no_decay"
    if leaf == "gate" or isinstance(module, nn.modules.conv._ConvNd):
        return "adamw"
    if param.ndim == 2:
        return "muon"
    if param.ndim == 3 and (
        param_name in _EXPERT_PARAM_NAMES
        or "expert" in leaf.lower()
        or "expert" in type(module).__name__.lower()
    ):
        return "muon"
    return "adamw"


def grouped_named_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{group name: [(full name, parameter), ...]}`` over the trainable parameters of ``model``.

    Shared (tied) parameters are listed once, under the first name ``named_modules`` reaches.
    """
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUP_NAMES}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = f"{module_name}.{param_name}" if module_name else param_name
            groups[param_group_name(module_name, module, param_name, param)].append((full, param))
    return groups
