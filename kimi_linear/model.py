"""The Kimi Linear hybrid language model: KDA / MLA token mixers, dense or MoE feed-forward.

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

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kimi_linear.cache import HybridCache, KDALayerCache, LatentKVCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.kda import KimiDeltaAttention
from kimi_linear.layers.mla import MLAttention
from kimi_linear.layers.moe import KimiMLP, KimiMoE, to_release_state_dict
from kimi_linear.layers.norm import RMSNorm

__all__ = [
    "CausalLMOutput",
    "FP32_PARAMETER_NAMES",
    "KimiDecoderLayer",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "cast_model_",
    "sample_next_token",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# config fields that are ours (not in the release config.json) and define the model
_EXTRA_CONFIG_KEY = "kimi_linear"
_EXTRA_CONFIG_FIELDS = ("name", "kda_gate", "kda_chunk_size")

#: Parameters and buffers kept in float32 whatever the model dtype: the KDA decay parameters
#: and the MoE router's balancing statistics (fp32 in the release, excluded from weight decay).
FP32_PARAMETER_NAMES = (
    "A_log",
    "dt_bias",
    "e_score_correction_bias",
    "expert_load",
    "last_expert_load",
)


class CausalLMOutput(NamedTuple):
    """``loss``: mean next-token cross-entropy (fp32 scalar); ``logits``: ``[B, T, V]``."""

    loss: torch.Tensor
    logits: torch.Tensor


def cast_model_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers of ``module`` to ``dtype`` in place, except those
    named in :data:`FP32_PARAMETER_NAMES`, which stay float32.  Returns ``module``."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in store.items():
                if t is None or not t.is_floating_point():
                    continue
                target = torch.float32 if name in FP32_PARAMETER_NAMES else dtype
                if t.dtype == target:
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = t.data.to(target)
                else:
                    store[name] = t.to(target)
    return module


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
    sampled with ``torch.multinomial`` (``generator`` makes it reproducible).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
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
    ) -> torch.Tensor:
        """``x: [B, T, D] -> [B, T, D]``; ``cache`` is this layer's entry of a HybridCache."""
        h = self.input_layernorm(x)
        if self.kind == "kda":
            h = self.self_attn(h, cache=cache)
        else:
            h = self.self_attn(h, cache=cache, position_offset=position_offset)
        x = x + h
        h = self.post_attention_layernorm(x)
        h = self.block_sparse_moe(h) if self.is_moe else self.mlp(h)
        return x + h

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, mixer={self.kind!r}, ffn={'moe' if self.is_moe else 'dense'!r}"


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

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, D]``; with ``cache``, continue from
        ``cache.seq_len`` and advance it by ``T`` (inputs are checked by the LM wrapper)."""
        offset = 0 if cache is None else cache.seq_len
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, None if cache is None else cache.layers[i], position_offset=offset)
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
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise as the release's training recipe does.

        Every weight matrix (linear layers, embedding, router, stacked experts) is drawn from
        ``N(0, initializer_range)``; norm weights are 1; the MoE router's correction bias is 0;
        the KDA decay parameters get Mamba-style values
        (:meth:`KimiDeltaAttention.reset_gate_parameters`); short-conv filters keep PyTorch's
        default initialisation.
        """
        if self.model.embed_tokens.weight.device.type == "meta":
            return  # shapes only: nothing to initialise (and meta RNG ops are slow to set up)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, KimiDeltaAttention):
                module.reset_gate_parameters()
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
                continue
            if isinstance(module, nn.Conv1d):
                continue
            for name, p in module.named_parameters(recurse=False):
                if name in FP32_PARAMETER_NAMES:
                    continue
                if p.dim() >= 2:
                    nn.init.normal_(p, mean=0.0, std=std)
                else:
                    nn.init.zeros_(p)
            for name, b in module.named_buffers(recurse=False):
                if name == "e_score_correction_bias":
                    b.zero_()

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
    ) -> torch.Tensor | CausalLMOutput:
        """Logits ``[B, T, V]`` of ``input_ids: [B, T]``, or ``CausalLMOutput(loss, logits)``.

        Args:
            input_ids: integer token ids in ``[0, vocab_size)``.
            labels: optional ``[B, T]`` targets aligned with ``input_ids`` (the model shifts:
                position ``t`` predicts ``labels[:, t + 1]``); ``-100`` is ignored.
            cache: optional :class:`HybridCache`; the forward continues its sequences from
                ``cache.seq_len`` and updates it in place.
            logits_to_keep: when > 0, compute logits of the last ``logits_to_keep`` positions
                only (``[B, logits_to_keep, V]``; prefill before decoding needs just the last).
                Not combinable with ``labels``.
        """
        self._check_ids("input_ids", input_ids)
        if (
            isinstance(logits_to_keep, bool)
            or not isinstance(logits_to_keep, int)
            or logits_to_keep < 0
        ):
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
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
        if cache is not None:
            self._check_cache(cache, input_ids.shape[0])
        hidden = self.model(input_ids, cache=cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        if labels is None:
            return logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        return CausalLMOutput(loss, logits)

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
    ) -> torch.Tensor:
        """Continue ``input_ids: [B, T]`` by up to ``max_new_tokens`` tokens: ``[B, T + n]``.

        The prompt is prefilled once into a fresh cache, then tokens are decoded one at a time.

        Args:
            temperature: softmax temperature; ``0`` means greedy (argmax) decoding.
            top_k: sample only among the ``top_k`` most likely tokens.
            top_p: nucleus sampling: the smallest set of tokens whose probability reaches
                ``top_p`` (the most likely token is always kept).
            eos_token_id: a sequence that produces it is finished and padded with it after;
                generation stops early (``n < max_new_tokens``) once every sequence finished.
                ``None``: never stop early.
            generator: a ``torch.Generator`` on the model's device for reproducible sampling.
        """
        self._check_ids("input_ids", input_ids)
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or max_new_tokens < 0
        ):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not temperature >= 0
        ):
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
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
        if max_new_tokens == 0:
            return input_ids.clone()

        B, T = input_ids.shape
        was_training = self.training
        self.eval()  # decoding must not feed the MoE balancing statistics
        try:
            cache = self.new_cache(B, capacity=T + max_new_tokens)
            logits = self(input_ids, cache=cache, logits_to_keep=1)[:, -1]
            finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            out = [input_ids]
            for step in range(max_new_tokens):
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    token = token.masked_fill(finished, eos_token_id)
                    finished |= token == eos_token_id
                out.append(token[:, None].to(input_ids.dtype))
                if step == max_new_tokens - 1 or (
                    eos_token_id is not None and bool(finished.all())
                ):
                    break
                logits = self(out[-1], cache=cache, logits_to_keep=1)[:, -1]
        finally:
            self.train(was_training)
        return torch.cat(out, dim=1)

    # ----------------------------------------------------------------- checkpoints
    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict under the release names (per-expert keys), without a tied LM head."""
        sd = to_release_state_dict(self.state_dict())
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    def save_pretrained(
        self, save_directory: str | os.PathLike, max_shard_size: int | None = None
    ) -> None:
        """Write ``config.json`` and the weights as safetensors under the release names.

        Args:
            save_directory: created if missing.
            max_shard_size: if given (bytes), split the weights into
                ``model-0000i-of-0000n.safetensors`` files of at most about that size plus a
                ``model.safetensors.index.json``; otherwise one ``model.safetensors``.
        """
        from safetensors.torch import save_file

        if max_shard_size is not None and (
            isinstance(max_shard_size, bool)
            or not isinstance(max_shard_size, int)
            or max_shard_size <= 0
        ):
            raise ValueError(
                f"max_shard_size must be None or a positive int (bytes), got {max_shard_size!r}"
            )
        if self.device.type == "meta":
            raise ValueError(
                "cannot save a model on the meta device (its weights are not materialised)"
            )
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        hf = self.config.to_hf_config()
        hf[_EXTRA_CONFIG_KEY] = {f: getattr(self.config, f) for f in _EXTRA_CONFIG_FIELDS}
        hf["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        (out / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n")

        sd = {k: v.detach().contiguous().cpu() for k, v in self.release_state_dict().items()}
        for stale in [
            *out.glob("model-*-of-*.safetensors"),
            out / WEIGHTS_NAME,
            out / WEIGHTS_INDEX_NAME,
        ]:
            if stale.exists():
                stale.unlink()
        if max_shard_size is None:
            save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
            return
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for k, v in sd.items():
            nbytes = v.numel() * v.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][k] = v
            size += nbytes
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        index = {
            "metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
            "weight_map": weight_map,
        }
        (out / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_dir: str | os.PathLike,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **config_overrides: Any,
    ) -> KimiLinearForCausalLM:
        """Load a model saved by :meth:`save_pretrained` or a release checkpoint folder.

        Reads ``config.json`` (:meth:`KimiLinearConfig.from_hf_config`) and ``model.safetensors``
        or the shards listed in ``model.safetensors.index.json``; loading is strict (every
        weight present, no unknown names).  ``dtype`` casts the weights (the fp32 parameters of
        :data:`FP32_PARAMETER_NAMES` stay fp32); by default they keep the stored dtype.
        ``config_overrides`` replace config fields (e.g. ``kda_backend="torch"``).
        """
        from safetensors.torch import load_file

        root = Path(pretrained_dir)
        if not (root / CONFIG_NAME).is_file():
            raise ValueError(f"pretrained_dir: no {CONFIG_NAME} in {str(root)!r}")
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
        hf = json.loads((root / CONFIG_NAME).read_text())
        config = KimiLinearConfig.from_hf_config(hf)
        extra = {
            k: v for k, v in (hf.get(_EXTRA_CONFIG_KEY) or {}).items() if k in _EXTRA_CONFIG_FIELDS
        }
        unknown = sorted(set(config_overrides) - set(config.to_dict()))
        if unknown:
            raise ValueError(f"config_overrides: unknown KimiLinearConfig fields {unknown}")
        config = config.replace(**{**extra, **config_overrides})

        if (root / WEIGHTS_INDEX_NAME).is_file():
            index = json.loads((root / WEIGHTS_INDEX_NAME).read_text())
            files = sorted(set(index["weight_map"].values()))
        elif (root / WEIGHTS_NAME).is_file():
            files = [WEIGHTS_NAME]
        else:
            raise ValueError(
                f"pretrained_dir: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} in {str(root)!r}"
            )
        sd: dict[str, torch.Tensor] = {}
        for fname in files:
            sd.update(load_file(str(root / fname), device="cpu"))

        with torch.device(device if device is not None else "cpu"):
            model = cls(config)
        if config.tie_word_embeddings and "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")  # type: ignore[assignment]
        stored = next((v.dtype for k, v in sd.items() if k.endswith("embed_tokens.weight")), None)
        cast_model_(model, dtype or stored or torch.float32)
        model.load_state_dict(sd, strict=True)
        return model
