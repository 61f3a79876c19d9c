"""Tensors kept in float32 whatever the model dtype: the one rule, and every cast that reads it.

A layer names its own float32 tensors (parameters or buffers) in its class attribute
``fp32_tensors`` and mixes in :class:`KeepsFloat32`; nothing else lists them.  Today:

* :class:`~kimi_linear.layers.kda.KimiDeltaAttention`: ``A_log``, ``dt_bias`` (the decay
  gate's parameters, fp32 in the release; bf16 would round the decay of long memories);
* :class:`~kimi_linear.layers.moe.MoEGate`: ``e_score_correction_bias``, and
  :class:`~kimi_linear.layers.moe.KimiMoE`: ``expert_load``, ``last_expert_load`` (the
  balancing bias and load counters accumulate small steps that bf16 would round away).

Every cast reads that attribute: ``module.to(dtype)`` / ``.half()`` / ``.bfloat16()``
(:meth:`KeepsFloat32._apply`), :func:`cast_model_` (``from_pretrained``, ``kimi-linear
export --dtype``, benchmarks) and :func:`fp32_tensor_names` (by state-dict name, for loaders that
cast tensor by tensor, e.g. ``kimi_linear.lightning.checkpoints.load_sharded_checkpoint``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["KeepsFloat32", "cast_model_", "fp32_tensor_names"]


class KeepsFloat32:
    """Mixin for an ``nn.Module``: the parameters and buffers named in ``fp32_tensors`` stay
    float32 through ``module.to(dtype)`` / ``.half()`` / ``.bfloat16()`` (device moves still
    apply; a down-cast fp32 value is restored exactly, not rounded and widened)."""

    #: names of this module's own parameters / buffers kept in float32
    fp32_tensors: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        params, buffers = self._parameters, self._buffers  # type: ignore[attr-defined]
        originals = {}
        for name in self.fp32_tensors:
            t = params.get(name) if name in params else buffers.get(name)
            originals[name] = None if t is None else t.data
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        for name, orig in originals.items():
            store = params if name in params else buffers
            t = store.get(name)
            if t is None or orig is None or not t.is_floating_point() or t.dtype == torch.float32:
                continue
            if orig.dtype == torch.float32 and orig.device.type != "meta":
                restored = orig.to(device=t.device)  # undo the down-cast without rounding
            else:
                restored = t.data.float()
            if isinstance(t, nn.Parameter):
                t.data = restored
            else:
                store[name] = restored
        return result


def fp32_tensor_names(module: nn.Module) -> frozenset[str]:
    """State-dict names (``"model.layers.0.self_attn.A_log"``, ...) of every tensor of
    ``module`` kept in float32 (the ``fp32_tensors`` of each submodule)."""
    names = set()
    for prefix, sub in module.named_modules():
        for name in getattr(sub, "fp32_tensors", ()):
            names.add(f"{prefix}.{name}" if prefix else name)
    return frozenset(names)


def cast_model_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters and buffers of ``module`` to ``dtype`` in place, except the
    ``fp32_tensors`` of each submodule, which stay float32.  Works on the meta device too (no
    data is read).  Returns ``module``."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    for sub in module.modules():
        keep = getattr(sub, "fp32_tensors", ())
        for store in (sub._parameters, sub._buffers):
            for name, t in store.items():
                if t is None or not t.is_floating_point():
                    continue
                target = torch.float32 if name in keep else dtype
                if t.dtype == target:
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(target)
                else:
                    store[name] = t.to(target)
    return module
