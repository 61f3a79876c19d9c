"""Input validation and numerics rules shared by every KDA implementation (reference ops and
Triton kernels): shapes, dtypes, devices, ``cu_seqlens`` (the contract of
:func:`kimi_linear.packing.check_cu_seqlens`), ``scale``, the log decay ``g`` and its safe-gate
bound.

Each check raises ``ValueError`` naming the argument and what was expected, before any
computation or kernel launch.

Log decay. ``g`` is a log decay in ``[-inf, 0]``: ``-inf`` means complete forgetting (also what
an overflowing gate produces). The chunked forms need differences of cumulative sums of ``g``;
they clamp ``g`` per step at :data:`LOG_DECAY_FLOOR` (by compute dtype) before summing. That
is exact: ``exp`` of anything at or below the floor is exactly 0 in that dtype, and every
decay factor is ``exp`` of a sum of steps ``<= 0``, so a factor that contains a clamped step is
0 with or without the clamp. Without it, ``-inf - (-inf)`` is NaN and a finite ``-1e30``
swallows the other terms of a cumulative sum.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence

import torch

from kimi_linear.packing import check_cu_seqlens

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Per-step floor of the log decay by compute dtype: ``exp(floor) == 0`` exactly in that dtype
#: (the smallest subnormals are ``exp(-103.3)`` in float32 and ``exp(-744.4)`` in float64), so
#: clamping ``g`` there changes no decay factor, and keeps cumulative sums finite and short.
LOG_DECAY_FLOOR = {torch.float32: -128.0, torch.float64: -1024.0}


def check_log_decay(g: torch.Tensor, name: str = "g") -> None:
    """Raise ``ValueError`` unless every value of ``g`` is a log decay: ``<= 0`` (``-inf``
    included), or NaN.

    NaN is not refused: it marks a poisoned token, which the ops isolate causally (outputs from
    that token of its sequence and head on are NaN, nothing else changes:
    :mod:`kimi_linear.ops.isolation`); refusing it would stop a whole batch for one bad row.
    ``g > 0`` (a decay factor above 1) is a bug of the caller's gate and refused. One reduction
    over ``g``; on CUDA it synchronises with the device. Skipped for tensors without data (meta
    device) and while ``torch.compile`` traces (a data-dependent branch).
    """
    if g.device.type == "meta" or g.numel() == 0 or torch.compiler.is_compiling():
        return
    if not bool(g.max() <= 0):  # max propagates NaN: then look closer
        bad = g[g > 0]
        if bad.numel():
            raise ValueError(
                f"{name} must be a log decay in [-inf, 0] (decay factors exp({name}) in [0, 1]); "
                f"found {bad.numel()} value(s) > 0, e.g. {bad.flatten()[0].item()!r}"
            )


def check_gate_lower_bound(g: torch.Tensor, lower_bound: float, name: str = "g") -> None:
    """Raise ``ValueError`` unless every value of ``g`` is at least ``lower_bound`` (NaN passes:
    the ops isolate it as a poisoned token), up to the rounding of ``g``'s dtype (a bound of
    ``lower_bound * (1 + eps)``: a safe-gate value rounded to bf16 may land half an ulp below a
    bound that bf16 cannot represent).

    The check behind ``KIMI_LINEAR_CHECK_GATE=1`` for ``gate_lower_bound`` (the scalar bound
    itself is checked by :func:`kimi_linear.ops.options.check_safe_gate_bound`): one reduction
    (a device sync on CUDA); skipped for tensors without data (meta) and under
    ``torch.compile``.
    """
    if g.device.type == "meta" or g.numel() == 0 or torch.compiler.is_compiling():
        return
    eps = torch.finfo(g.dtype).eps if g.dtype.is_floating_point else 0.0
    bound = lower_bound * (1.0 + eps)
    if not bool(g.min() >= bound):  # min propagates NaN: then look closer
        bad = g[g < bound]  # NaN is a poisoned token, isolated by the ops (not a broken promise)
        if bad.numel():
            raise ValueError(
                f"{name} must be >= gate_lower_bound={lower_bound} everywhere (the safe gate's "
                f"promise, which selects the kernels' fast path); found {bad.numel()} value(s) "
                f"below it, e.g. {bad.flatten()[0].item()!r}. Pass gate_lower_bound=None for an "
                "unbounded gate"
            )


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device`` (a no-op for devices autocast does not
    know, such as ``meta``, where ``torch.autocast`` itself would raise)."""
    if device.type in ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia"):
        try:
            return torch.autocast(device_type=device.type, enabled=False)
        except RuntimeError:  # a device type this torch build cannot autocast
            return contextlib.nullcontext()
    return contextlib.nullcontext()


