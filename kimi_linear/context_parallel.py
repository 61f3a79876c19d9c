"""Context parallelism (CP): one sequence split along T over the ranks of a process group.

Each CP rank holds a contiguous shard of every row (or of a packed row of documents) and runs
the whole model on it; the token mixers exchange what crosses the shard borders through
``torch.distributed`` collectives of the CP group (the ``cp`` dimension of a device mesh):

* **KDA** (:meth:`ContextParallel.kda`). The recurrence is affine in its state: over a shard,
  ``S_end = M @ S_start + H`` per head with ``M [K, K]`` and ``H [K, V]``.  Each rank runs its
  shard once, from a zero state, with the value channels widened by ``K`` identity-basis
  columns: values ``[v | 0]`` and initial state ``[0 | I]`` (through the backends' existing
  ``initial_state`` / ``output_final_state`` arguments, so every backend works).  The final
  state is ``[H | M]`` and the output ``[o_0 | o_q]`` with ``o_0`` the zero-state output and
  ``o_q[t] = scale * M_t^T q_t``.  One all-gather exchanges ``(M, H)``; each rank folds the
  transitions of the ranks before it in fp32 (``S <- M_j S + H_j``; float64 for float64
  inputs) to its true start state ``S_0`` and outputs ``o = o_0 + o_q @ S_0``.  The backward
  mirrors it: autograd runs through the fold, and the all-gather's backward reduce-scatters
  (sums) the gradients of ``(M, H)`` back to their owners.  Cost per rank: one pass with
  ``V + K`` value channels instead of ``V`` (``< 2x`` the KDA mixing work for ``K = V``: the
  within-chunk products shared by both halves are computed once), a fold of ``O(CP K^2 V)`` per
  head, one ``[T, K] x [K, V]`` product per head, and ``CP (K^2 + K V)`` floats per head
  gathered.  Rank 0 and shards that start a document skip the identity columns.
* **Short convolutions** (:meth:`ContextParallel.causal_conv1d`): every rank gets the last
  ``conv_size - 1`` inputs before its shard (from the ranks before it, also when a shard is
  shorter than that); taps across a document start are zero.
* **MLA** (:meth:`ContextParallel.mla`): the compressed latent and rope key (``kv_lora_rank +
  qk_rope_head_dim`` values per token) are all-gathered; each rank attends its own queries
  causally over the gathered keys (within their documents), RoPE at global positions; the
  gradients of the latents reduce-scatter back.
* **Loss** (:func:`context_parallel_loss`): per token as before; the scored-token count and the
  loss are summed over the CP group.  The QK-Clip max logits and the MoE expert loads are
  already reduced over the default (world) group by MuonClip / ``KimiMoE.update_bias``, which
  contains every CP group.

Documents (``cu_seqlens`` of the global row) may cross shard borders: a document starting
inside shard ``r`` cuts every earlier shard off from ``r``'s tokens after that start (its
transition ``M`` is 0), and one starting exactly at a border gives that shard a zero start.

Shards: ``T`` tokens over ``P`` ranks, rank ``r`` holds ``T // P + (r < T % P)`` contiguous tokens
(:func:`shard_bounds`; ``T >= P``).  The layers see a :class:`ContextParallel` through an
optional ``cp`` argument and nothing else of the parallelism.

Legend: ``B`` batch, ``T`` tokens (global) / ``T_r`` (this rank's shard), ``H`` heads, ``K`` key
dim, ``V`` value dim, ``P`` the CP degree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange

from kimi_linear.backends import dispatch_chunk_kda
from kimi_linear.layers.kda import causal_conv1d_packed
from kimi_linear.layers.rope import apply_rotary
from kimi_linear.packing import check_cu_seqlens, document_positions

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from kimi_linear.layers.mla import MLAttention
    from kimi_linear.model import KimiLinearForCausalLM

__all__ = [
    "CPBatch",
    "ContextParallel",
    "all_gather_autograd",
    "context_parallel_loss",
    "fold_transitions",
    "kda_shard_transition",
    "shard_batch",
    "shard_bounds",
]


# ---------------------------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------------------------
def shard_bounds(seq_len: int, size: int) -> list[tuple[int, int]]:
    """``[(start, end)]`` of the ``size`` contiguous shards of ``seq_len`` tokens: the first
    ``seq_len % size`` shards hold one token more.

    Raises:
        ValueError: ``size < 1`` or a sequence shorter than the CP degree (an empty shard).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"the context-parallel degree must be an int >= 1, got {size!r}")
    if seq_len < size:
        raise ValueError(
            f"sequence length {seq_len} is shorter than the context-parallel degree {size}: "
            "every CP rank needs at least one token"
        )
    base, extra = divmod(seq_len, size)
    bounds, start = [], 0
    for r in range(size):
        end = start + base + (r < extra)
        bounds.append((start, end))
        start = end
    return bounds


