"""MLAttention: agreement with a materialised reference, cache/decode equivalence, the absorbed
path, max-logit tracking (QK-Clip statistic), RoPE, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_linear.cache import KDALayerCache, LatentKVCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers import mla as mla_module
from kimi_linear.layers.mla import MLAttention, masked_max_logits
from kimi_linear.layers.rope import RotaryEmbedding, apply_rotary

ATOL = 1e-5


def make_config(use_nope: bool = True, q_lora_rank: int | None = None) -> KimiLinearConfig:
    return KimiLinearConfig.from_preset(
        "tiny",
        mla_use_nope=use_nope,
        q_lora_rank=q_lora_rank,
        num_attention_heads=3,
        rope_theta=500.0,
    )


def make_layer(use_nope: bool = True, q_lora_rank: int | None = None, seed: int = 0) -> MLAttention:
    torch.manual_seed(seed)
    layer = MLAttention(make_config(use_nope, q_lora_rank))
    with torch.no_grad():  # non-trivial norm weights, so the reference checks they are applied
        for mod in layer.modules():
            if mod.__class__.__name__ == "RMSNorm":
                mod.weight.uniform_(0.5, 1.5)
    return layer


def rope_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Interleaved RoPE as a complex rotation: pair (x[2i], x[2i+1]) times exp(i pos theta^(-2i/P))."""
    P = x.shape[-1]
    freqs = theta ** (-torch.arange(0, P, 2, dtype=torch.float64) / P)
    angles = positions.double()[:, None] * freqs[None, :]  # [T, P/2]
    rot = torch.polar(torch.ones_like(angles), angles)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], P // 2, 2).contiguous())
    shape = [1] * xc.dim()
    shape[1], shape[-1] = angles.shape  # position axis is dim 1 ([B, T, ...])
    out = torch.view_as_real(xc * rot.reshape(shape)).flatten(-2)
    return out.to(x.dtype)


