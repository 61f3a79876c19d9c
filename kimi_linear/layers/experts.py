"""The routed experts: ``E`` SwiGLU experts in stacked weights, run on tokens sorted by expert.

:class:`GroupedExperts` holds ``w1 [E, I, D]`` (gate), ``w3 [E, I, D]`` (up), ``w2 [E, D, I]``
(down) and runs each expert on its contiguous slice of the sorted token-expert pairs, either as
a loop over the experts that received tokens (any device, any dtype) or one
``torch._grouped_mm`` call per projection (bf16 with 16-byte aligned rows; picked automatically
on SM90+ GPUs).  Also here, because they belong to these weights:

* the compile-time custom op ``torch.ops.kimi_linear.moe_experts`` (:func:`grouped_experts_op`):
  the dispatch is data-dependent, so inside ``torch.compile`` the experts are one opaque node;
* the release's per-expert key format (``experts.{e}.w1.weight`` ...):
  :func:`stack_release_expert_keys` (the load pre-hook, so ``load_state_dict`` accepts either
  form) and :func:`to_release_state_dict` (the inverse, for export;
  :mod:`kimi_linear.hf.weight_names` builds the rest of the name mapping on them).

Shapes: ``N`` tokens, ``D`` hidden, ``I`` expert width, ``k`` experts per token.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kimi_linear.layers.checks import check_features
from kimi_linear.ops.autograd import autograd_inside_op

__all__ = [
    "DISPATCH_MODES",
    "PER_EXPERT_KEY",
    "STACKED_EXPERT_KEY",
    "GroupedExperts",
    "grouped_experts_op",
    "grouped_mm_applicable",
    "release_expert_items",
    "stack_release_expert_keys",
    "to_release_state_dict",
]

DISPATCH_MODES = ("auto", "loop", "grouped_mm")

#: a release per-expert key, ``{prefix}experts.{e}.w{1,2,3}.weight``
PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<e>\d+)\.(?P<w>w[123])\.weight$")
#: a stacked expert key of the kit, ``{prefix}experts.w{1,2,3}``
STACKED_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?experts\.)(?P<w>w[123])$")


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
            return grouped_experts_op(self, x, topk_idx, topk_weight)
        check_features(x, self.hidden_size, self.w1, "GroupedExperts")
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
    """Load pre-hook: stack the release's per-expert keys (:func:`stack_release_expert_keys`)."""
    stack_release_expert_keys(state_dict, prefix, module.num_experts)


# ----------------------------------------------------------------- compile-time custom op
# The routed experts' dispatch is data-dependent (tokens per expert decide the slice sizes), so
# Dynamo cannot trace it without a graph break.  Inside torch.compile, GroupedExperts calls
# this op instead: the real implementation runs the module's own eager forward on the given
# weights (through a weight-less meta template, so no module has to be looked up), the fake
# one only states the output's shape, ``[N, D]`` in x's dtype.


@functools.cache
def _experts_template(
    num_experts: int, hidden_size: int, intermediate_size: int, dispatch: str
) -> torch.nn.Module:
    with torch.device("meta"):
        module = GroupedExperts(num_experts, hidden_size, intermediate_size)
    module.dispatch = dispatch
    return module


def _experts_eager(x, topk_idx, topk_weight, w1, w2, w3, dispatch: str) -> Tensor:
    E, I, D = w1.shape
    template = _experts_template(E, D, I, dispatch)
    return torch.func.functional_call(
        template, {"w1": w1, "w2": w2, "w3": w3}, (x, topk_idx, topk_weight)
    )


@torch.library.custom_op("kimi_linear::moe_experts", mutates_args=())
def _moe_experts(
    x: Tensor,
    topk_idx: Tensor,
    topk_weight: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    dispatch: str,
) -> Tensor:
    with torch.no_grad():
        return _experts_eager(x, topk_idx, topk_weight, w1, w2, w3, dispatch).contiguous()


@_moe_experts.register_fake
def _moe_experts_fake(x, topk_idx, topk_weight, w1, w2, w3, dispatch):
    return x.new_empty(x.shape)


