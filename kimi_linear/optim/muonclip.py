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

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from kimi_linear.optim.groups import GROUP_NAMES, grouped_named_parameters
from kimi_linear.optim.qk_clip import (
    apply_qk_clip_,
    find_mla_modules,
    gather_max_logits,
    query_proj,
)
from kimi_linear.optim.sharded_muon import _sharded_muon_step
from kimi_linear.sharding import is_dtensor

_MUON_ADJUST_LR_FN = "match_rms_adamw"


_MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


_MUON_EPS = 1e-7


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

        named = grouped_named_parameters(model)
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
    def _qk_clip(self) -> None:
        self.last_max_logits = gather_max_logits(self._mla)
        self.last_clip_gamma = {}
        if self.qk_clip_tau is None:
            return
        for name, s_max in self.last_max_logits.items():
            attn = self._mla[name]
            if not (query_proj(attn).weight.requires_grad and attn.kv_b_proj.weight.requires_grad):
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
