"""Feed-forward blocks: the SwiGLU MLP and the sigmoid-routed mixture of experts (DeepSeek-V3 / K2 style).

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

Dispatch sorts the token-expert pairs by expert, runs each expert on its contiguous slice and
scatters the weighted results back with ``index_add`` (no token dropping).  The per-expert
matmuls are either a loop over the experts that received tokens (any device, any dtype) or one
``torch._grouped_mm`` call per projection (bf16 with 16-byte aligned rows; picked automatically
on SM90+ GPUs).

Expert weights live in :class:`GroupedExperts` as 3-D tensors ``w1 [E, I, D]`` (gate),
``w3 [E, I, D]`` (up), ``w2 [E, D, I]`` (down).  The release checkpoints store them per expert
(``experts.{e}.w1.weight`` ...): a load pre-hook stacks those keys, so ``load_state_dict``
(strict) accepts either form, and :func:`~kimi_linear.hf.to_release_state_dict` converts back
for export (all name mapping lives in :mod:`kimi_linear.hf`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kimi_linear.config import KimiLinearConfig
from kimi_linear.hf import stack_release_expert_keys, to_release_state_dict

DISPATCH_MODES = ("auto", "loop", "grouped_mm")


def _check_features(x: torch.Tensor, dim: int, weight: torch.Tensor, what: str) -> None:
    """ValueError unless ``x`` is a floating ``[..., dim]`` tensor matching ``weight``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor [..., {dim}], got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"x must be [..., hidden={dim}] for {what}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but {what}'s weights are on {weight.device}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"x has dtype {x.dtype} but {what}'s weights are {weight.dtype} (outside autocast); "
            "cast the input or the module"
        )


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
        _check_features(x, self.hidden_size, self.gate_proj.weight, "KimiMLP")
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Fp32BuffersMixin:
    """Keeps the named buffers in float32 through ``module.to(dtype)`` / ``.half()`` / ``.bfloat16()``.

    Device moves still apply. The routing bias and load counters accumulate small steps, which
    bf16 would round away.
    """

    _fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        originals = {name: self._buffers.get(name) for name in self._fp32_buffers}
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        for name, orig in originals.items():
            new = self._buffers.get(name)
            if orig is not None and new is not None and new.dtype != torch.float32:
                self._buffers[name] = orig.to(device=new.device, dtype=torch.float32)
        return result


class MoEGate(_Fp32BuffersMixin, nn.Module):
    """Sigmoid router with a selection-only bias.

    Parameters: ``weight [E, hidden]``; persistent fp32 buffer ``e_score_correction_bias [E]``
    (release name; never trained by gradient, stays fp32 under ``module.to(dtype)``).
    """

    _fp32_buffers = ("e_score_correction_bias",)

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