@torch.library.custom_op("kimi_linear::moe_experts_backward", mutates_args=())
def _moe_experts_backward(
    x: Tensor,
    topk_idx: Tensor,
    topk_weight: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    dispatch: str,
    dout: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = [t.detach().requires_grad_(True) for t in (x, topk_weight, w1, w2, w3)]
    with autograd_inside_op():
        xi, wi, w1i, w2i, w3i = inputs
        out = _experts_eager(xi, topk_idx, wi, w1i, w2i, w3i, dispatch)
        grads = torch.autograd.grad(out, inputs, dout, allow_unused=True, materialize_grads=True)
    return tuple(g.contiguous() for g in grads)


@_moe_experts_backward.register_fake
def _moe_experts_backward_fake(x, topk_idx, topk_weight, w1, w2, w3, dispatch, dout):
    return tuple(t.new_empty(t.shape) for t in (x, topk_weight, w1, w2, w3))


def _experts_setup_context(ctx, inputs, output) -> None:
    x, topk_idx, topk_weight, w1, w2, w3, dispatch = inputs
    ctx.save_for_backward(x, topk_idx, topk_weight, w1, w2, w3)
    ctx.dispatch = dispatch


def _experts_backward(ctx, dout):
    x, topk_idx, topk_weight, w1, w2, w3 = ctx.saved_tensors
    dx, dw, dw1, dw2, dw3 = _moe_experts_backward(
        x, topk_idx, topk_weight, w1, w2, w3, ctx.dispatch, dout.contiguous()
    )
    return dx, None, dw, dw1, dw2, dw3, None


_moe_experts.register_autograd(_experts_backward, setup_context=_experts_setup_context)


def grouped_experts_op(
    module: torch.nn.Module, x: Tensor, topk_idx: Tensor, topk_weight: Tensor
) -> Tensor:
    """``module(x, topk_idx, topk_weight)`` for a :class:`GroupedExperts`
    as one ``torch.library`` op (``[N, D]`` tokens, ``[N, k]`` expert ids and fp32 weights ->
    ``[N, D]``); differentiable in x, topk_weight and the expert weights.  Used by
    ``GroupedExperts.forward`` inside ``torch.compile``."""
    x, topk_idx, topk_weight = (t.contiguous() for t in (x, topk_idx, topk_weight))
    return _moe_experts(
        x, topk_idx, topk_weight, module.w1, module.w2, module.w3, str(module.dispatch)
    )


# ----------------------------------------------------------------- release per-expert keys
def stack_release_expert_keys(
    state_dict: dict[str, torch.Tensor], prefix: str, num_experts: int
) -> None:
    """In place: replace ``{prefix}{e}.w1.weight`` (w2, w3) for every ``e < num_experts`` by the
    stacked ``{prefix}w1``.  Runs per projection only when every expert's key is present and the
    stacked key is not; otherwise leaves the dict alone, so strict loading reports the gap.
    (The load pre-hook of :class:`GroupedExperts`.)"""
    for w in ("w1", "w2", "w3"):
        keys = [f"{prefix}{e}.{w}.weight" for e in range(num_experts)]
        if prefix + w in state_dict or not all(k in state_dict for k in keys):
            continue
        state_dict[prefix + w] = torch.stack([state_dict.pop(k) for k in keys], dim=0)


def release_expert_items(
    state_dict: Mapping[str, torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``state_dict`` under the release names, in order: each stacked
    ``...experts.w{1,2,3} [E, out, in]`` as ``E`` per-expert views ``...experts.{e}.w1.weight
    [out, in]`` (no copy); ``ValueError`` naming the key when a stacked key is not 3-D."""
    for key, value in state_dict.items():
        m = STACKED_EXPERT_KEY.match(key)
        if m is None:
            yield key, value
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 3:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"state_dict[{key!r}] must be a 3-D [E, out, in] expert tensor, got {shape}"
            )
        for e in range(value.shape[0]):
            yield f"{m['prefix']}{e}.{m['w']}.weight", value[e]


def to_release_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split every stacked ``...experts.w1 / w2 / w3`` (3-D) into the release's per-expert keys.

    ``a.experts.w1 [E, I, D]`` becomes ``a.experts.{e}.w1.weight [I, D]`` for ``e < E`` (each a
    contiguous copy, so safetensors can save them); other keys pass through unchanged, in order.
    """
    return {
        k: (v.clone() if PER_EXPERT_KEY.match(k) else v)
        for k, v in release_expert_items(state_dict)
    }
