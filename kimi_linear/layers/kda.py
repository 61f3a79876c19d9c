"""Kimi Delta Attention (KDA): the linear-attention token mixer of Kimi Linear.

One layer, per token ``x_t`` (``H`` heads of size ``K = V = config.kda_head_dim``)::

    q, k, v = SiLU(causal depthwise conv(W_q x)), ...(W_k x), ...(W_v x)   # q_conv1d, ...
    q, k    = q / ||q||, k / ||k||                        # per head, fp32, eps 1e-6
    g       = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)  # per-channel log decay [H, K]
    beta    = sigmoid(b_proj(x))                            # [H]
    o       = KDA(q, k, v, g, beta)                         # gated delta rule, fp32 state
    y       = o_proj(sigmoid(g_b(g_a(x))) * RMSNorm_per_head(o))

(Kimi Linear tech report, arXiv 2510.26692, eq. 10.)  With ``config.kda_gate == "head"`` the
decay is one scalar per head (``f_b_proj: K -> H``, ``dt_bias: [H]``), broadcast over the key
channels: the Gated DeltaNet-like variant.

The recurrence runs through a backend chosen by ``config.kda_backend``:

* ``"torch"``: :func:`kimi_linear.ops.kda_chunk` for ``T > 1``; a one-step update for ``T == 1``.
* ``"triton"``: :func:`kimi_linear.kernels.chunk_kda` and
  :func:`kimi_linear.kernels.fused_recurrent_kda` (CUDA, or CPU under ``TRITON_INTERPRET=1``).
* ``"fla"``: ``fla.ops.kda.chunk_kda`` / ``fused_recurrent_kda`` (CUDA only).
* ``"auto"``: ``"triton"`` for CUDA inputs, ``"torch"`` otherwise.

Parameter names and shapes follow the released Kimi-Linear checkpoints, so their state dicts
load without renaming.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kimi_linear.cache import KDALayerCache
from kimi_linear.config import KDA_BACKENDS, KimiLinearConfig
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.ops import kda_chunk

__all__ = [
    "KimiDeltaAttention",
    "causal_conv1d",
    "kda_decode_step",
    "l2_normalize",
    "resolve_kda_backend",
]

KDAOp = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution continuing from the previous inputs ``tail``.

    Args:
        x: ``[B, T, D]`` inputs of this block.
        weight: ``[D, 1, W]`` depthwise filters (an ``nn.Conv1d(D, D, W, groups=D)`` weight).
        tail: ``[B, W - 1, D]`` the last ``W - 1`` inputs before this block (zeros if ``None``).

    Returns:
        ``(y, new_tail)``: the pre-activation output ``[B, T, D]`` and the last ``W - 1`` inputs
        ``[B, W - 1, D]`` (in x's dtype) to continue from.
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(B, W - 1, D)
    xt = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, W - 1 + T, D]
    if T == 1:
        # decode: one dot product per channel over the window
        y = torch.einsum("bwd,dw->bd", xt, weight[:, 0].to(x.dtype)).unsqueeze(1)
    else:
        y = F.conv1d(rearrange(xt, "b t d -> b d t"), weight.to(x.dtype), groups=D)
        y = rearrange(y, "b d t -> b t d")
    new_tail = xt[:, xt.shape[1] - (W - 1) :]
    return y, new_tail


def kda_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One KDA token per sequence (``T == 1``) in fp32: the cheap decode update.

    Same layout and semantics as :func:`kimi_linear.ops.kda_recurrent` restricted to one step:
    q, k, g ``[B, 1, H, K]``, v ``[B, 1, H, V]``, beta ``[B, 1, H]``, state ``[B, H, K, V]``.
    Returns ``(o [B, 1, H, V] in v's dtype, new_state fp32 or None)``.
    """
    if q.shape[1] != 1:
        raise ValueError(
            f"q must hold exactly one token per sequence [B, 1, H, K], got {tuple(q.shape)}"
        )
    B, _, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf, gf, bf = (t[:, 0].float() for t in (q, k, v, g, beta))
    if initial_state is None:
        S = qf.new_zeros(B, H, K, V)
    else:
        S = initial_state.float()
    S = S * gf.exp().unsqueeze(-1)  # decay key rows
    residual = vf - torch.einsum("bhkv,bhk->bhv", S, kf)
    S = S + torch.einsum("bhk,bhv->bhkv", kf * bf.unsqueeze(-1), residual)
    o = torch.einsum("bhkv,bhk->bhv", S, qf * scale)
    return o.unsqueeze(1).to(v.dtype), (S if output_final_state else None)


def resolve_kda_backend(backend: str, device: torch.device) -> str:
    """The concrete backend (``"torch"``, ``"triton"`` or ``"fla"``) for inputs on ``device``.

    Raises ``ValueError`` for an unknown name or a backend that cannot run on ``device``.
    """
    if backend not in KDA_BACKENDS:
        raise ValueError(f"kda_backend must be one of {KDA_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "fla" and device.type != "cuda":
        raise ValueError(
            f"kda_backend='fla' runs fla's Triton kernels and needs CUDA inputs, got device "
            f"{device.type!r}; use kda_backend='torch' (or 'auto') on CPU"
        )
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"kda_backend='triton' needs CUDA inputs (got device {device.type!r}) or the Triton "
            "interpreter (set TRITON_INTERPRET=1 before importing triton); use 'torch' on CPU"
        )
    return backend


