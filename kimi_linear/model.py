"""The Kimi Linear hybrid language model: KDA / MLA token mixers, dense or MoE feed-forward.

One job: the model (decoder blocks, init, forward and loss, the decoding loop, and the
checkpoint entry points, which call :mod:`kimi_linear.hf` with the model); kept in one file so
it reads top to bottom, as nanoGPT's and litgpt's ``model.py`` do.

Module tree (names match the released checkpoints' state dicts)::

    KimiLinearForCausalLM
      .model: KimiLinearModel
         .embed_tokens                  nn.Embedding(vocab, hidden)
         .layers[i]: KimiDecoderLayer   pre-norm residual block
            .input_layernorm            RMSNorm(hidden)
            .self_attn                  KimiDeltaAttention | MLAttention
            .post_attention_layernorm   RMSNorm(hidden)
            .block_sparse_moe | .mlp    KimiMoE | KimiMLP
         .norm                          RMSNorm(hidden)
      .lm_head                          nn.Linear(hidden, vocab)

Incremental decoding goes through a :class:`~kimi_linear.cache.HybridCache`
(:meth:`KimiLinearForCausalLM.new_cache`): KDA layers keep a constant-size state, MLA layers
a per-token latent.  :meth:`KimiLinearForCausalLM.save_pretrained` /
:meth:`KimiLinearForCausalLM.from_pretrained` read and write the release layout
(``config.json`` + ``model.safetensors`` with per-expert keys).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimi_linear import hf
from kimi_linear.cache import HybridCache, KDALayerCache, LatentKVCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.fp32 import cast_model_
from kimi_linear.layers.kda import KimiDeltaAttention
from kimi_linear.layers.mla import MLAttention
from kimi_linear.layers.moe import KimiMLP, KimiMoE
from kimi_linear.layers.norm import RMSNorm
from kimi_linear.packing import (
    PackedDocuments,
    check_attention_mask,
    packed_documents,
    real_token_mask,
)

__all__ = [
    "CausalLMOutput",
    "KimiDecoderLayer",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "cast_model_",
    "sample_next_token",
]

#: Buffers a seeded (re-)initialisation sets to zero: MoE balancing bias and load statistics.
_ZERO_INIT_BUFFERS = frozenset({"e_score_correction_bias", "expert_load", "last_expert_load"})
# Name segments that wrappers insert (torch.compile, activation checkpointing, FSDP1); the
# seeded init hashes parameter names without them so that wrapping never changes the weights.
_WRAPPER_NAME_PARTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def _unwrapped_name(name: str) -> str:
    """``"model.layers.0._checkpoint_wrapped_module.mlp"`` -> ``"model.layers.0.mlp"``."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_NAME_PARTS)


class CausalLMOutput(NamedTuple):
    """``loss``: mean next-token cross-entropy (fp32 scalar); ``logits``: ``[B, T, V]``."""

    loss: torch.Tensor
    logits: torch.Tensor


def check_logits_finite(
    logits: torch.Tensor, rows: torch.Tensor | None = None, what: str = "logits"
) -> None:
    """Raise ``ValueError`` naming the rows of ``logits: [B, V]`` from which no token can be
    drawn: a NaN or ``+inf`` entry, or every entry ``-inf`` (``-inf`` alone is a masked token).
    ``rows``: the index of each row to report (e.g. its row in the caller's batch)."""
    bad = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=-1)
    bad |= torch.isneginf(logits).all(dim=-1)
    if bool(bad.any()):
        index = bad.nonzero().squeeze(-1)
        named = (index if rows is None else rows[index]).tolist()
        raise ValueError(
            f"{what} of batch row(s) {named} hold NaN / inf (or only -inf): no token can be "
            "drawn from them"
        )


