"""Hugging Face interop: ``config.json`` conversion, weight names, checkpoint save and load.

Everything that touches the on-disk formats lives here (one source per rule):

* **Config** (:func:`config_from_hf`, :func:`config_to_hf`).  Reads the two forms of a
  Kimi-Linear ``config.json`` a user meets: the release (Moonshot remote-code) form, with
  ``linear_attn_config`` (1-based ``full_attn_layers`` / ``kda_layers``), ``first_k_dense_replace``,
  ``mla_use_nope``, ``num_experts`` ...; and the form transformers' native ``KimiLinearConfig``
  writes (``layer_types``, ``mlp_layer_types``, ``linear_head_dim``, ``linear_num_heads``,
  ``linear_conv_kernel_dim``, ``n_group``, ``num_local_experts``, ``num_experts_per_tok``,
  ``n_shared_experts``, ...).  It never builds a different model silently: contradicting keys, a
  layer listed as both KDA and MLA (or neither), a key whose value changes the model but is not
  implemented, and unknown keys raise ``ValueError`` naming the key.  Keys that do not change
  the model are listed once, in :data:`IGNORED_KEYS` (any value) and :data:`NOOP_KEYS` (no-op only
  at the listed values).  Absent keys take transformers' ``KimiLinearConfig`` defaults (which are
  the release values), so the kit and transformers read a file the same way.
  :func:`config_to_hf` writes the release form (plus ``mlp_layer_types``, which transformers
  needs when ``moe_layer_freq > 1``; a per-layer pattern the release's two fields cannot
  express, ``KimiLinearConfig.mlp_layer_types``, as ``mlp_layer_types`` alone).
* **Weight names** (:func:`route_weight`, :func:`release_state_dict`).  The kit's modules carry
  the release names, except that MoE experts are stacked (``experts.w1 [E, I, D]``) where the
  release stores ``experts.{e}.w1.weight``.  The loader also reads what transformers writes:
  its default ``save_pretrained`` (release names, but dense-layer MLPs as
  ``block_sparse_moe.{gate,up,down}_proj``) and its internal layout
  (``save_original_format=False``: ``mlp.experts.gate_up_proj``, one packed ``conv1d``,
  ``forget_gate.*``).  The saver writes release names.
* **Checkpoints** (:func:`save_pretrained`, :func:`load_pretrained`).  Loading builds the model on
  the meta device, allocates it once in the target dtype and device, and copies the
  safetensors shards in one tensor at a time, so peak host memory stays near the model plus a
  few shards' pages (``benchmarks/load_memory.py``: 1.23x a 928 MiB bf16 checkpoint, against
  3.04x for reading it whole into an fp32 model).  Corrupt or truncated ``config.json``,
  index or safetensors files raise a one-line ``ValueError`` naming the file.

``KimiLinearConfig.from_hf_config`` / ``to_hf_config`` and
``KimiLinearForCausalLM.from_pretrained`` / ``save_pretrained`` are thin wrappers over this
module.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kimi_linear.config import KimiLinearConfig
from kimi_linear.errors import did_you_mean

if TYPE_CHECKING:
    from kimi_linear.model import KimiLinearForCausalLM

__all__ = [
    "CONFIG_NAME",
    "IGNORED_KEYS",
    "NOOP_KEYS",
    "NonFiniteWeightsWarning",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "check_output_dir",
    "config_from_hf",
    "config_to_hf",
    "load_pretrained",
    "load_weights_",
    "read_config_json",
    "release_state_dict",
    "route_weight",
    "save_pretrained",
    "stack_release_expert_keys",
    "to_release_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
#: section of config.json holding the kit's own fields (absent from the release form)
EXTRA_CONFIG_KEY = "kimi_linear"
EXTRA_CONFIG_FIELDS = ("name", "kda_gate", "kda_chunk_size", "moe_bias_update_rate")

# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
#: Keys that never change the model, whatever their value (bookkeeping, output switches,
#: and values the kit derives itself).
IGNORED_KEYS: dict[str, str] = {
    "architectures": "bookkeeping",
    "auto_map": "remote-code class names",
    "transformers_version": "bookkeeping",
    "_name_or_path": "bookkeeping (used as the config name)",
    "_commit_hash": "bookkeeping",
    "dtype": "storage dtype (the loader reads the tensors' own dtype)",
    "torch_dtype": "storage dtype (the loader reads the tensors' own dtype)",
    "use_cache": "generation switch",
    "output_router_logits": "output switch",
    "output_hidden_states": "output switch",
    "output_attentions": "output switch",
    "return_dict": "output switch",
    "head_dim": "legacy field (72 in the release; transformers writes qk_rope_head_dim)",
    "initializer_range": "initialisation only (kept as KimiLinearConfig.initializer_range)",
    "tokenizer_class": "tokenizer",
    "id2label": "classification heads",
    "label2id": "classification heads",
    "problem_type": "classification heads",
    "chunk_size_feed_forward": "transformers switch (0: off)",
    "is_encoder_decoder": "transformers switch",
}

#: Keys that are no-ops only at the listed values; any other value changes the model in a way
#: the kit does not implement and raises ``ValueError`` naming the key.
NOOP_KEYS: dict[str, tuple[Any, ...]] = {
    "attention_bias": (False,),
    "attention_dropout": (0, 0.0, None),
    "pretraining_tp": (1, None),
    "num_nextn_predict_layers": (0, None),  # multi-token-prediction layers
    "topk_method": ("noaux_tc",),
    "scoring_func": ("sigmoid",),
    "moe_router_activation_func": ("sigmoid",),
    "hidden_act": ("silu",),
    "use_grouped_topk": (True,),  # False is accepted too when num_expert_group == 1
    "quantization_config": (None,),
    "linear_attn_config.use_full_rank_gate": (False, None),
    "safe_gate": (False, True),  # fla's kernel switch; the gate itself is set by lower_bound
}

# Absent keys take transformers' KimiLinearConfig defaults (= the release values).
_DEFAULTS: dict[str, Any] = {
    "intermediate_size": 9216,
    "moe_intermediate_size": 1024,
    "num_shared_experts": 1,
    "routed_scaling_factor": 2.446,
    "kv_lora_rank": 512,
    "q_lora_rank": None,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "num_expert_group": 1,
    "topk_group": 1,
    "num_experts_per_token": 8,
    "num_experts": 256,
    "moe_renormalize": True,
    "max_position_embeddings": 1048576,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "pad_token_id": None,
    "bos_token_id": None,
    "eos_token_id": None,
    "kda_head_dim": 128,
    "kda_num_heads": 32,
    "kda_conv_size": 4,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
}

_LINEAR_ATTN_KEYS = (
    "full_attn_layers",
    "kda_layers",
    "num_heads",
    "head_dim",
    "short_conv_kernel_size",
    "gate_lower_bound",
    "use_full_rank_gate",
)


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The dict in ``path`` (a ``config.json`` or a folder holding one); ``ValueError`` naming
    the file when it is missing, not valid JSON (e.g. truncated) or not a JSON object."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not p.is_file():
        raise ValueError(f"no {CONFIG_NAME} at {str(p)!r}")
    return _read_json(p, "a Kimi-Linear config")


def _read_json(p: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e}); is the file truncated?") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object ({what}), got {type(data).__name__}")
    return data


class _Reader:
    """Reads keys (with aliases) from a config dict, checks that aliases agree, and remembers
    which keys were used, so that the rest can be checked against the ignorable lists."""

    def __init__(self, hf: Mapping[str, Any]) -> None:
        self.hf = hf
        self.used: set[str] = set()

    def has(self, *names: str) -> bool:
        return any(n in self.hf for n in names)

    def get(self, *names: str, default: Any = None) -> Any:
        found = [(n, self.hf[n]) for n in names if n in self.hf]
        self.used.update(n for n, _ in found)
        if not found:
            return default
        first_name, first = found[0]
        for n, v in found[1:]:
            if v != first:
                raise ValueError(
                    f"config.json: {first_name}={first!r} contradicts {n}={v!r} (the same setting)"
                )
        return first


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"config.json: {name} must be an int, got {v!r}")
    return v


def _layer_kinds(r: _Reader, n: int) -> tuple[str, ...]:
    """KDA / MLA per layer from ``linear_attn_config`` (1-based lists) and / or ``layer_types``."""
    lin = r.get("linear_attn_config")
    if lin is not None and not isinstance(lin, dict):
        raise ValueError(f"config.json: linear_attn_config must be an object, got {lin!r}")
    lin = lin or {}
    for key in lin:
        if key not in _LINEAR_ATTN_KEYS:
            raise ValueError(
                f"config.json: unknown key linear_attn_config.{key}{did_you_mean(key, _LINEAR_ATTN_KEYS)}; "
                "it may change the model and is not implemented"
            )
    from_lists: list[str] | None = None
    if "full_attn_layers" in lin or "kda_layers" in lin:
        for key in ("full_attn_layers", "kda_layers"):
            if not isinstance(lin.get(key), list):
                raise ValueError(
                    f"config.json: linear_attn_config.{key} must be a list of 1-based layer ids "
                    f"(both full_attn_layers and kda_layers are needed), got {lin.get(key)!r}"
                )
        ids = {}
        for key in ("full_attn_layers", "kda_layers"):
            vals = lin[key]
            bad = [
                i for i in vals if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= n
            ]
            if bad:
                raise ValueError(
                    f"config.json: linear_attn_config.{key} layer ids are 1-based in [1, {n}], got {bad}"
                )
            if len(set(vals)) != len(vals):
                raise ValueError(
                    f"config.json: linear_attn_config.{key} lists a layer twice: {vals}"
                )
            ids[key] = set(vals)
        both = sorted(ids["full_attn_layers"] & ids["kda_layers"])
        if both:
            raise ValueError(
                "config.json: linear_attn_config lists layers (1-based) as both KDA (kda_layers) "
                f"and MLA (full_attn_layers): {both}"
            )
        neither = sorted(set(range(1, n + 1)) - ids["full_attn_layers"] - ids["kda_layers"])
        if neither:
            raise ValueError(
                "config.json: linear_attn_config lists layers (1-based) in neither kda_layers nor "
                f"full_attn_layers: {neither}"
            )
        from_lists = ["mla" if i + 1 in ids["full_attn_layers"] else "kda" for i in range(n)]
    from_types: list[str] | None = None
    types = r.get("layer_types")
    if types is not None:
        names = {"linear_attention": "kda", "full_attention": "mla"}
        if not isinstance(types, list) or len(types) != n:
            raise ValueError(
                f"config.json: layer_types must be a list of num_hidden_layers={n} entries, got {types!r}"
            )
        bad = [t for t in types if t not in names]
        if bad:
            raise ValueError(
                f"config.json: layer_types entries must be 'linear_attention' or 'full_attention', got {bad[0]!r}"
            )
        from_types = [names[t] for t in types]
    if from_lists is not None and from_types is not None and from_lists != from_types:
        raise ValueError(
            "config.json: layer_types contradicts linear_attn_config.full_attn_layers / kda_layers"
        )
    kinds = from_lists or from_types
    if kinds is None:
        if lin:
            raise ValueError(
                "config.json: linear_attn_config needs full_attn_layers and kda_layers (1-based) "
                "to say which layers are KDA"
            )
        if r.has("linear_attn_config"):  # explicitly null: the release's "no KDA layers"
            return ("mla",) * n
        raise ValueError(
            "config.json: no layer pattern (linear_attn_config with full_attn_layers / kda_layers, "
            "or layer_types); readers disagree on the default, so it must be given"
        )
    return tuple(kinds)


def _moe_rule(first_k: int, freq: int, n: int) -> list[bool]:
    """MoE per layer by the rule ``i >= first_k_dense_replace and i % moe_layer_freq == 0``."""
    return [i >= first_k and i % freq == 0 for i in range(n)]


def _rule_of(sparse: list[bool]) -> tuple[int, int] | None:
    """``(first_k_dense_replace, moe_layer_freq)`` that give the MoE layers ``sparse``, or
    ``None`` when no rule does (e.g. dense layers between MoE layers)."""
    n = len(sparse)
    if not any(sparse):
        return n, 1
    k = sparse.index(True)
    return next(((k, f) for f in range(1, n + 1) if _moe_rule(k, f, n) == sparse), None)


def _moe_pattern(r: _Reader, n: int, num_experts: int) -> tuple[int, int, tuple[str, ...] | None]:
    """``(first_k_dense_replace, moe_layer_freq, mlp_layer_types)`` from those keys and / or
    ``mlp_layer_types``: the rule's two fields when they express the pattern (the list is then
    ``None``), else the defaults and the explicit per-layer list (``"dense"`` / ``"moe"``)."""
    first_k = r.get("first_k_dense_replace")
    freq = r.get("moe_layer_freq")
    types = r.get("mlp_layer_types")
    if first_k is not None:
        first_k = _as_int("first_k_dense_replace", first_k)
    if freq is not None:
        freq = _as_int("moe_layer_freq", freq)
        if freq < 1:
            raise ValueError(f"config.json: moe_layer_freq must be >= 1, got {freq}")
    if types is None:
        return (
            _DEFAULTS["first_k_dense_replace"] if first_k is None else first_k,
            _DEFAULTS["moe_layer_freq"] if freq is None else freq,
            None,
        )
    if (
        not isinstance(types, list)
        or len(types) != n
        or any(t not in ("dense", "sparse") for t in types)
    ):
        raise ValueError(
            f"config.json: mlp_layer_types must be a list of num_hidden_layers={n} entries, each "
            f"'dense' or 'sparse', got {types!r}"
        )
    sparse = [t == "sparse" for t in types]
    if any(sparse) and num_experts == 0:
        raise ValueError("config.json: mlp_layer_types has 'sparse' layers but num_experts is 0")

    if first_k is not None or freq is not None:
        k = _DEFAULTS["first_k_dense_replace"] if first_k is None else first_k
        f = _DEFAULTS["moe_layer_freq"] if freq is None else freq
        if num_experts and _moe_rule(k, f, n) != sparse:
            raise ValueError(
                f"config.json: mlp_layer_types contradicts first_k_dense_replace={k} / "
                f"moe_layer_freq={f}"
            )
        return k, f, None
    rule = _rule_of(sparse)
    if rule is not None:
        return (*rule, None)
    # any other pattern (e.g. dense layers between MoE layers): the explicit per-layer list
    return (
        _DEFAULTS["first_k_dense_replace"],
        _DEFAULTS["moe_layer_freq"],
        tuple("moe" if s else "dense" for s in sparse),
    )


def config_from_hf(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> KimiLinearConfig:
    """A :class:`KimiLinearConfig` from a Kimi-Linear ``config.json`` (its path, its folder, or
    the dict), in the release or the transformers-native form (see the module docstring)."""
    if isinstance(path_or_dict, Mapping):
        hf = dict(path_or_dict)
    elif isinstance(path_or_dict, (str, os.PathLike)):
        hf = read_config_json(path_or_dict)
    else:
        raise ValueError(
            f"path_or_dict must be a path or a dict, got {type(path_or_dict).__name__}"
        )
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"config.json lacks required keys {missing}")
    r = _Reader(hf)
    model_type = r.get("model_type", default="kimi_linear")
    if model_type != "kimi_linear":
        raise ValueError(f"config.json: model_type must be 'kimi_linear', got {model_type!r}")
    n = _as_int("num_hidden_layers", r.get("num_hidden_layers"))
    heads = r.get("num_attention_heads")
    kv_heads = r.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != heads:
        raise ValueError(
            f"config.json: num_key_value_heads={kv_heads} must equal num_attention_heads={heads} "
            "(MLA shares one latent; grouped heads are not implemented)"
        )
    layer_types = _layer_kinds(r, n)
    lin = hf.get("linear_attn_config") or {}

    def lin_get(key: str, native: str, default_key: str) -> Any:
        vals = [(f"linear_attn_config.{key}", lin[key])] if key in lin else []
        if native in hf:
            r.used.add(native)
            vals.append((native, hf[native]))
        for name, v in vals[1:]:
            if v != vals[0][1]:
                raise ValueError(
                    f"config.json: {vals[0][0]}={vals[0][1]!r} contradicts {name}={v!r}"
                )
        return vals[0][1] if vals else _DEFAULTS[default_key]

    kda_num_heads = lin_get("num_heads", "linear_num_heads", "kda_num_heads")
    kda_head_dim = lin_get("head_dim", "linear_head_dim", "kda_head_dim")
    kda_conv = lin_get("short_conv_kernel_size", "linear_conv_kernel_dim", "kda_conv_size")
    # safe gate: Kimi K3 / release-style key, transformers' glm5-style key, fla's key
    bounds = [("linear_attn_config.gate_lower_bound", lin.get("gate_lower_bound"))]
    for key in ("linear_lower_bound", "lower_bound"):
        if key in hf:
            r.used.add(key)
            bounds.append((key, hf[key]))
    given = [(k, v) for k, v in bounds if v is not None]
    for k, v in given[1:]:
        if v != given[0][1]:
            raise ValueError(f"config.json: {given[0][0]}={given[0][1]!r} contradicts {k}={v!r}")
    lower_bound = given[0][1] if given else None
    if hf.get("safe_gate") and lower_bound is None:
        raise ValueError("config.json: safe_gate is true but no lower_bound is given")

    num_experts = r.get("num_experts", "num_local_experts", "n_routed_experts", default=None)
    num_experts = _DEFAULTS["num_experts"] if num_experts is None else num_experts
    first_k, freq, mlp_types = _moe_pattern(r, n, num_experts)
    groups = r.get("num_expert_group", "n_group", default=_DEFAULTS["num_expert_group"])
    if hf.get("use_grouped_topk") is False and groups == 1:
        r.used.add("use_grouped_topk")  # plain top-k is grouped top-k with one group
    nope = r.get("mla_use_nope", default=True)  # transformers' KimiLinear is always NoPE
    qk_nope = r.get("qk_nope_head_dim", default=_DEFAULTS["qk_nope_head_dim"])
    qk_rope = r.get("qk_rope_head_dim", default=_DEFAULTS["qk_rope_head_dim"])
    qk_head = r.get("qk_head_dim")
    if qk_head is not None and qk_head != qk_nope + qk_rope:
        raise ValueError(
            f"config.json: qk_head_dim={qk_head} must be qk_nope_head_dim + qk_rope_head_dim = "
            f"{qk_nope + qk_rope}"
        )
    rope_theta = r.get("rope_theta")
    rope_params = r.get("rope_parameters")
    rope_scaling = r.get("rope_scaling")
    if rope_params is not None:
        if not isinstance(rope_params, dict):
            raise ValueError(f"config.json: rope_parameters must be an object, got {rope_params!r}")
        if "rope_theta" in rope_params:
            if rope_theta is not None and rope_theta != rope_params["rope_theta"]:
                raise ValueError(
                    f"config.json: rope_theta={rope_theta} contradicts rope_parameters.rope_theta="
                    f"{rope_params['rope_theta']}"
                )
            rope_theta = rope_params["rope_theta"]
        if rope_params.get("rope_type", "default") != "default" and not nope:
            raise ValueError(
                f"config.json: rope_parameters.rope_type={rope_params['rope_type']!r} is not "
                "implemented (only plain RoPE)"
            )
    if rope_scaling is not None and not nope:
        raise ValueError(
            f"config.json: rope_scaling={rope_scaling!r} is not implemented (only plain RoPE); "
            "with mla_use_nope it would not matter"
        )
    extra = hf.get(EXTRA_CONFIG_KEY) or {}
    r.used.add(EXTRA_CONFIG_KEY)
    if not isinstance(extra, dict):
        raise ValueError(f"config.json: {EXTRA_CONFIG_KEY} must be an object, got {extra!r}")
    for key in extra:
        if key not in EXTRA_CONFIG_FIELDS:
            raise ValueError(
                f"config.json: unknown key {EXTRA_CONFIG_KEY}.{key}{did_you_mean(key, EXTRA_CONFIG_FIELDS)}"
            )

    kwargs: dict[str, Any] = dict(
        name=extra.get("name") or hf.get("_name_or_path") or "kimi_linear",
        vocab_size=r.get("vocab_size"),
        hidden_size=r.get("hidden_size"),
        num_hidden_layers=n,
        layer_types=layer_types,
        rms_norm_eps=r.get("rms_norm_eps", default=_DEFAULTS["rms_norm_eps"]),
        tie_word_embeddings=r.get("tie_word_embeddings", default=False),
        initializer_range=hf.get("initializer_range", _DEFAULTS["initializer_range"]),
        max_position_embeddings=r.get(
            "model_max_length",
            "max_position_embeddings",
            default=_DEFAULTS["max_position_embeddings"],
        ),
        bos_token_id=_first_id(r.get("bos_token_id")),
        eos_token_id=_first_id(r.get("eos_token_id")),
        pad_token_id=_first_id(r.get("pad_token_id")),
        kda_num_heads=kda_num_heads,
        kda_head_dim=kda_head_dim,
        kda_conv_size=kda_conv,
        kda_gate_lower_bound=lower_bound,
        num_attention_heads=heads,
        q_lora_rank=r.get("q_lora_rank", default=None),
        kv_lora_rank=r.get("kv_lora_rank", default=_DEFAULTS["kv_lora_rank"]),
        qk_nope_head_dim=qk_nope,
        qk_rope_head_dim=qk_rope,
        v_head_dim=r.get("v_head_dim", default=_DEFAULTS["v_head_dim"]),
        mla_use_nope=nope,
        rope_theta=_DEFAULTS["rope_theta"] if rope_theta is None else rope_theta,
        intermediate_size=r.get("intermediate_size", default=_DEFAULTS["intermediate_size"]),
        num_experts=num_experts,
        num_experts_per_token=r.get(
            "num_experts_per_token",
            "num_experts_per_tok",
            default=_DEFAULTS["num_experts_per_token"],
        ),
        num_shared_experts=r.get(
            "num_shared_experts", "n_shared_experts", default=_DEFAULTS["num_shared_experts"]
        )
        or 0,
        moe_intermediate_size=r.get(
            "moe_intermediate_size", default=_DEFAULTS["moe_intermediate_size"]
        ),
        first_k_dense_replace=min(first_k, n) if num_experts else first_k,
        moe_layer_freq=freq,
        mlp_layer_types=mlp_types,
        num_expert_group=groups,
        topk_group=r.get("topk_group", default=_DEFAULTS["topk_group"]) or 1,
        routed_scaling_factor=r.get(
            "routed_scaling_factor", default=_DEFAULTS["routed_scaling_factor"]
        ),
        moe_renormalize=r.get("moe_renormalize", "norm_topk_prob", default=True),
        **{k: extra[k] for k in EXTRA_CONFIG_FIELDS if k in extra and k != "name"},
    )
    # every key must now be used, ignorable, or a no-op at its value
    for key, value in hf.items():
        if key in r.used or key in IGNORED_KEYS or key == "linear_attn_config":
            continue
        if key in NOOP_KEYS:
            if value not in NOOP_KEYS[key] or isinstance(value, bool) != isinstance(
                NOOP_KEYS[key][0], bool
            ):
                raise ValueError(
                    f"config.json: {key}={value!r} changes the model and is not implemented "
                    f"(implemented: {list(NOOP_KEYS[key])})"
                )
            continue
        known = [*r.used, *IGNORED_KEYS, *NOOP_KEYS, *_DEFAULTS]
        raise ValueError(
            f"config.json: unknown key {key!r}{did_you_mean(key, known)}; it may change the model "
            "and is not implemented (list harmless keys in kimi_linear.hf.IGNORED_KEYS)"
        )
    if "use_full_rank_gate" in lin and lin["use_full_rank_gate"] not in (False, None):
        raise ValueError(
            "config.json: linear_attn_config.use_full_rank_gate="
            f"{lin['use_full_rank_gate']!r} (Kimi K3's full-rank decay) is not implemented"
        )
    try:
        return KimiLinearConfig(**kwargs)
    except TypeError as e:  # a value of the wrong type deep in validation
        raise ValueError(f"config.json: {e}") from None


def config_to_hf(config: KimiLinearConfig) -> dict[str, Any]:
    """``config`` as a release-form ``config.json`` dict (plus ``mlp_layer_types`` and, for
    kit-only fields, the ``kimi_linear`` section).  transformers' ``KimiLinearConfig`` reads it as
    the same model, except the safe gate (``linear_attn_config.gate_lower_bound``), which
    transformers' KimiLinear does not implement."""
    kinds = config.layer_kinds
    lin: dict[str, Any] = {
        "full_attn_layers": [i + 1 for i, t in enumerate(kinds) if t == "mla"],
        "kda_layers": [i + 1 for i, t in enumerate(kinds) if t == "kda"],
        "num_heads": config.kda_num_heads,
        "head_dim": config.kda_head_dim,
        "short_conv_kernel_size": config.kda_conv_size,
    }
    if config.kda_gate_lower_bound is not None:
        lin["gate_lower_bound"] = config.kda_gate_lower_bound
    n = config.num_hidden_layers
    hf: dict[str, Any] = {
        "architectures": ["KimiLinearForCausalLM"],
        "model_type": "kimi_linear",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": n,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "model_max_length": config.max_position_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "linear_attn_config": lin,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,
        "q_lora_rank": config.q_lora_rank,
        "kv_lora_rank": config.kv_lora_rank,
        "qk_nope_head_dim": config.qk_nope_head_dim,
        "qk_rope_head_dim": config.qk_rope_head_dim,
        "v_head_dim": config.v_head_dim,
        "mla_use_nope": config.mla_use_nope,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "intermediate_size": config.intermediate_size,
        "num_experts": config.num_experts,
        "num_experts_per_token": config.num_experts_per_token,
        "num_shared_experts": config.num_shared_experts,
        "moe_intermediate_size": config.moe_intermediate_size,
        "first_k_dense_replace": config.first_k_dense_replace,
        "moe_layer_freq": config.moe_layer_freq,
        "mlp_layer_types": ["sparse" if config.is_moe_layer(i) else "dense" for i in range(n)],
        "routed_scaling_factor": config.routed_scaling_factor,
        "moe_renormalize": config.moe_renormalize,
        "moe_router_activation_func": "sigmoid",
        "use_grouped_topk": True,
        "num_expert_group": config.num_expert_group,
        "topk_group": config.topk_group,
        "num_nextn_predict_layers": 0,
        "use_cache": True,
        "dtype": "bfloat16",
    }
    if config.mlp_layer_types is not None and config.num_experts:
        rule = _rule_of([config.is_moe_layer(i) for i in range(n)])
        if rule is not None:  # an explicit list the release's two fields can spell
            hf["first_k_dense_replace"], hf["moe_layer_freq"] = rule
        else:  # mlp_layer_types alone (what transformers reads; the release's remote code
            # cannot build such a model)
            del hf["first_k_dense_replace"], hf["moe_layer_freq"]
    defaults = KimiLinearConfig.__dataclass_fields__
    extra = {
        f: getattr(config, f)
        for f in EXTRA_CONFIG_FIELDS
        if f != "name" and getattr(config, f) != defaults[f].default
    }
    if extra:
        hf[EXTRA_CONFIG_KEY] = {"name": config.name, **extra}
    return hf