def reference_mla(layer: MLAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Straightforward MLA from the weights: per-head q, k, v, explicit masked softmax.

    Returns ``(output [B, T, D], masked logits [B, H, T, T])``.
    """
    cfg = layer.config
    B, T, _ = x.shape
    H, nope, rope, vd, R = (
        cfg.num_attention_heads,
        cfg.qk_nope_head_dim,
        cfg.qk_rope_head_dim,
        cfg.v_head_dim,
        cfg.kv_lora_rank,
    )
    if cfg.q_lora_rank is None:
        q = x @ layer.q_proj.weight.T
    else:
        qa = x @ layer.q_a_proj.weight.T
        qa = (
            qa
            / torch.sqrt(qa.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
            * layer.q_a_layernorm.weight
        )
        q = qa @ layer.q_b_proj.weight.T
    q = q.view(B, T, H, nope + rope)
    kv_a = x @ layer.kv_a_proj_with_mqa.weight.T
    c, k_pe = kv_a[..., :R], kv_a[..., R:]
    c = (
        c
        / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)
        * layer.kv_a_layernorm.weight
    )
    kv = (c @ layer.kv_b_proj.weight.T).view(B, T, H, nope + vd)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    if not cfg.mla_use_nope:
        pos = torch.arange(T)
        q_pe = rope_reference(q_pe, pos, cfg.rope_theta)
        k_pe = rope_reference(k_pe, pos, cfg.rope_theta)
    logits = torch.zeros(B, H, T, T, dtype=x.dtype)
    for h in range(H):
        logits[:, h] = q_nope[:, :, h] @ k_nope[:, :, h].transpose(1, 2) + q_pe[
            :, :, h
        ] @ k_pe.transpose(1, 2)
    logits = logits * (nope + rope) ** -0.5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, float("-inf"))
    probs = logits.softmax(-1)
    o = torch.einsum("bhts,bshv->bthv", probs, v).reshape(B, T, H * vd)
    return o @ layer.o_proj.weight.T, logits


CASES = [(True, None), (True, 16), (False, None), (False, 16)]


@pytest.mark.parametrize("use_nope,q_lora_rank", CASES)
def test_prefill_matches_reference(use_nope, q_lora_rank):
    layer = make_layer(use_nope, q_lora_rank)
    x = torch.randn(2, 9, layer.config.hidden_size)
    with torch.no_grad():
        expected, _ = reference_mla(layer, x)
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=1e-4)
        # absorbed path without a cache (attention over this block's latents) agrees too
        torch.testing.assert_close(layer(x, absorb=True), expected, atol=ATOL, rtol=1e-4)


def test_parameter_names_and_shapes_follow_release():
    cfg = make_config(q_lora_rank=None)
    H, nope, rope, vd, R, D = 3, 16, 8, 16, 32, 64
    shapes = {n: tuple(p.shape) for n, p in MLAttention(cfg).named_parameters()}
    assert shapes == {
        "q_proj.weight": (H * (nope + rope), D),
        "kv_a_proj_with_mqa.weight": (R + rope, D),
        "kv_a_layernorm.weight": (R,),
        "kv_b_proj.weight": (H * (nope + vd), R),
        "o_proj.weight": (D, H * vd),
    }
    lora = {n for n, _ in MLAttention(make_config(q_lora_rank=16)).named_parameters()}
    assert {"q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"} <= lora
    assert "q_proj.weight" not in lora


@pytest.mark.parametrize("use_nope", [True, False])
@pytest.mark.parametrize("absorb", [None, False])
def test_decode_matches_full_sequence(use_nope, absorb):
    """Prompt then one token at a time through the cache equals the full forward at every position."""
    layer = make_layer(use_nope, q_lora_rank=16, seed=1)
    B, T, P = 2, 11, 4
    x = torch.randn(B, T, layer.config.hidden_size)
    with torch.no_grad():
        full = layer(x)
        cache = LatentKVCache(B, layer.kv_lora_rank, layer.rope_dim)
        outs = [layer(x[:, :P], cache, position_offset=0, absorb=absorb)]
        for t in range(P, T):
            outs.append(layer(x[:, t : t + 1], cache, position_offset=t, absorb=absorb))
    assert cache.length == T
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("use_nope", [True, False])
@pytest.mark.parametrize("absorb", [True, False])
def test_prefill_in_two_pieces(use_nope, absorb):
    layer = make_layer(use_nope, seed=2)
    x = torch.randn(2, 10, layer.config.hidden_size)
    with torch.no_grad():
        full = layer(x)
        cache = LatentKVCache(2, layer.kv_lora_rank, layer.rope_dim, capacity=4)  # forces a grow
        a = layer(x[:, :6], cache, 0, absorb=absorb)
        b = layer(x[:, 6:], cache, 6, absorb=absorb)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=ATOL, rtol=1e-4)
    # the cache holds exactly the normalised latents of the whole sequence
    latent = layer.kv_a_layernorm(layer.kv_a_proj_with_mqa(x)[..., : layer.kv_lora_rank])
    torch.testing.assert_close(cache.latent[:, : cache.length], latent, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("use_nope", [True, False])
@pytest.mark.parametrize("T", [1, 3])
def test_absorbed_equals_plain_on_cache(use_nope, T):
    layer = make_layer(use_nope, seed=3)
    B, L0 = 2, 13
    prefix = torch.randn(B, L0, layer.config.hidden_size)
    x = torch.randn(B, T, layer.config.hidden_size)
    results = []
    with torch.no_grad():
        for absorb in (True, False):
            cache = LatentKVCache(B, layer.kv_lora_rank, layer.rope_dim)
            layer(prefix, cache, 0)
            results.append(layer(x, cache, L0, absorb=absorb))
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=0)


def test_default_path_choice(monkeypatch):
    """Small blocks with a cache take the absorbed path, everything else the plain one."""
    layer = make_layer()
    calls = []
    orig_abs, orig_plain = layer._attend_absorbed, layer._attend_plain
    monkeypatch.setattr(
        layer, "_attend_absorbed", lambda *a: calls.append("absorbed") or orig_abs(*a)
    )
    monkeypatch.setattr(layer, "_attend_plain", lambda *a: calls.append("plain") or orig_plain(*a))
    D = layer.config.hidden_size
    cache = LatentKVCache(1, layer.kv_lora_rank, layer.rope_dim)
    with torch.no_grad():
        layer(torch.randn(1, 5, D))
        layer(torch.randn(1, 5, D), cache, 0)
        layer(torch.randn(1, 1, D), cache, 5)
        layer.absorb_max_tokens = 2
        layer(torch.randn(1, 3, D), cache, 6)
    assert calls == ["plain", "absorbed", "absorbed", "plain"]
    # the crossover for the released shape: R (nope + v) / (2R - nope - v) = 512*256/768
    assert (
        MLAttention(
            KimiLinearConfig.from_preset("kimi-linear-48b-a3b").replace(
                hidden_size=64, num_attention_heads=1
            )
        ).absorb_max_tokens
        == 170
    )


# ------------------------------------------------------------------ prefill memory linear in T
def _attention_case(case: str, layer: MLAttention, T: int, generator: torch.Generator):
    """``(x [B, T, D], forward kwargs, prefix [B, P, D] or None)`` of one attention layout."""
    D = layer.config.hidden_size
    B = 2 if case in ("pad", "cache") else 1
    x = torch.randn(B, T, D, generator=generator)
    if case == "pad":  # row 0 has 5 left pads, row 1 none
        return x, {"pad_lengths": torch.tensor([5, 0])}, None
    if case == "packed":
        cuts = [0, T // 3, T // 3 + 1, T]  # a one-token document in the middle
        return x, {"cu_seqlens": torch.tensor(cuts, dtype=torch.int32)}, None
    if case == "cache":  # continue a 9-token cache with a block of T tokens (plain path)
        return x, {"absorb": False}, torch.randn(B, 9, D, generator=generator)
    return x, {}, None


def _run_attention(layer: MLAttention, x, kwargs, prefix):
    """Output and input gradient (and parameter gradients) of one forward + backward."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    if prefix is None:
        out = layer(x, **kwargs)
    else:
        cache = LatentKVCache(x.shape[0], layer.kv_lora_rank, layer.rope_dim)
        layer(prefix, cache, 0)
        out = layer(x, cache, prefix.shape[1], **kwargs)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("case", ["causal", "pad", "packed", "cache"])
@pytest.mark.parametrize("use_nope", [True, False])
def test_blocked_attention_matches_one_call(monkeypatch, case, use_nope):
    """Attending in query blocks (the path taken without a fused SDPA kernel, or with a mask)
    gives the outputs and gradients of one SDPA call over the whole block, within fp32
    tolerance: plain causal, left-padded rows, packed documents and a cache continuation."""
    layer = make_layer(use_nope, seed=5)
    gen = torch.Generator().manual_seed(5)
    x, kwargs, prefix = _attention_case(case, layer, 40, gen)
    monkeypatch.setattr(mla_module, "ATTENTION_BLOCK_ELEMENTS", 1 << 30)  # one call
    one_call = _run_attention(layer, x, kwargs, prefix)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(mla_module, "ATTENTION_BLOCK_ELEMENTS", 3 * 40 * 7)  # blocks of 3-7 rows
    monkeypatch.setattr(mla_module, "_fused_sdpa", lambda *a, **k: False)
    monkeypatch.setattr(
        mla_module.F,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append(a) or sdpa(*a, **k),
    )
    blocked = _run_attention(layer, x, kwargs, prefix)
    assert len(calls) > 3  # it did split the queries
    torch.testing.assert_close(blocked[0], one_call[0], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(blocked[1], one_call[1], atol=ATOL, rtol=1e-5)
    for name, grad in one_call[2].items():
        torch.testing.assert_close(blocked[2][name], grad, atol=ATOL, rtol=1e-4, msg=name)
    if case == "causal":  # and both equal the explicit reference
        with torch.no_grad():
            expected, _ = reference_mla(layer, x)
        torch.testing.assert_close(blocked[0], expected, atol=ATOL, rtol=1e-5)


def test_query_block_rows_bound_the_scores():
    assert mla_module.query_block_rows(8, 1024, block_elements=1 << 20) == 128
    assert mla_module.query_block_rows(8, 1 << 20, block_elements=1 << 20) == 1  # at least one
    for bh, keys in [(1, 1), (3, 5000), (64, 65536)]:
        rows = mla_module.query_block_rows(bh, keys)
        assert rows >= 1 and (rows == 1 or bh * rows * keys <= mla_module.ATTENTION_BLOCK_ELEMENTS)


def _largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation made while ``fn()`` runs (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


@pytest.mark.parametrize(
    "case,fused", [("causal", True), ("causal", False), ("pad", True), ("packed", True)]
)
def test_prefill_never_allocates_t_by_t(monkeypatch, case, fused):
    """Forward + backward at T = 2048 never allocates a [T, T] tensor (fp32 scores would be
    T * T * 4 bytes per head; here nothing reaches T * T bytes), whether PyTorch has a fused
    SDPA kernel for the shapes (CPU flash: one call) or not (forced: blocks of queries)."""
    T = 2048
    layer = MLAttention(make_config().replace(max_position_embeddings=T))
    x, kwargs, _ = _attention_case(case, layer, T, torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    budget = 1 << 18
    monkeypatch.setattr(mla_module, "ATTENTION_BLOCK_ELEMENTS", budget, raising=False)
    if not fused:
        monkeypatch.setattr(mla_module, "_fused_sdpa", lambda *a, **k: False, raising=False)
    largest = _largest_allocation(lambda: layer(x, **kwargs).sum().backward())
    # a block's scores / float mask hold at most `budget` fp32 elements (B * H * rows * keys);
    # the rest is linear in T (projections, K/V, gradients)
    assert largest < T * T, f"largest allocation {largest} bytes >= T * T = {T * T}"


@pytest.mark.parametrize("use_nope", [True, False])
def test_max_logits_match_explicit_logits_and_accumulate(use_nope):
    layer = make_layer(use_nope, seed=4)
    D = layer.config.hidden_size
    x1, x2 = torch.randn(2, 7, D), 3 * torch.randn(1, 5, D)
    layer(x1)
    assert layer.max_logits is None  # off by default: nothing recorded
    layer.record_max_logits = True
    with torch.no_grad():
        _, logits1 = reference_mla(layer, x1)
        _, logits2 = reference_mla(layer, x2)
    y = layer(x1)
    m1 = logits1.amax(dim=(0, 2, 3))
    assert layer.max_logits.shape == (layer.num_heads,) and layer.max_logits.dtype == torch.float32
    assert not layer.max_logits.requires_grad and y.requires_grad
    torch.testing.assert_close(layer.max_logits, m1, atol=ATOL, rtol=1e-5)
    layer(x2)
    torch.testing.assert_close(
        layer.max_logits, torch.maximum(m1, logits2.amax(dim=(0, 2, 3))), atol=ATOL, rtol=1e-5
    )
    layer.reset_max_logits()
    assert layer.max_logits is None
    layer(x2)
    torch.testing.assert_close(layer.max_logits, logits2.amax(dim=(0, 2, 3)), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("absorb", [True, False])
def test_max_logits_through_cache_paths(absorb):
    """Prefill + decode steps record the same per-head max as one full-sequence pass."""
    layer = make_layer(use_nope=False, seed=5)
    x = torch.randn(2, 8, layer.config.hidden_size)
    with torch.no_grad():
        _, logits = reference_mla(layer, x)
        layer.record_max_logits = True
        cache = LatentKVCache(2, layer.kv_lora_rank, layer.rope_dim)
        layer(x[:, :3], cache, 0, absorb=absorb)
        layer(x[:, 3:6], cache, 3, absorb=absorb)
        for t in (6, 7):
            layer(x[:, t : t + 1], cache, t, absorb=absorb)
    torch.testing.assert_close(layer.max_logits, logits.amax(dim=(0, 2, 3)), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("q_start,T,L", [(0, 9, 9), (5, 4, 9), (8, 1, 9)])
def test_masked_max_logits_blockwise(q_start, T, L):
    torch.manual_seed(6)
    q, k = torch.randn(2, 3, T, 8), torch.randn(2, 3, L, 8)
    logits = (q @ k.transpose(-1, -2)) * 0.3
    visible = torch.arange(L)[None, :] <= torch.arange(q_start, q_start + T)[:, None]
    expected = logits.masked_fill(~visible, float("-inf")).amax(dim=(0, 2, 3))
    for block in (1, 7, 1 << 20):  # one query row per block, a few rows, everything at once
        got = masked_max_logits(q, k, 0.3, q_start, block_elements=block)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_row_layout_matches_qk_clip_rescaling():
    """Scaling head h's q rows (nope by sqrt(g), rope by g) and its kv_b k_nope rows by sqrt(g)
    scales exactly head h's logits by g: the layout MuonClip relies on."""
    layer = make_layer(use_nope=False, seed=7)
    x = torch.randn(2, 6, layer.config.hidden_size)
    layer.record_max_logits = True
    with torch.no_grad():
        layer(x)
        before = layer.max_logits.clone()
        h, g = 1, 0.25
        nope, rope, vd = layer.nope_dim, layer.rope_dim, layer.v_head_dim
        q_rows = layer.q_proj.weight[h * (nope + rope) : (h + 1) * (nope + rope)]
        q_rows[:nope] *= math.sqrt(g)
        q_rows[nope:] *= g
        layer.kv_b_proj.weight[h * (nope + vd) : h * (nope + vd) + nope] *= math.sqrt(g)
        layer.reset_max_logits()
        layer(x)
    expected = before.clone()
    expected[h] *= g
    torch.testing.assert_close(layer.max_logits, expected, atol=ATOL, rtol=1e-5)


def test_gradients_reach_every_parameter():
    layer = make_layer(use_nope=False, q_lora_rank=16)
    layer.record_max_logits = True
    layer(torch.randn(2, 5, layer.config.hidden_size)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_cache_with_fp32_layer_runs_close():
    layer = make_layer(seed=8)
    x = torch.randn(1, 6, layer.config.hidden_size)
    with torch.no_grad():
        full = layer(x)
        cache = LatentKVCache(1, layer.kv_lora_rank, layer.rope_dim, dtype=torch.bfloat16)
        out = torch.cat(
            [layer(x[:, :4], cache, 0), layer(x[:, 4:5], cache, 4), layer(x[:, 5:], cache, 5)], 1
        )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, full, atol=2e-2, rtol=2e-2)


def test_rope_properties():
    rot = RotaryEmbedding(8, theta=100.0)
    torch.manual_seed(9)
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)

    def rotated_dot(m: int, n: int) -> torch.Tensor:
        cm, sm = rot(torch.tensor([m]))
        cn, sn = rot(torch.tensor([n]))
        return (apply_rotary(q, cm, sm) * apply_rotary(k, cn, sn)).sum()

    # relative: q_m . k_n depends on m - n only; rotation keeps norms; position 0 is identity
    torch.testing.assert_close(rotated_dot(7, 3), rotated_dot(104, 100), atol=1e-5, rtol=1e-5)
    c, s = rot(torch.arange(5))
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(apply_rotary(x, c, s).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rotary(x, c, s)[:, 0], x[:, 0])
    torch.testing.assert_close(
        apply_rotary(x, c, s), rope_reference(x, torch.arange(5), 100.0), atol=1e-6, rtol=1e-6
    )
    with pytest.raises(ValueError, match="dim"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="positions"):
        rot(torch.arange(3.0))
    with pytest.raises(ValueError, match="even"):
        apply_rotary(torch.randn(2, 3), c[:2, :1], s[:2, :1])


def test_bad_inputs_raise_value_error():
    layer = make_layer()
    D = layer.config.hidden_size
    with pytest.raises(ValueError, match=r"x must be \[B, T, hidden=64\]"):
        layer(torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(3, D))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 0, D))
    with pytest.raises(ValueError, match="floating"):
        layer(torch.ones(2, 3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(2, 3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="LatentKVCache"):
        layer(torch.randn(2, 3, D), KDALayerCache(2, 2, 8, 8, 4))
    with pytest.raises(ValueError, match="cache must hold"):
        layer(torch.randn(2, 3, D), LatentKVCache(3, layer.kv_lora_rank, layer.rope_dim))
    with pytest.raises(ValueError, match="cache must hold"):
        layer(torch.randn(2, 3, D), LatentKVCache(2, layer.kv_lora_rank + 1, layer.rope_dim))
    cache = LatentKVCache(2, layer.kv_lora_rank, layer.rope_dim)
    with torch.no_grad():
        layer(torch.randn(2, 3, D), cache, 0)
    with pytest.raises(ValueError, match="position_offset"):
        layer(torch.randn(2, 1, D), cache, 0)
    with pytest.raises(ValueError, match="position_offset"):
        layer(torch.randn(2, 1, D), None, -1)
    assert cache.length == 3  # failed calls left the cache untouched


def test_max_logits_not_recorded_in_eval_mode():
    layer = make_layer()
    layer.record_max_logits = True
    x = torch.randn(2, 5, layer.config.hidden_size)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert layer.max_logits is None
    layer.train()
    layer(x)
    assert layer.max_logits is not None and layer.max_logits.shape == (layer.num_heads,)


# ------------------------------------------------------------------ non-finite tokens stay causal
NAN_T = 24
NAN_AT = 13  # the poisoned token (row 0): mid-block, mid-document
NAN_DOCS = [0, 7, 17, 24]  # packed: the NaN in the middle document


def _nan_case(case: str, layer: MLAttention):
    """``(x, kwargs, prefix, expected NaN outputs [B, T])`` with ``x[0, NAN_AT]`` a NaN."""
    gen = torch.Generator().manual_seed(11)
    x, kwargs, prefix = _attention_case(case, layer, NAN_T, gen)
    if case == "packed":
        kwargs = {"cu_seqlens": torch.tensor(NAN_DOCS, dtype=torch.int32)}
    bad = torch.zeros(x.shape[:2], dtype=torch.bool)
    bad[0, NAN_AT : NAN_DOCS[2] if case == "packed" else NAN_T] = True
    x = x.clone()
    x[0, NAN_AT, 3] = float("nan")
    return x, kwargs, prefix, bad


def _forward(layer: MLAttention, x, kwargs, prefix, path: str, monkeypatch) -> torch.Tensor:
    kwargs = dict(kwargs, absorb=path == "absorbed")
    if path == "blocked":  # query blocks of 1-7 rows, as without a fused kernel
        monkeypatch.setattr(mla_module, "ATTENTION_BLOCK_ELEMENTS", 3 * 40 * 7)
        monkeypatch.setattr(mla_module, "_fused_sdpa", lambda *a, **k: False)
    with torch.no_grad():
        if prefix is None:
            return layer(x, **kwargs)
        cache = LatentKVCache(x.shape[0], layer.kv_lora_rank, layer.rope_dim)
        layer(prefix, cache, 0)
        return layer(x, cache, prefix.shape[1], **kwargs)


@pytest.mark.parametrize("path", ["plain", "absorbed", "blocked"])
@pytest.mark.parametrize("case", ["causal", "pad", "packed", "cache"])
def test_nan_token_reaches_no_earlier_token_document_or_row(monkeypatch, case, path):
    """A NaN in token 13 of row 0 makes the outputs of row 0 (of its document, packed) NaN from
    token 13 on and changes nothing else, bit for bit: attention used to multiply the NaN key
    and value by the zero probability of every earlier query (0 * NaN = NaN)."""
    layer = make_layer(use_nope=False, seed=3)
    x, kwargs, prefix, bad = _nan_case(case, layer)
    clean = x.clone()
    clean[0, NAN_AT] = 0.0
    ref = _forward(layer, clean, kwargs, prefix, path, monkeypatch)
    out = _forward(layer, x, kwargs, prefix, path, monkeypatch)
    assert torch.isnan(out[bad]).all()
    torch.testing.assert_close(out[~bad], ref[~bad], atol=0, rtol=0)


@pytest.mark.parametrize("absorb", [True, False])
def test_nan_in_the_cache_poisons_later_outputs_of_its_row_only(absorb):
    """Prefill then decode one token at a time (and a block of 3): a NaN cached for row 0
    makes every later output of row 0 NaN; row 1 decodes exactly as without it."""
    layer = make_layer(use_nope=False, seed=4)
    D = layer.config.hidden_size
    x = torch.randn(2, 14, D, generator=torch.Generator().manual_seed(4))
    bad = x.clone()
    bad[0, 4] = float("nan")

    def run(inputs):
        cache = LatentKVCache(2, layer.kv_lora_rank, layer.rope_dim)
        with torch.no_grad():
            outs = [layer(inputs[:, :8], cache, 0)]
            for t in range(8, 11):
                outs.append(layer(inputs[:, t : t + 1], cache, t, absorb=absorb))
            outs.append(layer(inputs[:, 11:], cache, 11, absorb=absorb))
        return torch.cat(outs, dim=1)

    ref, out = run(x), run(bad)
    assert torch.isnan(out[0, 4:]).all()
    torch.testing.assert_close(out[0, :4], ref[0, :4], atol=0, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=0, rtol=0)


@pytest.mark.parametrize("absorb", [True, False])
def test_nan_in_a_left_pad_never_reaches_the_real_tokens(absorb):
    """A NaN at a left pad of row 0 (its key hidden from every real query) changes no real
    output of row 0, neither in the prefill nor when decoding over the cache."""
    layer = make_layer(use_nope=False, seed=6)
    D = layer.config.hidden_size
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(6))
    pads = torch.tensor([4, 0])
    bad = x.clone()
    bad[0, 1] = float("nan")

    def run(inputs):
        cache = LatentKVCache(2, layer.kv_lora_rank, layer.rope_dim)
        with torch.no_grad():
            outs = [layer(inputs[:, :9], cache, 0, pad_lengths=pads)]
            for t in range(9, 12):
                outs.append(layer(inputs[:, t : t + 1], cache, t, absorb, pad_lengths=pads))
        return torch.cat(outs, dim=1)

    ref, out = run(x), run(bad)
    torch.testing.assert_close(out[0, 4:], ref[0, 4:], atol=0, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=0, rtol=0)


@pytest.mark.parametrize("case", ["causal", "packed"])
def test_input_gradients_of_finite_outputs_ignore_a_nan_token(case):
    """A loss over the finite outputs (the NaN ones masked out after a nonlinearity, so their
    incoming gradient is NaN) gives every other token the input gradient it has without the
    NaN. (Weight gradients are NaN either way: ``dW = sum_t dy_t x_t^T`` meets the NaN input.)"""
    layer = make_layer(use_nope=False, seed=7)
    x, kwargs, _, bad = _nan_case(case, layer)
    clean = x.clone()
    clean[0, NAN_AT] = 0.0

    def input_grad(inputs):
        leaf = inputs.clone().requires_grad_(True)
        out = layer(leaf, **kwargs)
        (out.pow(2) * ~bad[..., None]).sum().backward()  # NaN * 0: NaN gradients at `bad`
        return leaf.grad

    others = torch.ones(x.shape[:2], dtype=torch.bool)
    others[0, NAN_AT] = False
    got, ref = input_grad(x)[others], input_grad(clean)[others]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_poisoned_queries_match_the_visibility_rule():
    """poisoned_queries against the rule written out per query: its own value is bad, or a key
    it may see (causal; not a pad unless the query is one, then only itself; same document)."""
    gen = torch.Generator().manual_seed(0)
    B, L = 3, 16
    key_bad = torch.rand(B, L, generator=gen) < 0.1
    for q_start, pads, positions in [
        (0, None, None),
        (5, None, None),
        (4, torch.tensor([0, 6, 16]), None),
        (0, None, torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])),
    ]:
        kb = key_bad[:1] if positions is not None else key_bad
        T = L - q_start
        q_bad = torch.rand(kb.shape[0], T, generator=gen) < 0.1
        got = mla_module.poisoned_queries(kb, q_bad, q_start, positions, pads)
        for b in range(kb.shape[0]):
            for t in range(T):
                p = q_start + t
                pad = 0 if pads is None else int(pads[b])
                first = p - int(positions[t]) if positions is not None else 0
                keys = [p] if p < pad else range(max(pad, first), p + 1)
                want = bool(q_bad[b, t]) or any(bool(kb[b, s]) for s in keys)
                assert bool(got[b, t]) == want, (q_start, pads, positions, b, t)