def check_temperature(temperature: object) -> None:
    """ValueError unless ``temperature`` is a finite number ``>= 0`` (0: greedy)."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature >= 0)
    ):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits: [B, V]``; returns ``[B]`` long.

    ``temperature == 0`` is greedy (argmax; ``top_k`` / ``top_p`` then do not matter).  Otherwise
    the logits are divided by ``temperature``, restricted to the ``top_k`` largest and then to
    the nucleus of cumulative probability ``top_p`` (the most likely token always stays), and
    sampled with ``torch.multinomial`` (``generator`` makes it reproducible). The logits are
    shifted by their row maximum before the division, so any finite ``temperature > 0`` is
    well defined: a tiny (even subnormal) one samples uniformly among the row's maxima, the
    limit of the distribution as the temperature goes to 0, instead of overflowing to NaN.

    Raises:
        ValueError: ``temperature`` not a finite number ``>= 0``, or a row of ``logits`` that
            holds NaN / ``+inf`` or only ``-inf`` (named by its index: nothing can be drawn).
    """
    check_temperature(temperature)
    check_logits_finite(logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float64 for a temperature float32 cannot hold (it would round to 0: 0 / 0 = NaN)
    tiny = temperature < torch.finfo(torch.float32).tiny
    logits = logits.double() if tiny else logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # <= 0, max at 0
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------
class KimiDecoderLayer(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``; ``out = h + ffn(norm(h))``.

    The token mixer is KDA or MLA per ``config.layer_kinds[layer_idx]``; the feed-forward part
    is a routed MoE when ``config.is_moe_layer(layer_idx)``, a dense SwiGLU MLP otherwise.
    """

    def __init__(self, config: KimiLinearConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.kind = config.layer_kinds[layer_idx]
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn: KimiDeltaAttention | MLAttention
        if self.kind == "kda":
            self.self_attn = KimiDeltaAttention(config, layer_idx)
        else:
            self.self_attn = MLAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.is_moe:
            self.block_sparse_moe = KimiMoE(config)
        else:
            self.mlp = KimiMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cache: KDALayerCache | LatentKVCache | None = None,
        position_offset: int = 0,
        cu_seqlens: torch.Tensor | PackedDocuments | None = None,
        pad_lengths: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        cp: Any = None,
    ) -> torch.Tensor:
        """``x: [B, T, D] -> [B, T, D]``; ``cache`` is this layer's entry of a HybridCache.

        Sequence layout (:mod:`kimi_linear.packing`): ``cu_seqlens`` packed documents
        (``B == 1``); ``pad_lengths [B]`` left pads per row (absolute, cache included) with
        ``token_mask [B, T]`` the real tokens of this block (both or neither; the MoE counts
        only those in its expert loads). ``cp``: context parallelism
        (:class:`kimi_linear.context_parallel.ContextParallel`; ``x`` is this rank's shard),
        passed to the token mixer.
        """
        h = self.input_layernorm(x)
        if cp is not None:
            h = self.self_attn(h, cp=cp)
        elif self.kind == "kda":
            layout = {}
            if cu_seqlens is not None:
                layout["cu_seqlens"] = cu_seqlens
            if token_mask is not None:
                layout["attention_mask"] = token_mask
            h = self.self_attn(h, cache=cache, **layout)
        else:
            h = self.self_attn(
                h,
                cache=cache,
                position_offset=position_offset,
                cu_seqlens=cu_seqlens,
                pad_lengths=pad_lengths,
            )
        x = x + h
        h = self.post_attention_layernorm(x)
        if self.is_moe:  # pads (token_mask False) do not count in the expert loads
            h = self.block_sparse_moe(h, token_mask=token_mask)
        else:
            h = self.mlp(h)
        return x + h

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, mixer={self.kind!r}, ffn={'moe' if self.is_moe else 'dense'!r}"


def _checkpointed_layer(layer: KimiDecoderLayer, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``layer(x, None, **kwargs)`` under non-reentrant activation checkpointing.

    The backward pass runs the layer's forward a second time; that recomputation restores the
    MoE ``expert_load`` it would otherwise add to twice (the MLA max logits are a max, which the
    same values leave unchanged).
    """
    calls = 0

    def run(h: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 1:
            return layer(h, None, **kwargs)
        saved = [(m, m.expert_load.clone()) for m in layer.modules() if isinstance(m, KimiMoE)]
        try:
            return layer(h, None, **kwargs)
        finally:  # also when the recomputation stops early
            for m, load in saved:
                m.expert_load.copy_(load)

    return checkpoint(run, x, use_reentrant=False)


class KimiLinearModel(nn.Module):
    """Embedding, decoder blocks and final norm: ``input_ids [B, T] -> hidden [B, T, D]``."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            KimiDecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        #: recompute each decoder layer in the backward pass instead of keeping its activations
        #: (see :meth:`set_activation_checkpointing`)
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Activation checkpointing per decoder layer (``torch.utils.checkpoint``, non-reentrant).

        When enabled, a training forward (grad enabled, no cache) keeps only each layer's input;
        the layer's forward runs again during the backward pass.  Loss and gradients are those of
        the plain run; the MoE load statistics count each token once.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        self.activation_checkpointing = enabled

    def compile_layers(self, **compile_kwargs: Any) -> None:
        """``torch.compile`` each decoder layer in place (``nn.Module.compile``; state-dict names
        are unchanged).  ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``,
        ``dynamic``, ...)."""
        for layer in self.layers:
            layer.compile(**compile_kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: HybridCache | None = None,
        cu_seqlens: torch.Tensor | PackedDocuments | None = None,
        pad_lengths: torch.Tensor | None = None,
        cp: Any = None,
    ) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, D]``; with ``cache``, continue from
        ``cache.seq_len`` and advance it by ``T`` (inputs are checked by the LM wrapper).

        ``cu_seqlens``: packed documents of ``input_ids [1, N]``; ``pad_lengths [B]``: left pads
        per row counted from the row's first (cached) token (:mod:`kimi_linear.packing`).
        ``cp``: context parallelism (:mod:`kimi_linear.context_parallel`): ``input_ids`` is this
        rank's shard ``[B, T_r]`` and ``cp`` its layout (no cache, ``cu_seqlens`` or pads).
        """
        if cp is not None and (
            cache is not None or cu_seqlens is not None or pad_lengths is not None
        ):
            raise ValueError(
                "context parallelism (cp) cannot be combined with a cache, cu_seqlens or pads "
                "(the cp object holds the layout)"
            )
        offset = 0 if cache is None else cache.seq_len
        token_mask = None
        if pad_lengths is not None:
            token_mask = real_token_mask(pad_lengths, offset, input_ids.shape[1])
        x = self.embed_tokens(input_ids)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            kwargs = dict(
                position_offset=offset,
                cu_seqlens=cu_seqlens,
                pad_lengths=pad_lengths,
                token_mask=token_mask,
            )
            if cp is not None:
                kwargs["cp"] = cp
            if recompute:
                x = _checkpointed_layer(layer, x, **kwargs)
            else:
                x = layer(x, None if cache is None else cache.layers[i], **kwargs)
        if cache is not None:
            cache.seq_len += input_ids.shape[1]
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# language model
# ---------------------------------------------------------------------------------------------
class KimiLinearForCausalLM(nn.Module):
    """Kimi Linear causal language model (see the module docstring for the layout).

    Example::

        cfg = KimiLinearConfig.from_preset("tiny")
        model = KimiLinearForCausalLM(cfg)
        logits = model(torch.randint(0, cfg.vocab_size, (2, 16)))          # [2, 16, V]
        loss = model(ids, labels=ids).loss
        out = model.generate(ids, max_new_tokens=32, temperature=0)         # greedy
    """

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        if not isinstance(config, KimiLinearConfig):
            raise ValueError(f"config must be a KimiLinearConfig, got {type(config).__name__}")
        self.config = config
        self.model = KimiLinearModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()

    def tie_weights(self) -> None:
        """With ``config.tie_word_embeddings``, make ``lm_head.weight`` the embedding's Parameter
        (one tensor: saving writes an equal copy of it as ``lm_head.weight`` too)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> Any:
        """``nn.Module.to_empty`` that keeps tied embeddings tied (moving off the meta device
        gives every module a new Parameter).  Sharded (DTensor) weights are left to FSDP."""
        super().to_empty(device=device, recurse=recurse)
        emb = self.model.embed_tokens.weight
        if self.config.tie_word_embeddings and type(emb.data) is torch.Tensor:
            self.tie_weights()
        return self

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise as the release's training recipe does.

        Every weight matrix (linear layers, embedding, router, stacked experts) is drawn from
        ``N(0, initializer_range)``; norm weights are 1; the MoE router's correction bias is 0;
        the KDA decay parameters get Mamba-style values (``A = 1`` with the safe gate;
        :meth:`KimiDeltaAttention.reset_gate_parameters`); short-conv filters keep PyTorch's
        default initialisation (``U(+-1/sqrt(fan_in))``).

        Args:
            seed: ``None`` draws from torch's global generator.  An int draws every parameter
                from its own stream, seeded by ``(seed, parameter name)``
                (:mod:`kimi_linear.sharding`), and also resets every buffer: the result does not
                depend on the global generator, on the order of modules, or on sharding (a
                model whose parameters are FSDP2 DTensors over any number of ranks gets the
                same full weights as an unsharded one).  This is how a model materialized from
                the meta device is initialised per shard.
        """
        if seed is not None:
            self._reset_parameters_seeded(seed)
            return
        if self.model.embed_tokens.weight.device.type == "meta":
            return  # shapes only: nothing to initialise (and meta RNG ops are slow to set up)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, KimiDeltaAttention):
                module.reset_gate_parameters()  # its own parameters are the gate's
                continue
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
                continue
            if isinstance(module, nn.Conv1d):
                continue
            for p in module.parameters(recurse=False):
                if p.dim() >= 2:
                    nn.init.normal_(p, mean=0.0, std=std)
                else:
                    nn.init.zeros_(p)
            for name, b in module.named_buffers(recurse=False):
                if name == "e_score_correction_bias":
                    b.zero_()

    @torch.no_grad()
    def _reset_parameters_seeded(self, seed: int) -> None:
        """:meth:`reset_parameters` with per-parameter seeded streams (see there)."""
        from kimi_linear.sharding import local_shard, seeded_normal_, seeded_uniform_

        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        std = self.config.initializer_range
        seen: set[int] = set()
        for module_name, module in self.named_modules():
            prefix = _unwrapped_name(module_name)
            named = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
            seen.update(id(p) for _, p in named)
            full = {n: f"{prefix}.{n}" if prefix else n for n, _ in named}
            if any(p.device.type == "meta" for _, p in named):
                raise ValueError(
                    f"reset_parameters(seed=...): {module_name or 'the model'} has parameters on "
                    "the meta device; materialize them first (model.to_empty(device=...))"
                )
            if isinstance(module, KimiDeltaAttention):
                # the gate recipe is elementwise: feed it this shard's uniform draws
                a = seeded_uniform_(
                    torch.empty_like(module.A_log), seed, full["A_log"], *module.init_a_range
                )
                u_dt = seeded_uniform_(torch.empty_like(module.dt_bias), seed, full["dt_bias"])
                a_log, dt_bias = module.gate_values(local_shard(a)[0], local_shard(u_dt)[0])
                local_shard(module.A_log)[0].copy_(a_log)
                local_shard(module.dt_bias)[0].copy_(dt_bias)
                continue  # the layer's own parameters are the gate's (its children follow)
            for n, p in named:
                if isinstance(module, RMSNorm):
                    local_shard(p)[0].fill_(1.0)
                elif isinstance(module, nn.Conv1d):
                    fan_in = p.shape[1] * math.prod(p.shape[2:])
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    seeded_uniform_(p, seed, full[n], -bound, bound)
                elif p.dim() >= 2:
                    seeded_normal_(p, seed, full[n], 0.0, std)
                else:
                    local_shard(p)[0].zero_()
            for n, b in module.named_buffers(recurse=False):
                if n not in _ZERO_INIT_BUFFERS:
                    raise NotImplementedError(
                        f"reset_parameters(seed=...): no init rule for buffer {module_name}.{n}; "
                        "add one to kimi_linear.model._ZERO_INIT_BUFFERS or to the seeded init"
                    )
                local_shard(b)[0].zero_()

    # ----------------------------------------------------------------- helpers
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once); optionally without the
        input embedding (and the LM head when it is not tied)."""
        seen: set[int] = set()
        skip: set[int] = set()
        if exclude_embeddings:
            skip = {id(self.model.embed_tokens.weight), id(self.lm_head.weight)}
        total = 0
        for p in self.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(
        self,
        batch_size: int,
        capacity: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> HybridCache:
        """An empty :class:`HybridCache` for ``batch_size`` sequences.

        ``capacity`` tokens are preallocated in the MLA caches (they grow when exceeded);
        ``dtype`` (conv tails and MLA latents; KDA states are fp32) and ``device`` default to
        those of the model's embedding.
        """
        return HybridCache.from_config(
            self.config,
            batch_size,
            capacity=capacity,
            device=self.device if device is None else device,
            dtype=self.dtype if dtype is None else dtype,
        )

    # ----------------------------------------------------------------- checks
    def _check_ids(self, name: str, ids: Any, allow_ignore: bool = False) -> None:
        if not isinstance(ids, torch.Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor of token ids [B, T], got {type(ids).__name__}"
            )
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must have an integer dtype (torch.long), got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(ids.shape)}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise ValueError(
                f"{name} must hold at least one token per row (B > 0, T > 0), got {tuple(ids.shape)}"
            )
        if ids.device.type == "meta" or torch.compiler.is_compiling():
            return
        V = self.config.vocab_size
        valid = (ids >= 0) & (ids < V)
        if allow_ignore:
            valid |= ids == -100
        if not bool(valid.all()):
            bad = ids[~valid][0].item()
            allowed = f"[0, vocab_size={V}) or -100" if allow_ignore else f"[0, vocab_size={V})"
            raise ValueError(f"{name} values must be in {allowed}, got {bad}")

    def _check_cache(self, cache: Any, batch_size: int) -> None:
        if not isinstance(cache, HybridCache):
            raise ValueError(
                f"cache must be a HybridCache (model.new_cache) or None, got {type(cache).__name__}"
            )
        if len(cache) != self.config.num_hidden_layers:
            raise ValueError(
                f"cache must have num_hidden_layers={self.config.num_hidden_layers} layers, got {len(cache)}"
            )
        for i, (kind, layer) in enumerate(zip(self.config.layer_kinds, cache.layers)):
            expected = KDALayerCache if kind == "kda" else LatentKVCache
            if not isinstance(layer, expected):
                raise ValueError(
                    f"cache.layers[{i}] must be a {expected.__name__} for a {kind} layer, got {type(layer).__name__}"
                )
        if cache.batch_size != batch_size:
            raise ValueError(
                f"cache batch size {cache.batch_size} does not match input_ids batch size {batch_size}"
            )

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        logits_to_keep: int = 0,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cp: Any = None,
    ) -> torch.Tensor | CausalLMOutput:
        """Logits ``[B, T, V]`` of ``input_ids: [B, T]``, or ``CausalLMOutput(loss, logits)``.

        Args:
            input_ids: integer token ids in ``[0, vocab_size)``.
            labels: optional ``[B, T]`` targets aligned with ``input_ids`` (the model shifts:
                position ``t`` predicts ``labels[:, t + 1]``); ``-100`` is ignored. The loss is
                the mean cross-entropy over the scored targets; when no target is scored (all
                ``-100``, e.g. a fine-tuning batch whose answers were cut off) it is exactly 0,
                still attached to the graph, so its gradients are zero (never NaN).
            cache: optional :class:`HybridCache`; the forward continues its sequences from
                ``cache.seq_len`` and updates it in place.
            logits_to_keep: when > 0, compute logits of the last ``logits_to_keep`` positions
                only (``[B, logits_to_keep, V]``; prefill before decoding needs just the last).
                At most ``T``; not combinable with ``labels``.
            cu_seqlens: packed documents: ``input_ids [1, N]`` holds documents back to back and
                ``cu_seqlens`` (1-D int32 / int64, on the same device) their offsets
                ``[0, ..., N]``. Every document is computed as if alone: KDA state and short
                convolutions restart, MLA attends within the document, positions restart, and
                no label is scored across a boundary. Not combinable with ``cache`` or
                ``attention_mask``.
            attention_mask: left padding (Hugging Face convention): ``[B, P + T]`` with ``P =
                cache.seq_len`` (0 without a cache), ``1`` for tokens and ``0`` for pads, every
                row's pads first. Each row is computed as if its tokens were alone (pads touch
                no KDA state, conv tail or attention; positions start at the first token);
                logits at pad positions are meaningless (finite) and labels there are not
                scored. With a cache the mask must agree with the pads it recorded; blocks after
                the pads may leave it out (:attr:`HybridCache.pad_lengths` keeps them masked).
            cp: context parallelism (:mod:`kimi_linear.context_parallel`): ``input_ids`` is
                this rank's shard ``[B, T_r]`` and ``cp`` its layout; returns the shard's logits
                (the loss: :func:`~kimi_linear.context_parallel.context_parallel_loss`). Not
                combinable with labels, a cache, ``logits_to_keep``, ``cu_seqlens`` or a mask.

        Raises:
            ValueError: bad ids, labels, cache, ``logits_to_keep`` (negative or ``> T``),
                ``cu_seqlens`` or ``attention_mask`` (:mod:`kimi_linear.packing`), or positions
                beyond ``config.max_position_embeddings`` (counted per document / per row).
        """
        self._check_ids("input_ids", input_ids)
        B, T = input_ids.shape
        if (
            isinstance(logits_to_keep, bool)
            or not isinstance(logits_to_keep, int)
            or logits_to_keep < 0
        ):
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if logits_to_keep > T:
            raise ValueError(
                f"logits_to_keep must be at most the number of input positions T={T}, got {logits_to_keep}"
            )
        if logits_to_keep and labels is not None:
            raise ValueError(
                "logits_to_keep must be 0 when labels are given (the loss needs every position)"
            )
        if labels is not None:
            self._check_ids("labels", labels, allow_ignore=True)
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            if labels.shape[1] < 2:
                raise ValueError(
                    "labels need T >= 2 tokens per row (position t is scored on labels[:, t + 1]), "
                    f"got T={labels.shape[1]}"
                )
        if cp is not None:
            if labels is not None or cache is not None or logits_to_keep:
                raise ValueError(
                    "context parallelism (cp) cannot be combined with labels, a cache or "
                    "logits_to_keep (the loss: kimi_linear.context_parallel.context_parallel_loss)"
                )
            if cu_seqlens is not None or attention_mask is not None:
                raise ValueError(
                    "context parallelism (cp) cannot be combined with cu_seqlens or an "
                    "attention_mask (the cp object holds the layout)"
                )
            return self.lm_head(self.model(input_ids, cp=cp))
        if cache is not None:
            self._check_cache(cache, B)
        packed, pad_lengths = self._check_layout(input_ids, cache, cu_seqlens, attention_mask)

        hidden = self.model(input_ids, cache=cache, cu_seqlens=packed, pad_lengths=pad_lengths)
        if cache is not None and pad_lengths is not None:
            cache.pad_lengths = pad_lengths
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if labels is None:
            return logits
        targets = labels[:, 1:]
        if packed is not None:  # the first token of a document is nobody's target
            starts = sorted({o for o in packed.offsets[1:-1] if 0 < o < T})
            if starts:
                targets = targets.clone()
                targets[:, torch.tensor(starts, device=targets.device) - 1] = -100
        if pad_lengths is not None:  # a pad predicts nothing (and is never a target)
            past = 0 if cache is None else cache.seq_len - T
            real = real_token_mask(pad_lengths, past, T)[:, :-1]
            targets = targets.masked_fill(~real, -100)
        scored = (targets != -100).sum()
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=-100,
            reduction="sum",
        ) / scored.clamp(min=1)
        return CausalLMOutput(loss, logits)

    def _check_layout(
        self,
        input_ids: torch.Tensor,
        cache: HybridCache | None,
        cu_seqlens: Any,
        attention_mask: Any,
    ) -> tuple[PackedDocuments | None, torch.Tensor | None]:
        """Validate ``cu_seqlens`` / ``attention_mask`` against the inputs and the cache, and
        the positions against ``max_position_embeddings``.

        Returns ``(packed, pad_lengths)``: the validated documents (or None; every layer reuses
        them) and the left pads per row ``[B]`` long (None when no row has a pad).
        """
        B, T = input_ids.shape
        past = 0 if cache is None else cache.seq_len
        packed = None
        pad_lengths = None if cache is None else cache.pad_lengths
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a cache")
            if attention_mask is not None:
                raise ValueError(
                    "cu_seqlens and attention_mask cannot be combined (packed documents hold no pads)"
                )
            packed = packed_documents(cu_seqlens, B, T, input_ids.device)
        if attention_mask is not None:
            pads = check_attention_mask(attention_mask, (B, past + T), input_ids.device)
            if past:
                recorded = (
                    torch.zeros_like(pads) if cache.pad_lengths is None else cache.pad_lengths
                )
                if not torch.equal(pads.clamp(max=past), recorded):
                    raise ValueError(
                        f"attention_mask[:, :{past}] (the cached tokens) must match the pads the "
                        f"cache recorded ({recorded.tolist()} per row), got "
                        f"{pads.clamp(max=past).tolist()}"
                    )
            pad_lengths = pads if bool(pads.any()) else None

        if input_ids.device.type != "meta":
            if packed is not None:
                positions = max(b - a for a, b in zip(packed.offsets[:-1], packed.offsets[1:]))
                what = "the longest document"
            elif pad_lengths is not None:
                positions = past + T - int(pad_lengths.min())
                what = "the longest row without its pads"
            else:
                positions = past + T
                what = "cached + input tokens" if past else "input tokens"
            limit = self.config.max_position_embeddings
            if positions > limit:
                raise ValueError(
                    f"input needs {positions} positions ({what}), more than the model's "
                    f"max_position_embeddings={limit}; split the input or raise the config field"
                )
        return packed, pad_lengths

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
        streamer: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids: [B, T]`` by up to ``max_new_tokens`` tokens: ``[B, T + n]``.

        The prompt is prefilled once into a fresh cache, then tokens are decoded one at a time.

        Args:
            temperature: softmax temperature; ``0`` means greedy (argmax) decoding.
            top_k: sample only among the ``top_k`` most likely tokens.
            top_p: nucleus sampling: the smallest set of tokens whose probability reaches
                ``top_p`` (the most likely token is always kept).
            eos_token_id: a sequence that produces it is finished and padded with it after
                (finished rows leave the decoding batch and its cache, so they cost nothing
                more); generation stops early (``n < max_new_tokens``) once every sequence
                finished. ``None``: never stop early.
            generator: a ``torch.Generator`` on the model's device for reproducible sampling.
            attention_mask: prompts of different lengths, left-padded (Hugging Face
                convention): ``[B, T]``, ``0`` for pads then ``1`` for tokens, at least one
                token per row. Each row continues as its prompt alone would (pads never reach
                the cache's state, conv tails or attention; positions are per row). The
                output keeps the pads: ``[B, T + n]``.
            streamer: called after each decoding step with that step's tokens ``[B]`` (rows
                that finished earlier read ``eos_token_id``), e.g. to print text as it comes.

        Raises:
            ValueError: a bad argument, right padding, or a prompt + ``max_new_tokens`` that
                needs more than ``config.max_position_embeddings`` positions.
        """
        self._check_ids("input_ids", input_ids)
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 0
        ):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        check_temperature(temperature)
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
        if eos_token_id is not None and not (
            isinstance(eos_token_id, int) and 0 <= eos_token_id < self.config.vocab_size
        ):
            raise ValueError(
                f"eos_token_id must be None or in [0, vocab_size={self.config.vocab_size}), got {eos_token_id!r}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        B, T = input_ids.shape
        pads = 0
        if attention_mask is not None:
            pad_lengths = check_attention_mask(
                attention_mask, (B, T), input_ids.device, require_token=True
            )
            pads = int(pad_lengths.min())
        needed = T - pads + max(max_new_tokens - 1, 0)  # the last new token is never fed back
        if needed > self.config.max_position_embeddings:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} with a prompt of {T - pads} tokens needs {needed} "
                f"positions, more than max_position_embeddings={self.config.max_position_embeddings}"
            )
        if max_new_tokens == 0:
            return input_ids.clone()

        was_training = self.training
        self.eval()  # decoding must not feed the MoE balancing statistics
        try:
            cache = self.new_cache(B, capacity=T + max_new_tokens)
            logits = self(input_ids, cache=cache, logits_to_keep=1, attention_mask=attention_mask)[
                :, -1
            ]
            new = input_ids.new_full(
                (B, max_new_tokens), 0 if eos_token_id is None else eos_token_id
            )
            active = torch.arange(B, device=input_ids.device)  # the rows still decoding
            n = 0
            for step in range(max_new_tokens):
                # a NaN row (e.g. a NaN embedding in one prompt) leaves the other rows intact
                # but cannot be sampled: say which prompt carried it
                check_logits_finite(
                    logits,
                    active,
                    f"the model's logits for new token {step} (a NaN / inf came from these "
                    "input_ids rows' tokens or from the weights)",
                )
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                new[active, step] = token.to(new.dtype)
                n = step + 1
                if streamer is not None:
                    streamer(new[:, step])
                if step == max_new_tokens - 1:
                    break
                if eos_token_id is not None:
                    running = token != eos_token_id
                    if not bool(running.all()):
                        # finished rows leave the batch and its cache; they read eos from here
                        keep = running.nonzero().squeeze(-1)
                        if keep.numel() == 0:
                            break
                        active, token = active[keep], token[keep]
                        cache.index_select(keep)
                logits = self(token[:, None].to(input_ids.dtype), cache=cache, logits_to_keep=1)
                logits = logits[:, -1]
        finally:
            self.train(was_training)
        return torch.cat([input_ids, new[:, :n]], dim=1)

    # ----------------------------------------------------------------- checkpoints
    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the release names (per-expert keys; see :mod:`kimi_linear.hf`)."""
        return hf.release_state_dict(self)

    def save_pretrained(
        self, save_directory: str | os.PathLike, max_shard_size: int | None = None
    ) -> None:
        """Write ``config.json`` and the weights as safetensors under the release names
        (:func:`kimi_linear.hf.save_pretrained`; ``max_shard_size`` in bytes shards them)."""
        hf.save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **config_overrides: Any,
    ) -> KimiLinearForCausalLM:
        """Load a folder saved by :meth:`save_pretrained`, a release checkpoint or a folder saved
        by transformers' ``KimiLinearForCausalLM``: built on the meta device, allocated once
        in ``dtype`` (default: the stored dtype of the embedding; the fp32-kept parameters of
        :func:`cast_model_` stay fp32) on ``device`` (default CPU) and filled tensor by tensor
        from the shards (:func:`kimi_linear.hf.plan_load`, :func:`kimi_linear.hf.fill_weights_`),
        so no fp32 or second copy of the model is ever made.  Strict: every weight must be
        present and every stored tensor must have a place.  ``config_overrides`` replace config
        fields (e.g. ``kda_backend="torch"``)."""
        if cls is not KimiLinearForCausalLM:
            raise ValueError(
                "from_pretrained builds a KimiLinearForCausalLM; call it on that class"
            )
        config = hf.pretrained_config(pretrained_dir, **config_overrides)
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
        try:
            device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: {e}") from None
        with torch.device("meta"):
            model = cls(config)
        plan = hf.plan_load(pretrained_dir, model)  # headers only: names and shapes checked
        cast_model_(model, dtype or plan.stored_dtype or torch.float32)
        model.to_empty(device=device)  # one allocation, in the target dtype; keeps ties
        for sub in model.modules():  # non-persistent buffers (load statistics) start at zero
            for name in sub._non_persistent_buffers_set:
                buf = sub._buffers.get(name)
                if buf is not None:
                    buf.zero_()
        hf.fill_weights_(model, plan)
        return model