def check_scale(scale: object, name: str = "scale") -> float | None:
    """``scale`` as a Python float (``None`` stays ``None``); else ``ValueError`` naming ``name``.

    Accepted: a finite real number ``> 0`` (int, float, a NumPy scalar) or a one-element real
    tensor without gradient (read once: a device sync on CUDA). Refused: bool, ``0``, negative,
    ``inf`` / NaN (every output would be non-finite or zero), complex values, tensors of more
    than one element and tensors that require grad (the ops take ``scale`` as a constant: no
    gradient would reach it).
    """
    if scale is None:
        return None
    value = scale
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.is_complex() or scale.dtype == torch.bool:
            raise ValueError(
                f"{name} must be None or a positive finite number (a float or a one-element real "
                f"tensor), got a {scale.dtype} tensor of shape {tuple(scale.shape)}"
            )
        if scale.requires_grad:
            raise ValueError(
                f"{name} is a constant of the op (no gradient reaches it); got a tensor that "
                f"requires grad: pass {name}.detach() or a float"
            )
        if scale.device.type == "meta":
            raise ValueError(f"{name} must hold a value, got a tensor on the meta device")
        value = scale.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{name} must be None or a positive finite number, got {type(scale).__name__} {scale!r}"
        )
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be None or a positive finite number, got {value!r}")
    return value


def scale_or_default(scale: object, head_dim: int) -> float:
    """The query scale the KDA ops apply: ``scale`` (checked by :func:`check_scale`) or, when
    ``None``, ``head_dim ** -0.5``."""
    value = check_scale(scale)
    return head_dim**-0.5 if value is None else value


def host_offsets(
    cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor | Sequence[int] | None
) -> tuple[int, ...]:
    """The offsets of ``cu_seqlens`` on the host: from ``cu_seqlens_cpu`` (a CPU tensor, as fla
    takes it, or a sequence of ints) when the caller has them, no device read; else read from
    the device (a sync on CUDA)."""
    if cu_seqlens_cpu is None:
        return tuple(cu_seqlens.tolist())
    if isinstance(cu_seqlens_cpu, torch.Tensor):
        return tuple(cu_seqlens_cpu.tolist())
    return tuple(int(o) for o in cu_seqlens_cpu)


