"""KimiMoE / GroupedExperts / KimiMLP: routing against a naive per-token reference, the
selection-only bias and its balancing update, load counts, release state-dict keys, the
grouped_mm path, gradients, dtype handling and input validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kimi_linear.config import KimiLinearConfig
from kimi_linear.layers.moe import KimiMLP, KimiMoE, MoEGate, to_release_state_dict
from kimi_linear.testing import assert_rel_close


def make_config(**overrides) -> KimiLinearConfig:
    kwargs = dict(
        num_experts=6,
        num_experts_per_token=2,
        routed_scaling_factor=2.446,
        moe_intermediate_size=32,
    )
    kwargs.update(overrides)
    return KimiLinearConfig.from_preset("tiny", **kwargs)


def make_moe(seed: int = 0, **overrides) -> KimiMoE:
    torch.manual_seed(seed)
    moe = KimiMoE(make_config(**overrides))
    with torch.no_grad():
        moe.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
    return moe


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def naive_moe(moe: KimiMoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sigmoid scores, biased top-k, unbiased renormalised weights, dense sum."""
    cfg = moe.config
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for n in range(flat.shape[0]):
        s = torch.sigmoid(flat[n].float() @ moe.gate.weight.float().T)
        chosen = (s + moe.gate.e_score_correction_bias).topk(cfg.num_experts_per_token).indices
        w = s[chosen]
        if cfg.moe_renormalize:
            w = w / w.sum()
        w = w * cfg.routed_scaling_factor
        for j, e in enumerate(chosen.tolist()):
            ex = moe.experts
            out[n] += w[j] * swiglu(flat[n], ex.w1[e], ex.w3[e], ex.w2[e])
        if moe.shared_experts is not None:
            sh = moe.shared_experts
            out[n] += swiglu(flat[n], sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight)
    return out.reshape(x.shape)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"moe_renormalize": False},
        {"num_shared_experts": 0},
        {"num_shared_experts": 2, "num_experts_per_token": 3},
    ],
)
def test_matches_naive_per_token_reference(overrides):
    moe = make_moe(**overrides)
    x = torch.randn(3, 5, moe.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=1e-5)
    assert (moe.shared_experts is None) == (moe.config.num_shared_experts == 0)
    if moe.shared_experts is not None:
        cfg = moe.config
        assert (
            moe.shared_experts.intermediate_size
            == cfg.moe_intermediate_size * cfg.num_shared_experts
        )


def test_parameter_names_and_shapes_follow_contract():
    moe = make_moe()
    E, I, D = 6, 32, 64
    shapes = {n: tuple(t.shape) for n, t in moe.state_dict().items()}
    assert shapes == {
        "gate.weight": (E, D),
        "gate.e_score_correction_bias": (E,),
        "experts.w1": (E, I, D),
        "experts.w3": (E, I, D),
        "experts.w2": (E, D, I),
        "shared_experts.gate_proj.weight": (I, D),
        "shared_experts.up_proj.weight": (I, D),
        "shared_experts.down_proj.weight": (D, I),
    }
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    assert not any(n.endswith("e_score_correction_bias") for n, _ in moe.named_parameters())


def test_bias_changes_selection_only():
    moe = make_moe(seed=1)
    x = torch.randn(20, moe.hidden_size)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        idx0, w0, scores = moe.gate(x)
        moe.gate.e_score_correction_bias[3] = 10.0  # expert 3 is now always chosen
        idx1, w1, _ = moe.gate(x)
    assert (idx1 == 3).any(dim=-1).all()
    assert not (idx0 == 3).any(dim=-1).all()
    for idx, w in ((idx0, w0), (idx1, w1)):  # weights are the unbiased scores of the chosen experts
        s = scores.gather(-1, idx)
        torch.testing.assert_close(
            w, s / s.sum(-1, keepdim=True) * moe.config.routed_scaling_factor
        )
    # a bias equal for all experts changes nothing at all
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        y = moe(x)
        moe.gate.e_score_correction_bias.fill_(0.7)
        torch.testing.assert_close(moe(x), y, atol=0, rtol=0)


