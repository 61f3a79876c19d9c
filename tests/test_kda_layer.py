"""KimiDeltaAttention: agreement with a from-the-equations reference, caches, variants, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from kimi_linear.cache import KDALayerCache
from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.kda import KimiDeltaAttention, causal_conv1d, l2_normalize
from kimi_linear.ops import naive_kda_step, naive_recurrent_kda

H, K, D = 2, 16, 32


def make_layer(seed: int = 0, **overrides) -> KimiDeltaAttention:
    cfg = KimiLinearConfig.from_preset(
        "tiny", hidden_size=D, kda_num_heads=H, kda_head_dim=K, kda_backend="torch", **overrides
    )
    torch.manual_seed(seed)
    layer = KimiDeltaAttention(cfg, layer_idx=0)
    with torch.no_grad():  # non-trivial norm / conv weights so the test sees them
        layer.o_norm.weight.uniform_(0.5, 1.5)
    return layer


def new_cache(layer: KimiDeltaAttention, batch: int) -> KDALayerCache:
    return KDALayerCache(batch, layer.num_heads, layer.head_dim, layer.head_dim, layer.conv_size)


def reference_forward(layer: KimiDeltaAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer written out from the paper's equations, with PyTorch's own padded conv."""
    W = layer.conv_size

    def short_conv(proj, conv):
        y = F.conv1d(
            proj(x).transpose(1, 2), conv.weight, padding=W - 1, groups=conv.weight.shape[0]
        )
        return F.silu(y[..., : x.shape[1]].transpose(1, 2)).unflatten(-1, (H, K))

    q = F.normalize(short_conv(layer.q_proj, layer.q_conv1d), dim=-1, eps=1e-12)
    k = F.normalize(short_conv(layer.k_proj, layer.k_conv1d), dim=-1, eps=1e-12)
    v = short_conv(layer.v_proj, layer.v_conv1d)
    f = layer.f_b_proj(layer.f_a_proj(x)) + layer.dt_bias
    if layer.gate_mode == "channel":
        f = f.unflatten(-1, (H, K))
    else:
        f = f.unsqueeze(-1).expand(*f.shape, K)
    g = -layer.A_log.exp() * F.softplus(f)
    beta = torch.sigmoid(layer.b_proj(x))
    o, _ = naive_recurrent_kda(q, k, v, g, beta)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
    o = o * torch.sigmoid(layer.g_b_proj(layer.g_a_proj(x))).unflatten(-1, (H, K))
    return layer.o_proj(o.flatten(-2))