def check_kda_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    allowed_dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
    cu_seqlens_cpu: torch.Tensor | Sequence[int] | None = None,
    allow_gva: bool = False,
) -> tuple[int, int, int, int, int, int]:
    """Validate the KDA op layout and return ``(B, T, H, K, V, N)``.

    Layout: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g ``[B, T, H, K]``; beta ``[B, T, H]``;
    initial_state ``[N, H, K, V]`` where ``N = B`` (or the number of sequences with
    ``cu_seqlens``, which needs ``B == 1``: :func:`kimi_linear.packing.check_cu_seqlens`, with
    ``cu_seqlens_cpu`` its host offsets when the caller has them: no device read). q, k and v
    share one dtype; g, beta and initial_state may have any allowed floating dtype (gates are
    often kept in float32).

    With ``allow_gva`` (grouped value attention), v, g, beta and initial_state may have
    ``HV = G * H`` heads (:func:`check_kda_heads`); ``H`` returned is then q and k's head count,
    ``HV`` is ``v.shape[2]``.
    """
    if allow_gva:
        _, HV = check_kda_heads(q, k, v, g, beta)
        B, T, _, K = q.shape
        # q and k as zero-stride stand-ins on the value heads: the checks below then see HV
        q_hv = q.new_empty((1, 1, 1, 1)).expand(B, T, HV, K)
        k_hv = k.new_empty((1, 1, 1, 1)).expand(B, T, HV, K)
        _, _, _, _, V, N = check_kda_inputs(
            q_hv,
            k_hv,
            v,
            g,
            beta,
            scale,
            initial_state,
            cu_seqlens,
            allowed_dtypes=allowed_dtypes,
            cu_seqlens_cpu=cu_seqlens_cpu,
        )
        return B, T, q.shape[2], K, V, N
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in allowed_dtypes:
            raise ValueError(
                f"{name} must have a floating dtype in {allowed_dtypes}, got {t.dtype}"
            )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, T, H, K], got shape {tuple(q.shape)}")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(
            f"k must have the shape of q {tuple(q.shape)} [B, T, H, K], got {tuple(k.shape)}"
        )
    if g.shape != q.shape:
        raise ValueError(
            f"g must have the shape of q {tuple(q.shape)} [B, T, H, K], got {tuple(g.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    V = v.shape[-1]
    if beta.shape != q.shape[:3]:
        raise ValueError(f"beta must be [B, T, H] = [{B}, {T}, {H}], got {tuple(beta.shape)}")
    if K == 0 or V == 0 or H == 0:
        raise ValueError(f"q and v need non-empty head dims, got K={K}, V={V}, H={H}")
    for name, t in (("k", k), ("v", v), ("g", g), ("beta", beta)):
        if t.device != q.device:
            raise ValueError(
                f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device"
            )
    check_scale(scale)
    N = B
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T, q.device, host=cu_seqlens_cpu)
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise ValueError(
                f"initial_state must be a torch.Tensor or None, got {type(initial_state).__name__}"
            )
        if tuple(initial_state.shape) != (N, H, K, V):
            raise ValueError(
                f"initial_state must be [N, H, K, V] = [{N}, {H}, {K}, {V}], got {tuple(initial_state.shape)}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
        if initial_state.dtype not in allowed_dtypes:
            raise ValueError(f"initial_state must be floating point, got {initial_state.dtype}")
    return B, T, H, K, V, N


def check_kda_heads(q: object, k: object, v: object, g: object, beta: object) -> tuple[int, int]:
    """``(H, HV)`` after checking the GVA head layout: q, k ``[B, T, H, K]``; v
    ``[B, T, HV, V]``, g ``[B, T, HV, K]``, beta ``[B, T, HV]`` with ``HV`` a positive multiple
    of ``H`` (value head ``i`` reads key head ``i // (HV // H)``). Only the head layout: the
    rest is :func:`check_kda_inputs`'s."""
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D [B, T, H, K], got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        raise ValueError(
            f"k must have the shape of q {tuple(q.shape)} [B, T, H, K], got {tuple(k.shape)}"
        )
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v must be [B, T, HV, V] = [{B}, {T}, HV, V], got {tuple(v.shape)}")
    HV = v.shape[2]
    if H == 0 or HV % H != 0:
        raise ValueError(
            f"v's head count (num_v_heads HV={HV}) must be a positive multiple of q and k's "
            f"(num_heads H={H})"
        )
    if g.shape != (B, T, HV, K):
        raise ValueError(f"g must be [B, T, HV, K] = [{B}, {T}, {HV}, {K}], got {tuple(g.shape)}")
    if beta.shape != (B, T, HV):
        raise ValueError(f"beta must be [B, T, HV] = [{B}, {T}, {HV}], got {tuple(beta.shape)}")
    return H, HV


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference ops compute in for inputs of ``dtype``: float64 for float64,
    float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_outputs(
    v: torch.Tensor, N: int, K: int, output_final_state: bool, state_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Correctly shaped outputs without computation, for inputs that hold no data (meta device):
    ``o`` like ``v`` (``[B, T, H, V]``) and, when asked for, an ``[N, H, K, V]`` state."""
    H, V = v.shape[2], v.shape[3]
    state = v.new_empty(N, H, K, V, dtype=state_dtype) if output_final_state else None
    return torch.empty_like(v), state