def test_load_counts():
    moe = make_moe(seed=2)
    x = torch.randn(4, 7, moe.hidden_size)
    moe.train()
    moe(x)
    idx, _, _ = moe.gate(x.reshape(-1, moe.hidden_size))
    expected = torch.bincount(idx.reshape(-1), minlength=moe.num_experts).float()
    torch.testing.assert_close(moe.last_expert_load, expected)
    assert moe.last_expert_load.sum() == 4 * 7 * moe.top_k
    moe(x[:1])
    assert moe.expert_load.sum() == 5 * 7 * moe.top_k  # accumulated over training forwards
    assert moe.last_expert_load.sum() == 7 * moe.top_k
    moe.eval()
    moe(x)
    assert moe.expert_load.sum() == 5 * 7 * moe.top_k  # eval passes don't steer balancing
    assert moe.last_expert_load.sum() == 28 * moe.top_k
    assert "expert_load" not in moe.state_dict() and "last_expert_load" not in moe.state_dict()


@pytest.mark.parametrize("num_groups", [1, 3])
def test_nan_token_is_isolated_and_not_counted(num_groups: int) -> None:
    """A NaN hidden state (one poisoned batch row) gives NaN for that token only: every other
    token's output is unchanged, and it adds nothing to the expert loads (it would steer the
    balancing bias of the whole model), with or without group-limited routing."""
    overrides = {"num_expert_group": 3, "topk_group": 2} if num_groups > 1 else {}
    moe = make_moe(seed=4, **overrides)
    x = torch.randn(3, 5, moe.hidden_size)
    moe.train()
    ref = moe(x)
    ref_load = moe.last_expert_load.clone()
    bad = x.clone()
    bad[1, 2, 7] = float("nan")
    out = moe(bad)
    assert torch.isnan(out[1, 2]).all()
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1, 2] = False
    torch.testing.assert_close(out[keep], ref[keep], atol=0, rtol=0)
    idx, _, _ = moe.gate(x[1, 2].reshape(1, -1))  # the clean token's experts, counted before
    expected = ref_load - torch.bincount(idx.reshape(-1), minlength=moe.num_experts).float()
    torch.testing.assert_close(moe.last_expert_load, expected, atol=0, rtol=0)
    assert moe.last_expert_load.sum() == (15 - 1) * moe.top_k


def test_update_bias_step():
    moe = make_moe(seed=3)
    moe.train()
    moe(torch.randn(50, moe.hidden_size))
    load = moe.expert_load.clone()
    before = moe.gate.e_score_correction_bias.clone()
    used = moe.update_bias(rate=0.01)
    torch.testing.assert_close(used, load)
    delta = moe.gate.e_score_correction_bias - before
    torch.testing.assert_close(delta, 0.01 * torch.sign(load.mean() - load))
    assert moe.expert_load.sum() == 0
    moe(torch.randn(10, moe.hidden_size))
    before = moe.gate.e_score_correction_bias.clone()
    moe.update_bias()  # rate defaults to config.moe_bias_update_rate
    step = (moe.gate.e_score_correction_bias - before).abs()
    assert torch.all(
        (step == 0) | torch.isclose(step, torch.tensor(moe.config.moe_bias_update_rate))
    )
    for bad in (-0.1, "0.1", True):
        with pytest.raises(ValueError, match="rate"):
            moe.update_bias(rate=bad)


def test_update_bias_balances_a_skewed_router():
    moe = make_moe(seed=4, num_experts=8, num_experts_per_token=2)
    torch.manual_seed(4)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.weight[:2] += 0.05  # experts 0, 1 dominate for inputs with a positive mean
    data = torch.randn(400, moe.hidden_size) + 0.5

    def imbalance() -> float:
        moe.eval()
        with torch.no_grad():
            moe(data)
        moe.train()
        load = moe.last_expert_load
        return (load.max() / load.mean()).item()

    start = imbalance()
    for _ in range(40):
        moe(data[torch.randint(0, 400, (64,))])
        moe.update_bias(rate=0.01)
    end = imbalance()
    assert start > 3.0, start
    assert end < 1.45, (start, end)
    bias = moe.gate.e_score_correction_bias
    assert bias[:2].max() < bias[2:].min()  # the favoured experts were pushed down


