"""Analytic FLOPs per token of a Kimi Linear config (for MFU and for comparing layouts).

Counts multiply-adds as 2 FLOPs and only matrix products (element-wise work: norms, gates,
activations, softmax, the decay exponentials, is left out, as in the usual MFU convention).
Per token of a training sequence of length ``T``:

* **weights** (every matrix a token multiplies by): ``2 * n`` for each ``nn.Linear`` of ``n``
  weights (q/k/v/o, gate and beta projections, MLA's q, kv_a, kv_b, o; dense MLPs; shared
  experts; the LM head), ``2 * E * D`` for the router, ``2 * 3 * D * I_moe`` for each of the
  ``num_experts_per_token`` routed experts, and ``2 * W`` per channel for the depthwise short
  convolutions of KDA.  The input embedding is a lookup (0 FLOPs).
* **KDA chunked form** (chunk ``C = min(chunk, T)``, head dim ``K = V = d``; ``chunk`` is the
  chunk the backend runs: ``kda_chunk_size`` for the pure-PyTorch ``torch`` backend, 64 for the
  Triton kernels and fla, see :func:`kda_flops_chunk`), per head:
  the two decayed Gram matrices ``q k^T`` and ``k k^T`` (``2 * 2 * C * d``), the triangular solve
  of ``(I + A_kk)`` (``2 * C^2 / 3``: ``C^3 / 3`` multiply-adds per chunk of ``C`` tokens), the WY
  products ``w = A k`` and ``u = A v`` (``2 * 2 * C * d``), the intra-chunk output ``A_qk v``
  (``2 * C * d``) and three state products (``v - w S``, ``q S``, ``S += k^T v``: ``3 * 2 * d^2``).
* **MLA at length T**: causal attention over the decompressed heads, on average ``(T + 1) / 2``
  keys per query: ``2 * H * (d_qk + d_v) * (T + 1) / 2``.

A training step costs 3x the forward (backward = 2x forward); recomputation by activation
checkpointing is not counted (that is hardware, not model, FLOPs utilization).
"""

from __future__ import annotations

from kimi_linear.config import KimiLinearConfig

__all__ = ["KERNEL_CHUNK_SIZE", "flops_breakdown", "flops_per_token", "kda_flops_chunk"]

#: The chunk length of the Triton kernels and of fla's ``chunk_kda`` (fixed; they ignore
#: ``KimiLinearConfig.kda_chunk_size``, which only the ``torch`` backend reads).
KERNEL_CHUNK_SIZE = 64


def kda_flops_chunk(config: KimiLinearConfig, device: str | None = None) -> int:
    """The KDA chunk length a model of ``config`` runs with on ``device`` (``"cpu"``,
    ``"cuda"``, ...): ``config.kda_chunk_size`` when the backend resolves to ``torch``, else
    :data:`KERNEL_CHUNK_SIZE`. Without a device, ``auto`` counts as the kernels (the GPU case,
    where MFU matters)."""
    from kimi_linear.backends import resolve_kda_backend

    if device is None:
        torch_backend = config.kda_backend == "torch"
    else:
        torch_backend = resolve_kda_backend(config.kda_backend, device) == "torch"
    return config.kda_chunk_size if torch_backend else KERNEL_CHUNK_SIZE


def _check(config: KimiLinearConfig, seq_len: int) -> None:
    if not isinstance(config, KimiLinearConfig):
        raise TypeError(f"config must be a KimiLinearConfig, got {type(config).__name__}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")


def _mlp_weights(hidden: int, intermediate: int) -> int:
    return 3 * hidden * intermediate  # gate, up, down


