"""Config conversion: :class:`~kimi_linear.config.KimiLinearConfig` <-> ``config.json``.

Reads the two forms of a Kimi-Linear ``config.json`` a user meets (:func:`config_from_hf`): the
release (Moonshot remote-code) form, with ``linear_attn_config`` (1-based ``full_attn_layers`` /
``kda_layers``), ``first_k_dense_replace``, ``mla_use_nope``, ``num_experts`` ...; and the form
transformers' native ``KimiLinearConfig`` writes (``layer_types``, ``mlp_layer_types``,
``linear_head_dim``, ``linear_num_heads``, ``linear_conv_kernel_dim``, ``n_group``,
``num_local_experts``, ``num_experts_per_tok``, ``n_shared_experts``, ...).  It never builds a
different model silently: contradicting keys, a layer listed as both KDA and MLA (or neither), a
key whose value changes the model but is not implemented, and unknown keys raise ``ValueError``
naming the key.  Keys that do not change the model are listed once, in :data:`IGNORED_KEYS` (any
value) and :data:`NOOP_KEYS` (no-op only at the listed values).  Absent keys take transformers'
``KimiLinearConfig`` defaults (which are the release values), so the kit and transformers read a
file the same way.

:func:`config_to_hf` writes the release form (plus ``mlp_layer_types``, which transformers needs
when ``moe_layer_freq > 1``; a per-layer pattern the release's two fields cannot express,
``KimiLinearConfig.mlp_layer_types``, as ``mlp_layer_types`` alone).  :func:`generation_config`
gives the ``generation_config.json`` beside it.

One job: reading and writing ``config.json`` (every key of both forms is read and checked here,
hence above the usual ~600 lines).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kimi_linear.config import KimiLinearConfig
from kimi_linear.errors import did_you_mean

__all__ = [
    "CONFIG_NAME",
    "GENERATION_CONFIG_NAME",
    "IGNORED_KEYS",
    "NOOP_KEYS",
    "config_from_hf",
    "config_to_hf",
    "generation_config",
    "read_config_json",
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
    if config.kda_value_heads != config.kda_num_heads:
        raise ValueError(
            f"KimiLinearConfig.kda_num_v_heads={config.kda_num_v_heads} (GVA, more value heads "
            f"than kda_num_heads={config.kda_num_heads}) has no field in the release config.json "
            "(nor in transformers' KimiLinearConfig): such a model cannot be exported in the "
            "Hugging Face format; save it with its Lightning checkpoint instead"
        )
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


def generation_config(config: KimiLinearConfig) -> dict[str, Any]:
    """The ``generation_config.json`` of ``config``: its special token ids (those set) and
    greedy decoding as the default, as transformers' ``GenerationConfig`` reads it."""
    ids = {
        k: getattr(config, k)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(config, k) is not None
    }
    return {**ids, "do_sample": False}