@pytest.mark.parametrize("gate", ["channel", "head"])
@pytest.mark.parametrize("T", [1, 37, 70])
def test_layer_matches_equations(gate, T):
    layer = make_layer(kda_gate=gate)
    x = torch.randn(2, T, D)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_chunked_prefill_and_decode_match_full_forward(gate):
    layer = make_layer(kda_gate=gate)
    x = torch.randn(2, 70, D)
    full = layer(x)
    cache = new_cache(layer, 2)
    parts = [layer(x[:, :21], cache), layer(x[:, 21:64], cache)]  # prefill in two pieces
    parts += [layer(x[:, t : t + 1], cache) for t in range(64, 70)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.state.dtype == torch.float32
    # conv tails hold the last conv_size - 1 pre-conv inputs
    torch.testing.assert_close(cache.conv_v, layer.v_proj(x[:, -(layer.conv_size - 1) :]))


def test_decode_step_equals_recurrent_reference():
    torch.manual_seed(0)
    B, V = 3, 12
    q, k = l2_normalize(torch.randn(B, 1, H, K)), l2_normalize(torch.randn(B, 1, H, K))
    v, g = torch.randn(B, 1, H, V), -torch.rand(B, 1, H, K)
    beta, S0 = torch.rand(B, 1, H), torch.randn(B, H, K, V)
    o, S = naive_kda_step(q, k, v, g, beta, initial_state=S0)
    o_ref, S_ref = naive_recurrent_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(S, S_ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="exactly one token"):
        naive_kda_step(*(x.repeat_interleave(2, dim=1) for x in (q, k, v, g, beta)))


def test_layer_decode_uses_cache_state_like_reference():
    """One layer decode step from a random cache equals naive_recurrent_kda from the same state."""
    layer = make_layer()
    cache = new_cache(layer, 2)
    cache.state.normal_()
    cache.conv_q.normal_(), cache.conv_k.normal_(), cache.conv_v.normal_()
    x = torch.randn(2, 1, D)
    tails = [t.clone() for t in (cache.conv_q, cache.conv_k, cache.conv_v)]
    S0 = cache.state.clone()
    y = layer(x, cache)

    def conv(proj, c, tail):
        window = torch.cat([tail, proj(x)], 1)  # [B, W, HK]
        return F.silu((window * c.weight[:, 0].T).sum(1, keepdim=True)).unflatten(-1, (H, K))

    q = l2_normalize(conv(layer.q_proj, layer.q_conv1d, tails[0]))
    k = l2_normalize(conv(layer.k_proj, layer.k_conv1d, tails[1]))
    v = conv(layer.v_proj, layer.v_conv1d, tails[2])
    o_ref, S_ref = naive_recurrent_kda(
        q,
        k,
        v,
        layer.decay(x),
        torch.sigmoid(layer.b_proj(x)),
        initial_state=S0,
        output_final_state=True,
    )
    torch.testing.assert_close(cache.state, S_ref, atol=1e-5, rtol=1e-5)
    gate = torch.sigmoid(layer.g_b_proj(layer.g_a_proj(x))).unflatten(-1, (H, K))
    y_ref = layer.o_proj((layer.o_norm(o_ref) * gate).flatten(-2))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)


def test_causal_conv1d_continues_from_tail():
    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 6), torch.randn(6, 1, 4)
    y, tail = causal_conv1d(x, w)
    y1, t1 = causal_conv1d(x[:, :5], w)
    y2, t2 = causal_conv1d(x[:, 5:6], w, t1)
    y3, t3 = causal_conv1d(x[:, 6:], w, t2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y)
    torch.testing.assert_close(t3, tail)
    assert tail.shape == (2, 3, 6)
    y, tail = causal_conv1d(x, torch.randn(6, 1, 1))  # width 1: no tail
    assert tail.shape == (2, 0, 6)


def test_parameters_follow_release_names_shapes_and_init():
    layer = make_layer()
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {
        "q_proj.weight": (H * K, D),
        "k_proj.weight": (H * K, D),
        "v_proj.weight": (H * K, D),
        "q_conv1d.weight": (H * K, 1, 4),
        "k_conv1d.weight": (H * K, 1, 4),
        "v_conv1d.weight": (H * K, 1, 4),
        "f_a_proj.weight": (K, D),
        "f_b_proj.weight": (H * K, K),
        "A_log": (1, 1, H, 1),
        "dt_bias": (H * K,),
        "b_proj.weight": (H, D),
        "g_a_proj.weight": (K, D),
        "g_b_proj.weight": (H * K, K),
        "o_norm.weight": (K,),
        "o_proj.weight": (D, H * K),
    }
    assert layer.A_log.dtype == torch.float32 and layer.dt_bias.dtype == torch.float32
    A = layer.A_log.exp()
    assert (A >= 1).all() and (A <= 16).all()
    dt = F.softplus(layer.dt_bias)
    assert (dt >= 1e-4 - 1e-7).all() and (dt <= 0.1 + 1e-6).all()
    assert set(layer.no_weight_decay) == {"A_log", "dt_bias"}
    head = make_layer(kda_gate="head")
    assert tuple(head.f_b_proj.weight.shape) == (H, K) and tuple(head.dt_bias.shape) == (H,)
    g = head.decay(torch.randn(1, 3, D))
    assert g.shape == (1, 3, H, K) and (g <= 0).all()
    assert torch.equal(g, g[..., :1].expand_as(g))  # one decay per head