# ---------------------------------------------------------------------------------------------
# the collective
# ---------------------------------------------------------------------------------------------
# torch >= 2.13 names them *_single (the *_tensor names are deprecated there); older: *_tensor
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """``x [*]`` on every rank -> ``[P, *]`` stacked in rank order; backward: reduce-scatter
    (sum) of the stacked gradient, so each rank gets the sum over ranks of its slice's
    gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        size = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty(size * x.numel())
        _ALL_GATHER(out, x.reshape(-1), group=group)
        return out.view(size, *x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        out = grad.new_empty(grad.shape[1:])
        _REDUCE_SCATTER(out.view(-1), grad.view(-1), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def _joined(x: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
    """``x`` with a zero-valued dependence on ``gathered``, so that every rank runs the
    gather's backward (a collective) even where its own result does not use the gathered
    values; the order of the collectives in the backward pass is then the same on all ranks."""
    if not gathered.requires_grad:
        return x
    return x + (gathered.sum() * 0).to(x.dtype)


def all_gather_autograd(x: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable all-gather over ``group``: ``x`` (same shape on every rank) -> ``[P, *x]``.

    The gradient of ``x`` is the sum over ranks of the gradients of their copy of ``x``
    (one reduce-scatter), i.e. correct when the total loss is the sum of the ranks' losses.
    """
    return _AllGather.apply(x, group)