def test_release_keys_load_and_round_trip():
    src = make_moe(seed=5)
    release = to_release_state_dict(src.state_dict())
    E = src.num_experts
    for name, shape in (("w1", (32, 64)), ("w3", (32, 64)), ("w2", (64, 32))):
        assert "experts." + name not in release
        for e in range(E):
            t = release[f"experts.{e}.{name}.weight"]
            assert t.shape == shape and t.is_contiguous()
            torch.testing.assert_close(t, getattr(src.experts, name)[e])
    assert release["shared_experts.gate_proj.weight"].shape == (32, 64)  # passed through
    dst = make_moe(seed=6)
    dst.load_state_dict(release, strict=True)  # per-expert keys, no renaming
    x = torch.randn(2, 3, src.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    # stacked keys load as usual, and a partial per-expert set fails loudly under strict
    make_moe(seed=7).load_state_dict(src.state_dict(), strict=True)
    partial = dict(release)
    del partial[f"experts.{E - 1}.w2.weight"]
    with pytest.raises(RuntimeError, match="experts"):
        make_moe(seed=8).load_state_dict(partial, strict=True)


def test_release_keys_under_a_parent_prefix():
    cfg = make_config()
    torch.manual_seed(9)
    parent = nn.ModuleDict({"block_sparse_moe": KimiMoE(cfg), "mlp": KimiMLP(cfg.hidden_size, 16)})
    sd = to_release_state_dict(parent.state_dict())
    assert "block_sparse_moe.experts.3.w2.weight" in sd
    assert "mlp.gate_proj.weight" in sd and "block_sparse_moe.shared_experts.up_proj.weight" in sd
    assert list(sd)[:2] == [
        "block_sparse_moe.gate.weight",
        "block_sparse_moe.gate.e_score_correction_bias",
    ]
    torch.manual_seed(10)
    other = nn.ModuleDict({"block_sparse_moe": KimiMoE(cfg), "mlp": KimiMLP(cfg.hidden_size, 16)})
    other.load_state_dict(sd, strict=True)
    for k, v in parent.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, atol=0, rtol=0)
    with pytest.raises(ValueError, match="3-D"):
        to_release_state_dict({"x.experts.w1": torch.zeros(4, 4)})


def _grouped_mm_runs() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(2, 16, 8, dtype=torch.bfloat16)
        torch._grouped_mm(
            a, b, offs=torch.tensor([1, 4], dtype=torch.int32)
        ).float().square().sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


@pytest.mark.skipif(not _grouped_mm_runs(), reason="torch._grouped_mm (bf16) does not run here")
def test_grouped_mm_matches_loop():
    """Output and every gradient of the grouped_mm path against the loop, tensor by tensor
    (norm-relative: gradients here are ~1e-3, so an element-wise atol would pass zeros)."""
    moe = make_moe(seed=11, num_experts=8, num_experts_per_token=3).to(torch.bfloat16)
    x = torch.randn(5, 9, moe.hidden_size, dtype=torch.bfloat16)
    dy = torch.randn(5, 9, moe.hidden_size)
    results = []
    for mode in ("loop", "grouped_mm"):
        moe.zero_grad()
        moe.experts.dispatch = mode
        xi = x.clone().requires_grad_()
        y = moe(xi)
        (y.float() * dy).sum().backward()
        grads = {n: p.grad.float() for n, p in moe.named_parameters()}
        results.append({"y": y.detach().float(), "dx": xi.grad.float(), **grads})
    loop, grouped = results
    assert set(loop) == {"y", "dx", *(n for n, _ in moe.named_parameters())}
    for name in loop:
        assert_rel_close(grouped[name], loop[name], 2e-2, name)


def test_dispatch_mode_errors():
    moe = make_moe()
    x = torch.randn(2, 3, moe.hidden_size)
    moe.experts.dispatch = "grouped_mm"
    with pytest.raises(ValueError, match="bf16"):
        moe(x)  # fp32 is not a grouped_mm dtype
    moe.experts.dispatch = "fast"
    with pytest.raises(ValueError, match="dispatch"):
        moe(x)
    moe.experts.dispatch = "auto"
    moe(x)  # CPU / fp32: the loop


