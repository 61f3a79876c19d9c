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
channels: the Gated DeltaNet-like variant.  With ``config.kda_gate_lower_bound`` set, ``g`` is the
bounded safe gate ``lower_bound * sigmoid(exp(A_log) * (f_b(f_a(x)) + dt_bias))`` instead
(:mod:`kimi_linear.ops.gate` forms both).  GVA (``config.kda_num_v_heads = HV``, a multiple
of ``H``): q and k keep ``H`` heads, v, the decay, beta, the output gate and the state take
``HV``; value head ``i`` reads key head ``i // (HV // H)``.

The recurrence runs through the backend named by ``config.kda_backend`` (``"auto"``, ``"torch"``,
``"triton"`` or ``"fla"``), via the two entry points of :mod:`kimi_linear.backends`:
:func:`~kimi_linear.backends.dispatch_decode_kda` for single-token steps and
:func:`~kimi_linear.backends.dispatch_chunk_kda` otherwise. ``"auto"`` is the pure-PyTorch path off
CUDA and fla's kernels on CUDA (ours only on GPU architectures where they passed the GPU suite).

Parameter names and shapes follow the released Kimi-Linear checkpoints, so their state dicts
load without renaming.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kimi_linear.backends import (
    KDABackend,
    dispatch_chunk_kda,
    dispatch_decode_kda,
    get_kda_backend,
)
from kimi_linear.cache import KDALayerCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.checks import check_features
from kimi_linear.layers.fp32 import KeepsFloat32
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.ops.gate import kda_gate
from kimi_linear.ops.options import check_kda_backend
from kimi_linear.packing import PackedDocuments, packed_documents

__all__ = ["KimiDeltaAttention", "causal_conv1d", "causal_conv1d_packed", "l2_normalize"]


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