def grouped_mm_applicable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` can run the experts for ``x [N, D]`` with these weights.

    Needs the op (torch >= 2.8), bf16 activations and weights, and rows of 16-byte multiples
    (every weight dim a multiple of 8 for bf16).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.dtype != torch.bfloat16 or any(w.dtype != torch.bfloat16 for w in weights):
        return False
    align = 16 // x.element_size()
    return all(d % align == 0 for w in weights for d in w.shape[1:])


class GroupedExperts(nn.Module):
    """``E`` SwiGLU experts with stacked weights, run on tokens sorted by expert.

    Parameters: ``w1 [E, I, D]`` (gate), ``w3 [E, I, D]`` (up), ``w2 [E, D, I]`` (down); expert
    ``e`` computes ``w2[e] (silu(w1[e] x) * w3[e] x)``.

    Attributes:
        dispatch: ``"auto"`` (grouped_mm on CUDA SM90+ when applicable, else the loop),
            ``"loop"`` (one matmul per expert with tokens), ``"grouped_mm"`` (force
            ``torch._grouped_mm``; ValueError where not applicable).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.dispatch: Literal["auto", "loop", "grouped_mm"] = "auto"
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_stack_release_expert_keys)

    def reset_parameters(self) -> None:
        """Per expert, the default ``nn.Linear`` init (uniform in ``+-1/sqrt(fan_in)``)."""
        for w in (self.w1, self.w3, self.w2):
            bound = w.shape[-1] ** -0.5
            nn.init.uniform_(w, -bound, bound)

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        mode = self.dispatch
        if mode not in DISPATCH_MODES:
            raise ValueError(
                f"GroupedExperts.dispatch must be one of {DISPATCH_MODES}, got {mode!r}"
            )
        applicable = grouped_mm_applicable(x, self.w1, self.w3, self.w2)
        if mode == "grouped_mm":
            if not applicable:
                raise ValueError(
                    "dispatch='grouped_mm' needs torch._grouped_mm, bf16 inputs and weights, and "
                    f"hidden/intermediate sizes that are multiples of 8; got x {x.dtype}, weights "
                    f"{self.w1.dtype}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"
                )
            return True
        if mode == "loop":
            return False
        return applicable and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)

    def forward(
        self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor
    ) -> torch.Tensor:
        """Weighted sum of each token's chosen experts.

        Args:
            x: ``[N, D]`` tokens.
            topk_idx: ``[N, k]`` long, expert ids in ``[0, E)``.
            topk_weight: ``[N, k]`` routing weights (fp32).

        Returns:
            ``[N, D]`` in ``x``'s dtype: ``sum_j topk_weight[n, j] * expert_{topk_idx[n, j]}(x[n])``.
        """
        if torch.compiler.is_compiling():  # data-dependent dispatch: one opaque op for compile
            from kimi_linear.ops.custom_op import grouped_experts_op

            return grouped_experts_op(self, x, topk_idx, topk_weight)
        _check_features(x, self.hidden_size, self.w1, "GroupedExperts")
        if x.dim() != 2:
            raise ValueError(f"x must be [N, hidden={self.hidden_size}], got {tuple(x.shape)}")
        N = x.shape[0]
        if (
            topk_idx.dim() != 2
            or topk_idx.shape[0] != N
            or topk_idx.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(
                f"topk_idx must be an integer [N={N}, k] tensor, got {topk_idx.dtype} {tuple(topk_idx.shape)}"
            )
        if topk_weight.shape != topk_idx.shape:
            raise ValueError(
                f"topk_weight must have topk_idx's shape {tuple(topk_idx.shape)}, got {tuple(topk_weight.shape)}"
            )
        if x.device.type == "meta":  # shape inference: the routing below is data-dependent
            return x.new_empty(N, self.hidden_size)
        k = topk_idx.shape[1]
        flat_idx = topk_idx.reshape(-1).long()
        order = torch.argsort(flat_idx, stable=True)  # pairs grouped by expert
        token_of = order // k  # token of each sorted pair
        counts = torch.bincount(flat_idx, minlength=self.num_experts)
        if counts.numel() != self.num_experts:
            raise ValueError(f"topk_idx holds expert ids >= num_experts={self.num_experts}")
        x_sorted = x[token_of]  # [N * k, D]
        if self._use_grouped_mm(x_sorted):
            y_sorted = self._run_grouped_mm(x_sorted, counts)
        else:
            y_sorted = self._run_loop(x_sorted, counts)
        weights = topk_weight.reshape(-1)[order].unsqueeze(-1)  # [N * k, 1] fp32
        out = torch.zeros(N, self.hidden_size, device=x.device, dtype=torch.float32)
        out.index_add_(0, token_of, y_sorted.float() * weights)
        return out.to(x_sorted.dtype)

    def _run_loop(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        outputs = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            xe = x_sorted[start : start + n]
            h = F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e])
            outputs.append(F.linear(h, self.w2[e]))
            start += n
        if not outputs:
            return x_sorted.new_zeros(0, self.hidden_size)
        return torch.cat(outputs, dim=0)

    def _run_grouped_mm(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)  # end offset of each expert's slice
        gate = torch._grouped_mm(x_sorted, self.w1.transpose(-2, -1), offs=offs)
        up = torch._grouped_mm(x_sorted, self.w3.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(F.silu(gate) * up, self.w2.transpose(-2, -1), offs=offs)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}"


def _stack_release_expert_keys(
    module: GroupedExperts,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: stack the release's per-expert keys (the name mapping lives in
    :func:`kimi_linear.hf.stack_release_expert_keys`)."""
    stack_release_expert_keys(state_dict, prefix, module.num_experts)


class KimiMoE(_Fp32BuffersMixin, nn.Module):
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

    _fp32_buffers = ("expert_load", "last_expert_load")

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
        _check_features(x, self.hidden_size, next(self.experts.parameters()), "KimiMoE")
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
