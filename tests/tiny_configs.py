"""The tiny Kimi Linear model settings the tests build on: one base, each test names only what
it changes (sizes small enough for CPU tests in well under a second)."""

from __future__ import annotations

from typing import Any

#: A three-layer KDA / MLA / KDA hybrid with a 4-expert MoE (layer 0 dense), torch backend.
TINY_HYBRID: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    layer_types=("kda", "mla", "kda"),
    kda_num_heads=2,
    kda_head_dim=16,
    num_attention_heads=2,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=8,
    v_head_dim=8,
    intermediate_size=48,
    num_experts=4,
    num_experts_per_token=2,
    num_shared_experts=1,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    kda_backend="torch",
)


def tiny_settings(**changes: Any) -> dict[str, Any]:
    """:data:`TINY_HYBRID` with ``changes`` applied: keyword arguments for
    ``KimiLinearConfig(**...)`` or ``KimiLinearConfig.from_preset("tiny", **...)``."""
    return {**TINY_HYBRID, **changes}