class _CausalConv(torch.autograd.Function):
    """Depthwise causal convolution over inputs with their history in front, fp32 accumulation.

    ``y[:, t] = sum_s w[:, W - 1 - s] * xp[:, t + W - 1 - s]`` for taps ``s = 0 .. W - 1``, the
    taps ``s > positions[t]`` dropped (a document start) when ``positions`` is given. Products
    and sums in fp32 (float64 for float64 inputs) whatever the input dtype, rounded once to it;
    the backward likewise (``dxp`` and ``dw``, the latter summed over every token in fp32). Keeps
    only the inputs for the backward (no fp32 copy, no per-tap tensor).
    """

    @staticmethod
    def forward(ctx, xp, weight, positions):
        ctx.save_for_backward(xp, weight, positions)
        return _conv_taps(xp, weight, positions).to(xp.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xp, weight, positions = ctx.saved_tensors
        W, T = weight.shape[-1], dy.shape[1]
        compute = _conv_dtype(xp)
        w = weight.reshape(-1, W).to(compute)
        dyf, xf = dy.to(compute), xp.to(compute)
        dxp = xf.new_zeros(xf.shape) if ctx.needs_input_grad[0] else None
        dw = w.new_zeros(w.shape) if ctx.needs_input_grad[1] else None
        for s in range(W):
            d = dyf if s == 0 else _drop_taps(dyf, positions, s)
            window = slice(W - 1 - s, W - 1 - s + T)
            if dxp is not None:
                dxp[:, window] += d * w[:, W - 1 - s]
            if dw is not None:
                dw[:, W - 1 - s] = (d * xf[:, window]).sum((0, 1))
        dxp = None if dxp is None else dxp.to(xp.dtype)
        dw = None if dw is None else dw.to(weight.dtype).view_as(weight)
        return dxp, dw, None


def _conv_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _drop_taps(x: torch.Tensor, positions: torch.Tensor | None, s: int) -> torch.Tensor:
    """``x [B, T, D]`` with zeros at the tokens whose tap ``s`` would cross a document start
    (``positions < s``); ``where``, not a product, so a non-finite input of one document never
    reaches the next."""
    if positions is None:
        return x
    return torch.where((positions >= s)[None, :, None], x, 0.0)


def _conv_taps(xp: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor | None):
    """The forward sum of :class:`_CausalConv` in fp32 (float64 for float64 inputs)."""
    W = weight.shape[-1]
    T = xp.shape[1] - (W - 1)
    compute = _conv_dtype(xp)
    w = weight.reshape(-1, W).to(compute)  # [D, W]; tap W - 1 is the current token
    xf = xp.to(compute)
    y = xf[:, W - 1 :] * w[:, W - 1]
    for s in range(1, W):
        y += _drop_taps(xf[:, W - 1 - s : W - 1 - s + T] * w[:, W - 1 - s], positions, s)
    return y


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, tail: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution continuing from the previous inputs ``tail``.

    Args:
        x: ``[B, T, D]`` inputs of this block.
        weight: ``[D, 1, W]`` depthwise filters (an ``nn.Conv1d(D, D, W, groups=D)`` weight).
        tail: ``[B, W - 1, D]`` the last ``W - 1`` inputs before this block (zeros if ``None``).

    Returns:
        ``(y, new_tail)``: the pre-activation output ``[B, T, D]`` in x's dtype and the last
        ``W - 1`` inputs ``[B, W - 1, D]`` (in x's dtype) to continue from.

    Products and sums run in fp32 whatever x's dtype (float64 for float64), rounded once to
    x's dtype, forward and backward; the multi-token path is the packed one
    (:func:`causal_conv1d_packed`, the same operations with zeros for history), so a batch
    row and the same row packed among others give the same bits.
    """
    B, T, D = x.shape
    W = weight.shape[-1]
    if tail is None:
        tail = x.new_zeros(B, W - 1, D)
    xt = torch.cat([tail.to(x.dtype), x], dim=1)  # [B, W - 1 + T, D]
    if T == 1:
        # decode: one fp32 dot product per channel over the window
        compute = _conv_dtype(x)
        w = weight[:, 0].to(compute)
        y = torch.einsum("bwd,dw->bd", xt.to(compute), w).unsqueeze(1).to(x.dtype)
    else:
        y = _CausalConv.apply(xt, weight, None)
    new_tail = xt[:, xt.shape[1] - (W - 1) :]
    return y, new_tail


def causal_conv1d_packed(
    x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Causal depthwise convolution of packed documents, each starting from zeros.

    Args:
        x: ``[B, T, D]`` inputs (``B == 1`` for packed documents).
        weight: ``[D, 1, W]`` depthwise filters.
        positions: ``[T]`` long, the position of each token inside its document
            (:func:`kimi_linear.packing.document_positions`): a tap reaching ``s`` tokens back
            is dropped where ``positions < s``, i.e. across a document start.

    Returns:
        The pre-activation output ``[B, T, D]`` in x's dtype (what :func:`causal_conv1d` gives
        each document alone, with no tail, bit for bit): ``W`` masked shifted multiply-adds in
        fp32 (float64 for float64 inputs), rounded once; the backward accumulates in fp32 too.
    """
    W = weight.shape[-1]
    return _CausalConv.apply(F.pad(x, (0, 0, W - 1, 0)), weight, positions)


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------
class KimiDeltaAttention(KeepsFloat32, nn.Module):
    """KDA token mixer with release parameter names (see the module docstring).

    Args:
        config: model configuration; uses ``hidden_size``, ``kda_num_heads``,
            ``kda_num_v_heads`` (GVA), ``kda_head_dim``,
            ``kda_conv_size``, ``kda_gate``, ``kda_backend``, ``kda_chunk_size`` and
            ``rms_norm_eps`` (the eps of ``o_norm``).
        layer_idx: index of this layer in the model (for messages and caches).

    Attributes:
        backend: the backend name used by :meth:`forward`, one of
            :data:`kimi_linear.ops.options.KDA_BACKENDS` (initialised from
            ``config.kda_backend``, which the config validated; may be reassigned per layer,
            e.g. by benchmarks, validated on assignment). Resolved to a
            :class:`~kimi_linear.backends.KDABackend` once per device, not per call.
    """

    def __init__(self, config: KimiLinearConfig, layer_idx: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = D = config.hidden_size
        self.num_heads = H = config.kda_num_heads
        # GVA: value heads (v, decay, beta, output gate, state); key head i // (HV // H) serves
        # value head i (the ops read q and k per group, never repeated)
        self.num_v_heads = HV = config.kda_value_heads
        self.head_dim = K = config.kda_head_dim
        self.conv_size = W = config.kda_conv_size
        self.gate_mode = config.kda_gate
        self._backend = config.kda_backend  # validated by the config
        self._resolved: tuple[torch.device, KDABackend] | None = None
        self.chunk_size = config.kda_chunk_size
        proj_qk, proj = H * K, HV * K

        self.q_proj = nn.Linear(D, proj_qk, bias=False)
        self.k_proj = nn.Linear(D, proj_qk, bias=False)
        self.v_proj = nn.Linear(D, proj, bias=False)
        self.q_conv1d = nn.Conv1d(proj_qk, proj_qk, W, groups=proj_qk, bias=False)
        self.k_conv1d = nn.Conv1d(proj_qk, proj_qk, W, groups=proj_qk, bias=False)
        self.v_conv1d = nn.Conv1d(proj, proj, W, groups=proj, bias=False)
        # decay: low rank (rank = head dim) to one value per channel, or one per head
        gate_dim = proj if self.gate_mode == "channel" else HV
        self.f_a_proj = nn.Linear(D, K, bias=False)
        self.f_b_proj = nn.Linear(K, gate_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, HV, 1, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(gate_dim, dtype=torch.float32))
        self.b_proj = nn.Linear(D, HV, bias=False)
        # output gate (no bias, as released)
        self.g_a_proj = nn.Linear(D, K, bias=False)
        self.g_b_proj = nn.Linear(K, proj, bias=False)
        self.o_norm = RMSNorm(K, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(proj, D, bias=False)
        self.reset_gate_parameters()

    @property
    def backend(self) -> str:
        """The KDA backend name (see :mod:`kimi_linear.backends`)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = check_kda_backend(name)
        self._resolved = None

    def _backend_for(self, device: torch.device) -> str | KDABackend:
        """The layer's backend for inputs on ``device``: resolved (and its operators imported)
        on the first call per device, then reused, so no call re-validates the name. Under
        ``torch.compile`` the name, which the dispatcher hands to its custom op."""
        if torch.compiler.is_compiling():
            return self._backend
        resolved = self._resolved
        if resolved is None or resolved[0] != device:
            resolved = self._resolved = (device, get_kda_backend(self._backend, device))
        return resolved[1]

    #: the decay gate's parameters stay float32 whatever the model dtype, as released (the one
    #: rule: :mod:`kimi_linear.layers.fp32`)
    fp32_tensors = ("A_log", "dt_bias")
    #: the decay gate's parameters take no weight decay (read by
    #: :func:`kimi_linear.optim.groups.param_group_name`; a module attribute, so it survives
    #: FSDP2's parameter swap)
    no_weight_decay = ("A_log", "dt_bias")

    # ----------------------------------------------------------------- init
    #: ranges of the decay init: ``A ~ U[A_RANGE]``, ``dt`` log-uniform in ``DT_RANGE``
    A_RANGE: tuple[float, float] = (1.0, 16.0)
    DT_RANGE: tuple[float, float] = (1e-3, 1e-1)
    #: ``A`` of the safe gate's init: ``A = 1`` (``A_log = 0``), as fla's KDA layer with
    #: ``safe_gate`` (see :attr:`init_a_range`)
    SAFE_GATE_A_RANGE: tuple[float, float] = (1.0, 1.0)

    @property
    def init_a_range(self) -> tuple[float, float]:
        """The range ``A`` is drawn from at init, by gate form.

        Release gate ``g = -A * softplus(f + dt_bias)``: :attr:`A_RANGE` (Mamba's ``U[1, 16]``),
        so at init (``f ~ 0``) ``g = -A * dt`` spans ``[-1.6, -1e-3]``.

        Safe gate ``g = lower_bound * sigmoid(A * (f + dt_bias))``: :attr:`SAFE_GATE_A_RANGE`
        (``A = 1``, fla's choice).  ``dt_bias = softplus^-1(dt)`` lies in ``[-6.9, -2.25]``;
        scaled by ``A`` up to 16 the sigmoid's argument would reach ``-110`` (at the median
        ``A = 8.5``, ``dt = 0.01``: ``-39``, ``sigmoid = 1e-17``), so most channels would start
        with ``g ~ 0`` (no forgetting: ``exp(g) == 1`` in fp32) and a vanishing gradient
        through the saturated sigmoid (``tests/test_safe_gate_init.py``).  With ``A = 1``, ``sigmoid(dt_bias) ~ dt``, so
        ``g ~ lower_bound * dt``: log-uniform like Mamba's, in ``[-0.48, -0.005]`` for
        ``lower_bound = -5`` (per-token decay ``exp(g)`` in ``[0.62, 0.995]``), with the full
        sigmoid slope.
        """
        if self.config.kda_gate_lower_bound is None:
            return self.A_RANGE
        return self.SAFE_GATE_A_RANGE

    @torch.no_grad()
    def reset_gate_parameters(
        self,
        a_range: tuple[float, float] | None = None,
        dt_range: tuple[float, float] = DT_RANGE,
    ) -> None:
        """Mamba-style decay init: ``A ~ U[a_range]`` (stored as ``log A``; default
        :attr:`init_a_range`: ``U[1, 16]`` for the release gate, ``A = 1`` for the safe gate) and
        ``dt_bias`` the softplus-inverse of ``dt`` drawn log-uniformly from ``dt_range``
        (floored at 1e-4)."""
        if self.A_log.device.type == "meta":
            return
        if a_range is None:
            a_range = self.init_a_range
        a = torch.empty_like(self.A_log).uniform_(*a_range)
        a_log, dt_bias = self.gate_values(a, torch.rand_like(self.dt_bias), dt_range)
        self.A_log.copy_(a_log)
        self.dt_bias.copy_(dt_bias)

    @staticmethod
    def gate_values(
        a: torch.Tensor, u_dt: torch.Tensor, dt_range: tuple[float, float] = DT_RANGE
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_log, dt_bias)`` of :meth:`reset_gate_parameters` from ``A`` (drawn in ``a_range``)
        and ``U[0, 1)`` draws ``u_dt`` of ``dt_bias``'s shape (elementwise, so a sharded init can
        pass the draws of its own shard)."""
        lo, hi = math.log(dt_range[0]), math.log(dt_range[1])
        dt = (u_dt * (hi - lo) + lo).exp().clamp(min=1e-4)
        return a.log(), dt + torch.log(-torch.expm1(-dt))  # softplus(dt_bias) == dt

    # ----------------------------------------------------------------- pieces
    def decay(self, x: torch.Tensor) -> torch.Tensor:
        """Log-space per-channel decay ``g: [B, T, H, K]`` (fp32, ``<= 0``) for ``x: [B, T, D]``:
        :func:`kimi_linear.ops.gate.kda_gate` of ``f_b_proj(f_a_proj(x))``."""
        f = self.f_b_proj(self.f_a_proj(x))
        if self.gate_mode == "channel":
            f = rearrange(f, "b t (h k) -> b t h k", k=self.head_dim)
        else:
            f = f.unsqueeze(-1)  # [B, T, H, 1]
        # the release gate or the safe gate, per config.kda_gate_lower_bound (ops/gate.py)
        g = kda_gate(f, self.A_log, self.dt_bias, self.config.kda_gate_lower_bound)
        return g.expand(*g.shape[:-1], self.head_dim).contiguous()

    def _check_inputs(self, x: torch.Tensor, cache: KDALayerCache | None) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, T, hidden_size={self.hidden_size}], got {shape}")
        if x.shape[1] == 0:
            raise ValueError("x must hold at least one token (T > 0)")
        check_features(x, self.hidden_size, self.q_proj.weight, "KimiDeltaAttention")
        if cache is None:
            return
        if not isinstance(cache, KDALayerCache):
            raise ValueError(f"cache must be a KDALayerCache or None, got {type(cache).__name__}")
        B, H, HV, K = x.shape[0], self.num_heads, self.num_v_heads, self.head_dim
        expected = {
            "state": (B, HV, K, K),
            "conv_q": (B, self.conv_size - 1, H * K),
            "conv_k": (B, self.conv_size - 1, H * K),
            "conv_v": (B, self.conv_size - 1, HV * K),
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
    def forward(
        self,
        x: torch.Tensor,
        cache: KDALayerCache | None = None,
        cu_seqlens: torch.Tensor | PackedDocuments | None = None,
        attention_mask: torch.Tensor | None = None,
        cp: Any = None,
    ) -> torch.Tensor:
        """Mix tokens of ``x: [B, T, D]``; returns ``[B, T, D]``.

        With ``cache`` the block continues the sequences held in it (any ``T``: decode,
        prefill or chunked prefill) and the cache's conv tails and fp32 state are replaced by
        those after this block.

        Args:
            cu_seqlens: packed documents ``x [1, N]`` with offsets ``[0, ..., N]`` (int32 /
                int64): the recurrent state and the short convolutions restart at every
                document start (the backend's varlen path). No cache.
            attention_mask: ``[B, T]`` bool, False at left pads: pads write nothing (their conv
                inputs are zeroed, their decay is 1 and their step size 0), so the state and
                the conv tails after them are those of the real tokens alone. Pads must come
                before every real token of their row (left padding), across cached blocks too.
            cp: context parallelism (:class:`kimi_linear.context_parallel.ContextParallel`):
                ``x`` is this rank's shard; the conv inputs before it and the KDA start state
                come from the CP group. No cache, ``cu_seqlens`` or mask (``cp`` holds the
                layout).
        """
        self._check_inputs(x, cache)
        if cp is not None and any(t is not None for t in (cache, cu_seqlens, attention_mask)):
            raise ValueError(
                "context parallelism (cp) cannot be combined with a cache, cu_seqlens or an "
                "attention_mask (the cp object holds the layout)"
            )
        T, K = x.shape[1], self.head_dim
        if cp is not None and self.num_v_heads != self.num_heads:
            raise ValueError(
                "context parallelism (cp) does not support GVA (kda_num_v_heads != "
                "kda_num_heads) yet"
            )
        positions = offsets = None
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens (packed documents) cannot continue a cache")
            # checked once per model forward (a PackedDocuments passes through); its host
            # offsets go down to the ops, so no layer reads cu_seqlens back from the device
            packed = packed_documents(cu_seqlens, x.shape[0], T, x.device)
            positions, cu_seqlens = packed.positions, packed.cu_seqlens
            if not torch.compiler.is_compiling():  # compiled: the custom op reads the tensor
                offsets = packed.offsets
        if attention_mask is not None:
            if (
                not isinstance(attention_mask, torch.Tensor)
                or attention_mask.dtype != torch.bool
                or tuple(attention_mask.shape) != tuple(x.shape[:2])
                or attention_mask.device != x.device
            ):
                raise ValueError(
                    f"attention_mask must be a bool tensor [B, T] = {list(x.shape[:2])} on "
                    f"{x.device} (False at left pads), got {attention_mask!r}"
                )
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens and attention_mask cannot be combined")

        projected = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]
        if attention_mask is not None:  # pads feed zeros to the convolutions
            keep = attention_mask[..., None].to(x.dtype)
            projected = [p * keep for p in projected]
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        if cp is not None:  # halo exchange: the last conv inputs of the ranks before
            q, k, v = cp.causal_conv1d(projected, [c.weight for c in convs])
        elif positions is not None:
            q, k, v = (
                causal_conv1d_packed(p, c.weight, positions) for p, c in zip(projected, convs)
            )
        else:
            tails = (
                (None, None, None) if cache is None else (cache.conv_q, cache.conv_k, cache.conv_v)
            )
            (q, tail_q), (k, tail_k), (v, tail_v) = (
                causal_conv1d(p, c.weight, t) for p, c, t in zip(projected, convs, tails)
            )
        # q, k: [B, T, H, K]; v: [B, T, HV, K] (GVA: HV = G * H)
        q, k, v = (rearrange(F.silu(t), "b t (h d) -> b t h d", d=K) for t in (q, k, v))
        q, k = l2_normalize(q), l2_normalize(k)
        g = self.decay(x)
        beta = torch.sigmoid(self.b_proj(x))
        if attention_mask is not None:  # pads neither decay nor write the state
            g = g.masked_fill(~attention_mask[..., None, None], 0.0)
            beta = beta.masked_fill(~attention_mask[..., None], 0.0)

        state = None if cache is None else cache.state
        if cp is not None:  # the true start state from the CP group's shard transitions
            new_state = None
            o = cp.kda(
                q,
                k,
                v,
                g,
                beta,
                backend=self._backend_for(q.device),
                chunk_size=self.chunk_size,
                gate_lower_bound=self.config.kda_gate_lower_bound,
            )
        else:
            o, new_state = self._mix(q, k, v, g, beta, state, cu_seqlens, offsets)

        if cache is not None:
            cache.conv_q = tail_q.to(cache.conv_q.dtype)
            cache.conv_k = tail_k.to(cache.conv_k.dtype)
            cache.conv_v = tail_v.to(cache.conv_v.dtype)
            if new_state is None:
                raise RuntimeError(f"KDA backend {self.backend!r} returned no final state")
            cache.state = new_state if new_state.dtype == torch.float32 else new_state.float()

        gate = rearrange(self.g_b_proj(self.g_a_proj(x)), "b t (h d) -> b t h d", d=K)
        o = self.o_norm(o.to(x.dtype)) * torch.sigmoid(gate)
        return self.o_proj(rearrange(o, "b t h d -> b t (h d)"))

    def _mix(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        state: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None = None,
        offsets: tuple[int, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the recurrence through the layer's backend.

        ``state`` is the fp32 ``[N, H, K, V]`` cache state or ``None`` (then no final state is
        returned); ``cu_seqlens`` the ``[N + 1]`` offsets of packed sequences (``B == 1``) or
        ``None``, ``offsets`` the same on the host (no device read in the ops). Single-token steps take the decode entry point (fused, state updated in place
        where the backend can), everything else the chunked one.
        """
        want_state = state is not None
        if q.shape[1] == 1 and cu_seqlens is None:
            return dispatch_decode_kda(
                q,
                k,
                v,
                g,
                beta,
                backend=self._backend_for(q.device),
                initial_state=state,
                output_final_state=want_state,
                inplace_state=want_state,
            )
        return dispatch_chunk_kda(
            q,
            k,
            v,
            g,
            beta,
            backend=self._backend_for(q.device),
            initial_state=state,
            output_final_state=want_state,
            cu_seqlens=cu_seqlens,
            cu_seqlens_cpu=offsets,
            chunk_size=self.chunk_size,
            # the safe gate's bound (None for the release gate): the kernels' fast path
            gate_lower_bound=self.config.kda_gate_lower_bound,
        )

    def extra_repr(self) -> str:
        return (
            f"layer_idx={self.layer_idx}, heads={self.num_heads}, v_heads={self.num_v_heads}, "
            f"head_dim={self.head_dim}, "
            f"conv_size={self.conv_size}, gate={self.gate_mode!r}, backend={self.backend!r}"
        )
