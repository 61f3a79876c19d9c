"""Analytic FLOPs per token (kimi_linear.flops): a dense case counted by hand, the weight part
against the real modules, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kimi_linear.config import KimiLinearConfig
from kimi_linear.flops import flops_breakdown, flops_per_token


def _dense() -> KimiLinearConfig:
    # 2 layers: KDA then MLA, dense SwiGLU MLPs, no MoE.
    return KimiLinearConfig.from_preset(
        "tiny",
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        layer_types=("kda", "mla"),
        kda_num_heads=2,
        kda_head_dim=8,
        kda_conv_size=4,
        kda_chunk_size=4,
        kda_backend="torch",  # the backend that runs kda_chunk_size (the kernels run 64)
        num_attention_heads=2,
        q_lora_rank=None,
        kv_lora_rank=8,
        qk_nope_head_dim=4,
        qk_rope_head_dim=2,
        v_head_dim=4,
        intermediate_size=32,
        num_experts=0,
        tie_word_embeddings=False,
    )


def test_dense_case_against_a_hand_count() -> None:
    cfg = _dense()
    T = 10
    # KDA layer: q,k,v 3*16*16; decay gate 16*8 + 8*16; beta 16*2; out gate 16*8 + 8*16; o 16*16
    kda_w = 768 + 128 + 128 + 32 + 128 + 128 + 256  # = 1568 weights
    kda_conv = 2 * 3 * 16 * 4  # depthwise, 48 channels... 3 convs of 16 channels, width 4
    C, d = 4, 8
    # per head: grams q k^T, k k^T; WY products A k, A v; intra-chunk A_qk v; 3 state products;
    # the triangular solve (C^3 / 3 multiply-adds per chunk of C tokens)
    per_head = 2 * 2 * C * d + 2 * 2 * C * d + 2 * C * d + 3 * 2 * d * d + 2 * C * C / 3
    kda_mix = 2 * per_head
    # MLA layer: q 16*2*6; kv_a 16*(8+2); kv_b 8*2*(4+4); o 2*4*16
    mla_w = 192 + 160 + 128 + 128  # = 608 weights
    mla_attn = 2 * 2 * (6 + 4) * (T + 1) / 2
    mlp = 2 * (3 * 16 * 32)  # two dense SwiGLU MLPs
    head = 16 * 100
    forward = 2 * kda_w + kda_conv + kda_mix + 2 * mla_w + mla_attn + 2 * mlp + 2 * head
    b = flops_breakdown(cfg, T)
    assert b["kda_projections"] == 2 * kda_w
    assert b["kda_conv"] == kda_conv
    assert b["kda_mixing"] == pytest.approx(kda_mix)
    assert b["mla_attention"] == pytest.approx(mla_attn)
    assert b["routed_experts"] == b["router"] == b["shared_experts"] == 0
    assert b["total"] == pytest.approx(forward)
    assert flops_per_token(cfg, T) == pytest.approx(3 * forward)
    assert flops_per_token(cfg, T, training=False) == pytest.approx(forward)
    # MLA grows with the length, KDA is constant per token once T >= chunk size
    b2 = flops_breakdown(cfg, 2 * T)
    assert b2["kda_mixing"] == b["kda_mixing"] and b2["mla_attention"] > b["mla_attention"]


@pytest.mark.parametrize("preset", ["tiny", "small", "kimi-linear-48b-a3b"])
def test_weight_flops_match_the_modules(preset: str) -> None:
    """2 x (linear weights + router + active share of the experts) of the meta-device model."""
    from kimi_linear.layers.moe import GroupedExperts, MoEGate
    from kimi_linear.model import KimiLinearForCausalLM

    cfg = KimiLinearConfig.from_preset(preset)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    n = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n += m.weight.numel()
        elif isinstance(m, nn.Conv1d):
            n += m.weight.numel()  # depthwise: W weights per channel, one MAC each per token
        elif isinstance(m, GroupedExperts):
            n += (m.w1.numel() + m.w2.numel() + m.w3.numel()) * (
                cfg.num_experts_per_token / cfg.num_experts
            )
        elif isinstance(m, MoEGate):
            n += m.weight.numel()
    b = flops_breakdown(cfg, 128)
    weights = b["total"] - b["kda_mixing"] - b["mla_attention"]
    assert weights == pytest.approx(2 * n, rel=1e-12)


def test_bad_input() -> None:
    with pytest.raises(TypeError, match="config must be a KimiLinearConfig"):
        flops_per_token({"hidden_size": 8}, 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seq_len must be an int >= 1, got 0"):
        flops_per_token(_dense(), 0)
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        flops_breakdown(_dense(), 3.5)  # type: ignore[arg-type]


def test_kda_chunk_follows_the_backend() -> None:
    """The torch backend runs ``kda_chunk_size``; the kernels and fla a fixed 64."""
    from kimi_linear.flops import KERNEL_CHUNK_SIZE, kda_flops_chunk

    torch_cfg = _dense()  # kda_backend="torch", kda_chunk_size=4
    auto_cfg = KimiLinearConfig.from_preset("tiny", kda_backend="auto", kda_chunk_size=16)
    assert kda_flops_chunk(torch_cfg) == 4
    assert kda_flops_chunk(auto_cfg) == KERNEL_CHUNK_SIZE == 64  # no device: the GPU case
    assert kda_flops_chunk(auto_cfg, "cpu") == 16  # auto on CPU is the torch backend
    assert kda_flops_chunk(KimiLinearConfig.from_preset("tiny", kda_backend="triton")) == 64
    T = 256
    at4 = flops_breakdown(torch_cfg, T)["kda_mixing"]
    assert flops_breakdown(torch_cfg, T, kda_chunk_len=4)["kda_mixing"] == at4
    assert flops_breakdown(torch_cfg, T, kda_chunk_len=64)["kda_mixing"] > at4
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="kda_chunk_len must be None or an int >= 1"):
            flops_per_token(torch_cfg, T, kda_chunk_len=bad)
