"""torch.compile support: the KDA custom op (eager agreement, fake/meta implementation, opcheck)
and compiled decoder layers against eager, with no graph break inside a KDA layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from kimi_linear.backends import chunk_kda_custom_op, dispatch_chunk_kda


def _inputs(B=2, T=20, H=2, K=8, V=8, dtype=torch.float32, seed=0, h0=True):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = -torch.rand(B, T, H, K, generator=gen, dtype=dtype) * 0.5
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    s = torch.randn(B, H, K, V, generator=gen, dtype=torch.float32) if h0 else None
    return q, k, v, g, beta, s


def test_custom_op_matches_the_backend_forward_and_backward() -> None:
    tensors = _inputs()
    ref_in = [t.clone().requires_grad_(True) for t in tensors]
    op_in = [t.clone().requires_grad_(True) for t in tensors]
    kw = dict(backend="torch", output_final_state=True, chunk_size=8)
    o1, s1 = dispatch_chunk_kda(*ref_in[:5], initial_state=ref_in[5], **kw)
    o2, s2 = chunk_kda_custom_op(*op_in[:5], initial_state=op_in[5], **kw)
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    torch.testing.assert_close(s2, s1, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(1)
    do, ds = torch.randn(o1.shape, generator=gen), torch.randn(s1.shape, generator=gen)
    torch.autograd.backward((o1, s1), (do, ds))
    torch.autograd.backward((o2, s2), (do, ds))
    for a, b in zip(ref_in, op_in):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-6)
    # without the final state requested, the state is None as for dispatch_chunk_kda
    assert chunk_kda_custom_op(*tensors[:5], backend="torch")[1] is None
    with pytest.raises(TypeError, match="backend must be a backend name"):
        chunk_kda_custom_op(*tensors[:5], backend=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("h0", [True, False])
def test_fake_implementation_gives_shapes_and_dtypes_without_running(h0: bool) -> None:
    with FakeTensorMode():
        q, k, v, g, beta, s = _inputs(B=3, T=37, H=2, K=8, V=16, h0=h0)
        o, state = torch.ops.kimi_linear.chunk_kda(q, k, v, g, beta, 0.5, s, None, "triton", 64)
        assert o.shape == (3, 37, 2, 16) and o.dtype == v.dtype
        assert state.shape == (3, 2, 8, 16) and state.dtype == torch.float32
        cu = torch.tensor([0, 10, 37], dtype=torch.int32)
        q1, k1, v1, g1, b1 = (t[:1] for t in (q, k, v, g, beta))
        o, state = torch.ops.kimi_linear.chunk_kda(q1, k1, v1, g1, b1, 0.5, None, cu, "torch", 64)
        assert state.shape == (2, 2, 8, 16)
        grads = torch.ops.kimi_linear.chunk_kda_backward(
            q,
            k,
            v,
            g,
            beta,
            0.5,
            s,
            None,
            "triton",
            64,
            torch.empty_like(v),
            torch.empty(3, 2, 8, 16),
        )
        assert [t.shape for t in grads[:5]] == [t.shape for t in (q, k, v, g, beta)]
        assert grads[5].shape == ((3, 2, 8, 16) if h0 else (0,))
    # the meta device goes through the same fake implementation
    q, k, v, g, beta, s = (None if t is None else t.to("meta") for t in _inputs(h0=h0))
    o, state = torch.ops.kimi_linear.chunk_kda(q, k, v, g, beta, 0.5, s, None, "triton", 64)
    assert o.device.type == "meta" and state.shape == (2, 2, 8, 8)


def test_opcheck() -> None:
    q, k, v, g, beta, s = _inputs(T=9)
    args = [t.requires_grad_(True) for t in (q, k, v, g, beta, s)]
    torch.library.opcheck(
        torch.ops.kimi_linear.chunk_kda.default,
        (*args[:5], 0.35, args[5], None, "torch", 4),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_fake_state_dtype_resolves_auto_like_the_real_op() -> None:
    """``"auto"`` off CUDA runs the torch backend, whose float64 state the fake must report."""
    q, k, v, g, beta, _ = (
        None if t is None else t.double() for t in _inputs(B=1, T=9, H=1, K=4, V=4, h0=False)
    )
    _, real = torch.ops.kimi_linear.chunk_kda(q, k, v, g, beta, 0.5, None, None, "auto", 64)
    mode = FakeTensorMode()
    with mode:
        fake = [mode.from_tensor(t) for t in (q, k, v, g, beta)]
        _, state = torch.ops.kimi_linear.chunk_kda(*fake, 0.5, None, None, "auto", 64)
    assert real.dtype == state.dtype == torch.float64


def test_experts_op_matches_the_module_forward_backward_and_fake() -> None:
    from kimi_linear.layers.experts import GroupedExperts, grouped_experts_op

    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 12)
    x = torch.randn(10, 8, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    w = torch.rand(10, 2, requires_grad=True)
    y0 = experts(x, idx, w)
    y1 = grouped_experts_op(experts, x, idx, w)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    dy = torch.randn_like(y0)
    params = [x, w, experts.w1, experts.w2, experts.w3]
    g0 = torch.autograd.grad(y0, params, dy)
    g1 = torch.autograd.grad(y1, params, dy)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    real = [t.detach() for t in (x, idx, w, experts.w1, experts.w2, experts.w3)]
    mode = FakeTensorMode()
    fake = [mode.from_tensor(t) for t in real]
    with mode:
        out = torch.ops.kimi_linear.moe_experts(*fake, "auto")
        assert out.shape == (10, 8) and out.dtype == x.dtype


def _tiny(**overrides):
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    torch.manual_seed(0)
    cfg = KimiLinearConfig.from_preset("tiny", kda_backend="torch", **overrides)
    return KimiLinearForCausalLM(cfg)


@pytest.mark.parametrize("index", [0, 1, 3])  # KDA + dense MLP, KDA + MoE, MLA + MoE
def test_no_graph_break_inside_a_decoder_layer(index: int) -> None:
    """Every decoder layer is one graph: KDA and the routed experts' dispatch go through the
    custom ops, the rest traces through."""
    torch._dynamo.reset()
    model = _tiny()
    layer = model.model.layers[index]
    assert (layer.kind, layer.is_moe) == {0: ("kda", False), 1: ("kda", True), 3: ("mla", True)}[
        index
    ]
    x = torch.randn(2, 24, model.config.hidden_size)
    explain = torch._dynamo.explain(layer)(x)
    assert explain.graph_break_count == 0, [str(b.reason)[:200] for b in explain.break_reasons]
    assert explain.graph_count == 1


@pytest.mark.parametrize("checkpointing", [False, True])
def test_traced_layers_match_eager(checkpointing: bool) -> None:
    """Dynamo + AOTAutograd (``aot_eager``: the same graphs and custom ops as inductor, without
    code generation) give eager's loss and gradients, alone and under activation checkpointing."""
    torch._dynamo.reset()
    eager = _tiny(num_hidden_layers=2, layer_types=("kda", "mla"), first_k_dense_replace=1)
    traced = _tiny(num_hidden_layers=2, layer_types=("kda", "mla"), first_k_dense_replace=1)
    traced.load_state_dict(eager.state_dict())
    traced.model.compile_layers(backend="aot_eager", fullgraph=True)
    traced.model.set_activation_checkpointing(checkpointing)
    ids = torch.randint(0, eager.config.vocab_size, (2, 20))
    l0 = eager(ids, labels=ids).loss
    l1 = traced(ids, labels=ids).loss
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    l0.backward()
    l1.backward()
    g1 = dict(traced.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(g1[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_layers_match_eager() -> None:
    """Loss and gradients of the compiled model equal eager within 1e-5 (fp32; inductor
    reorders floating-point sums, so bitwise equality is not expected)."""
    torch._dynamo.reset()
    eager = _tiny()
    compiled = _tiny()
    compiled.load_state_dict(eager.state_dict())
    compiled.model.compile_layers(backend="inductor", dynamic=False)
    ids = torch.randint(0, eager.config.vocab_size, (2, 24))
    l0 = eager(ids, labels=ids).loss
    l1 = compiled(ids, labels=ids).loss
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    l0.backward()
    l1.backward()
    g1 = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(g1[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged


def test_custom_op_takes_gva() -> None:
    """GVA (q, k on 1 head; v, g, beta, state on 2): the custom op's state is on the value heads
    (fake and real), with no final-state cotangent too, and matches the eager dispatcher."""
    q, k, v, g, beta, s = _inputs(H=2, T=9)
    q, k = q[:, :, :1].contiguous(), k[:, :, :1].contiguous()
    op_in = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta, s)]
    o, state = chunk_kda_custom_op(
        *op_in[:5], initial_state=op_in[5], backend="torch", output_final_state=True
    )
    ro, rstate = dispatch_chunk_kda(
        q, k, v, g, beta, initial_state=s, backend="torch", output_final_state=True
    )
    torch.testing.assert_close(o, ro, rtol=0, atol=0)
    torch.testing.assert_close(state, rstate, rtol=0, atol=0)
    o.sum().backward()  # dstate is None: zeros on the value heads
    assert op_in[0].grad.shape == q.shape and op_in[5].grad.shape == s.shape
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (q, k, v, g, beta, s)]
        _, fstate = torch.ops.kimi_linear.chunk_kda(*fake[:5], 0.5, fake[5], None, "torch", 8)
    assert fstate.shape == s.shape