def _triton_ops() -> tuple[KDAOp, KDAOp]:
    try:
        from kimi_linear.kernels import chunk_kda, fused_recurrent_kda
    except ImportError as e:
        raise ValueError(
            f"kda_backend='triton' needs kimi_linear.kernels.chunk_kda and fused_recurrent_kda, "
            f"which failed to import ({e}); use kda_backend='torch'"
        ) from e
    return chunk_kda, fused_recurrent_kda


def _fla_ops() -> tuple[KDAOp, KDAOp]:
    try:
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except ImportError as e:
        raise ValueError(
            f"kda_backend='fla' needs flash-linear-attention with fla.ops.kda ({e}); "
            "use kda_backend='torch' or 'triton'"
        ) from e
    return chunk_kda, fused_recurrent_kda


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------
class KimiDeltaAttention(nn.Module):
    """KDA token mixer with release parameter names (see the module docstring).

    Args:
        config: model configuration; uses ``hidden_size``, ``kda_num_heads``, ``kda_head_dim``,
            ``kda_conv_size``, ``kda_gate``, ``kda_backend``, ``kda_chunk_size`` and
            ``rms_norm_eps`` (the eps of ``o_norm``).
        layer_idx: index of this layer in the model (for messages and caches).

    Attributes:
        backend: the backend name used by :meth:`forward` (initialised from
            ``config.kda_backend``; may be reassigned per layer, e.g. by benchmarks).
    """

    def __init__(self, config: KimiLinearConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = D = config.hidden_size
        self.num_heads = H = config.kda_num_heads
        self.head_dim = K = config.kda_head_dim
        self.conv_size = W = config.kda_conv_size
        self.gate_mode = config.kda_gate
        self.backend: str = config.kda_backend
        self.chunk_size = config.kda_chunk_size
        proj = H * K

        self.q_proj = nn.Linear(D, proj, bias=False)
        self.k_proj = nn.Linear(D, proj, bias=False)
        self.v_proj = nn.Linear(D, proj, bias=False)
        self.q_conv1d = nn.Conv1d(proj, proj, W, groups=proj, bias=False)
        self.k_conv1d = nn.Conv1d(proj, proj, W, groups=proj, bias=False)
        self.v_conv1d = nn.Conv1d(proj, proj, W, groups=proj, bias=False)
        # decay: low rank (rank = head dim) to one value per channel, or one per head
        gate_dim = proj if self.gate_mode == "channel" else H
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, gate_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, H, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(gate_dim, dtype=torch.float32))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]
        self.b_proj = nn.Linear(D, H, bias=False)
        # output gate (no bias, as released)
        self.g_a_proj = nn.Linear(D, K, bias=False)
        self.g_b_proj = nn.Linear(K, proj, bias=False)
        self.o_norm = RMSNorm(K, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(proj, D, bias=False)
        self.reset_gate_parameters()

    #: parameters kept in float32 through ``module.to(dtype)`` / ``.bfloat16()`` (as released)
    _fp32_parameters = ("A_log", "dt_bias")

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``nn.Module._apply`` that keeps :attr:`_fp32_parameters` in float32 (device moves
        still apply), so a bf16 model keeps full-precision decay parameters."""
        originals = {
            n: getattr(self._parameters.get(n), "data", None) for n in self._fp32_parameters
        }
        result = super()._apply(fn, recurse)
        for name, orig in originals.items():
            p = self._parameters.get(name)
            if p is None or orig is None or p.dtype == torch.float32:
                continue
            if orig.dtype == torch.float32 and orig.device.type != "meta":
                p.data = orig.to(device=p.device)  # undo the down-cast without rounding
            else:
                p.data = p.data.float()
        return result

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def reset_gate_parameters(
        self,
        a_range: tuple[float, float] = (1.0, 16.0),
        dt_range: tuple[float, float] = (1e-3, 1e-1),
    ) -> None:
        """Mamba-style decay init: ``A ~ U[a_range]`` (stored as ``log A``) and ``dt_bias`` the
        softplus-inverse of ``dt`` drawn log-uniformly from ``dt_range`` (floored at 1e-4)."""
        if self.A_log.device.type == "meta":
            return
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*a_range).log())
        lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
        dt = (torch.rand_like(self.dt_bias) * (hi - lo) + lo).exp().clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) == dt

    # ----------------------------------------------------------------- pieces
    def decay(self, x: torch.Tensor) -> torch.Tensor:
        """Log-space per-channel decay ``g: [B, T, H, K]`` (fp32, ``<= 0``) for ``x: [B, T, D]``."""
        f = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        if self.gate_mode == "channel":
            f = rearrange(f, "b t (h k) -> b t h k", k=self.head_dim)
        else:
            f = f.unsqueeze(-1)  # [B, T, H, 1]
        g = -self.A_log.float().exp() * F.softplus(f)
        return g.expand(*g.shape[:-1], self.head_dim).contiguous()

    def _check_inputs(self, x: torch.Tensor, cache: KDALayerCache | None) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, T, hidden_size={self.hidden_size}], got {shape}")
        if x.shape[1] == 0:
            raise ValueError("x must hold at least one token (T > 0)")
        if not x.is_floating_point():
            raise ValueError(f"x must be floating point, got {x.dtype}")
        w = self.q_proj.weight
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the layer's weights are on {w.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"x has dtype {x.dtype} but the layer's weights are {w.dtype} (outside autocast); "
                "cast the input or the module"
            )
        if cache is None:
            return
        if not isinstance(cache, KDALayerCache):
            raise ValueError(f"cache must be a KDALayerCache or None, got {type(cache).__name__}")
        B, H, K = x.shape[0], self.num_heads, self.head_dim
        expected = {
            "state": (B, H, K, K),
            "conv_q": (B, self.conv_size - 1, H * K),
            "conv_k": (B, self.conv_size - 1, H * K),
            "conv_v": (B, self.conv_size - 1, H * K),
        }
        for name, shape in expected.items():
            t = getattr(cache, name)
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"cache.{name} must be {list(shape)} for batch {B} (layer {self.layer_idx}), "
                    f"got {list(t.shape)}"
                )
            if t.device != x.device:
                raise ValueError(f"cache.{name} is on {t.device} but x is on {x.device}")

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, cache: KDALayerCache | None = None) -> torch.Tensor:
        """Mix tokens of ``x: [B, T, D]``; returns ``[B, T, D]``.

        With ``cache`` the block continues the sequences held in it (any ``T``: decode,
        prefill or chunked prefill) and the cache's conv tails and fp32 state are replaced by
        those after this block.
        """
        self._check_inputs(x, cache)
        backend = resolve_kda_backend(self.backend, x.device)
        H, T = self.num_heads, x.shape[1]

        tails = (None, None, None) if cache is None else (cache.conv_q, cache.conv_k, cache.conv_v)
        q, tail_q = causal_conv1d(self.q_proj(x), self.q_conv1d.weight, tails[0])
        k, tail_k = causal_conv1d(self.k_proj(x), self.k_conv1d.weight, tails[1])
        v, tail_v = causal_conv1d(self.v_proj(x), self.v_conv1d.weight, tails[2])
        q, k, v = (rearrange(F.silu(t), "b t (h d) -> b t h d", h=H) for t in (q, k, v))
        q, k = l2_normalize(q), l2_normalize(k)
        g = self.decay(x)
        beta = torch.sigmoid(self.b_proj(x))

        state = None if cache is None else cache.state
        o, new_state = self._mix(backend, q, k, v, g, beta, state, T)

        if cache is not None:
            cache.conv_q = tail_q.to(cache.conv_q.dtype)
            cache.conv_k = tail_k.to(cache.conv_k.dtype)
            cache.conv_v = tail_v.to(cache.conv_v.dtype)
            if new_state is None:
                raise RuntimeError(f"KDA backend {backend!r} returned no final state")
            cache.state = new_state if new_state.dtype == torch.float32 else new_state.float()

        gate = rearrange(self.g_b_proj(self.g_a_proj(x)), "b t (h d) -> b t h d", h=H)
        o = self.o_norm(o.to(x.dtype)) * torch.sigmoid(gate)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))

    def _mix(
        self,
        backend: str,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        state: torch.Tensor | None,
        T: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the recurrence; ``state`` is the fp32 ``[B, H, K, V]`` cache state or ``None``."""
        want_state = state is not None
        # the fused recurrent kernels are forward-only: take them for decode steps that need
        # no gradient, the chunked kernels (differentiable) otherwise
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, g, beta))
        forward_only_ok = T == 1 and want_state and not needs_grad and not state.requires_grad
        if backend == "torch":
            if T == 1:
                return kda_decode_step(
                    q, k, v, g, beta, initial_state=state, output_final_state=want_state
                )
            return kda_chunk(
                q,
                k,
                v,
                g,
                beta,
                initial_state=state,
                output_final_state=want_state,
                chunk_size=self.chunk_size,
            )
        if backend == "triton":
            chunk, recurrent = _triton_ops()
            if forward_only_ok:
                return recurrent(
                    q,
                    k,
                    v,
                    g,
                    beta,
                    initial_state=state.contiguous(),
                    output_final_state=True,
                    inplace_state=True,
                )
            return chunk(q, k, v, g, beta, initial_state=state, output_final_state=want_state)
        # fla: q, k are already normalised and g, beta already activated
        chunk, recurrent = _fla_ops()
        op = recurrent if forward_only_ok else chunk
        return op(q, k, v, g, beta, initial_state=state, output_final_state=want_state)

    def extra_repr(self) -> str:
        return (
            f"layer_idx={self.layer_idx}, heads={self.num_heads}, head_dim={self.head_dim}, "
            f"conv_size={self.conv_size}, gate={self.gate_mode!r}, backend={self.backend!r}"
        )
