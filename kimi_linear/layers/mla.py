"""Multi-head latent attention (MLA), DeepSeek-V2/V3 style, as used by Kimi Linear and Kimi K2.

One job: the MLA layer (projections, prefill over packed or padded rows, and decode over its
latent cache, plain or absorbed); the file is long because those three paths share one module.

Per token the layer compresses the hidden state into one shared latent ``c_kv``
(``kv_lora_rank``) plus one shared rope key (``qk_rope_head_dim``); that pair is all a decode
cache keeps.  Per-head keys and values come from the up-projection ``kv_b_proj``::

    q          = q_proj(x)                         (or q_b_proj(RMSNorm(q_a_proj(x))))
    [c, k_pe]  = kv_a_proj_with_mqa(x)             c: [B, T, R], k_pe: [B, T, P]
    c          = kv_a_layernorm(c)                 (the cached latent)
    [k_nope|v] = kv_b_proj(c)                      per head: [nope | v]
    k_h        = [k_nope_h | k_pe]                 the rope key is shared by all heads
    o          = o_proj(softmax(scale * q_h k_h^T + causal mask) v_h)

With ``config.mla_use_nope`` (Kimi Linear's default) the rope slices are used as they are; with
it False they are rotated (:mod:`kimi_linear.layers.rope`) at positions
``position_offset + arange(T)``.

Several sequences per call (:mod:`kimi_linear.packing`):

* ``cu_seqlens`` (packed documents in one row): block-diagonal causal attention, one SDPA call
  per document (``O(sum l_i^2)`` work and memory, no ``N x N`` mask); RoPE positions restart.
  While ``torch.compile`` traces, one SDPA call with an ``N x N`` block-diagonal mask instead
  (no Python loop over the documents, so no recompilation per document count).
* ``pad_lengths`` (left-padded rows): keys at a row's pads are masked out for its real tokens
  (a pad query sees only itself, so every softmax row is finite), and positions count from the
  row's first real token; decode over the cache keeps masking them.

Two equivalent computations:

* **plain**: materialise per-head K/V from the latents and call
  ``scaled_dot_product_attention`` (prefill; continuing a cache with a block of tokens);
* **absorbed** (decode): fold ``kv_b_proj``'s key rows into the query
  (``q_nope W_uk -> latent space``) and its value rows into the output, so scores and the
  attention-weighted sum run over the cached latents directly and per-head K/V of the cached
  tokens are never built.

Non-finite tokens stay causal (as in the KDA ops, :mod:`kimi_linear.ops.isolation`): a NaN /
inf in the latent or rope key of token ``s`` makes the outputs of the queries of its row (of its
document, when packed) at and after ``s`` NaN, a NaN query only its own output; earlier tokens,
other documents and rows are exact. Attention would otherwise spread it backwards: a masked key
still enters ``probs @ v`` with probability 0, and ``0 * NaN = NaN``. So when a call holds a
query that must not see some key (``T > 1``, or packed documents), the queries and keys are
cleaned (non-finite values replaced by 0) and the poisoned outputs set to NaN, with device ops
only (no sync, CUDA-graph capturable; :func:`poisoned_queries`). A single decode query
(``T == 1``) sees every real key of its row, so a NaN in the cache makes its output NaN by
itself (the softmax row is NaN) and nothing is added; left pads, the keys it must not see, are
stored in the cache cleaned. Context parallelism (``cp``) does not isolate yet.
``KIMI_LINEAR_ISOLATE_NONFINITE=0`` turns this off, as for the KDA ops.

Weight layout (release names; what MuonClip's per-head rescaling relies on): query rows of head
``h`` are ``[h * (nope + rope), (h + 1) * (nope + rope))`` ordered ``[nope | rope]``;
``kv_b_proj`` rows of head ``h`` are ``[h * (nope + v), (h + 1) * (nope + v))`` ordered
``[k_nope | v]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from kimi_linear.cache import LatentKVCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.checks import check_features
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.layers.rope import RotaryEmbedding, apply_rotary
from kimi_linear.ops.isolation import isolation_enabled, nonfinite_rows, zero_nonfinite
from kimi_linear.packing import PackedDocuments, packed_documents, padded_positions

#: eps of ``q_a_layernorm`` / ``kv_a_layernorm``: the RMSNorm default 1e-6, not ``rms_norm_eps``,
#: as in the release (Moonshot's ``modeling_kimi.py``), DeepSeek-V3 and transformers.
LATENT_NORM_EPS = 1e-6

# Largest number of fp32 logits materialised at once when measuring max logits in the plain path.
MAX_LOGIT_BLOCK_ELEMENTS = 1 << 24

#: Most attention scores (``B * H * queries * keys``) one SDPA call may hold when PyTorch would
#: run its unfused math kernel (which materialises them), and the bound on the elements of the
#: boolean mask built for one call: beyond it, queries are attended in blocks of
#: :func:`query_block_rows` rows, so prefill memory stays linear in T on every device.
ATTENTION_BLOCK_ELEMENTS = 1 << 24

_MATH_OR_ERROR = (0, -1)  # torch.nn.attention.SDPBackend.MATH / ERROR


def query_block_rows(batch_heads: int, keys: int, block_elements: int | None = None) -> int:
    """Queries per SDPA call so that ``batch_heads * rows * keys <= block_elements`` (default
    :data:`ATTENTION_BLOCK_ELEMENTS`), at least 1."""
    if block_elements is None:
        block_elements = ATTENTION_BLOCK_ELEMENTS
    return max(1, block_elements // max(1, batch_heads * keys))


def _fused_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> bool:
    """Whether ``scaled_dot_product_attention`` runs a fused kernel (flash, memory-efficient,
    cuDNN or a backend's own) for these inputs: those never hold the ``[T, L]`` scores.

    Asks PyTorch's own dispatcher (``torch._fused_sdp_choice``, which honours ``sdpa_kernel``);
    if it cannot answer, the math kernel is assumed (the caller then attends in blocks).
    """
    try:
        choice = torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal)
    except Exception:  # noqa: BLE001 - private API: treat any failure as "not fused"
        return False
    return int(choice) not in _MATH_OR_ERROR


_SDPA_MIXED_V_DIM: dict[tuple[str, torch.dtype], bool] = {}


def _sdpa_accepts_mixed_v_dim(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether SDPA runs with a value head dim different from the query/key head dim here.

    Probed once per (device type, dtype) on tiny tensors; where it raises, callers pad ``v``.
    """
    key = (device.type, dtype)
    if key not in _SDPA_MIXED_V_DIM:
        q = torch.zeros(1, 1, 2, 24, device=device, dtype=dtype)
        v = torch.zeros(1, 1, 2, 16, device=device, dtype=dtype)
        try:
            F.scaled_dot_product_attention(q, q, v, is_causal=True)
            _SDPA_MIXED_V_DIM[key] = True
        except RuntimeError:
            _SDPA_MIXED_V_DIM[key] = False
    return _SDPA_MIXED_V_DIM[key]


def _causal_mask(q_start: int, T: int, L: int, device: torch.device) -> torch.Tensor:
    """Boolean ``[T, L]``: query ``t`` (absolute position ``q_start + t``) may see key ``j``."""
    q_pos = torch.arange(q_start, q_start + T, device=device)
    return torch.arange(L, device=device)[None, :] <= q_pos[:, None]


def _padded_causal_mask(q_start: int, T: int, L: int, pad_lengths: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, T, L]`` for left-padded rows: causal, and keys before ``pad_lengths[b]``
    hidden; a pad query (``q_start + t < pad_lengths[b]``) sees only itself (finite softmax)."""
    device = pad_lengths.device
    q_pos = torch.arange(q_start, q_start + T, device=device)
    k_pos = torch.arange(L, device=device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [T, L]
    real_key = k_pos[None, None, :] >= pad_lengths[:, None, None]  # [B, 1, L]
    itself = k_pos[None, :] == q_pos[:, None]  # [T, L]
    return (causal[None] & real_key) | itself[None]


def poisoned_queries(
    key_bad: torch.Tensor,
    q_bad: torch.Tensor,
    q_start: int = 0,
    positions: torch.Tensor | None = None,
    pad_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which attention outputs a non-finite key or query makes NaN (device ops only, no sync).

    Args:
        key_bad: ``[B, L]`` bool, keys (positions ``arange(L)``) with a non-finite latent or
            rope key.
        q_bad: ``[B, T]`` bool, queries (positions ``q_start + arange(T)``) with a non-finite
            value.
        q_start: position of the first query.
        positions: ``[T]`` long, each token's position inside its packed document
            (``q_start == 0``, ``T == L``), or ``None``.
        pad_lengths: ``[B]`` long left pads (their keys are hidden from real queries; a pad
            query sees only itself), or ``None``.

    Returns:
        ``[B, T]`` bool: the query is non-finite, or some key it may see (causal, same document,
        not a pad) is.
    """
    B, L = key_bad.shape
    T = q_bad.shape[1]
    pos = torch.arange(q_start, q_start + T, device=key_bad.device)
    visible = key_bad
    if pad_lengths is not None:
        visible = key_bad & (torch.arange(L, device=key_bad.device) >= pad_lengths[:, None])
    count = visible.cumsum(dim=1, dtype=torch.int32)  # bad visible keys up to each position
    seen = count.index_select(1, pos)  # [B, T]
    if positions is not None:  # minus those before the document's first token
        before = torch.cat([count.new_zeros(B, 1), count], dim=1)
        seen = seen - before.index_select(1, pos - positions)
    return q_bad | (seen > 0) | key_bad.index_select(1, pos)  # (the last: pad queries)


@torch.no_grad()
def masked_max_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    q_start: int = 0,
    block_elements: int = MAX_LOGIT_BLOCK_ELEMENTS,
    pad_lengths: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-head max of the causal pre-softmax logits ``scale * q k^T``, computed blockwise.

    Args:
        q: ``[B, H, T, D]`` queries at absolute positions ``q_start + arange(T)``.
        k: ``[B, H, L, D]`` keys at positions ``arange(L)``.
        scale: softmax scale (included in the logits).
        q_start: absolute position of the first query.
        block_elements: at most this many logits are held at once (fp32), so the extra memory
            is bounded independently of ``T``; keys a block cannot see are skipped.
        pad_lengths: optional ``[B]`` left pads per row: logits of pad queries and pad keys
            are left out.
        doc_ids: optional ``[L]`` document number of every token (packed documents, with
            ``q_start == 0``, ``T == L``): only logits inside a document count.

    Returns:
        ``[H]`` float32, the max over batch, query positions and visible keys.
    """
    B, H, T, _ = q.shape
    L = k.shape[2]
    rows = max(1, block_elements // max(1, B * H * L))
    out = torch.full((H,), float("-inf"), device=q.device, dtype=torch.float32)
    for s in range(0, T, rows):
        e = min(T, s + rows)
        visible = min(L, q_start + e)  # keys beyond the block's last query are all masked
        logits = torch.matmul(q[:, :, s:e], k[:, :, :visible].transpose(-1, -2)).float() * scale
        mask = _causal_mask(q_start + s, e - s, visible, q.device)
        if pad_lengths is not None:  # real keys only (then pad queries see nothing)
            real_key = torch.arange(visible, device=q.device)[None, :] >= pad_lengths[:, None]
            mask = (mask[None] & real_key[:, None, :])[:, None]  # [B, 1, rows, visible]
        if doc_ids is not None:
            mask = mask & (doc_ids[q_start + s : q_start + e, None] == doc_ids[None, :visible])
        logits = logits.masked_fill(~mask, float("-inf"))
        out = torch.maximum(out, logits.amax(dim=(0, 2, 3)))
    return out


class MLAttention(nn.Module):
    """Multi-head latent attention layer (see the module docstring).

    Args:
        config: model config; uses ``hidden_size``, ``num_attention_heads``, ``q_lora_rank``,
            ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``, ``v_head_dim``,
            ``mla_use_nope``, ``rope_theta`` (the latent norms use :data:`LATENT_NORM_EPS`).
        layer_idx: index of the layer in the model (kept for bookkeeping).

    Attributes:
        record_max_logits: when True, each forward in training mode updates
            :attr:`max_logits` (the QK-Clip statistic; evaluation passes never feed the clip).
            When False (default) no extra work is done.
        max_logits: ``None`` or fp32 ``[H]``: per head, the running max (over calls until
            :meth:`reset_max_logits`) of the pre-softmax logit, scale included, causal mask
            applied, over batch and positions. Detached.
        absorb_max_tokens: with a cache and ``absorb=None``, blocks of at most this many
            tokens take the absorbed path. Default: the FLOP crossover
            ``R (nope + v) / (2R - nope - v)`` per cached token (170 for Kimi-Linear-48B).
    """

    def __init__(self, config: KimiLinearConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        D = config.hidden_size
        H = self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.qk_head_dim = self.nope_dim + self.rope_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = R = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.softmax_scale = config.mla_softmax_scale

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, R + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(R, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(R, H * (self.nope_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, D, bias=False)

        self.use_rope = not config.mla_use_nope and self.rope_dim > 0
        self.rotary = RotaryEmbedding(self.rope_dim, config.rope_theta) if self.use_rope else None

        up = R * (self.nope_dim + self.v_head_dim)
        extra = 2 * R - self.nope_dim - self.v_head_dim
        self.absorb_max_tokens: int = max(1, up // extra) if extra > 0 else 1 << 30

        self.record_max_logits: bool = False
        self.max_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------ QK-Clip statistic
    def reset_max_logits(self) -> None:
        """Forget the running max logits (``max_logits`` becomes None)."""
        self.max_logits = None

    def _update_max_logits(self, step_max: torch.Tensor) -> None:
        step_max = step_max.detach().float()
        if self.max_logits is None:
            self.max_logits = step_max
        else:
            self.max_logits = torch.maximum(self.max_logits.to(step_max.device), step_max)

    # ------------------------------------------------------------------ helpers
    def _check_inputs(
        self,
        x: torch.Tensor,
        cache: LatentKVCache | None,
        position_offset: int,
        cu_seqlens: torch.Tensor | PackedDocuments | None = None,
        pad_lengths: torch.Tensor | None = None,
    ) -> PackedDocuments | None:
        """Validate the inputs; returns the packed documents of ``cu_seqlens`` (or None)."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor [B, T, hidden], got {type(x).__name__}")
        D = self.config.hidden_size
        if x.dim() != 3 or x.shape[-1] != D or x.shape[1] == 0 or x.shape[0] == 0:
            raise ValueError(f"x must be [B, T, hidden={D}] with B, T >= 1, got {tuple(x.shape)}")
        check_features(x, D, self.kv_a_proj_with_mqa.weight, "MLAttention")
        if (
            isinstance(position_offset, bool)
            or not isinstance(position_offset, int)
            or position_offset < 0
        ):
            raise ValueError(f"position_offset must be an int >= 0, got {position_offset!r}")
        if pad_lengths is not None:
            if (
                not isinstance(pad_lengths, torch.Tensor)
                or pad_lengths.dtype != torch.long
                or tuple(pad_lengths.shape) != (x.shape[0],)
                or pad_lengths.device != x.device
            ):
                raise ValueError(
                    f"pad_lengths must be a torch.long tensor [B={x.shape[0]}] on {x.device} "
                    f"(left pads per row), got {pad_lengths!r}"
                )
            if cu_seqlens is not None:
                raise ValueError(
                    "cu_seqlens and pad_lengths cannot be combined (packed rows have no pads)"
                )
        packed = None
        if cu_seqlens is not None:
            if cache is not None or position_offset != 0:
                raise ValueError(
                    "cu_seqlens (packed documents) cannot continue a cache (cache must be None, "
                    "position_offset 0)"
                )
            packed = packed_documents(cu_seqlens, x.shape[0], x.shape[1], x.device)
        if cache is None:
            return packed
        if not isinstance(cache, LatentKVCache):
            raise ValueError(
                f"cache must be a LatentKVCache (kimi_linear.cache) or None, got {type(cache).__name__}"
            )
        expect = (x.shape[0], self.kv_lora_rank, self.rope_dim)
        got = (cache.latent.shape[0], cache.latent.shape[2], cache.k_rope.shape[2])
        if got != expect:
            raise ValueError(
                f"cache must hold (batch, kv_lora_rank, rope_dim) = {expect}, got {got}"
            )
        if cache.latent.device != x.device:
            raise ValueError(f"cache is on {cache.latent.device} but x is on {x.device}")
        if position_offset != cache.length:
            raise ValueError(
                f"position_offset ({position_offset}) must equal the number of cached tokens "
                f"({cache.length}) when a cache is given"
            )
        return packed

    def _project_q(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]`` -> ``q [B, T, H, nope + rope]``."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return rearrange(q, "b t (h d) -> b t h d", h=self.num_heads)

    def _split_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``kv_b_proj.weight`` as ``W_uk [H, nope, R]`` and ``W_uv [H, v, R]``.

        A ``kv_b_proj`` that is not a plain ``nn.Linear`` (a wrapper, e.g. an unmerged LoRA
        adapter, whose ``.weight`` is only the base weight) gives its effective linear map,
        read off its outputs on the ``R`` unit latents (one extra ``[R, R] x [R, H * (nope + v)]``
        product per call)."""
        proj = self.kv_b_proj
        if type(proj) is nn.Linear:
            weight = proj.weight
        else:
            base = next(proj.parameters())
            eye = torch.eye(self.kv_lora_rank, dtype=base.dtype, device=base.device)
            weight = proj(eye).transpose(0, 1)  # [H * (nope + v), R]
        w = rearrange(weight, "(h d) r -> h d r", h=self.num_heads)
        return w[:, : self.nope_dim], w[:, self.nope_dim :]

    def _rotate(
        self,
        q_rope: torch.Tensor,
        k_rope: torch.Tensor,
        position_offset: int,
        packed: PackedDocuments | None = None,
        pad_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q_rope [B, T, H, P]`` and ``k_rope [B, T, P]`` at their positions:
        ``position_offset + arange(T)``, restarting at each document of ``packed``, or per row
        counted from the first real token with ``pad_lengths``."""
        if self.rotary is None:
            return q_rope, k_rope
        T = q_rope.shape[1]
        if packed is not None:
            pos = packed.positions  # [T]
        elif pad_lengths is not None:
            pos = padded_positions(pad_lengths, position_offset, T)  # [B, T]
        else:
            pos = torch.arange(position_offset, position_offset + T, device=q_rope.device)
        cos, sin = self.rotary(pos)  # [T, P / 2] or [B, T, P / 2]
        q_rope = apply_rotary(q_rope, cos.unsqueeze(-2), sin.unsqueeze(-2))
        k_rope = apply_rotary(k_rope, cos, sin)
        return q_rope, k_rope

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        cache: LatentKVCache | None = None,
        position_offset: int = 0,
        absorb: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        pad_lengths: torch.Tensor | None = None,
        cp: Any = None,
    ) -> torch.Tensor:
        """Attend causally over the cached tokens (if any) and this block.

        Args:
            x: ``[B, T, hidden]``.
            cache: the layer's :class:`~kimi_linear.cache.LatentKVCache`; this block's
                normalised latents and (rotated) rope keys are appended to it in place.
            position_offset: absolute position of ``x[:, 0]``; must equal ``cache.length``
                when a cache is given.
            absorb: True: absorbed path (attention over latents, no per-head K/V); False:
                plain SDPA path; None: absorbed iff a cache is given and
                ``T <= absorb_max_tokens``.
            cu_seqlens: packed documents ``x [1, N]`` with offsets ``[0, ..., N]`` (int32 /
                int64): block-diagonal causal attention, positions restart per document.
                No cache.
            pad_lengths: ``[B]`` long, the number of left pads of each row, counted from the
                row's first (cached) token: pad keys are hidden from real queries and positions
                start at the first real token. Pass the same value for every block of a
                cached sequence (cached pads stay masked).
            cp: context parallelism (:class:`kimi_linear.context_parallel.ContextParallel`):
                ``x`` is this rank's shard, attending over the latents gathered from the CP
                group (:meth:`~kimi_linear.context_parallel.ContextParallel.mla`). No cache,
                offset, ``cu_seqlens`` or pads (``cp`` holds the layout).

        Returns:
            ``[B, T, hidden]``; NaN where a non-finite token poisons the output (that token
            and the later ones of its row or document, module docstring), exact elsewhere.
        """
        packed = self._check_inputs(x, cache, position_offset, cu_seqlens, pad_lengths)
        if cp is not None:
            if (
                cache is not None
                or position_offset
                or packed is not None
                or pad_lengths is not None
            ):
                raise ValueError(
                    "context parallelism (cp) cannot be combined with a cache, a position "
                    "offset, cu_seqlens or pad_lengths (the cp object holds the layout)"
                )
            return cp.mla(self, x)
        B, T, _ = x.shape
        q = self._project_q(x)  # [B, T, H, nope + rope]
        # Non-finite tokens (module docstring): with keys some query must not see, clean the
        # queries and keys and set the poisoned outputs to NaN afterwards
        isolate = (T > 1 or packed is not None) and isolation_enabled()
        if isolate:
            q_bad = nonfinite_rows(q.flatten(2))  # [B, T]
            q = zero_nonfinite(q)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(
            [self.kv_lora_rank, self.rope_dim], dim=-1
        )
        latent = self.kv_a_layernorm(latent)  # [B, T, R]
        q_rope, k_rope = self._rotate(q_rope, k_rope, position_offset, packed, pad_lengths)

        q_start = 0
        if cache is not None:
            q_start = cache.length
            if pad_lengths is not None and isolation_enabled():  # hidden from later queries
                pad = torch.arange(q_start, q_start + T, device=x.device) < pad_lengths[:, None]
                latent = torch.where(pad[..., None], zero_nonfinite(latent), latent)
                k_rope = torch.where(pad[..., None], zero_nonfinite(k_rope), k_rope)
            latent, k_rope = cache.append(latent, k_rope)  # all cached tokens [B, L, *]
            latent, k_rope = latent.to(q.dtype), k_rope.to(q.dtype)
        poisoned = None
        if isolate:
            key_bad = nonfinite_rows(latent) | nonfinite_rows(k_rope)  # [B, L]
            latent, k_rope = zero_nonfinite(latent), zero_nonfinite(k_rope)
            positions = None if packed is None else packed.positions
            poisoned = poisoned_queries(key_bad, q_bad, q_start, positions, pad_lengths)

        if absorb is None:
            absorb = cache is not None and T <= self.absorb_max_tokens
        if absorb:
            mask = None
            if pad_lengths is not None:
                mask = _padded_causal_mask(q_start, T, latent.shape[1], pad_lengths)  # [B, T, L]
            out = self._attend_absorbed(
                q_nope, q_rope, latent, k_rope, q_start, mask, packed, pad_lengths
            )
        else:  # builds its masks per query block
            out = self._attend_plain(q_nope, q_rope, latent, k_rope, q_start, packed, pad_lengths)
        if poisoned is not None:
            out = torch.where(~poisoned.unsqueeze(-1), out, float("nan"))
        return self.o_proj(out)

    def _attend_plain(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        q_start: int,
        packed: PackedDocuments | None = None,
        pad_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Materialised K/V + SDPA. q_*: ``[B, T, H, *]``; latent ``[B, L, R]``; k_rope ``[B, L, P]``.

        ``pad_lengths``: optional ``[B]`` left pads (their keys are hidden from real queries);
        ``packed``: packed documents (``B == 1``, no cache), one causal attention per document.
        Memory is linear in T (see :meth:`_attention`).  Returns ``[B, T, H * v]``.
        """
        H, T, L = self.num_heads, q_nope.shape[1], latent.shape[1]
        kv = rearrange(self.kv_b_proj(latent), "b l (h d) -> b h l d", h=H)
        k_nope, v = kv.split([self.nope_dim, self.v_head_dim], dim=-1)
        k_pe = rearrange(k_rope, "b l p -> b 1 l p").expand(-1, H, -1, -1)
        k = torch.cat([k_nope, k_pe], dim=-1)  # [B, H, L, nope + rope]
        q = rearrange(torch.cat([q_nope, q_rope], dim=-1), "b t h d -> b h t d")
        if v.shape[-1] != k.shape[-1]:
            # Zero columns up to the q/k head dim (the output is sliced back): fused SDPA kernels
            # (CPU flash, CUDA flash) need one head dim for q, k and v; without one, PyTorch's
            # math kernel would materialise the [T, L] scores.
            v = F.pad(v, (0, k.shape[-1] - v.shape[-1]))

        # eager: one causal attention per document; traced by torch.compile: one SDPA call with
        # an N x N mask built from tensors only (the document offsets are Python ints that would
        # be guarded on)
        loop = packed is not None and not torch.compiler.is_compiling()
        doc_ids = None
        if packed is not None and not loop:
            doc_ids = (packed.positions == 0).cumsum(0)  # [T]: a document number per token
        docs = packed.spans if loop else [(0, T)]
        if self.record_max_logits and self.training:
            for a, b in docs:
                self._update_max_logits(
                    masked_max_logits(
                        q[:, :, a:b],
                        k[:, :, a : b if loop else L],
                        self.softmax_scale,
                        q_start,
                        pad_lengths=pad_lengths,
                        doc_ids=doc_ids,
                    )
                )
        if loop:  # block-diagonal: each document attends causally to itself
            o = torch.cat(
                [self._attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], 0) for a, b in docs],
                dim=2,
            )
        else:
            o = self._attention(q, k, v, q_start, pad_lengths, doc_ids)
        o = o[..., : self.v_head_dim]
        return rearrange(o, "b h t d -> b t (h d)")

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_start: int,
        pad_lengths: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal SDPA of ``q [B, H, T, D]`` (positions ``q_start + arange(T)``) over
        ``k, v [B, H, L, D]`` (positions ``arange(L)``), with left pads (``pad_lengths [B]``) or
        documents (``doc_ids [L]``, ``q_start == 0``) masked.  Returns ``[B, H, T, D]``.

        Memory is linear in T on every device: a plain causal prefill (no pads, documents or
        cache) is one ``is_causal`` call when PyTorch has a fused kernel for it (CPU and CUDA
        flash: nothing ``[T, L]`` is held); otherwise (the math kernel, or a mask is needed) the
        queries go in blocks of :func:`query_block_rows` rows, each over the keys it can see
        and with its own mask, so at most :data:`ATTENTION_BLOCK_ELEMENTS` scores or mask
        elements exist at once.
        """
        B, H, T, _ = q.shape
        L = k.shape[2]
        scale = self.softmax_scale
        causal_only = pad_lengths is None and doc_ids is None and q_start == 0 and T == L
        if torch.compiler.is_compiling():  # one call, shapes static in the graph
            if causal_only:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            mask = self._block_mask(0, T, L, q_start, pad_lengths, doc_ids, q.device)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        if causal_only and (
            B * H * T * L <= ATTENTION_BLOCK_ELEMENTS or _fused_sdpa(q, k, v, None, True)
        ):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        rows = query_block_rows(B * H, L)
        out = []
        for s in range(0, T, rows):
            e = min(T, s + rows)
            visible = min(L, q_start + e)  # keys after the block's last query are all masked
            mask = self._block_mask(s, e, visible, q_start, pad_lengths, doc_ids, q.device)
            out.append(
                F.scaled_dot_product_attention(
                    q[:, :, s:e], k[:, :, :visible], v[:, :, :visible], attn_mask=mask, scale=scale
                )
            )
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    @staticmethod
    def _block_mask(
        s: int,
        e: int,
        visible: int,
        q_start: int,
        pad_lengths: torch.Tensor | None,
        doc_ids: torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor:
        """Boolean ``[B or 1, 1, e - s, visible]``: which keys ``arange(visible)`` queries
        ``s .. e - 1`` (absolute positions ``q_start + s ...``) may see."""
        if pad_lengths is not None:
            return _padded_causal_mask(q_start + s, e - s, visible, pad_lengths)[:, None]
        mask = _causal_mask(q_start + s, e - s, visible, device)
        if doc_ids is not None:
            mask = mask & (doc_ids[q_start + s : q_start + e, None] == doc_ids[None, :visible])
        return mask[None, None]

    def _attend_absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        q_start: int,
        mask: torch.Tensor | None = None,
        packed: PackedDocuments | None = None,
        pad_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over latents with kv_b_proj absorbed. Arguments as in :meth:`_attend_plain`
        (packed documents get a block-diagonal causal mask here).

        ``score[b,h,t,l] = scale * ((q_nope W_uk)[b,t,h] . latent[b,l] + q_rope[b,t,h] . k_rope[b,l])``,
        ``out[b,t,h] = W_uv (sum_l p[b,h,t,l] latent[b,l])``.
        """
        T, L = q_nope.shape[1], latent.shape[1]
        w_uk, w_uv = self._split_kv_b()
        q_lat = torch.einsum("bthn,hnr->bthr", q_nope, w_uk)  # [B, T, H, R]
        scores = torch.einsum("bthr,blr->bhtl", q_lat, latent)
        if self.rope_dim > 0:
            scores = scores + torch.einsum("bthp,blp->bhtl", q_rope, k_rope)
        scores = scores.float() * self.softmax_scale  # [B, H, T, L]
        if packed is not None:
            doc = (packed.positions == 0).cumsum(0)  # [T]: a document number per token
            same_doc = doc[:, None] == doc[None, :]
            scores = scores.masked_fill(
                ~(same_doc & _causal_mask(0, T, L, scores.device)), float("-inf")
            )
        elif mask is not None:
            scores = scores.masked_fill(~mask[:, None], float("-inf"))
        elif T > 1:  # a single query (the newest token) sees every cached key
            scores = scores.masked_fill(~_causal_mask(q_start, T, L, scores.device), float("-inf"))
        if self.record_max_logits and self.training:
            stat = scores.detach()
            if pad_lengths is not None:  # only real queries on real keys feed the statistic
                real_key = torch.arange(L, device=stat.device)[None, :] >= pad_lengths[:, None]
                stat = stat.masked_fill(~real_key[:, None, None, :], float("-inf"))
            self._update_max_logits(stat.amax(dim=(0, 2, 3)))
        probs = scores.softmax(dim=-1).to(latent.dtype)
        ctx = torch.einsum("bhtl,blr->bthr", probs, latent)  # [B, T, H, R]
        o = torch.einsum("bthr,hvr->bthv", ctx, w_uv)  # [B, T, H, v]
        return rearrange(o, "b t h v -> b t (h v)")

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, q_lora_rank={self.q_lora_rank}, kv_lora_rank={self.kv_lora_rank}, "
            f"nope={self.nope_dim}, rope={self.rope_dim}, v={self.v_head_dim}, use_rope={self.use_rope}"
        )


__all__ = ["MLAttention", "masked_max_logits", "poisoned_queries"]