def test_experts_with_no_tokens_and_empty_input():
    moe = make_moe(seed=12)
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[:2] = 5.0  # only experts 0 and 1 receive tokens
        x = torch.randn(6, moe.hidden_size)
        torch.testing.assert_close(moe(x), naive_moe(moe, x), atol=1e-5, rtol=1e-5)
        assert moe.last_expert_load[2:].sum() == 0
        assert moe(torch.randn(0, moe.hidden_size)).shape == (0, moe.hidden_size)


@pytest.mark.parametrize("overrides", [{}, {"moe_renormalize": False, "num_shared_experts": 0}])
def test_gradients_match_naive_reference(overrides):
    """Every parameter's and the input's gradient equals autograd through the per-token loop
    (fp32; norm-relative per tensor, so a missing or zero gradient fails)."""
    moe = make_moe(seed=16, **overrides)
    x = torch.randn(3, 7, moe.hidden_size)
    dy = torch.randn(3, 7, moe.hidden_size)
    grads = []
    for fn in (moe, lambda t: naive_moe(moe, t)):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        (fn(xi) * dy).sum().backward()
        grads.append({"dx": xi.grad, **{n: p.grad for n, p in moe.named_parameters()}})
    ours, ref = grads
    assert set(ours) == set(ref) and len(ours) == 1 + len(list(moe.parameters()))
    for name in ref:
        assert ours[name] is not None, f"no gradient for {name}"
        assert_rel_close(ours[name], ref[name], 1e-5, name)


def test_gradients_flow():
    moe = make_moe(seed=13)
    x = torch.randn(3, 8, moe.hidden_size, requires_grad=True)
    moe(x).square().mean().backward()
    names = [
        "gate.weight",
        "experts.w1",
        "experts.w2",
        "experts.w3",
        "shared_experts.gate_proj.weight",
        "shared_experts.up_proj.weight",
        "shared_experts.down_proj.weight",
    ]
    params = dict(moe.named_parameters())
    assert sorted(params) == sorted(names)
    for n in names:
        assert params[n].grad is not None and params[n].grad.abs().sum() > 0, n
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_low_precision_keeps_fp32_router_state():
    moe = make_moe(seed=14).to(torch.bfloat16)
    assert moe.experts.w1.dtype == torch.bfloat16 and moe.gate.weight.dtype == torch.bfloat16
    for buf in (moe.gate.e_score_correction_bias, moe.expert_load, moe.last_expert_load):
        assert buf.dtype == torch.float32
    moe.train()
    y = moe(torch.randn(2, 4, moe.hidden_size, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    moe.update_bias(rate=1e-4)  # steps far below bf16 resolution near 0.05 still register
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    moe.float()
    assert moe.experts.w1.dtype == torch.float32


def test_kimi_mlp():
    torch.manual_seed(15)
    mlp = KimiMLP(64, 48)
    x = torch.randn(2, 3, 64)
    expected = swiglu(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)
    assert all(m.bias is None for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    with pytest.raises(ValueError, match="intermediate_size"):
        KimiMLP(64, 0)
    with pytest.raises(ValueError, match="hidden=64"):
        mlp(torch.randn(2, 63))


def test_bad_inputs_raise_value_error():
    moe = make_moe()
    D = moe.hidden_size
    with pytest.raises(ValueError, match="hidden=64"):
        moe(torch.randn(2, 3, D - 1))
    with pytest.raises(ValueError, match="floating"):
        moe(torch.ones(2, 3, D, dtype=torch.int64))
    with pytest.raises(ValueError, match="dtype"):
        moe(torch.randn(2, 3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.Tensor"):
        moe([[0.0] * D])
    with pytest.raises(ValueError, match="num_experts"):
        KimiMoE(make_config(num_experts=0))
    with pytest.raises(ValueError, match="top_k"):
        MoEGate(8, 4, top_k=5)
    ex, x2 = moe.experts, torch.randn(3, D)
    idx, w = torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    with pytest.raises(ValueError, match=r"x must be \[N"):
        ex(x2[None], idx, w)
    with pytest.raises(ValueError, match="topk_idx"):
        ex(x2, idx[:2], w[:2])
    with pytest.raises(ValueError, match="topk_weight"):
        ex(x2, idx, w[:, :1])
    with pytest.raises(ValueError, match="expert ids"):
        ex(x2, idx + moe.num_experts, w)