def flops_breakdown(
    config: KimiLinearConfig, seq_len: int, kda_chunk_len: int | None = None
) -> dict[str, float]:
    """Forward FLOPs per token at training length ``seq_len``, by part (see the module docstring).

    ``kda_chunk_len``: the KDA chunk length to count (default :func:`kda_flops_chunk` without a
    device: ``kda_chunk_size`` for the ``torch`` backend, else the kernels' 64).

    Returns a dict with ``kda_projections``, ``kda_conv``, ``kda_mixing``, ``mla_projections``,
    ``mla_attention``, ``dense_mlp``, ``router``, ``routed_experts``, ``shared_experts``,
    ``lm_head`` and their sum ``total``.
    """
    _check(config, seq_len)
    if kda_chunk_len is None:
        kda_chunk_len = kda_flops_chunk(config)
    elif isinstance(kda_chunk_len, bool) or not isinstance(kda_chunk_len, int) or kda_chunk_len < 1:
        raise ValueError(f"kda_chunk_len must be None or an int >= 1, got {kda_chunk_len!r}")
    c = config
    D, T = c.hidden_size, seq_len
    out = dict.fromkeys(
        (
            "kda_projections",
            "kda_conv",
            "kda_mixing",
            "mla_projections",
            "mla_attention",
            "dense_mlp",
            "router",
            "routed_experts",
            "shared_experts",
            "lm_head",
        ),
        0.0,
    )
    # KDA
    H, d, W = c.kda_value_heads, c.kda_head_dim, c.kda_conv_size  # per value head (GVA)
    proj = H * d
    proj_qk = c.kda_num_heads * d  # q and k on the key heads
    gate_dim = proj if c.kda_gate == "channel" else H
    kda_weights = (
        2 * D * proj_qk  # q, k
        + D * proj  # v
        + D * d
        + d * gate_dim  # decay gate (low rank)
        + D * H  # beta
        + D * d
        + d * proj  # output gate (low rank)
        + proj * D  # o
    )
    C = min(kda_chunk_len, T)
    kda_mix_per_head = 2 * (2 * C * d + 2 * C * d + C * d + 3 * d * d) + 2 * C * C / 3
    # MLA
    Hm = c.num_attention_heads
    d_qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    R = c.kv_lora_rank
    if c.q_lora_rank is None:
        q_weights = D * Hm * d_qk
    else:
        q_weights = D * c.q_lora_rank + c.q_lora_rank * Hm * d_qk
    mla_weights = (
        q_weights
        + D * (R + c.qk_rope_head_dim)
        + R * Hm * (c.qk_nope_head_dim + c.v_head_dim)
        + Hm * c.v_head_dim * D
    )
    mla_attn = 2 * Hm * (d_qk + c.v_head_dim) * (T + 1) / 2

    for i, kind in enumerate(c.layer_kinds):
        if kind == "kda":
            out["kda_projections"] += 2 * kda_weights
            out["kda_conv"] += 2 * (2 * proj_qk + proj) * W
            out["kda_mixing"] += H * kda_mix_per_head
        else:
            out["mla_projections"] += 2 * mla_weights
            out["mla_attention"] += mla_attn
        if c.is_moe_layer(i):
            out["router"] += 2 * c.num_experts * D
            out["routed_experts"] += (
                2 * c.num_experts_per_token * _mlp_weights(D, c.moe_intermediate_size)
            )
            out["shared_experts"] += (
                2 * _mlp_weights(D, c.moe_intermediate_size * c.num_shared_experts)
                if c.num_shared_experts
                else 0
            )
        else:
            out["dense_mlp"] += 2 * _mlp_weights(D, c.intermediate_size)
    out["lm_head"] = 2.0 * D * c.vocab_size
    out["total"] = sum(out.values())
    return out


def flops_per_token(
    config: KimiLinearConfig, seq_len: int, training: bool = True, kda_chunk_len: int | None = None
) -> float:
    """FLOPs per token of ``config`` on sequences of ``seq_len`` tokens: the forward
    (:func:`flops_breakdown` ``total``, ``kda_chunk_len`` as there), times 3 when ``training``
    (forward + backward)."""
    total = flops_breakdown(config, seq_len, kda_chunk_len)["total"]
    return 3.0 * total if training else total
