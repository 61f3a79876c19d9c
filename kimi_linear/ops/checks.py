"""Input validation shared by every KDA implementation (reference ops and Triton kernels).

Each check raises ``ValueError`` naming the argument and what was expected, before any
computation or kernel launch.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
) -> tuple[int, int, int, int, int, int]:
    """Validate the KDA op layout and return ``(B, T, H, K, V, N)``.

    Layout: q, k ``[B, T, H, K]``; v ``[B, T, H, V]``; g ``[B, T, H, K]``; beta ``[B, T, H]``;
    initial_state ``[N, H, K, V]`` where ``N = B`` (or the number of sequences with
    ``cu_seqlens``, which needs ``B == 1``). q, k and v share one dtype; g, beta and
    initial_state may have any allowed floating dtype (gates are often kept in float32).
    """
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
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be None or a positive float, got {scale!r}")
    N = B
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            raise ValueError("cu_seqlens must be a 1-D integer tensor of sequence offsets")
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if B != 1:
            raise ValueError(f"cu_seqlens needs packed inputs with B == 1, got B={B}")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least two offsets [0, ..., T]")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
        offs = cu_seqlens.tolist()
        if offs[0] != 0 or offs[-1] != T:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at T={T}, got {offs[0]} ... {offs[-1]}"
            )
        if any(b < a for a, b in zip(offs[:-1], offs[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")
        N = len(offs) - 1
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