def _first_id(v: Any) -> int | None:
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else None
    return v


# ---------------------------------------------------------------------------------------------
# weight names
# ---------------------------------------------------------------------------------------------
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts\.)(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_STACKED = re.compile(r"^(?P<prefix>(?:.*\.)?experts\.)(?P<w>w[123])$")
_LAYER = r"^(?P<p>model\.layers\.\d+\.)"
_TF_DENSE = re.compile(_LAYER + r"block_sparse_moe\.(?P<rest>(?:gate|up|down)_proj\.weight)$")
_TF_GATE_UP = re.compile(_LAYER + r"mlp\.experts\.gate_up_proj$")
_TF_DOWN = re.compile(_LAYER + r"mlp\.experts\.down_proj$")
_TF_MOE = re.compile(_LAYER + r"mlp\.(?P<rest>(?:gate|shared_experts)\..+)$")
_TF_CONV = re.compile(_LAYER + r"self_attn\.conv1d\.weight$")
_TF_FORGET = re.compile(_LAYER + r"self_attn\.forget_gate\.(?P<rest>.+)$")

#: how a stored tensor lands in a kit tensor: ("full",) the whole of it; ("index", e) as its
#: row ``e`` (one expert of a stacked tensor); ("narrow", dim, start, n) the stored tensor's slice
#: ``narrow(dim, start, n)`` is the whole kit tensor (one part of a packed tensor)
Part = tuple[Any, ...]
FULL: Part = ("full",)


def _view(t: torch.Tensor, part: Part) -> torch.Tensor:
    """The part of kit tensor ``t`` that a stored tensor fills (all of it unless ``index``)."""
    return t[part[1]] if part[0] == "index" else t


_SHARED_EXPERT = re.compile(
    r"^model\.layers\.(?P<i>\d+)\.(?:block_sparse_moe|mlp)\.shared_experts\.[a-z_]+\.weight$"
)


def _no_shared_expert(
    name: str, shape: tuple[int, ...], config: KimiLinearConfig, path: Path
) -> bool:
    """Whether the stored tensor ``name`` (no place in the model) is a shared-expert tensor of
    zero size in a MoE layer of a model with ``num_shared_experts == 0``: transformers and the
    release code build the shared expert at width ``moe_intermediate_size * n_shared_experts``,
    so they save ``[0, D]`` / ``[D, 0]`` tensors where the kit has no module (nothing to load).
    A non-empty one there is a ``ValueError`` naming the count in config.json."""
    m = _SHARED_EXPERT.match(name)
    if m is None or config.num_shared_experts != 0:
        return False
    i = int(m["i"])
    if i >= config.num_hidden_layers or not config.is_moe_layer(i):
        return False
    if math.prod(shape) == 0:
        return True
    raise ValueError(
        f"{path}: tensor {name!r} has shape {list(shape)}, a shared expert, but config.json has "
        "num_shared_experts=0 (n_shared_experts; no shared expert); does config.json match the "
        "weights?"
    )


def route_weight(name: str, targets: Mapping[str, torch.Tensor]) -> list[tuple[str, Part]] | None:
    """Where the stored tensor ``name`` goes among the kit's state-dict tensors ``targets``.

    Returns ``[(kit_name, part), ...]`` (one entry, or several for a packed tensor) or ``None``
    when ``name`` has no place in this model.  Handles, in this order: the kit's own names (the
    release names with stacked experts); the release's per-expert ``experts.{e}.w{1,2,3}.weight``;
    transformers' default save of dense MLPs as ``block_sparse_moe.{gate,up,down}_proj``; and
    transformers' internal layout (``mlp.experts.gate_up_proj`` = ``[w1 | w3]`` on dim 1,
    ``mlp.experts.down_proj`` = ``w2``, ``mlp.gate.*`` / ``mlp.shared_experts.*``, the packed
    ``self_attn.conv1d`` = ``[q | k | v]`` on dim 0, ``self_attn.forget_gate.*``).
    """
    if name in targets:
        return [(name, FULL)]
    m = _PER_EXPERT.match(name)
    if m:
        t = m["prefix"] + m["w"]
        return [(t, ("index", int(m["e"])))] if t in targets else None
    m = _TF_DENSE.match(name)
    if m:
        t = m["p"] + "mlp." + m["rest"]
        return [(t, FULL)] if t in targets else None
    m = _TF_GATE_UP.match(name)
    if m:
        w1, w3 = (m["p"] + f"block_sparse_moe.experts.{w}" for w in ("w1", "w3"))
        if w1 not in targets or w3 not in targets:
            return None
        inter = targets[w1].shape[1]
        return [(w1, ("narrow", 1, 0, inter)), (w3, ("narrow", 1, inter, inter))]
    m = _TF_DOWN.match(name)
    if m:
        t = m["p"] + "block_sparse_moe.experts.w2"
        return [(t, FULL)] if t in targets else None
    m = _TF_MOE.match(name)
    if m:
        t = m["p"] + "block_sparse_moe." + m["rest"]
        return [(t, FULL)] if t in targets else None
    m = _TF_CONV.match(name)
    if m:
        convs = [m["p"] + f"self_attn.{x}_conv1d.weight" for x in "qkv"]
        if any(c not in targets for c in convs):
            return None
        P = targets[convs[0]].shape[0]
        return [(c, ("narrow", 0, j * P, P)) for j, c in enumerate(convs)]
    m = _TF_FORGET.match(name)
    if m:
        t = m["p"] + "self_attn." + m["rest"]
        return [(t, FULL)] if t in targets else None
    return None


def stack_release_expert_keys(
    state_dict: dict[str, torch.Tensor], prefix: str, num_experts: int
) -> None:
    """In place: replace ``{prefix}{e}.w1.weight`` (w2, w3) for every ``e < num_experts`` by the
    stacked ``{prefix}w1``.  Runs per projection only when every expert's key is present and the
    stacked key is not; otherwise leaves the dict alone, so strict loading reports the gap.
    (The load pre-hook of :class:`~kimi_linear.layers.moe.GroupedExperts`.)"""
    for w in ("w1", "w2", "w3"):
        keys = [f"{prefix}{e}.{w}.weight" for e in range(num_experts)]
        if prefix + w in state_dict or not all(k in state_dict for k in keys):
            continue
        state_dict[prefix + w] = torch.stack([state_dict.pop(k) for k in keys], dim=0)


def _release_items(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in state_dict.items():
        m = _STACKED.match(key)
        if m is None:
            yield key, value
            continue
        if not isinstance(value, torch.Tensor) or value.dim() != 3:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"state_dict[{key!r}] must be a 3-D [E, out, in] expert tensor, got {shape}"
            )
        for e in range(value.shape[0]):
            yield f"{m['prefix']}{e}.{m['w']}.weight", value[e]


def to_release_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split every stacked ``...experts.w1 / w2 / w3`` (3-D) into the release's per-expert keys.

    ``a.experts.w1 [E, I, D]`` becomes ``a.experts.{e}.w1.weight [I, D]`` for ``e < E`` (each a
    contiguous copy, so safetensors can save them); other keys pass through unchanged, in order.
    """
    return {k: (v.clone() if _PER_EXPERT.match(k) else v) for k, v in _release_items(state_dict)}


def release_state_dict(model: KimiLinearForCausalLM) -> dict[str, torch.Tensor]:
    """``model``'s weights under the release names (per-expert keys).  With tied embeddings
    ``lm_head.weight`` is written too (an equal copy), since transformers' KimiLinear does not
    tie and would otherwise start from a random head."""
    return to_release_state_dict(model.state_dict())


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as a Path; ``ValueError`` when it is a file, or a non-empty folder and not
    ``overwrite`` (so an export never replaces a user's files by surprise)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output dir {str(p)!r} is a file")
    if not overwrite and p.is_dir() and any(p.iterdir()):
        names = sorted(q.name + ("/" if q.is_dir() else "") for q in p.iterdir())
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
        raise ValueError(
            f"output dir {str(p)!r} already exists and is not empty ({shown}); pass --overwrite "
            "to replace its checkpoint files, or choose another folder"
        )
    return p


def generation_config(config: KimiLinearConfig) -> dict[str, Any]:
    """The ``generation_config.json`` of ``config``: its special token ids (those set) and
    greedy decoding as the default, as transformers' ``GenerationConfig`` reads it."""
    ids = {
        k: getattr(config, k)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(config, k) is not None
    }
    return {**ids, "do_sample": False}


def save_pretrained(
    model: KimiLinearForCausalLM,
    save_directory: str | os.PathLike,
    max_shard_size: int | None = None,
) -> None:
    """Write ``config.json``, ``generation_config.json`` and the weights (safetensors, release
    names) to ``save_directory``; every file gets the process's normal file mode (umask).

    ``max_shard_size`` (bytes): split into ``model-0000i-of-0000n.safetensors`` files of at most
    that size (a larger tensor gets a file of its own) plus ``model.safetensors.index.json``, by
    ``huggingface_hub.split_torch_state_dict_into_shards`` (transformers' layout); weights that
    fit in one file, or no ``max_shard_size``, give one ``model.safetensors`` and no index.
    Shards are written one at a time (host memory: one shard of copies).  Stale weight files of
    an earlier save in the folder are removed first.
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
    if model.device.type == "meta":
        raise ValueError(
            "cannot save a model on the meta device (its weights are not materialised)"
        )
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_directory {str(out)!r} is a file")
    out.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(model.config)
    hf["dtype"] = str(model.dtype).removeprefix("torch.")
    (out / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n")
    (out / GENERATION_CONFIG_NAME).write_text(
        json.dumps(generation_config(model.config), indent=2) + "\n"
    )
    # safetensors writes its files owner-only (0600); give them the mode every other file of the
    # folder gets (the process umask's, e.g. 0644), so the export is readable wherever it is used
    file_mode = (out / CONFIG_NAME).stat().st_mode & 0o777
    for stale in [
        *out.glob("model-*-of-*.safetensors"),
        out / WEIGHTS_NAME,
        out / WEIGHTS_INDEX_NAME,
    ]:
        if stale.exists():
            stale.unlink()

    sd = model.state_dict()
    items = dict(_release_items(sd))
    # Group names into shards first (sizes only), then materialise one shard at a time.  The
    # split is huggingface_hub's (transformers' file names and index); it is given size-only
    # meta stand-ins, so views of one storage (the per-expert slices of a stacked expert
    # tensor, a tied head) are sized and placed one by one, as the files store them (copies),
    # instead of being kept together in one shard.
    if max_shard_size is None:
        files = {WEIGHTS_NAME: list(items)}
        index = None
    else:
        from huggingface_hub import split_torch_state_dict_into_shards

        split = split_torch_state_dict_into_shards(
            {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in items.items()},
            filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
            max_shard_size=max_shard_size,
        )
        files = split.filename_to_tensors
        index = (
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            if split.is_sharded
            else None
        )
    seen: set[int] = set()
    for fname, keys in files.items():
        shard = {}
        for k in keys:
            v = items[k].detach()
            storage = v.untyped_storage()
            own = (
                v.device.type == "cpu"
                and v.is_contiguous()
                and storage.nbytes() == v.numel() * v.element_size()
                and storage.data_ptr() not in seen
            )
            # safetensors refuses shared storage (tied head, per-expert views of a stacked
            # tensor): those, and non-CPU tensors, are written from a copy
            shard[k] = v if own else v.to("cpu", copy=True).contiguous()
            seen.add(storage.data_ptr())
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, file_mode)
        del shard
    if index is not None:
        (out / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


#: at most this many tensors are named in the non-finite weights warning
MAX_NAMED_TENSORS = 5


def _allowed_roots(root: Path) -> list[Path]:
    """Folders a weight file of ``root`` may resolve into: ``root`` itself, and for a snapshot
    of the Hugging Face cache (``.../snapshots/<revision>/``, whose files are symlinks to
    ``../../blobs/<hash>``) that repository's ``blobs/`` folder."""
    real = root.resolve()
    allowed = [real]
    if real.parent.name == "snapshots":
        allowed.append(real.parent.parent / "blobs")
    return allowed


def _weight_file(root: Path, name: Any, source: str) -> Path:
    """``root / name`` for a weight-file name read from ``source`` (the index, or the default
    name); ``ValueError`` naming it when it is not a relative path inside ``root`` (``..``,
    absolute paths, a symlink that resolves outside the folder), so a checkpoint's files never
    make the loader read elsewhere."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: weight file names must be non-empty strings, got {name!r}")
    rel = Path(name)
    if (
        rel.is_absolute()
        or ".." in rel.parts
        or name.startswith(("/", "\\"))
        or ".." in name.split("\\")
    ):
        raise ValueError(
            f"{source}: weight file {name!r} is outside the checkpoint folder {str(root)!r} "
            "(only relative paths inside it are read)"
        )
    path = root / rel
    real = path.resolve()
    if not any(real == a or a in real.parents for a in _allowed_roots(root)):
        raise ValueError(
            f"{source}: weight file {name!r} resolves to {str(real)!r}, outside the checkpoint "
            f"folder {str(root)!r} (a symlink leaving the folder is not followed)"
        )
    return path


def _weight_files(root: Path) -> list[Path]:
    index_path = root / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path, "a safetensors index")
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index_path}: has no 'weight_map' object")
        names = set(wm.values())
        files = [_weight_file(root, f, str(index_path)) for f in sorted(names, key=str)]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{f}: listed in {index_path.name} but missing")
        return files
    if (root / WEIGHTS_NAME).is_file():
        return [_weight_file(root, WEIGHTS_NAME, str(root / WEIGHTS_NAME))]
    raise ValueError(
        f"pretrained_dir: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} in {str(root)!r}"
    )


def _open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError: header truncated or not safetensors
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def load_pretrained(
    pretrained_dir: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides: Any,
) -> KimiLinearForCausalLM:
    """Load a kit, release-layout or transformers-saved folder (see the module docstring).

    The model is built on the meta device, allocated once in ``dtype`` (default: the stored
    dtype of the embedding; the parameters of ``FP32_PARAMETER_NAMES`` stay fp32) on ``device``
    (default CPU), and filled tensor by tensor from the shards, so no fp32 or second copy of the
    model is ever made.  Every kit weight must be present and every stored tensor must have a
    place (strict); a tied ``lm_head.weight`` that differs from the embedding is an error.
    ``config_overrides`` replace config fields (e.g. ``kda_backend="torch"``).
    """
    from kimi_linear.model import KimiLinearForCausalLM, cast_model_

    root = Path(pretrained_dir)
    if not (root / CONFIG_NAME).is_file():
        raise ValueError(f"pretrained_dir: no {CONFIG_NAME} in {str(root)!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    try:
        device = torch.device("cpu" if device is None else device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: {e}") from None
    config = config_from_hf(root / CONFIG_NAME)
    fields = set(config.to_dict())
    unknown = sorted(set(config_overrides) - fields)
    if unknown:
        raise ValueError(
            f"config_overrides: unknown KimiLinearConfig fields {unknown}"
            f"{did_you_mean(unknown[0], fields)}"
        )
    if config_overrides:
        config = config.replace(**config_overrides)
    files = _weight_files(root)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    plan, tied_head, stored_dtype = _plan_load(root, files, model)
    cast_model_(model, dtype or stored_dtype or torch.float32)
    model.to_empty(device=device)  # keeps tied embeddings tied
    for sub in model.modules():  # non-persistent buffers (load statistics) start at zero
        for name in sub._non_persistent_buffers_set:
            buf = sub._buffers.get(name)
            if buf is not None:
                buf.zero_()
    _fill(model, plan, tied_head)
    return model


def load_weights_(model: KimiLinearForCausalLM, pretrained_dir: str | os.PathLike) -> None:
    """Copy the weights of a checkpoint folder (kit, release or transformers layout) into the
    materialised ``model`` in place (each cast to the parameter's dtype and device), strictly.
    Used by ``KimiLinearLitModule(init_from=...)`` to start training from released weights."""
    root = Path(pretrained_dir)
    if not (root / CONFIG_NAME).is_file():
        raise ValueError(f"init_from: no {CONFIG_NAME} in {str(root)!r}")
    plan, tied_head, _ = _plan_load(root, _weight_files(root), model)
    _fill(model, plan, tied_head)


_Plan = list[tuple[Path, list[tuple[str, list[tuple[str, Part]]]]]]


def _plan_load(
    root: Path, files: list[Path], model: KimiLinearForCausalLM
) -> tuple[_Plan, Path | None, torch.dtype | None]:
    """Route every stored tensor to the model's tensors and check names and shapes, reading
    only the safetensors headers.  Returns the plan, the file of a tied head to verify, and the
    stored dtype of the embedding."""
    config = model.config
    targets = dict(model.state_dict())
    tied = config.tie_word_embeddings
    if tied:
        targets.pop("lm_head.weight", None)
    plan: _Plan = []
    covered: dict[str, set[Any]] = {k: set() for k in targets}
    tied_head: Path | None = None
    stored_dtype: torch.dtype | None = None
    for path in files:
        entries = []
        with _open(path) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape = tuple(sl.get_shape())
                st_dtype = sl.get_dtype()
                if st_dtype not in _ST_DTYPES:
                    raise ValueError(
                        f"{path}: tensor {key!r} is stored as {st_dtype}, not a float dtype "
                        f"({'/'.join(_ST_DTYPES)}); integer or quantized weights are not loaded "
                        "(a cast would not restore their values): dequantize the checkpoint first"
                    )
                if key == "model.embed_tokens.weight":
                    stored_dtype = _ST_DTYPES[st_dtype]
                if tied and key == "lm_head.weight":
                    tied_head = path
                    continue
                routes = route_weight(key, targets)
                if routes is None and _no_shared_expert(key, shape, config, path):
                    continue  # zero-width shared expert (n_shared_experts=0): nothing to load
                if routes is None:
                    raise ValueError(
                        f"{path}: tensor {key!r} has no place in this model "
                        f"({config.num_hidden_layers} layers, {list(config.layer_kinds)}); "
                        "does config.json match the weights?"
                    )
                first_t, first_part = routes[0]
                if first_part[0] == "index" and first_part[1] >= targets[first_t].shape[0]:
                    raise ValueError(
                        f"{path}: tensor {key!r} is expert {first_part[1]}, but config.json has "
                        f"num_experts={targets[first_t].shape[0]} (experts 0.."
                        f"{targets[first_t].shape[0] - 1}); does config.json match the weights?"
                    )
                if first_part[0] == "narrow":  # a packed tensor: its parts side by side
                    dim = first_part[1]
                    want_l = list(targets[first_t].shape)
                    want_l[dim] = sum(p[3] for _, p in routes)
                    want = tuple(want_l)
                else:
                    want = tuple(_view(targets[first_t], first_part).shape)
                if shape != want:
                    experts = ""
                    if _STACKED.match(first_t) and len(shape) == len(want) == 3:
                        experts = f"; config.json has num_experts={want[0]}"
                    raise ValueError(
                        f"{path}: tensor {key!r} has shape {list(shape)}, the model expects "
                        f"{list(want)} (for {first_t}){experts}"
                    )
                for t, part in routes:
                    covered[t].add("full" if part[0] != "index" else part[1])
                entries.append((key, routes))
        plan.append((path, entries))
    missing = []
    for t, parts in covered.items():
        if "full" in parts:
            continue
        m = _STACKED.match(t)
        if m and parts:
            gaps = sorted(set(range(targets[t].shape[0])) - parts)
            missing += [f"{m['prefix']}{e}.{m['w']}.weight" for e in gaps]
        elif m:
            missing.append(f"{m['prefix']}{{0..{targets[t].shape[0] - 1}}}.{m['w']}.weight")
        else:
            missing.append(t)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{root}: weights missing from the checkpoint: {missing[:5]}{more}")

    return plan, tied_head, stored_dtype


def _fill(model: KimiLinearForCausalLM, plan: _Plan, tied_head: Path | None) -> None:
    """Copy the planned tensors into ``model``, one stored tensor at a time."""
    state = model.state_dict(keep_vars=True)
    nonfinite: list[str] = []
    with torch.no_grad():
        for path, entries in plan:
            with _open(path) as f:
                for key, routes in entries:
                    try:
                        src = f.get_tensor(key)
                    except Exception as e:
                        raise ValueError(f"{path}: cannot read tensor {key!r} ({e})") from None
                    bad = 0
                    for t, part in routes:
                        if part[0] == "narrow":  # a packed tensor: this target is one slice
                            dst = state[t].data
                            dst.copy_(src.narrow(part[1], part[2], part[3]))
                        else:
                            dst = _view(state[t].data, part)
                            dst.copy_(src)
                        bad += _count_nonfinite(dst)  # after the cast: overflow counts too
                    if bad:
                        nonfinite.append(f"{key} ({bad} of {src.numel()})")
                    del src
        if tied_head is not None:
            with _open(tied_head) as f:
                head = f.get_tensor("lm_head.weight")
            emb = state["model.embed_tokens.weight"]
            if not torch.equal(head.to(emb.dtype).to(emb.device), emb.data):
                raise ValueError(
                    f"{tied_head}: lm_head.weight differs from model.embed_tokens.weight but "
                    "config.json says tie_word_embeddings=true; load with "
                    "tie_word_embeddings=False to keep both matrices"
                )
    if nonfinite:
        more = len(nonfinite) - MAX_NAMED_TENSORS
        shown = ", ".join(nonfinite[:MAX_NAMED_TENSORS]) + (f" and {more} more" if more > 0 else "")
        root = plan[0][0].parent if plan else "checkpoint"
        warnings.warn(
            f"{root}: non-finite (NaN / inf) values in {len(nonfinite)} loaded weight tensor(s), "
            f"after the cast to the model's dtype: {shown}; the model's outputs may be NaN",
            NonFiniteWeightsWarning,
            stacklevel=3,
        )


class NonFiniteWeightsWarning(UserWarning):
    """A loaded checkpoint holds NaN / inf weights (or values that overflow the target dtype)."""


def _count_nonfinite(t: torch.Tensor, block: int = 1 << 22) -> int:
    """Number of NaN / inf elements of float tensor ``t`` (checked in blocks of ``block``
    elements, so the temporary is small whatever the tensor's size); 0 for other dtypes."""
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), block):
        bad += int((~torch.isfinite(flat[start : start + block])).sum())
    return bad
