"""Feed-forward blocks: the SwiGLU MLP, the sigmoid router and the mixture of experts (DeepSeek-V3 / K2).

Routing (per token ``x``; ``E`` experts, top ``k``)::

    s       = sigmoid(x W_gate^T)                       fp32 scores [E]
    chosen  = topk(s + b, k)                            b = e_score_correction_bias (selection only)
              (with num_expert_group G > 1: only among the topk_group groups of E / G experts
              whose top-2 (s + b) sum is largest, DeepSeek-V3's node-limited routing)
    w       = s[chosen] / sum(s[chosen])                (when config.moe_renormalize)
    w       = w * routed_scaling_factor
    y       = sum_{e in chosen} w_e SwiGLU_e(x) + shared_experts(x)

``b`` is never trained by gradient: auxiliary-loss-free balancing moves it after each step,
``b_e += rate * sign(mean(load) - load_e)`` (:meth:`KimiMoE.update_bias`).

The routed experts are :class:`~kimi_linear.layers.experts.GroupedExperts` (stacked weights,
tokens sorted by expert, no token dropping; their compile-time custom op and the release's
per-expert key format live beside them in :mod:`kimi_linear.layers.experts`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.checks import check_features
from kimi_linear.layers.experts import (
    DISPATCH_MODES,
    GroupedExperts,
    grouped_mm_applicable,
    to_release_state_dict,
)
from kimi_linear.layers.fp32 import KeepsFloat32


class KimiMLP(nn.Module):
    """SwiGLU MLP ``down_proj(silu(gate_proj(x)) * up_proj(x))``, no biases.

    Used for dense layers (``intermediate_size``) and as the shared expert(s) of a MoE layer.
    ``x: [..., hidden] -> [..., hidden]``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features(x, self.hidden_size, self.gate_proj.weight, "KimiMLP")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(KeepsFloat32, nn.Module):
    """Sigmoid router with a selection-only bias.

    Parameters: ``weight [E, hidden]``; persistent fp32 buffer ``e_score_correction_bias [E]``
    (release name; never trained by gradient, stays fp32 under ``module.to(dtype)``).
    """

    fp32_tensors = ("e_score_correction_bias",)  # bf16 would round the balancing steps away

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        routed_scaling_factor: float = 1.0,
        renormalize: bool = True,
        num_groups: int = 1,
        topk_group: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
        if num_experts % num_groups or (num_groups > 1 and num_experts // num_groups < 2):
            raise ValueError(
                f"num_groups must divide num_experts={num_experts} into groups of >= 2 experts, "
                f"got {num_groups}"
            )
        if not (isinstance(topk_group, int) and 1 <= topk_group <= num_groups):
            raise ValueError(
                f"topk_group must be in [1, num_groups={num_groups}], got {topk_group!r}"
            )
        if topk_group * (num_experts // num_groups) < top_k:
            raise ValueError(
                f"topk_group={topk_group} groups of {num_experts // num_groups} experts hold fewer "
                f"than top_k={top_k} experts"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_groups = num_groups
        self.topk_group = topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32)
        )
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route ``x: [N, hidden]``.

        Returns:
            ``topk_idx [N, k]`` long (experts chosen with the bias), ``topk_weight [N, k]`` fp32
            (unbiased scores, renormalised, scaled), ``scores [N, E]`` fp32 (sigmoid scores).
        """
        logits = F.linear(x.float(), self.weight.float())
        scores = torch.sigmoid(logits)
        selection = scores.detach() + self.e_score_correction_bias.float()
        if self.num_groups > 1 and self.topk_group < self.num_groups:
            selection = self._restrict_to_top_groups(selection)
        topk_idx = selection.topk(self.top_k, dim=-1).indices
        topk_weight = scores.gather(-1, topk_idx)
        if self.renormalize:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return topk_idx, topk_weight * self.routed_scaling_factor, scores

    def _restrict_to_top_groups(self, selection: torch.Tensor) -> torch.Tensor:
        """Node-limited routing (DeepSeek-V3): score each of the ``num_groups`` contiguous expert
        groups by the sum of its top-2 biased scores, keep the best ``topk_group`` groups and set
        the other experts' selection scores to ``-inf``.  ``selection: [N, E] -> [N, E]``."""
        grouped = rearrange(selection, "n (g e) -> n g e", g=self.num_groups)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        keep = group_scores.topk(self.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        grouped = grouped.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        return rearrange(grouped, "n g e -> n (g e)")

    def extra_repr(self) -> str:
        groups = (
            f", groups={self.num_groups}, topk_group={self.topk_group}"
            if self.num_groups > 1
            else ""
        )
        return (
            f"hidden={self.hidden_size}, experts={self.num_experts}, top_k={self.top_k}, "
            f"scale={self.routed_scaling_factor}, renormalize={self.renormalize}{groups}"
        )


class KimiMoE(KeepsFloat32, nn.Module):
    """Sigmoid-routed mixture of SwiGLU experts plus always-on shared expert(s).

    Children (release names): ``gate`` (:class:`MoEGate`), ``experts``
    (:class:`GroupedExperts`), ``shared_experts`` (:class:`KimiMLP` of width
    ``moe_intermediate_size * num_shared_experts``; absent when ``num_shared_experts == 0``).

    Load statistics (non-persistent fp32 buffers, ``[E]``): ``last_expert_load`` holds the
    token-expert assignments of the last forward; ``expert_load`` accumulates them over training
    forwards (``module.training``) since the last :meth:`update_bias`, so evaluation passes
    don't steer balancing. Both count real tokens, so each sums to ``tokens * top_k``: the pads
    of a left-padded batch (``token_mask`` False, passed down by the model from its
    ``attention_mask``) are routed and computed like any token (shapes stay static) but never
    counted, so they cannot steer the auxiliary-loss-free bias.  (Packed documents need no mask:
    every token of a ``cu_seqlens`` pack belongs to a document; empty documents have none.)
    """

    fp32_tensors = ("expert_load", "last_expert_load")  # counts: exact in fp32

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        if config.num_experts <= 0:
            raise ValueError(f"KimiMoE needs config.num_experts > 0, got {config.num_experts}")
        self.config = config
        self.hidden_size = config.hidden_size
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_token
        self.gate = MoEGate(
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_token,
            routed_scaling_factor=config.routed_scaling_factor,
            renormalize=config.moe_renormalize,
            num_groups=config.num_expert_group,
            topk_group=config.topk_group,
        )
        self.experts = GroupedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size
        )
        if config.num_shared_experts > 0:
            self.shared_experts = KimiMLP(
                config.hidden_size, config.moe_intermediate_size * config.num_shared_experts
            )
        else:
            self.shared_experts = None
        self.register_buffer("expert_load", torch.zeros(config.num_experts), persistent=False)
        self.register_buffer("last_expert_load", torch.zeros(config.num_experts), persistent=False)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x: [..., hidden]`` (normally ``[B, T, hidden]``) -> same shape.

        ``token_mask``: optional bool ``[...]`` (``x.shape[:-1]``, e.g. ``[B, T]``), ``False``
        at pad tokens: they are not counted in the expert loads (their outputs are computed
        as usual and ignored by the caller). Tokens with a non-finite ``x`` (NaN router scores)
        are not counted either; their outputs are NaN and every other token's is unchanged.
        """
        # the experts' first weight (w1), reached through parameters(): a wrapper of the experts
        # module (e.g. a LoRA adapter, kimi_linear.lightning.finetune) keeps it as a submodule
        check_features(x, self.hidden_size, next(self.experts.parameters()), "KimiMoE")
        if token_mask is not None and (
            not isinstance(token_mask, torch.Tensor)
            or token_mask.dtype != torch.bool
            or token_mask.shape != x.shape[:-1]
            or token_mask.device != x.device
        ):
            got = (
                f"{token_mask.dtype} {tuple(token_mask.shape)} on {token_mask.device}"
                if isinstance(token_mask, torch.Tensor)
                else type(token_mask).__name__
            )
            raise ValueError(
                f"token_mask must be a bool tensor {tuple(x.shape[:-1])} on {x.device} "
                f"(x.shape[:-1]), got {got}"
            )
        shape = x.shape
        flat = x.reshape(-1, self.hidden_size)
        topk_idx, topk_weight, scores = self.gate(flat)
        if flat.device.type != "meta":  # no load to count for data-less (meta) inputs
            with torch.no_grad():
                # tokens per expert; a fixed-size scatter (not bincount) keeps shapes static.
                # A token whose router scores are NaN (a NaN / inf hidden state: one poisoned
                # row of the batch) was routed arbitrarily: it adds 0, so it cannot steer the
                # balancing bias of the whole model (its own output stays NaN).
                counted = torch.isfinite(scores).all(dim=-1)  # [N]
                if token_mask is not None:  # pads add 0 (same shapes as without a mask)
                    counted = counted & token_mask.reshape(-1)
                flat_idx = topk_idx.reshape(-1)
                counts = counted.reshape(-1, 1).expand_as(topk_idx).reshape(-1).float()
                load = flat.new_zeros(self.num_experts, dtype=torch.float32).scatter_add_(
                    0, flat_idx, counts
                )
                self.last_expert_load.copy_(load)
                if self.training:
                    self.expert_load.add_(load)
        out = self.experts(flat, topk_idx, topk_weight)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)

    @torch.no_grad()
    def update_bias(self, rate: float | None = None, sync: bool = True) -> torch.Tensor:
        """Auxiliary-loss-free balancing step: ``b += rate * sign(mean(load) - load)``.

        Args:
            rate: step size (``config.moe_bias_update_rate`` when None), >= 0.
            sync: when ``torch.distributed`` is initialised, sum ``expert_load`` over ranks
                first so every rank applies the same step (every rank must call this then).

        Returns:
            The load the step used (fp32 ``[E]``); ``expert_load`` is then zeroed.
        """
        if rate is None:
            rate = self.config.moe_bias_update_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 0:
            raise ValueError(f"rate must be a number >= 0 (or None), got {rate!r}")
        load = self.expert_load.clone()
        if sync and dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        bias = self.gate.e_score_correction_bias
        bias.add_(float(rate) * torch.sign(load.mean() - load).to(bias.dtype))
        self.expert_load.zero_()
        return load

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}"


__all__ = [
    "DISPATCH_MODES",
    "GroupedExperts",
    "KimiMLP",
    "KimiMoE",
    "MoEGate",
    "grouped_mm_applicable",
    "to_release_state_dict",
]
