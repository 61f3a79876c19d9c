"""Per-head QK-Clip of MLA layers: the max-logit all-reduce across ranks and the row rescaling."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from kimi_linear.sharding import is_dtensor, local_shard


def _is_mla(module: nn.Module) -> bool:
    return (
        isinstance(getattr(module, "kv_b_proj", None), nn.Module)
        and isinstance(getattr(module, "kv_a_proj_with_mqa", None), nn.Module)
        and (
            isinstance(getattr(module, "q_b_proj", None), nn.Module)
            or isinstance(getattr(module, "q_proj", None), nn.Module)
        )
    )


def find_mla_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every MLA attention module of ``model`` by dotted name.

    A module counts as MLA when it has the release's MLA projections: ``kv_a_proj_with_mqa``,
    ``kv_b_proj`` and ``q_proj`` or ``q_b_proj`` (this covers
    :class:`kimi_linear.layers.mla.MLAttention`).
    """
    return {name: m for name, m in model.named_modules() if _is_mla(m)}


def query_proj(attn: nn.Module) -> nn.Module:
    """The projection whose output rows are the per-head queries (never ``q_a_proj``)."""
    q_b = getattr(attn, "q_b_proj", None)
    return q_b if isinstance(q_b, nn.Module) else attn.q_proj


def mla_head_dims(attn: nn.Module, num_heads: int) -> tuple[int, int, int]:
    """``(qk_nope_head_dim, qk_rope_head_dim, v_head_dim)`` of an MLA module, read off its weights.

    Uses the contract's row layouts: query projection ``[H * (nope + rope), in]`` with rows of
    head ``h`` ordered ``[nope | rope]``, ``kv_b_proj: [H * (nope + v), kv_lora_rank]`` with rows
    of head ``h`` ordered ``[k_nope | v]``, ``kv_a_proj_with_mqa: [kv_lora_rank + rope, hidden]``.

    Raises:
        ValueError: if the weight shapes do not fit that layout for ``num_heads`` heads.
    """
    q_rows = query_proj(attn).weight.shape[0]
    kv_b_rows, kv_lora_rank = attn.kv_b_proj.weight.shape
    rope = attn.kv_a_proj_with_mqa.weight.shape[0] - kv_lora_rank
    if num_heads <= 0 or q_rows % num_heads or kv_b_rows % num_heads:
        raise ValueError(
            f"MLA module {type(attn).__name__}: query projection rows ({q_rows}) and kv_b_proj rows "
            f"({kv_b_rows}) must be multiples of num_heads={num_heads}"
        )
    nope = q_rows // num_heads - rope
    v = kv_b_rows // num_heads - nope
    if rope < 0 or nope < 0 or v <= 0:
        raise ValueError(
            f"MLA module {type(attn).__name__}: weight shapes do not match the MLA row layout for "
            f"{num_heads} heads (got nope={nope}, rope={rope}, v={v})"
        )
    return nope, rope, v


@torch.no_grad()
def _scale_head_rows_(weight: Tensor, row_scale: Tensor) -> None:
    """``weight [H * R, in] *= row_scale [H, R]`` row-wise, computed in fp32, written in place.

    A sharded ``weight`` (DTensor, e.g. FSDP2's row shards) scales the rows of its local shard
    only, each by the factor of its global row."""
    if is_dtensor(weight):
        local, offset = local_shard(weight)
        rows = row_scale.reshape(-1)[offset[0] : offset[0] + local.shape[0]].to(local.device)
        if local.dtype == torch.float32:
            local.mul_(rows[:, None])
        else:
            local.copy_(local.float() * rows[:, None])
        return
    w = rearrange(weight, "(h r) i -> h r i", h=row_scale.shape[0])
    if weight.dtype == torch.float32:
        w.mul_(row_scale[..., None])
    else:
        w.copy_(w.float() * row_scale[..., None])