# ---------------------------------------------------------------------------------------------
# KDA: the shard transition and the fold
# ---------------------------------------------------------------------------------------------
def kda_shard_transition(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    carry: bool,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "torch",
    chunk_size: int = 64,
    gate_lower_bound: float | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One shard of KDA from a zero state, with its affine transition.

    Args:
        q, k, g: ``[B, T_r, H, K]``; v ``[B, T_r, H, V]``; beta ``[B, T_r, H]`` (as
            :func:`~kimi_linear.backends.dispatch_chunk_kda`).
        carry: whether the shard's first token continues the sequence of the shard before it
            (False on rank 0 and when a document starts at the shard's first token).
        cu_seqlens: ``[N + 1]`` offsets of the shard's segments (packed rows, ``B == 1``): the
            first segment continues the previous shard (if ``carry``), the others start a
            document.

    Returns:
        ``(o_0, o_q, M, H)``: the output from a zero start state ``[B, T_r, H, V]`` (v's
        dtype), ``o_q [B, T_r, H, K]`` (``scale * M_t^T q_t``: the output's linear part in the
        start state, zero after the first segment; ``None`` when not ``carry``), ``M [B', H, K,
        K]`` and ``H [B', H, K, V]`` (float32, float64 for float64 inputs on the torch backend;
        ``B' = 1`` for packed rows) with ``S_end = M @ S_start + H``.
    """
    B, _, Hh, K = k.shape
    V = v.shape[-1]
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    common = dict(
        backend=backend,
        scale=scale,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
        gate_lower_bound=gate_lower_bound,
    )
    if not carry:  # nothing before this shard reaches it: M = 0, no identity columns
        o0, final = dispatch_chunk_kda(q, k, v, g, beta, **common)
        H = (final[-1:] if cu_seqlens is not None else final).to(state_dtype)
        return o0, None, H.new_zeros(*H.shape[:-1], K), H
    v_ext = torch.cat([v, v.new_zeros(*v.shape[:-1], K)], dim=-1)  # [B, T_r, H, V + K]
    h0 = torch.zeros(n_seq, Hh, K, V + K, dtype=state_dtype, device=v.device)
    eye = torch.eye(K, dtype=state_dtype, device=v.device)
    if cu_seqlens is None:
        h0[..., V:] = eye
    else:
        h0[0, :, :, V:] = eye  # only the first segment continues the previous shard
    o, final = dispatch_chunk_kda(q, k, v_ext, g, beta, initial_state=h0, **common)
    last = final[-1:] if cu_seqlens is not None else final
    return o[..., :V], o[..., V:], last[..., V:].to(state_dtype), last[..., :V].to(state_dtype)


def fold_transitions(M: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Start states of every shard from the shards' transitions.

    Args:
        M: ``[P, ..., K, K]`` and H ``[P, ..., K, V]``: shard ``j`` maps its start state ``S`` to
            ``M[j] @ S + H[j]``.

    Returns:
        ``[P, ..., K, V]``: the state before each shard (zero before shard 0), in the inputs'
        dtype (pass float32 or float64: the fold loses accuracy in 16-bit).
    """
    starts = [torch.zeros_like(H[0])]
    for j in range(M.shape[0] - 1):
        starts.append(M[j] @ starts[-1] + H[j])
    return torch.stack(starts)


# ---------------------------------------------------------------------------------------------
# the context object the layers receive
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ContextParallel:
    """The CP layout of one forward on this rank, passed to the layers as ``cp``.

    Build it with :meth:`build` (or :func:`shard_batch`) from the global sequence length and
    document offsets, which every rank of the group must pass alike.

    Attributes:
        group: the CP process group (``None``: the default group).
        rank, size: this rank's index in the group and the CP degree ``P``.
        bounds: ``(start, end)`` of every rank's shard (:func:`shard_bounds`).
        seq_len: ``T``, the global length.
        offsets: the global document offsets (packed row) or ``None`` (every row one sequence).
        positions: ``[T_r]`` long, the RoPE / convolution position of each local token: inside
            its document (packed) or in its row.
        doc_ids: ``[T]`` long document number of every global token (packed), else ``None``.
        local_cu_seqlens: ``[n + 1]`` int32 offsets of the shard's segments (packed), else
            ``None``.
        carry: whether the shard's first token continues the previous shard's sequence.
    """

    group: ProcessGroup | None
    rank: int
    size: int
    bounds: tuple[tuple[int, int], ...]
    seq_len: int
    offsets: tuple[int, ...] | None
    positions: torch.Tensor
    doc_ids: torch.Tensor | None
    local_cu_seqlens: torch.Tensor | None
    carry: bool
    _key_start: int = field(default=0)

    @classmethod
    def build(
        cls,
        seq_len: int,
        cu_seqlens: torch.Tensor | None = None,
        group: ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        *,
        rank: int | None = None,
        size: int | None = None,
    ) -> ContextParallel:
        """The layout of this rank (``rank`` / ``size`` default to the group's).

        Args:
            seq_len: ``T`` of the global rows.
            cu_seqlens: global packed-document offsets ``[0, ..., T]`` (``B == 1``), or None.

        Raises:
            ValueError: ``T`` shorter than the CP degree, bad ``cu_seqlens``.
        """
        if rank is None or size is None:
            if not dist.is_available() or not dist.is_initialized():
                raise ValueError(
                    "context parallelism needs an initialised torch.distributed process group "
                    "(or explicit rank and size)"
                )
            rank, size = dist.get_rank(group), dist.get_world_size(group)
        bounds = tuple(shard_bounds(seq_len, size))
        start, end = bounds[rank]
        device = torch.device(device)
        offsets = doc_ids = local = None
        if cu_seqlens is None:
            positions = torch.arange(start, end, device=device)
            carry = rank > 0
            key_start = 0
        else:
            offsets = tuple(check_cu_seqlens(cu_seqlens, 1, seq_len, cu_seqlens.device))
            pos_all = document_positions(offsets, device)
            positions = pos_all[start:end]
            doc_ids = (pos_all == 0).cumsum(0) - 1
            inner = sorted({o - start for o in offsets if start < o < end})
            local = torch.tensor([0, *inner, end - start], dtype=torch.int32, device=device)
            carry = rank > 0 and start not in offsets
            key_start = max(o for o in offsets if o <= start)  # the first local document
        return cls(
            group, rank, size, bounds, seq_len, offsets, positions, doc_ids, local, carry, key_start
        )

    @property
    def start(self) -> int:
        return self.bounds[self.rank][0]

    @property
    def end(self) -> int:
        return self.bounds[self.rank][1]

    # --------------------------------------------------------------- gather helpers
    def gather_sequence(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        """All-gather the shards ``x [B, T_r, *]`` into ``[B, upto, *]`` (default ``T``):
        shards are padded to the longest for the collective and cut back. Differentiable."""
        width = max(e - s for s, e in self.bounds)
        pad = width - x.shape[1]
        if pad:
            x = torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
        parts = all_gather_autograd(x, self.group)  # [P, B, width, *]
        upto = self.seq_len if upto is None else upto
        pieces = [parts[j, :, : e - s] for j, (s, e) in enumerate(self.bounds) if s < upto]
        return torch.cat(pieces, dim=1)[:, :upto]

    # --------------------------------------------------------------- layer pieces
    def causal_conv1d(
        self, xs: list[torch.Tensor], weights: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Causal depthwise convolutions of this shard's inputs ``xs[i] [B, T_r, D_i]``
        (``weights[i] [D_i, 1, W]``), continuing the previous ranks' inputs: the last ``W - 1``
        inputs of every rank are gathered in one collective (so a shard shorter than ``W - 1``
        is fine) and taps across a document start (or the row's start) are zero.
        Returns the pre-activation outputs ``[B, T_r, D_i]``."""
        W = weights[0].shape[-1]
        if W == 1:
            return [causal_conv1d_packed(x, w, self.positions) for x, w in zip(xs, weights)]
        x = torch.cat(xs, dim=-1)
        B, T, D = x.shape
        tail = x[:, max(0, T - (W - 1)) :]
        if tail.shape[1] < W - 1:
            tail = torch.cat([x.new_zeros(B, W - 1 - tail.shape[1], D), tail], dim=1)
        tails = all_gather_autograd(tail, self.group)  # [P, B, W - 1, D]
        before = [
            tails[j, :, W - 1 - min(W - 1, e - s) :]
            for j, (s, e) in enumerate(self.bounds[: self.rank])
        ]
        halo = torch.cat([x.new_zeros(B, W - 1, D), *before], dim=1)[:, -(W - 1) :]
        halo = _joined(halo, tails)  # rank 0 uses no tail; the gather's backward still runs
        pos = torch.cat([self.positions.new_zeros(W - 1), self.positions])
        out = []
        for xi, hi, w in zip(xs, halo.split([t.shape[-1] for t in xs], dim=-1), weights):
            out.append(causal_conv1d_packed(torch.cat([hi, xi], dim=1), w, pos)[:, W - 1 :])
        return out

    def kda(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        beta: torch.Tensor,
        *,
        backend: str = "torch",
        chunk_size: int = 64,
        gate_lower_bound: float | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        """KDA of this shard with the true start state (see the module docstring).

        Arguments as :func:`~kimi_linear.backends.dispatch_chunk_kda` (``[B, T_r, ...]``; packed
        rows come from :attr:`local_cu_seqlens`). Returns ``o [B, T_r, H, V]`` in v's dtype.
        """
        o0, oq, M, H = kda_shard_transition(
            q,
            k,
            v,
            g,
            beta,
            carry=self.carry,
            cu_seqlens=self.local_cu_seqlens,
            backend=backend,
            chunk_size=chunk_size,
            gate_lower_bound=gate_lower_bound,
            scale=scale,
        )
        K = M.shape[-1]
        MH = all_gather_autograd(torch.cat([M, H], dim=-1), self.group)  # [P, B', H, K, K + V]
        if oq is None:  # nothing before reaches this shard; the gather's backward still runs
            return _joined(o0, MH)
        r = self.rank + 1  # the transitions up to this shard (its own is not used)
        s0 = fold_transitions(MH[:r, ..., :K], MH[:r, ..., K:])[-1]  # [B', H, K, V]
        corr = torch.einsum("bthk,bhkv->bthv", oq.to(s0.dtype), s0)
        return (o0.to(s0.dtype) + corr).to(o0.dtype)

    def mla(self, layer: MLAttention, x: torch.Tensor) -> torch.Tensor:
        """The MLA layer on this shard ``x [B, T_r, D]`` over the gathered latents of the shards
        up to this one (from the first local document's start): causal, within documents,
        RoPE at the tokens' positions. Returns ``[B, T_r, D]``; records max logits as the
        layer does (training, ``record_max_logits``)."""
        from kimi_linear.layers.mla import _sdpa_accepts_mixed_v_dim

        Hh = layer.num_heads
        q = layer._project_q(x)  # [B, T_r, H, nope + rope]
        q_nope, q_rope = q.split([layer.nope_dim, layer.rope_dim], dim=-1)
        latent, k_rope = layer.kv_a_proj_with_mqa(x).split(
            [layer.kv_lora_rank, layer.rope_dim], dim=-1
        )
        latent = layer.kv_a_layernorm(latent)
        if layer.rotary is not None:
            cos, sin = layer.rotary(self.positions)
            q_rope = apply_rotary(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2))
            k_rope = apply_rotary(k_rope, cos, sin)
        kv = self.gather_sequence(torch.cat([latent, k_rope], dim=-1), upto=self.end)
        kv = kv[:, self._key_start :]  # keys of the local documents only
        latent_all, k_rope_all = kv.split([layer.kv_lora_rank, layer.rope_dim], dim=-1)
        kvh = rearrange(layer.kv_b_proj(latent_all), "b l (h d) -> b h l d", h=Hh)
        k_nope, v = kvh.split([layer.nope_dim, layer.v_head_dim], dim=-1)
        k_pe = rearrange(k_rope_all, "b l p -> b 1 l p").expand(-1, Hh, -1, -1)
        k = torch.cat([k_nope, k_pe], dim=-1)  # [B, H, L, nope + rope]
        qh = rearrange(torch.cat([q_nope, q_rope], dim=-1), "b t h d -> b h t d")
        q_idx = torch.arange(self.start, self.end, device=x.device)
        k_idx = torch.arange(self._key_start, self.end, device=x.device)
        mask = k_idx[None, :] <= q_idx[:, None]  # [T_r, L]
        if self.doc_ids is not None:
            mask = mask & (self.doc_ids[q_idx][:, None] == self.doc_ids[k_idx][None, :])
        if layer.record_max_logits and layer.training:
            with torch.no_grad():
                rows = max(1, (1 << 24) // max(1, qh.shape[0] * Hh * k.shape[2]))
                best = torch.full((Hh,), float("-inf"), device=x.device)
                for a in range(0, qh.shape[2], rows):
                    s = torch.matmul(qh[:, :, a : a + rows], k.transpose(-1, -2)).float()
                    s = (s * layer.softmax_scale).masked_fill(~mask[a : a + rows], float("-inf"))
                    best = torch.maximum(best, s.amax(dim=(0, 2, 3)))
                layer._update_max_logits(best)
        if v.shape[-1] != k.shape[-1] and not _sdpa_accepts_mixed_v_dim(x.device, qh.dtype):
            v = F.pad(v, (0, k.shape[-1] - v.shape[-1]))
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=layer.softmax_scale)
        o = rearrange(o[..., : layer.v_head_dim], "b h t d -> b t (h d)")
        return layer.o_proj(o)


# ---------------------------------------------------------------------------------------------
# data and loss
# ---------------------------------------------------------------------------------------------
@dataclass
class CPBatch:
    """This rank's part of a global batch: ``input_ids [B, T_r]``, ``targets [B, T_r]`` (the
    next-token label of every local position, ``-100`` where nothing is scored: after the
    row's last token, before a document start, ignored labels) and the layout ``cp``."""

    input_ids: torch.Tensor
    targets: torch.Tensor | None
    cp: ContextParallel


def shard_batch(
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
    *,
    rank: int | None = None,
    size: int | None = None,
) -> CPBatch:
    """Cut a global batch (the same on every rank of the CP group) into this rank's shard.

    The targets are shifted before cutting, so the label of a shard's last token (the next
    shard's first) stays with it.

    Raises:
        ValueError: ``T`` shorter than the CP degree, bad ``cu_seqlens`` / ``labels``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs the documents packed in one row, got batch size {B}")
    cp = ContextParallel.build(T, cu_seqlens, group, input_ids.device, rank=rank, size=size)
    targets = None
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(labels.shape)}"
            )
        targets = torch.cat([labels[:, 1:], labels.new_full((B, 1), -100)], dim=1)
        if cp.offsets is not None:
            starts = [o for o in cp.offsets[1:-1] if 0 < o < T]
            if starts:
                targets[:, torch.tensor(starts, device=labels.device) - 1] = -100
        targets = targets[:, cp.start : cp.end]
    return CPBatch(input_ids[:, cp.start : cp.end], targets, cp)


def context_parallel_loss(
    model: KimiLinearForCausalLM, batch: CPBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, logits)`` of this rank's shard: logits ``[B, T_r, V]``; the loss's value is the
    global mean next-token cross-entropy (summed over the CP group), its gradient this rank's
    share: the parameter gradients summed over the CP ranks are the gradients of the global
    loss (what a strategy's gradient reduction must do: sum over ``cp``, mean over ``dp``)."""
    if batch.targets is None:
        raise ValueError("context_parallel_loss needs targets (shard_batch with labels)")
    cp = batch.cp
    logits = model(batch.input_ids, cp=cp)  # through the root module (FSDP's hooks)
    t = batch.targets
    count = (t != -100).sum().to(torch.float32)
    dist.all_reduce(count, group=cp.group)
    local = F.cross_entropy(
        logits.flatten(0, 1).float(), t.flatten(), ignore_index=-100, reduction="sum"
    ) / count.clamp(min=1)
    total = local.detach().clone()
    dist.all_reduce(total, group=cp.group)
    return local + (total - local).detach(), logits
