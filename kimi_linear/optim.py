"""MuonClip: Muon for hidden matrices, AdamW for the rest, and per-head QK-Clip on MLA layers.

This is the optimizer recipe Kimi K2 and Kimi Linear were trained with (Kimi K2 report,
arXiv 2507.20534; Moonlight, arXiv 2502.16982):

* **Muon** (momentum 0.95, Nesterov, 5 Newton-Schulz steps) updates the hidden 2-D weight
  matrices: attention and KDA projections, dense and expert FFN matrices.  Stacked expert weights
  ``experts.w1 / w2 / w3: [E, out, in]`` are orthogonalised expert by expert, exactly as if each
  ``[out, in]`` slice were its own matrix.  The update is scaled by ``0.2 * sqrt(max(out, in))``
  (``adjust_lr_fn="match_rms_adamw"``) so that Muon and AdamW share one learning rate and one
  weight decay.  The arithmetic is PyTorch's own :class:`torch.optim.Muon`; this module only
  feeds it the per-expert slices, which it cannot take directly.
* **AdamW** (PyTorch's :class:`torch.optim.AdamW`) updates embeddings, the LM head, the router
  gate, short-conv filters and every vector; weight decay is off for norms, biases, ``A_log`` and
  ``dt_bias`` (group ``"adamw_no_decay"``).
* **QK-Clip** runs after every update.  Each MLA layer records, per head ``h``, the largest
  pre-softmax logit ``S_max^h`` of the forward passes since the last step (batch, positions and
  micro-batches included; max-reduced across ranks under ``torch.distributed``).  For each head
  with ``S_max^h > tau``, ``gamma = tau / S_max^h`` and the head's query rows are rescaled (nope
  part by ``sqrt(gamma)``, rope part by ``gamma``) together with its ``k_nope`` rows of
  ``kv_b_proj`` (by ``sqrt(gamma)``).  Every logit of that head is then multiplied by exactly
  ``gamma``; the shared latent projections, the rope key and the values are left alone, and heads
  under ``tau`` are bit-identical.  A layer whose query or ``kv_b_proj`` weight is frozen
  (``requires_grad=False``, e.g. the base model under LoRA) is skipped with a warning: the clip
  never changes a weight the optimizer does not train.

**Sharded parameters.**  Under FSDP2 / HSDP (``fully_shard``; parameters are DTensors sharded
on dim 0) the same step is taken without gathering whole parameters anywhere but where
Newton-Schulz needs them: momentum, weight decay and the update run on the local shards; stacked
experts are sharded by expert, so each rank orthogonalizes its own; each 2-D matrix is
orthogonalized once, by the rank it is assigned to (largest first, to the least loaded rank of
its shard group), which gathers its row blocks and scatters the result back with two
``all_to_all`` calls for all matrices.  QK-Clip scales the local rows of each head.  The result
equals the unsharded step (to 1e-6 relative in ``tests/test_fsdp.py``).

Parameter groups carry ``"name"`` (``"muon"``, ``"adamw"``, ``"adamw_no_decay"``), ``"lr"``,
``"weight_decay"`` and ``"param_names"``; learning-rate schedulers act on all of them alike.

Example::

    opt = MuonClip(model, lr=2e-3, weight_decay=0.1, qk_clip_tau=100.0)
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()          # Muon + AdamW, then QK-Clip
    opt.zero_grad()
    opt.last_max_logits  # {"model.layers.3.self_attn": tensor([...])}  per-head max logit [H]
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn

from kimi_linear.sharding import is_dtensor, local_shard

__all__ = [
    "GROUP_NAMES",
    "MuonClip",
    "apply_qk_clip_",
    "build_optimizer",
    "find_mla_modules",
    "mla_head_dims",
    "param_group_name",
]

#: Names of the parameter groups, in the order they appear in ``param_groups``.
GROUP_NAMES: tuple[str, ...] = ("muon", "adamw", "adamw_no_decay")

# Parameters that are gates / log-scales of the KDA layer: AdamW without weight decay.
_NO_DECAY_PARAM_NAMES = frozenset({"A_log", "dt_bias", "e_score_correction_bias"})
# Stacked expert matrices [E, out, in] (GroupedExperts in kimi_linear.layers.moe).
_EXPERT_PARAM_NAMES = frozenset({"w1", "w2", "w3"})
_MUON_ADJUST_LR_FN = "match_rms_adamw"
_MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_MUON_EPS = 1e-7


# ----------------------------------------------------------------------------------------------
# parameter grouping
# ----------------------------------------------------------------------------------------------
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
       ``e_score_correction_bias``), ``A_log`` and every 0-/1-D parameter: ``"adamw_no_decay"``;
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
        or param_name in _NO_DECAY_PARAM_NAMES
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


def _grouped_named_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
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


# ----------------------------------------------------------------------------------------------
# QK-Clip on MLA layers
# ----------------------------------------------------------------------------------------------
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


def _query_proj(attn: nn.Module) -> nn.Module:
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
    q_rows = _query_proj(attn).weight.shape[0]
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
    q_weight = _query_proj(attn).weight
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


# ----------------------------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------------------------
def _check_number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")


def _require_muon() -> type:
    muon = getattr(torch.optim, "Muon", None)
    if muon is None:
        raise RuntimeError(
            f"MuonClip needs torch.optim.Muon (PyTorch >= 2.9); this is torch {torch.__version__}"
        )
    return muon


def _distributed_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class MuonClip(torch.optim.Optimizer):
    """Muon + AdamW parameter groups with per-head QK-Clip on every MLA layer of ``model``.

    Args:
        model: the model to train (its trainable parameters are split into the groups
            ``"muon"``, ``"adamw"``, ``"adamw_no_decay"``; see :func:`param_group_name`).
        lr: learning rate of every group (Muon's update is RMS-matched to AdamW's).
        weight_decay: decoupled weight decay of ``"muon"`` and ``"adamw"``
            (``"adamw_no_decay"`` has 0).
        momentum: Muon momentum.
        nesterov: Nesterov momentum for Muon.
        ns_steps: Newton-Schulz iterations of Muon.
        adamw_betas: AdamW ``(beta1, beta2)``.
        adamw_eps: AdamW epsilon.
        qk_clip_tau: QK-Clip threshold on the max pre-softmax logit per head; ``None`` turns the
            clip off.
        track_max_logits: make the MLA layers record their per-head max logits (needed by the
            clip; also useful without it, for monitoring).  Defaults to ``qk_clip_tau is not None``.

    Attributes:
        last_max_logits: ``{MLA module name: [H] fp32}``, the per-head max logits the last
            :meth:`step` read (all-reduced across ranks), before clipping.  Layers that ran no
            forward since the previous step are absent.
        last_clip_gamma: ``{MLA module name: [H] fp32}``, the factors ``gamma`` the last step
            applied (1 where a head was not clipped).

    Every MLA module's max logits are read and reset in :meth:`step`, so with gradient
    accumulation the running max over the micro-batches is what clips; forward passes run
    between two steps (evaluation included) count too.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        qk_clip_tau: float | None = 100.0,
        track_max_logits: bool | None = None,
    ) -> None:
        _require_muon()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_number("lr", lr, 0.0)
        _check_number("weight_decay", weight_decay, 0.0)
        _check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        if not isinstance(nesterov, bool):
            raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
            raise ValueError(f"ns_steps must be an int in [1, 99], got {ns_steps!r}")
        if not (isinstance(adamw_betas, (tuple, list)) and len(adamw_betas) == 2):
            raise ValueError(f"adamw_betas must be a pair (beta1, beta2), got {adamw_betas!r}")
        for i, b in enumerate(adamw_betas):
            _check_number(f"adamw_betas[{i}]", b, 0.0, 1.0, high_open=True)
        _check_number("adamw_eps", adamw_eps, 0.0, low_open=True)
        if qk_clip_tau is not None:
            _check_number("qk_clip_tau", qk_clip_tau, 0.0, low_open=True)
        if track_max_logits is None:
            track_max_logits = qk_clip_tau is not None
        if not isinstance(track_max_logits, bool):
            raise ValueError(f"track_max_logits must be a bool or None, got {track_max_logits!r}")
        if qk_clip_tau is not None and not track_max_logits:
            raise ValueError(
                "track_max_logits=False with qk_clip_tau set: QK-Clip needs the max logits; pass "
                "qk_clip_tau=None to turn the clip off"
            )

        named = _grouped_named_parameters(model)
        if not any(named.values()):
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        muon_hyper = dict(
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coefficients=_MUON_NS_COEFFICIENTS,
            eps=_MUON_EPS,
            adjust_lr_fn=_MUON_ADJUST_LR_FN,
        )
        adamw_hyper = dict(betas=tuple(adamw_betas), eps=adamw_eps)
        groups: list[dict[str, Any]] = []
        for name in GROUP_NAMES:
            if not named[name]:
                continue
            hyper = muon_hyper if name == "muon" else adamw_hyper
            wd = 0.0 if name == "adamw_no_decay" else weight_decay
            groups.append(
                {"params": named[name], "name": name, "lr": lr, "weight_decay": wd, **hyper}
            )
        super().__init__(groups, {"lr": lr, "weight_decay": weight_decay})

        self.qk_clip_tau = None if qk_clip_tau is None else float(qk_clip_tau)
        self.track_max_logits = track_max_logits
        self._mla = find_mla_modules(model)
        for mod_name, mod in self._mla.items():
            if track_max_logits:
                if not hasattr(mod, "record_max_logits") or not callable(
                    getattr(mod, "reset_max_logits", None)
                ):
                    raise ValueError(
                        f"MLA module {mod_name!r} ({type(mod).__name__}) has no max-logit tracking "
                        "(record_max_logits / reset_max_logits); pass qk_clip_tau=None and "
                        "track_max_logits=False, or use kimi_linear.layers.mla.MLAttention"
                    )
                mod.reset_max_logits()
                mod.record_max_logits = True
        self.last_max_logits: dict[str, Tensor] = {}
        self.last_clip_gamma: dict[str, Tensor] = {}
        self._frozen_mla_warned: set[str] = set()

    # ------------------------------------------------------------------ introspection
    def describe_groups(self) -> dict[str, list[str]]:
        """``{group name: [parameter names]}`` for all of ``GROUP_NAMES`` (empty lists included)."""
        out: dict[str, list[str]] = {g: [] for g in GROUP_NAMES}
        for group in self.param_groups:
            out[group["name"]].extend(group["param_names"])
        return out

    @property
    def mla_modules(self) -> dict[str, nn.Module]:
        """The MLA modules QK-Clip watches, by name."""
        return dict(self._mla)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Muon/AdamW update of every group, then QK-Clip (when ``qk_clip_tau`` is set)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["name"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        if self.track_max_logits:
            self._qk_clip()
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        """Run :class:`torch.optim.Muon` on each 2-D matrix and each expert slice of 3-D ones.

        The momentum buffers live in ``self.state[p]["momentum_buffer"]`` (the shape of ``p``);
        a throw-away ``torch.optim.Muon`` is handed the matrices (views of ``p`` for the expert
        slices) with their gradients and the matching buffer views, and updates both in place.
        """
        muon_cls = _require_muon()
        mats: list[Tensor] = []
        bufs: list[Tensor] = []
        sharded: list[Tensor] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MuonClip does not support sparse gradients")
            if is_dtensor(p):
                sharded.append(p)
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            if p.ndim == 2:
                mats.append(p)
                bufs.append(buf)
                continue
            data, grad = p.detach(), p.grad
            for e in range(p.shape[0]):
                view = data[e]
                view.grad = grad[e]
                mats.append(view)
                bufs.append(buf[e])
        if sharded:
            _sharded_muon_step(self.state, sharded, group)
        if not mats:
            return
        engine = muon_cls(
            mats,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_coefficients=group["ns_coefficients"],
            eps=group["eps"],
            ns_steps=group["ns_steps"],
            adjust_lr_fn=group["adjust_lr_fn"],
        )
        for mat, buf in zip(mats, bufs):
            engine.state[mat] = {"momentum_buffer": buf}
        engine.step()
        for mat, buf in zip(mats, bufs):
            st = engine.state[mat]
            if set(st) != {"momentum_buffer"} or st["momentum_buffer"] is not buf:
                raise RuntimeError(
                    "torch.optim.Muon no longer keeps its momentum in state['momentum_buffer'] "
                    f"(torch {torch.__version__}); MuonClip must be updated for this version"
                )

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """Run :class:`torch.optim.AdamW` on the group, its state kept in ``self.state``."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        engine = torch.optim.AdamW(
            params,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
        for p in params:
            # the same dict object: AdamW creates and updates step / exp_avg / exp_avg_sq in it
            engine.state[p] = self.state[p]
        engine.step()

    # ------------------------------------------------------------------ QK-Clip
    def _gather_max_logits(self) -> dict[str, Tensor]:
        """Read and reset every MLA module's max logits; max-reduce them across ranks."""
        names = list(self._mla)
        if not names:
            return {}
        vals: list[Tensor | None] = []
        for name in names:
            mod = self._mla[name]
            ml = getattr(mod, "max_logits", None)
            vals.append(None if ml is None else ml.detach().float().reshape(-1))
            mod.reset_max_logits()
        if _distributed_world():
            # every rank joins the collective, also with layers that saw no forward (-inf)
            device = next(iter(self._mla.values())).kv_b_proj.weight.device
            if dist.get_backend() == "nccl" and device.type != "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            sizes = [self._num_heads(name, v) for name, v in zip(names, vals)]
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

    def _num_heads(self, name: str, value: Tensor | None) -> int:
        if value is not None:
            return value.numel()
        mod = self._mla[name]
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

    def _qk_clip(self) -> None:
        self.last_max_logits = self._gather_max_logits()
        self.last_clip_gamma = {}
        if self.qk_clip_tau is None:
            return
        for name, s_max in self.last_max_logits.items():
            attn = self._mla[name]
            if not (_query_proj(attn).weight.requires_grad and attn.kv_b_proj.weight.requires_grad):
                # Frozen query / kv_b_proj weights (e.g. the base under LoRA, whose wrappers'
                # ``.weight`` is the frozen base weight): the clip would change weights this
                # optimizer does not train, so the layer is skipped (absent from last_clip_gamma)
                if name not in self._frozen_mla_warned:
                    self._frozen_mla_warned.add(name)
                    warnings.warn(
                        f"QK-Clip skips MLA layer {name!r}: its query / kv_b_proj weights are "
                        "frozen (requires_grad=False)",
                        stacklevel=3,
                    )
                continue
            self.last_clip_gamma[name] = apply_qk_clip_(attn, s_max, self.qk_clip_tau)


# ----------------------------------------------------------------------------------------------
# Muon on FSDP2-sharded (DTensor) parameters
# ----------------------------------------------------------------------------------------------
def _muon_kernels() -> tuple[Callable[..., Tensor], Callable[..., float]]:
    """PyTorch's own Newton-Schulz and learning-rate adjustment (``torch.optim._muon``), so the
    sharded step does exactly the arithmetic of :class:`torch.optim.Muon`."""
    try:
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz
    except ImportError as e:  # pragma: no cover - depends on the torch version
        raise RuntimeError(
            "MuonClip on sharded parameters needs torch.optim._muon._zeropower_via_newtonschulz "
            f"and _adjust_lr (torch {torch.__version__}); MuonClip must be updated for this version"
        ) from e
    return _zeropower_via_newtonschulz, _adjust_lr


def _shard_mesh_dim(p: Tensor) -> int | None:
    """The mesh dim ``p`` is row-sharded over (``Shard(0)``), ``None`` when it is replicated.

    Raises:
        NotImplementedError: for any other layout (a shard of another dim, several shard dims,
            partial values): MuonClip supports FSDP / HSDP sharding only.
    """
    from torch.distributed.tensor import Replicate, Shard

    dims = []
    for i, placement in enumerate(p.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard) and placement.dim == 0:
            dims.append(i)
        elif not isinstance(placement, Replicate):
            raise NotImplementedError(
                f"MuonClip supports parameters sharded on dim 0 over one mesh dim (FSDP2 / HSDP); "
                f"got placements {p.placements} for a parameter of shape {tuple(p.shape)}"  # type: ignore[attr-defined]
            )
    if len(dims) > 1:
        raise NotImplementedError(
            f"MuonClip supports one sharded mesh dim, got placements {p.placements}"  # type: ignore[attr-defined]
        )
    return dims[0] if dims else None


def _row_range(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``rank`` in a dim-0 ``Shard`` of ``rows`` rows (torch.chunk)."""
    chunk = -(-rows // world)
    return min(rank * chunk, rows), min((rank + 1) * chunk, rows)


def _orthogonalize_row_shards(
    updates: list[Tensor], shapes: list[tuple[int, int]], group: Any, ns: Callable[[Tensor], Tensor]
) -> list[Tensor]:
    """Newton-Schulz of row-sharded matrices, each done once, by one rank of ``group``.

    ``updates[k]`` is this rank's row block of matrix ``k`` of full shape ``shapes[k]``.
    Matrices are assigned to ranks greedily by size (largest first to the least loaded rank);
    one ``all_to_all`` brings every owner the row blocks of its matrices, the owner runs
    ``ns`` on the full matrix, and a second ``all_to_all`` returns each rank its rows of every
    orthogonalized matrix.  Returns this rank's row blocks of the results (fp32).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    loads = [0] * world
    owner = [0] * len(shapes)
    for k in sorted(range(len(shapes)), key=lambda k: -shapes[k][0] * shapes[k][1]):
        owner[k] = min(range(world), key=lambda r: loads[r])
        loads[owner[k]] += shapes[k][0] * shapes[k][1]
    mine = [k for k in range(len(shapes)) if owner[k] == rank]
    device = updates[0].device if updates else torch.device("cpu")

    def numel(k: int, r: int) -> int:
        r0, r1 = _row_range(shapes[k][0], world, r)
        return (r1 - r0) * shapes[k][1]

    # 1. row blocks to their owners
    send = [
        [updates[k].float().reshape(-1) for k in range(len(shapes)) if owner[k] == j]
        for j in range(world)
    ]
    send_sizes = [sum(t.numel() for t in chunk) for chunk in send]
    recv_sizes = [sum(numel(k, i) for k in mine) for i in range(world)]
    flat_send = (
        torch.cat([t for chunk in send for t in chunk])
        if any(send_sizes)
        else torch.empty(0, device=device)
    )
    flat_recv = torch.empty(sum(recv_sizes), device=device)
    dist.all_to_all_single(flat_recv, flat_send, recv_sizes, send_sizes, group=group)
    # 2. orthogonalize the owned matrices
    pieces = [
        list(t.split([numel(k, i) for k in mine]))
        for i, t in enumerate(flat_recv.split(recv_sizes))
    ]
    results = []
    for j, k in enumerate(mine):
        full = torch.cat([pieces[i][j] for i in range(world)]).view(shapes[k])
        results.append(ns(full).float())
    # 3. each rank its rows of every result
    back = []
    for i in range(world):
        for j, k in enumerate(mine):
            r0, r1 = _row_range(shapes[k][0], world, i)
            back.append(results[j][r0:r1].reshape(-1))
    back_sizes = [sum(numel(k, i) for k in mine) for i in range(world)]
    recv_back_sizes = send_sizes
    flat_back = torch.cat(back) if back else torch.empty(0, device=device)
    flat_out = torch.empty(sum(recv_back_sizes), device=device)
    dist.all_to_all_single(flat_out, flat_back, recv_back_sizes, back_sizes, group=group)
    out: list[Tensor | None] = [None] * len(shapes)
    for j, chunk in enumerate(flat_out.split(recv_back_sizes)):
        ks = [k for k in range(len(shapes)) if owner[k] == j]
        for k, t in zip(ks, chunk.split([numel(k, rank) for k in ks])):
            out[k] = t.view_as(updates[k])
    return out  # type: ignore[return-value]


@torch.no_grad()
def _sharded_muon_step(
    state: dict[Tensor, dict[str, Any]], params: list[Tensor], group: dict[str, Any]
) -> None:
    """One Muon step of DTensor parameters (FSDP2 / HSDP row shards), equal to
    :class:`torch.optim.Muon` on the full matrices.

    Momentum, Nesterov blend, weight decay and the update are elementwise and run on the local
    shards; only the Newton-Schulz orthogonalization needs whole matrices:

    * stacked experts ``[E, out, in]`` are sharded by expert, so every rank orthogonalizes the
      experts it holds (no communication, the work is spread by construction);
    * 2-D matrices row-sharded over a mesh dim are gathered matrix by matrix to one owner rank
      of that dim's process group, orthogonalized there once, and scattered back
      (:func:`_orthogonalize_row_shards`); with HSDP each replica group does this for itself;
    * replicated matrices are orthogonalized locally.
    """
    zeropower, adjust_lr = _muon_kernels()
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]

    def ns(x: Tensor) -> Tensor:
        return zeropower(x, group["ns_coefficients"], group["ns_steps"], group["eps"])

    def apply(p_local: Tensor, update: Tensor, shape: tuple[int, ...]) -> None:
        p_local.mul_(1 - lr * wd)
        p_local.add_(update, alpha=-adjust_lr(lr, group["adjust_lr_fn"], torch.Size(shape)))

    exchange: dict[Any, list[tuple[Tensor, Tensor, tuple[int, int]]]] = {}
    for p in params:
        mesh_dim = _shard_mesh_dim(p)
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p)
        p_local, _ = local_shard(p)
        g_local, _ = local_shard(p.grad)  # type: ignore[arg-type]
        buf_local, _ = local_shard(st["momentum_buffer"])
        if g_local.shape != p_local.shape or buf_local.shape != p_local.shape:
            raise RuntimeError(
                f"gradient / momentum shard of shape {tuple(g_local.shape)} / "
                f"{tuple(buf_local.shape)} does not match the parameter shard {tuple(p_local.shape)}"
            )
        buf_local.lerp_(g_local, 1 - momentum)
        update = g_local.lerp(buf_local, momentum) if group["nesterov"] else buf_local
        if p.ndim == 3:  # experts: whole [out, in] slices are local
            for e in range(p_local.shape[0]):
                apply(p_local[e], ns(update[e]), tuple(p.shape[1:]))
        elif mesh_dim is None:
            apply(p_local, ns(update), tuple(p.shape))
        else:
            pg = p.device_mesh.get_group(mesh_dim)  # type: ignore[attr-defined]
            exchange.setdefault(pg, []).append((p_local, update, (p.shape[0], p.shape[1])))
    for pg, entries in exchange.items():
        results = _orthogonalize_row_shards(
            [u for _, u, _ in entries], [shape for _, _, shape in entries], pg, ns
        )
        for (p_local, _, shape), o in zip(entries, results):
            apply(p_local, o, shape)


# ----------------------------------------------------------------------------------------------
# factory
# ----------------------------------------------------------------------------------------------
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
    named = _grouped_named_parameters(model)
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