@torch.no_grad()
def apply_qk_clip_(attn: nn.Module, max_logits: Tensor, tau: float) -> Tensor:
    """Per-head QK-Clip of one MLA module, in place; returns ``gamma: [H]`` fp32 (1 = untouched).

    Args:
        attn: an MLA module (see :func:`find_mla_modules`).
        max_logits: ``[H]`` largest pre-softmax logit (softmax scale included) of each head.
        tau: the clipping threshold; heads with ``max_logits[h] > tau`` are scaled by
            ``gamma_h = tau / max_logits[h]``: query nope rows by ``sqrt(gamma_h)``, query rope rows
            by ``gamma_h``, ``kv_b_proj`` k_nope rows by ``sqrt(gamma_h)``.  ``kv_b_proj``'s value
            rows, ``kv_a_proj_with_mqa`` (latent and shared rope key), ``q_a_proj`` and the norms are
            never touched, and rows of heads at or under ``tau`` keep their exact bits.
    """
    if not (
        isinstance(tau, (int, float))
        and not isinstance(tau, bool)
        and tau > 0
        and math.isfinite(tau)
    ):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if not isinstance(max_logits, Tensor) or max_logits.ndim != 1:
        raise ValueError(
            f"max_logits must be a 1-D tensor [H], got {type(max_logits).__name__} "
            f"{tuple(getattr(max_logits, 'shape', ()))}"
        )
    num_heads = max_logits.shape[0]
    nope, rope, _ = mla_head_dims(attn, num_heads)
    q_weight = query_proj(attn).weight
    kv_b_weight = attn.kv_b_proj.weight

    s = max_logits.detach().float().to(q_weight.device)
    clipped = s > tau
    gamma = torch.where(
        clipped, tau / torch.where(clipped, s, torch.ones_like(s)), torch.ones_like(s)
    )
    sqrt_gamma = gamma.sqrt()
    q_scale = torch.cat(
        [sqrt_gamma[:, None].expand(num_heads, nope), gamma[:, None].expand(num_heads, rope)], 1
    )
    kv_rows = kv_b_weight.shape[0] // num_heads
    kv_scale = torch.ones(num_heads, kv_rows, device=kv_b_weight.device)
    kv_scale[:, :nope] = sqrt_gamma.to(kv_b_weight.device)[:, None]
    _scale_head_rows_(q_weight, q_scale)
    _scale_head_rows_(kv_b_weight, kv_scale)
    return gamma


def _distributed_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _num_heads(mla: dict[str, nn.Module], name: str, value: Tensor | None) -> int:
    """Head count of MLA module ``name``: from its recorded max logits, else its attributes."""
    if value is not None:
        return value.numel()
    mod = mla[name]
    for attr in ("num_heads", "num_attention_heads", "n_heads"):
        h = getattr(mod, attr, None)
        if isinstance(h, int):
            return h
    cfg = getattr(mod, "config", None)
    h = getattr(cfg, "num_attention_heads", None)
    if isinstance(h, int):
        return h
    raise RuntimeError(
        f"cannot tell the head count of MLA module {name!r} for the cross-rank max-logit "
        "reduction: give it a num_heads attribute or a config with num_attention_heads"
    )


def gather_max_logits(mla: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Read and reset every MLA module's per-head max logits ``[H]`` (fp32); under
    ``torch.distributed`` max-reduce them across ranks in one all-reduce for all layers.

    Layers that ran no forward since the last read (on any rank) are absent from the result.
    """
    names = list(mla)
    if not names:
        return {}
    vals: list[Tensor | None] = []
    for name in names:
        mod = mla[name]
        ml = getattr(mod, "max_logits", None)
        vals.append(None if ml is None else ml.detach().float().reshape(-1))
        mod.reset_max_logits()
    if _distributed_world():
        # every rank joins the collective, also with layers that saw no forward (-inf)
        device = next(iter(mla.values())).kv_b_proj.weight.device
        if dist.get_backend() == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        sizes = [_num_heads(mla, name, v) for name, v in zip(names, vals)]
        flat = torch.cat(
            [
                (v.to(device) if v is not None else torch.full((n,), -math.inf, device=device))
                for v, n in zip(vals, sizes)
            ]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.MAX)
        vals = list(flat.split(sizes))
    out = {}
    for name, v in zip(names, vals):
        if v is not None and bool((v > -math.inf).any()):
            out[name] = v
    return out
