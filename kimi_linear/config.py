"""One configuration dataclass for every Kimi Linear model, with named presets.

A model is a stack of ``num_hidden_layers`` decoder blocks.  Each block has a token mixer
(``"kda"``: Kimi Delta Attention, or ``"mla"``: multi-head latent attention) and a feed-forward
part (a dense SwiGLU MLP for the first ``first_k_dense_replace`` layers, a sigmoid-routed MoE
after that every ``moe_layer_freq`` layers, or any per-layer pattern in ``mlp_layer_types``;
dense everywhere when ``num_experts == 0``).

Field names follow the released Kimi-Linear ``config.json`` where one exists, so that
:func:`kimi_linear.hf.config_from_hf` and :func:`kimi_linear.hf.config_to_hf` are thin.

Sources for the published shapes: the Kimi-Linear-48B-A3B release ``config.json`` (Moonshot AI,
2025, arXiv 2510.26692) and the Kimi K2 report / release config (arXiv 2507.20534).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from kimi_linear.errors import did_you_mean
from kimi_linear.ops.options import (
    KDA_BACKENDS,
    check_kda_backend,
    check_safe_gate_bound,
)

LAYER_TYPES = ("kda", "mla")
#: entries of ``KimiLinearConfig.mlp_layer_types`` (transformers writes "dense" / "sparse")
MLP_LAYER_TYPES = ("dense", "moe")
KDA_GATES = ("channel", "head")


@dataclass
class KimiLinearConfig:
    """Hyper-parameters of a Kimi Linear hybrid model.

    Layer pattern: ``layer_types`` (one ``"kda"`` / ``"mla"`` entry per layer) wins when given.
    Otherwise it is derived: layer ``i`` (0-based) is MLA when ``(i + 1) % mla_every == 0`` or,
    with ``last_layer_mla``, when it is the last layer; KDA elsewhere.  ``mla_every = 0`` means
    no MLA from the period rule, ``mla_every = 1`` every layer MLA.

    Feed-forward pattern (:meth:`is_moe_layer`): ``mlp_layer_types`` (one ``"dense"`` / ``"moe"``
    entry per layer) wins when given, for patterns the rule cannot express (e.g. dense layers
    between MoE layers, as transformers' ``mlp_layer_types`` allows); otherwise layer ``i`` is MoE
    when ``i >= first_k_dense_replace`` and ``i % moe_layer_freq == 0``.  Both given and
    different (with ``first_k_dense_replace`` / ``moe_layer_freq`` not at their defaults) is an
    error.
    """

    name: str = "custom"
    # --- trunk ---------------------------------------------------------------------------
    vocab_size: int = 163840
    hidden_size: int = 2304
    num_hidden_layers: int = 27
    layer_types: tuple[str, ...] | None = None
    mla_every: int = 4
    last_layer_mla: bool = True
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 1048576
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # --- KDA (Kimi Delta Attention) ------------------------------------------------------
    kda_num_heads: int = 32
    kda_head_dim: int = 128  # d_k = d_v, as released (``linear_attn_config.head_dim``)
    # GVA: value heads (v, decay gate, beta, output gate and the state); None = kda_num_heads.
    # A multiple of kda_num_heads (value head i reads key head i // (kda_num_v_heads //
    # kda_num_heads)). Kit-only: the release config.json has no such field.
    kda_num_v_heads: int | None = None
    kda_conv_size: int = 4  # ``short_conv_kernel_size``
    kda_gate: Literal["channel", "head"] = "channel"  # "head": GDN-like scalar gate per head
    kda_backend: str = "auto"  # one of kimi_linear.ops.options.KDA_BACKENDS
    # chunk length of the pure-PyTorch KDA (the "torch" backend,
    # kimi_linear.ops.torch_chunk_kda): 32, that op's default, is the fastest on CPU; the Triton
    # kernels and fla always use 64 and ignore it. Results do not depend on it beyond rounding.
    # A positive int.
    kda_chunk_size: int = 32
    # decay gate: None = the release gate ``-exp(A_log) * softplus(x + dt_bias)``; a value in
    # [-5, 0) = fla's bounded "safe gate" ``lower_bound * sigmoid(exp(A_log) * (x + dt_bias))``
    # (``linear_attn_config.gate_lower_bound`` in config.json; see kimi_linear.ops.gate)
    kda_gate_lower_bound: float | None = None
    # --- MLA (multi-head latent attention) -----------------------------------------------
    num_attention_heads: int = 32
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True  # True: the rope part exists in the weights but is never rotated
    rope_theta: float = 10000.0
    # --- feed-forward / MoE --------------------------------------------------------------
    intermediate_size: int = 9216  # dense SwiGLU layers
    num_experts: int = 256  # 0: dense MLP in every layer
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 1024
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1  # MoE at layers i >= first_k_dense_replace with i % freq == 0
    # explicit per-layer feed-forward, "dense" or "moe" (MLP_LAYER_TYPES); None: the rule above
    mlp_layer_types: tuple[str, ...] | None = None
    num_expert_group: int = 1  # grouped (node-limited) routing, DeepSeek-V3; 1 = plain top-k
    topk_group: int = 1  # groups kept per token when num_expert_group > 1
    routed_scaling_factor: float = 2.446
    moe_renormalize: bool = True
    moe_bias_update_rate: float = 1e-3  # gamma of auxiliary-loss-free balancing

    def __post_init__(self) -> None:
        if self.layer_types is not None:
            self.layer_types = tuple(self.layer_types)
        if isinstance(self.mlp_layer_types, list):
            self.mlp_layer_types = tuple(self.mlp_layer_types)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field outside its allowed range."""

        def positive(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"KimiLinearConfig.{name} must be a positive int, got {v!r}")

        def non_negative(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"KimiLinearConfig.{name} must be an int >= 0, got {v!r}")

        def positive_float(name: str) -> None:
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, (int, float))
                or not v > 0
                or not math.isfinite(v)
            ):
                raise ValueError(f"KimiLinearConfig.{name} must be a finite number > 0, got {v!r}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "max_position_embeddings",
            "kda_num_heads",
            "kda_head_dim",
            "kda_conv_size",
            "kda_chunk_size",
            "num_attention_heads",
            "kv_lora_rank",
            "v_head_dim",
            "intermediate_size",
            "moe_intermediate_size",
            "moe_layer_freq",
            "num_expert_group",
            "topk_group",
        ):
            positive(name)
        for name in (
            "mla_every",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "num_experts",
            "num_shared_experts",
            "first_k_dense_replace",
        ):
            non_negative(name)
        for name in ("rms_norm_eps", "initializer_range", "rope_theta", "routed_scaling_factor"):
            positive_float(name)
        if not (
            isinstance(self.moe_bias_update_rate, (int, float)) and self.moe_bias_update_rate >= 0
        ):
            raise ValueError(
                f"KimiLinearConfig.moe_bias_update_rate must be >= 0, got {self.moe_bias_update_rate!r}"
            )
        if self.q_lora_rank is not None:
            positive("q_lora_rank")
        if self.qk_nope_head_dim + self.qk_rope_head_dim == 0:
            raise ValueError(
                "KimiLinearConfig.qk_nope_head_dim + qk_rope_head_dim must be > 0 (the MLA "
                "query/key head dim), got 0"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"KimiLinearConfig.qk_rope_head_dim must be even (RoPE rotates pairs), got "
                f"{self.qk_rope_head_dim}"
            )
        if self.kda_num_v_heads is not None:
            positive("kda_num_v_heads")
            if self.kda_num_v_heads % self.kda_num_heads:
                raise ValueError(
                    "KimiLinearConfig.kda_num_v_heads must be a multiple of kda_num_heads="
                    f"{self.kda_num_heads} (GVA: each key head serves a group of value heads), "
                    f"got {self.kda_num_v_heads}"
                )
        if self.kda_gate not in KDA_GATES:
            raise ValueError(
                f"KimiLinearConfig.kda_gate must be one of {KDA_GATES}, got {self.kda_gate!r}"
            )
        check_safe_gate_bound(self.kda_gate_lower_bound, "KimiLinearConfig.kda_gate_lower_bound")
        check_kda_backend(self.kda_backend, "KimiLinearConfig.kda_backend")
        if self.num_experts > 0:
            if not 1 <= self.num_experts_per_token <= self.num_experts:
                raise ValueError(
                    "KimiLinearConfig.num_experts_per_token must be in [1, num_experts="
                    f"{self.num_experts}], got {self.num_experts_per_token!r}"
                )
            if self.num_experts % self.num_expert_group:
                raise ValueError(
                    f"KimiLinearConfig.num_expert_group must divide num_experts={self.num_experts}, "
                    f"got {self.num_expert_group}"
                )
            if self.num_expert_group > 1 and self.num_experts // self.num_expert_group < 2:
                raise ValueError(
                    "KimiLinearConfig.num_expert_group: grouped routing scores a group by its top-2 "
                    f"experts, so groups need >= 2 experts; got {self.num_experts} experts in "
                    f"{self.num_expert_group} groups"
                )
            if self.topk_group > self.num_expert_group:
                raise ValueError(
                    f"KimiLinearConfig.topk_group must be in [1, num_expert_group={self.num_expert_group}], "
                    f"got {self.topk_group}"
                )
            if (
                self.topk_group * (self.num_experts // self.num_expert_group)
                < self.num_experts_per_token
            ):
                raise ValueError(
                    f"KimiLinearConfig.topk_group={self.topk_group} groups of "
                    f"{self.num_experts // self.num_expert_group} experts hold fewer than "
                    f"num_experts_per_token={self.num_experts_per_token} experts"
                )
            if self.first_k_dense_replace > self.num_hidden_layers:
                raise ValueError(
                    "KimiLinearConfig.first_k_dense_replace must be <= num_hidden_layers="
                    f"{self.num_hidden_layers}, got {self.first_k_dense_replace}"
                )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 0 <= v < self.vocab_size):
                raise ValueError(
                    f"KimiLinearConfig.{name} must be None or in [0, vocab_size={self.vocab_size}), got {v!r}"
                )
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"KimiLinearConfig.layer_types must have num_hidden_layers={self.num_hidden_layers} "
                    f"entries, got {len(self.layer_types)}"
                )
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ValueError(
                    f"KimiLinearConfig.layer_types entries must be one of {LAYER_TYPES}, got {bad[0]!r}"
                )
        if self.mlp_layer_types is not None:
            self._validate_mlp_layer_types()

    def _validate_mlp_layer_types(self) -> None:
        types, n = self.mlp_layer_types, self.num_hidden_layers
        if not isinstance(types, tuple) or len(types) != n:
            got = f"{len(types)} entries" if isinstance(types, tuple) else repr(types)
            raise ValueError(
                f"KimiLinearConfig.mlp_layer_types must be None or a list of num_hidden_layers={n} "
                f"entries, got {got}"
            )
        bad = [t for t in types if t not in MLP_LAYER_TYPES]
        if bad:
            hint = (
                " (transformers' 'sparse' is 'moe' here)"
                if bad[0] == "sparse"
                else did_you_mean(str(bad[0]), MLP_LAYER_TYPES)
            )
            raise ValueError(
                f"KimiLinearConfig.mlp_layer_types entries must be one of {MLP_LAYER_TYPES}, got "
                f"{bad[0]!r}{hint}"
            )
        if self.num_experts == 0 and "moe" in types:
            raise ValueError(
                "KimiLinearConfig.mlp_layer_types has 'moe' layers "
                f"{[i for i, t in enumerate(types) if t == 'moe']} but num_experts is 0"
            )
        defaults = KimiLinearConfig.__dataclass_fields__
        rule_given = (self.first_k_dense_replace, self.moe_layer_freq) != (
            defaults["first_k_dense_replace"].default,
            defaults["moe_layer_freq"].default,
        )
        rule = tuple("moe" if self._rule_is_moe(i) else "dense" for i in range(n))
        if self.num_experts and rule_given and rule != types:
            raise ValueError(
                f"KimiLinearConfig.mlp_layer_types {list(types)} contradicts "
                f"first_k_dense_replace={self.first_k_dense_replace} / moe_layer_freq="
                f"{self.moe_layer_freq} ({list(rule)}); give one of them"
            )

    # ------------------------------------------------------------------ derived
    @property
    def kda_value_heads(self) -> int:
        """KDA value heads ``HV``: ``kda_num_v_heads``, or ``kda_num_heads`` when None."""
        return self.kda_num_heads if self.kda_num_v_heads is None else self.kda_num_v_heads

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """``"kda"`` or ``"mla"`` for each layer (0-based), resolved from the pattern fields."""
        if self.layer_types is not None:
            return self.layer_types
        n = self.num_hidden_layers
        kinds = []
        for i in range(n):
            is_mla = (self.mla_every > 0 and (i + 1) % self.mla_every == 0) or (
                self.last_layer_mla and i == n - 1
            )
            kinds.append("mla" if is_mla else "kda")
        return tuple(kinds)

    @property
    def kda_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_kinds) if t == "kda"]

    @property
    def mla_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_kinds) if t == "mla"]

    def _rule_is_moe(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` (0-based) has a routed MoE: ``mlp_layer_types[layer_idx]
        == "moe"`` when that list is given, else DeepSeek-V3's rule (``layer_idx >=
        first_k_dense_replace and layer_idx % moe_layer_freq == 0``); never with no experts."""
        if self.num_experts == 0:
            return False
        if self.mlp_layer_types is not None:
            return self.mlp_layer_types[layer_idx] == "moe"
        return self._rule_is_moe(layer_idx)

    @property
    def mlp_layer_kinds(self) -> tuple[str, ...]:
        """``"dense"`` or ``"moe"`` for each layer (0-based), resolved from the pattern fields."""
        return tuple(
            "moe" if self.is_moe_layer(i) else "dense" for i in range(self.num_hidden_layers)
        )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mla_softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    def replace(self, **changes: Any) -> KimiLinearConfig:
        """A validated copy with ``changes`` applied (``dataclasses.replace``); an unknown field
        name is a ``ValueError`` naming it, with the closest field."""
        self.check_field_names(changes, "replace")
        return dataclasses.replace(self, **changes)

    @classmethod
    def check_field_names(cls, names: Any, where: str) -> None:
        """The one check of user-given field names (``from_preset`` / ``replace`` overrides, a
        run's ``model.overrides``): ``ValueError`` naming the first unknown one."""
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in names:
            if key not in fields:
                raise ValueError(
                    f"{where}: unknown KimiLinearConfig field {key!r}{did_you_mean(key, fields)}"
                )

    def all_mla_twin(self) -> KimiLinearConfig:
        """The same model with every layer MLA (the full-attention baseline for benchmarks)."""
        return self.replace(
            name=f"{self.name}-all-mla", layer_types=("mla",) * self.num_hidden_layers
        )

    def with_layer_kinds(self, kind: str) -> KimiLinearConfig:
        """The same model with every layer of one kind (``"kda"`` or ``"mla"``)."""
        if kind not in LAYER_TYPES:
            raise ValueError(f"kind must be one of {LAYER_TYPES}, got {kind!r}")
        return self.replace(
            name=f"{self.name}-all-{kind}", layer_types=(kind,) * self.num_hidden_layers
        )

    # ------------------------------------------------------------------ cache sizes
    def kv_cache_bytes(
        self,
        seq_len: int,
        batch_size: int = 1,
        cache_dtype_bytes: int = 2,
        state_dtype_bytes: int = 4,
    ) -> dict[str, int]:
        """Analytic decode-cache size of this model for ``batch_size`` sequences of ``seq_len``.

        MLA layers cache per token the normalised latent (``kv_lora_rank``) and the shared
        rope key (``qk_rope_head_dim``; kept under NoPE too since the weights produce it).
        KDA layers hold a constant ``[H, d_k, d_v]`` recurrent state (``state_dtype_bytes``,
        fp32) and three short-conv tails of ``kda_conv_size - 1`` tokens each.

        Returns bytes: ``mla`` (all MLA layers), ``kda_state``, ``kda_conv``, ``total`` and
        ``per_token_mla`` (one token, all MLA layers, one sequence).
        """
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
            raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n_mla = len(self.mla_layers)
        n_kda = len(self.kda_layers)
        per_token_layer = (self.kv_lora_rank + self.qk_rope_head_dim) * cache_dtype_bytes
        HV = self.kda_value_heads
        proj = (2 * self.kda_num_heads + HV) * self.kda_head_dim  # q, k on H heads; v on HV
        state = HV * self.kda_head_dim * self.kda_head_dim * state_dtype_bytes
        conv = (self.kda_conv_size - 1) * proj * cache_dtype_bytes
        out = {
            "per_token_mla": n_mla * per_token_layer,
            "mla": batch_size * seq_len * n_mla * per_token_layer,
            "kda_state": batch_size * n_kda * state,
            "kda_conv": batch_size * n_kda * conv,
        }
        out["total"] = out["mla"] + out["kda_state"] + out["kda_conv"]
        return out

    # ------------------------------------------------------------------ presets
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> KimiLinearConfig:
        """A named preset (see :data:`PRESETS`), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(
                f"unknown preset {name!r}; choose one of {sorted(PRESETS)}"
                f"{did_you_mean(name, PRESETS)}"
            )
        cls.check_field_names(overrides, "from_preset")
        kwargs = dict(PRESETS[name])
        kwargs.update(overrides)
        return cls(name=name, **kwargs) if "name" not in kwargs else cls(**kwargs)

    @staticmethod
    def preset_names() -> list[str]:
        return list(PRESETS)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("layer_types", "mlp_layer_types"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


# Presets. ``tiny`` is for tests and CPU runs in seconds; ``small`` (~100M total parameters)
# fits one GPU; the two published shapes are for counting and cache sizing on the meta device.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=4,
        max_position_embeddings=8192,
        kda_num_heads=2,
        kda_head_dim=32,
        num_attention_heads=2,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        intermediate_size=128,
        num_experts=4,
        num_experts_per_token=2,
        num_shared_experts=1,
        moe_intermediate_size=64,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
    ),
    "small": dict(
        vocab_size=32768,
        hidden_size=512,
        num_hidden_layers=12,
        max_position_embeddings=131072,
        kda_num_heads=4,
        kda_head_dim=128,
        num_attention_heads=4,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        intermediate_size=1536,
        num_experts=16,
        num_experts_per_token=2,
        num_shared_experts=1,
        moe_intermediate_size=256,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
    ),
    # Kimi-Linear-48B-A3B (release config.json): 27 layers, MLA at 4, 8, ..., 24 and 27.
    "kimi-linear-48b-a3b": dict(
        vocab_size=163840,
        hidden_size=2304,
        num_hidden_layers=27,
        max_position_embeddings=1048576,
        kda_num_heads=32,
        kda_head_dim=128,
        kda_conv_size=4,
        num_attention_heads=32,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        mla_use_nope=True,
        intermediate_size=9216,
        num_experts=256,
        num_experts_per_token=8,
        num_shared_experts=1,
        moe_intermediate_size=1024,
        first_k_dense_replace=1,
        routed_scaling_factor=2.446,
        rms_norm_eps=1e-5,
        bos_token_id=163584,
        eos_token_id=163586,
        pad_token_id=163839,
    ),
    # Kimi K2 (all MLA with RoPE; 1.04T total / 32B active).
    "kimi-k2": dict(
        vocab_size=163840,
        hidden_size=7168,
        num_hidden_layers=61,
        mla_every=1,
        max_position_embeddings=131072,
        num_attention_heads=64,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        mla_use_nope=False,
        rope_theta=50000.0,
        intermediate_size=18432,
        num_experts=384,
        num_experts_per_token=8,
        num_shared_experts=1,
        moe_intermediate_size=2048,
        first_k_dense_replace=1,
        routed_scaling_factor=2.827,
        rms_norm_eps=1e-6,
        bos_token_id=163584,
        eos_token_id=163585,
    ),
}

__all__ = ["KimiLinearConfig", "PRESETS", "LAYER_TYPES", "KDA_BACKENDS"]