def test_gradients_flow_through_the_layer():
    layer = make_layer()
    x = torch.randn(2, 20, D, requires_grad=True)
    layer(x).square().mean().backward()
    for name, p in [("x", x), *layer.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert layer.A_log.grad.abs().sum() > 0 and layer.dt_bias.grad.abs().sum() > 0


def test_backend_names_validated_at_config_layer_and_assignment():
    layer = make_layer()
    x = torch.randn(1, 4, D)
    layer.backend = "fla"  # a valid name: refused when called on CPU inputs
    with pytest.raises(ValueError, match="kda_backend='fla'.*CUDA"):
        layer(x)
    with pytest.raises(ValueError, match=r"kda_backend must be one of .*did you mean 'triton'"):
        layer.backend = "trition"
    assert layer.backend == "fla"  # a refused assignment leaves the old name
    with pytest.raises(ValueError, match="KimiLinearConfig.kda_backend must be one of"):
        KimiLinearConfig.from_preset("tiny", kda_backend="cuda")


def test_bad_inputs():
    layer = make_layer()
    with pytest.raises(ValueError, match="hidden_size=32"):
        layer(torch.randn(2, 4, D + 1))
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(4, D))
    with pytest.raises(ValueError, match="at least one token"):
        layer(torch.randn(2, 0, D))
    with pytest.raises(ValueError, match="floating point"):
        layer(torch.ones(2, 3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="x has dtype torch.float64"):
        layer(torch.randn(2, 3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"cache.state must be \[2, 2, 16, 16\]"):
        layer(torch.randn(2, 3, D), new_cache(layer, 3))
    with pytest.raises(ValueError, match="KDALayerCache"):
        layer(torch.randn(2, 3, D), cache=torch.zeros(2))


@pytest.mark.parametrize("grad", [False, True])
def test_triton_backend_matches_torch(grad):
    """The Triton kernels (interpreter on CPU): prefill, then decode steps through the cache.

    Without gradients decode takes the fused recurrent kernel updating the state in place;
    with them, the differentiable chunked kernel.
    """
    layer = make_layer()
    x = torch.randn(1, 20, D)

    def run():
        cache = new_cache(layer, 1)
        with torch.set_grad_enabled(grad):
            full = layer(x)
            steps = [layer(x[:, :17], cache)] + [
                layer(x[:, t : t + 1], cache) for t in (17, 18, 19)
            ]
        return full, torch.cat(steps, 1), cache.state

    ref = run()
    layer.backend = "triton"
    out = run()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    if grad:
        out[1].sum().backward()
        assert layer.q_proj.weight.grad is not None


def test_dt_bias_is_softplus_inverse():
    layer = make_layer(seed=3)
    layer.reset_gate_parameters(a_range=(2.0, 2.0), dt_range=(0.01, 0.01))
    torch.testing.assert_close(layer.A_log, torch.full_like(layer.A_log, math.log(2.0)))
    torch.testing.assert_close(F.softplus(layer.dt_bias), torch.full_like(layer.dt_bias, 0.01))


def test_decay_parameters_stay_fp32_under_module_casts():
    layer = make_layer()
    A = layer.A_log.detach().clone()
    layer.to(torch.bfloat16)
    assert layer.q_proj.weight.dtype == torch.bfloat16
    assert layer.A_log.dtype == torch.float32 and layer.dt_bias.dtype == torch.float32
    assert torch.equal(layer.A_log, A)  # no bf16 rounding on the way
    y = layer(torch.randn(1, 5, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    layer.half().float()
    assert layer.A_log.dtype == torch.float32 and layer.q_proj.weight.dtype == torch.float32


def test_meta_device_layer_and_model_forward_give_meta_outputs():
    """Shape inference on the meta device (meta-device init): no data, right shapes."""
    from kimi_linear.model import KimiLinearForCausalLM

    with torch.device("meta"):
        layer = make_layer()
        y = layer(torch.empty(2, 5, D))
        cache = new_cache(layer, 2)
        y1 = layer(torch.empty(2, 1, D), cache)
    assert y.device.type == "meta" and y.shape == (2, 5, D)
    assert y1.device.type == "meta" and y1.shape == (2, 1, D)
    assert cache.state.device.type == "meta" and cache.state.shape == (2, H, K, K)
    cfg = KimiLinearConfig.from_preset("tiny", kda_backend="auto")
    with torch.device("meta"):
        model = KimiLinearForCausalLM(cfg)
    out = model(torch.zeros(2, 5, dtype=torch.long, device="meta"))
    logits = getattr(out, "logits", out)
    assert logits.device.type == "meta" and logits.shape == (2, 5, cfg.vocab_size)


# ------------------------------------------------------------------------------------------ GVA


def _gva_pair(gate: str) -> tuple[KimiDeltaAttention, KimiDeltaAttention]:
    """A GVA layer (H=2 key heads, HV=4 value heads) and a plain layer with 4 heads whose q / k
    projections and convs are the GVA ones repeated per group (key head i // 2 -> head i)."""
    gva = make_layer(kda_gate=gate, kda_num_v_heads=2 * H)
    cfg = KimiLinearConfig.from_preset(
        "tiny", hidden_size=D, kda_num_heads=2 * H, kda_head_dim=K, kda_backend="torch",
        kda_gate=gate,
    )  # fmt: skip
    plain = KimiDeltaAttention(cfg, layer_idx=0)
    state = dict(gva.state_dict())
    for name in ("q_proj.weight", "k_proj.weight", "q_conv1d.weight", "k_conv1d.weight"):
        w = state[name]
        state[name] = w.unflatten(0, (H, K)).repeat_interleave(2, dim=0).flatten(0, 1)
    plain.load_state_dict(state)
    return gva, plain


@pytest.mark.parametrize("gate", ["channel", "head"])
def test_gva_layer_equals_repeated_key_heads(gate):
    gva, plain = _gva_pair(gate)
    assert gva.q_proj.weight.shape == (H * K, D) and gva.v_proj.weight.shape == (2 * H * K, D)
    assert gva.A_log.shape == (1, 1, 2 * H, 1) and gva.b_proj.weight.shape == (2 * H, D)
    x = torch.randn(2, 37, D)
    torch.testing.assert_close(gva(x), plain(x), atol=1e-5, rtol=1e-4)


def test_gva_chunked_prefill_and_decode_match_full_forward():
    layer = make_layer(kda_num_v_heads=2 * H)
    x = torch.randn(2, 40, D)
    full = layer(x)
    cache = KDALayerCache(2, H, K, K, layer.conv_size, num_v_heads=2 * H)
    assert cache.state.shape == (2, 2 * H, K, K) and cache.conv_q.shape[-1] == H * K
    parts = [layer(x[:, :21], cache), layer(x[:, 21:36], cache)]
    parts += [layer(x[:, t : t + 1], cache) for t in range(36, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"cache.state must be \[2, 4, 16, 16\]"):
        layer(x[:, :1], new_cache(layer, 2))


def test_gva_config_checks():
    with pytest.raises(ValueError, match="kda_num_v_heads must be a multiple of kda_num_heads=2"):
        KimiLinearConfig.from_preset("tiny", kda_num_heads=2, kda_num_v_heads=3)
    with pytest.raises(ValueError, match="kda_num_v_heads must be a positive int"):
        KimiLinearConfig.from_preset("tiny", kda_num_v_heads=0)
    cfg = KimiLinearConfig.from_preset("tiny", kda_num_heads=2, kda_num_v_heads=4)
    plain = KimiLinearConfig.from_preset("tiny", kda_num_heads=2)
    assert cfg.kda_value_heads == 4 and plain.kda_value_heads == 2
    assert cfg.kv_cache_bytes(8)["kda_state"] == 2 * plain.kv_cache_bytes(8)["kda_state"]


def test_gva_layer_refuses_context_parallelism():
    layer = make_layer(kda_num_v_heads=2 * H)
    with pytest.raises(ValueError, match="context parallelism .* does not support GVA"):
        layer(torch.randn(1, 4, D), cp=object())
