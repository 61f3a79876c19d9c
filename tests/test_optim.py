"""MuonClip: parameter groups, agreement with torch.optim.Muon / AdamW, per-head QK-Clip,
gradient accumulation, 2-process DDP, state_dict resume, argument checks, the experiment smoke run."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kimi_linear import KimiLinearConfig
from kimi_linear.layers.mla import MLAttention, masked_max_logits
from kimi_linear.layers.moe import GroupedExperts
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.optim import (
    GROUP_NAMES,
    MuonClip,
    apply_qk_clip_,
    build_optimizer,
    find_mla_modules,
    mla_head_dims,
)

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
_MUON_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "f_a_proj.weight",
    "f_b_proj.weight",
    "b_proj.weight",
    "g_a_proj.weight",
    "g_b_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "kv_b_proj.weight",
    "q_a_proj.weight",
    "q_b_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
    "experts.w1",
    "experts.w2",
    "experts.w3",
)
_ADAMW_SUFFIXES = (
    "embed_tokens.weight",
    "lm_head.weight",
    "block_sparse_moe.gate.weight",
    "q_conv1d.weight",
    "k_conv1d.weight",
    "v_conv1d.weight",
)
_NO_DECAY_SUFFIXES = ("layernorm.weight", "norm.weight", "A_log", "dt_bias")


def expected_group(name: str) -> str:
    """The group the brief's rule assigns, spelled out by release parameter name."""
    hits = [
        g
        for g, sfx in (
            ("adamw", _ADAMW_SUFFIXES),
            ("adamw_no_decay", _NO_DECAY_SUFFIXES),
            ("muon", _MUON_SUFFIXES),
        )
        if name.endswith(sfx)
    ]
    assert len(hits) == 1, f"{name}: ambiguous or unknown in the test's table: {hits}"
    return hits[0]


def mla_config(**overrides) -> KimiLinearConfig:
    """A 1-4 layer, all-MLA, dense config small enough for exact CPU tests."""
    kw = dict(
        name="mla-test",
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        layer_types=("mla", "mla"),
        num_attention_heads=4,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        intermediate_size=64,
        num_experts=0,
        max_position_embeddings=256,
    )
    kw.update(overrides)
    return KimiLinearConfig(**kw)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids).loss


def exact_max_logits(layer: MLAttention, x: torch.Tensor) -> torch.Tensor:
    """Per-head max causal logit of ``layer`` on ``x``, recomputed from its current weights."""
    with torch.no_grad():
        q = layer._project_q(x)
        q_nope, q_rope = q.split([layer.nope_dim, layer.rope_dim], dim=-1)
        latent, k_rope = layer.kv_a_proj_with_mqa(x).split([layer.kv_lora_rank, layer.rope_dim], -1)
        latent = layer.kv_a_layernorm(latent)
        q_rope, k_rope = layer._rotate(q_rope, k_rope, 0)
        kv = layer.kv_b_proj(latent).unflatten(-1, (layer.num_heads, -1)).transpose(1, 2)
        k_nope = kv[..., : layer.nope_dim]
        k_pe = k_rope[:, None].expand(-1, layer.num_heads, -1, -1)
        k = torch.cat([k_nope, k_pe], -1)
        qq = torch.cat([q_nope, q_rope], -1).transpose(1, 2)
        return masked_max_logits(qq, k, layer.softmax_scale)


# ----------------------------------------------------------------------------------------------
# parameter groups
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny", {}),
        ("tiny", {"tie_word_embeddings": True, "q_lora_rank": 16, "kda_gate": "head"}),
        ("small", {}),
    ],
)
def test_groups_follow_the_rule(preset, overrides):
    cfg = KimiLinearConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg)
    opt = MuonClip(model, lr=3e-3, weight_decay=0.05)
    groups = opt.describe_groups()
    assert list(groups) == list(GROUP_NAMES)
    listed = [n for names in groups.values() for n in names]
    assert len(listed) == len(set(listed)), "a parameter is in two groups"
    assert set(listed) == {n for n, _ in model.named_parameters()}, "every parameter in one group"
    for group_name, names in groups.items():
        for n in names:
            assert expected_group(n) == group_name, n
    # group hyper-parameters and the identity of the params
    params = dict(model.named_parameters())
    for g in opt.param_groups:
        assert g["lr"] == 3e-3
        assert g["weight_decay"] == (0.0 if g["name"] == "adamw_no_decay" else 0.05)
        assert all(p is params[n] for p, n in zip(g["params"], g["param_names"]))
    assert "model.layers.1.block_sparse_moe.experts.w1" in groups["muon"]
    buffers = dict(model.named_buffers())
    assert "model.layers.1.block_sparse_moe.gate.e_score_correction_bias" in buffers


def test_adamw_builder_groups():
    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("tiny"))
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"adamw", "adamw_no_decay"}
    assert (
        by_name["adamw_no_decay"]["weight_decay"] == 0.0 and by_name["adamw"]["weight_decay"] == 0.1
    )
    for n in by_name["adamw_no_decay"]["param_names"]:
        assert expected_group(n) == "adamw_no_decay"
    assert isinstance(build_optimizer(model, "muonclip", qk_clip_tau=None), MuonClip)


def test_tracking_switches_on_mla_layers():
    model = KimiLinearForCausalLM(mla_config())
    layers = find_mla_modules(model)
    assert list(layers) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    MuonClip(model, qk_clip_tau=None)
    assert not any(m.record_max_logits for m in layers.values())
    MuonClip(model, qk_clip_tau=None, track_max_logits=True)
    assert all(m.record_max_logits for m in layers.values())


# ----------------------------------------------------------------------------------------------
# agreement with torch.optim.Muon / AdamW
# ----------------------------------------------------------------------------------------------
def test_updates_match_torch_muon_and_adamw():
    # a dense KDA + MLA model (stacked experts are checked in the next test)
    cfg = mla_config(layer_types=("kda", "mla"), kda_num_heads=2, kda_head_dim=16)
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg)
    ref = copy.deepcopy(model)
    kw = dict(lr=2e-2, weight_decay=0.1)
    opt = MuonClip(
        model, momentum=0.9, adamw_betas=(0.8, 0.9), adamw_eps=1e-7, qk_clip_tau=None, **kw
    )
    groups = opt.describe_groups()
    rp = dict(ref.named_parameters())
    mats = [rp[n] for n in groups["muon"] if rp[n].ndim == 2]
    ref_muon = torch.optim.Muon(
        mats, momentum=0.9, nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw", **kw
    )
    ref_adamw = torch.optim.AdamW(
        [
            {"params": [rp[n] for n in groups["adamw"]], "weight_decay": 0.1},
            {"params": [rp[n] for n in groups["adamw_no_decay"]], "weight_decay": 0.0},
        ],
        lr=2e-2,
        betas=(0.8, 0.9),
        eps=1e-7,
    )
    for step in range(3):
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
        for m in (model, ref):
            m.zero_grad(set_to_none=True)
            lm_loss(m, ids).backward()
        opt.step()
        ref_muon.step()
        ref_adamw.step()
    assert {
        "model.layers.0.self_attn.A_log",
        "model.layers.0.self_attn.q_conv1d.weight",
        "model.layers.1.self_attn.kv_b_proj.weight",
    } <= set(sum(groups.values(), []))
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, r), n


def test_stacked_experts_equal_per_expert_muon():
    torch.manual_seed(0)
    experts = GroupedExperts(num_experts=3, hidden_size=12, intermediate_size=20)
    (
        nn.init.normal_(experts.w1, std=0.1),
        nn.init.normal_(experts.w2, std=0.1),
        nn.init.normal_(experts.w3, std=0.1),
    )
    opt = MuonClip(experts, lr=1e-2, weight_decay=0.1, qk_clip_tau=None)
    assert opt.describe_groups()["muon"] == ["w1", "w3", "w2"]
    refs = {
        n: [p[e].detach().clone().requires_grad_() for e in range(3)]
        for n, p in experts.named_parameters()
    }
    ref_opts = [
        torch.optim.Muon(mats, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for mats in refs.values()
    ]
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for n, p in experts.named_parameters():
            p.grad = torch.randn(p.shape, generator=g)
            for e in range(3):
                refs[n][e].grad = p.grad[e].clone()
        opt.step()
        for o in ref_opts:
            o.step()
    for n, p in experts.named_parameters():
        for e in range(3):
            assert torch.equal(p[e], refs[n][e]), (n, e)
        buf = opt.state[p]["momentum_buffer"]
        assert buf.shape == p.shape


# ----------------------------------------------------------------------------------------------
# QK-Clip on a hand-made MLA layer
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{}, {"q_lora_rank": 24}, {"mla_use_nope": False}],
    ids=["q_proj-nope", "q_lora", "rope"],
)
def test_qk_clip_per_head(overrides):
    cfg = mla_config(**overrides)
    torch.manual_seed(0)
    layer = MLAttention(cfg)
    for p in layer.parameters():
        if p.ndim == 2:
            nn.init.normal_(p, std=0.3)
    H, n, r, v = 4, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    q_lin = layer.q_b_proj if cfg.q_lora_rank else layer.q_proj
    with torch.no_grad():  # make heads 1 and 3 produce large logits
        q_lin.weight.view(H, n + r, -1)[[1, 3]] *= 12.0
    holder = nn.ModuleDict({"attn": layer})
    opt = MuonClip(holder, qk_clip_tau=1.0)  # replaced below, once the logits are known
    x = torch.randn(2, 10, cfg.hidden_size)
    before = exact_max_logits(layer, x)
    big = torch.zeros(H, dtype=torch.bool)
    big[[1, 3]] = True
    tau = float((before[big].min() + before[~big].max()) / 2)
    assert before[big].min() > tau > before[~big].max()
    opt.qk_clip_tau = tau

    old = {k: w.detach().clone() for k, w in holder.named_parameters()}
    layer(x)  # records the max logits (no backward: no gradients, only the clip moves weights)
    torch.testing.assert_close(layer.max_logits, before, rtol=1e-6, atol=1e-6)
    opt.step()
    assert layer.max_logits is None, "step() resets the running max"
    s = opt.last_max_logits["attn"]
    gamma = opt.last_clip_gamma["attn"]
    assert torch.equal(gamma[~big], torch.ones(2))
    torch.testing.assert_close(gamma[big], tau / s[big])

    after = exact_max_logits(layer, x)
    assert torch.all(after[big] <= tau * (1 + 1e-4))
    torch.testing.assert_close(after[big], torch.full((2,), tau), rtol=1e-4, atol=0)
    assert torch.equal(after[~big], before[~big])

    # exact factors on the right rows; everything else bit-identical
    qn = q_lin.weight.view(H, n + r, -1)
    qo = old[f"attn.{'q_b_proj' if cfg.q_lora_rank else 'q_proj'}.weight"].view(H, n + r, -1)
    kn = layer.kv_b_proj.weight.view(H, n + v, -1)
    ko = old["attn.kv_b_proj.weight"].view(H, n + v, -1)
    for h in range(H):
        g = gamma[h]
        if big[h]:
            assert torch.equal(qn[h, :n], qo[h, :n] * g.sqrt())
            assert torch.equal(qn[h, n:], qo[h, n:] * g)
            assert torch.equal(kn[h, :n], ko[h, :n] * g.sqrt())
        else:
            assert torch.equal(qn[h], qo[h]) and torch.equal(kn[h, :n], ko[h, :n])
        assert torch.equal(kn[h, n:], ko[h, n:]), "value rows untouched"
    for k, w in holder.named_parameters():
        if k not in ("attn.q_proj.weight", "attn.q_b_proj.weight", "attn.kv_b_proj.weight"):
            assert torch.equal(w, old[k]), f"{k} must be untouched (rope key, latent, q_a, norms)"


def test_qk_clip_bf16_weights_and_no_clip_below_tau():
    layer = MLAttention(mla_config()).to(torch.bfloat16)
    old = {k: w.detach().clone() for k, w in layer.named_parameters()}
    gamma = apply_qk_clip_(layer, torch.tensor([0.5, 2.0, 1.0, 4.0]), tau=1.0)
    torch.testing.assert_close(gamma, torch.tensor([1.0, 0.5, 1.0, 0.25]))
    qn, qo = layer.q_proj.weight.view(4, 12, -1), old["q_proj.weight"].view(4, 12, -1)
    assert torch.equal(qn[[0, 2]], qo[[0, 2]])
    torch.testing.assert_close(qn[3, :8], (qo[3, :8].float() * 0.5).bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(qn[3, 8:], (qo[3, 8:].float() * 0.25).bfloat16(), rtol=0, atol=0)
    assert layer.q_proj.weight.dtype == torch.bfloat16
    assert mla_head_dims(layer, 4) == (8, 4, 8)


# ----------------------------------------------------------------------------------------------
# accumulation, DDP, resume
# ----------------------------------------------------------------------------------------------
def _clip_setup(seed: int = 0):
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(mla_config(initializer_range=0.2))
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(seed + 1))
    return model, ids


def _max_logits_on(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-layer, per-head max logits of the freshly initialised test model on ``ids``."""
    probe, _ = _clip_setup()
    opt = MuonClip(probe, qk_clip_tau=None, track_max_logits=True)
    with torch.no_grad():
        probe(ids)
    opt.step()
    return opt.last_max_logits


def _tau_under_the_logits(ids: torch.Tensor) -> float:
    """A tau under every layer's largest logit on ``ids``, so that the clip fires."""
    return 0.7 * min(float(s.max()) for s in _max_logits_on(ids).values())


def _one_big_batch_step(tau: float):
    model, ids = _clip_setup()
    opt = MuonClip(model, lr=1e-2, qk_clip_tau=tau)
    lm_loss(model, ids).backward()
    opt.step()
    return model, opt


def test_accumulation_matches_one_large_batch():
    model, ids = _clip_setup()
    tau = _tau_under_the_logits(ids)

    big_model, big_opt = _one_big_batch_step(tau)
    acc_opt = MuonClip(model, lr=1e-2, qk_clip_tau=tau)
    for half in ids.chunk(2):
        (lm_loss(model, half) / 2).backward()
    # The accumulated gradients equal the large batch's to rounding; the step is then taken from
    # the large batch's gradients, because Muon's bf16 Newton-Schulz turns last-bit gradient
    # differences into bf16 rounding flips (~1e-4 relative): what is compared below is the
    # optimizer's part, the running max over micro-batches and the clip, bit for bit.
    _take_grads(model, big_model)
    acc_opt.step()
    assert (
        set(acc_opt.last_max_logits) == set(big_opt.last_max_logits) == set(find_mla_modules(model))
    )
    for name, s in big_opt.last_max_logits.items():
        torch.testing.assert_close(acc_opt.last_max_logits[name], s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(acc_opt.last_clip_gamma[name], big_opt.last_clip_gamma[name])
        assert (big_opt.last_clip_gamma[name] < 1).any(), "the clip must fire in this test"
    # the last micro-batch alone has smaller maxima somewhere: the running max is what clipped
    last = _max_logits_on(ids.chunk(2)[1])
    assert any((last[k] < s - 1e-4).any() for k, s in big_opt.last_max_logits.items())
    for (n, a), b in zip(model.named_parameters(), big_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)


def _take_grads(model: nn.Module, source: nn.Module | dict[str, torch.Tensor]) -> None:
    """Check that ``model``'s gradients equal ``source``'s (rtol 1e-5), then replace them by them."""
    grads = (
        source
        if isinstance(source, dict)
        else {n: p.grad for n, p in source.named_parameters() if p.grad is not None}
    )
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7, msg=n)
        p.grad = grads[n].clone()


def _ddp_worker(
    rank: int,
    world: int,
    init_file: str,
    ids: torch.Tensor,
    tau: float,
    out: str,
    ref_grads: dict[str, torch.Tensor],
) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, _ = _clip_setup()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = MuonClip(ddp.module, lr=1e-2, qk_clip_tau=tau)
        ddp(ids.chunk(world)[rank], labels=ids.chunk(world)[rank]).loss.backward()
        _take_grads(model, ref_grads)  # all-reduced grads == large batch's (see above)
        opt.step()
        if rank == 0:
            torch.save(
                {
                    "params": dict(model.named_parameters()),
                    "max": opt.last_max_logits,
                    "gamma": opt.last_clip_gamma,
                },
                out,
            )
        dist.barrier()  # no rank tears gloo down while the other still has work in flight
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_large_batch(tmp_path):
    _, ids = _clip_setup()
    tau = _tau_under_the_logits(ids)
    out = str(tmp_path / "rank0.pt")
    model, _ = _clip_setup()
    lm_loss(model, ids).backward()
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    mp.spawn(
        _ddp_worker,
        args=(2, str(tmp_path / "store"), ids, tau, out, ref_grads),
        nprocs=2,
        join=True,
    )
    got = torch.load(out)
    big_model, big_opt = _one_big_batch_step(tau)
    for name, s in big_opt.last_max_logits.items():
        torch.testing.assert_close(got["max"][name], s, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got["gamma"][name], big_opt.last_clip_gamma[name])
    # rank 0's half alone has smaller maxima somewhere: without the MAX all-reduce it would clip
    # differently from the large batch
    own = _max_logits_on(ids.chunk(2)[0])
    assert any((own[k] < s - 1e-4).any() for k, s in big_opt.last_max_logits.items())
    for n, p in big_model.named_parameters():
        torch.testing.assert_close(got["params"][n], p, rtol=1e-6, atol=1e-7, msg=n)


def test_state_dict_resume_continues_identically():
    cfg = KimiLinearConfig.from_preset(
        "tiny", num_hidden_layers=2, layer_types=("kda", "mla"), initializer_range=0.2
    )
    batches = [
        torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]

    def train(model, opt, bs):
        for ids in bs:
            opt.zero_grad(set_to_none=True)
            lm_loss(model, ids).backward()
            opt.step()

    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg)
    opt = MuonClip(model, lr=1e-2, qk_clip_tau=0.05)
    train(model, opt, batches[:2])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in saved_opt["state"].values())
    assert any(
        s.get("momentum_buffer", torch.zeros(())).ndim == 3 for s in saved_opt["state"].values()
    )
    assert [g["name"] for g in saved_opt["param_groups"]] == list(GROUP_NAMES)
    train(model, opt, batches[2:])

    torch.manual_seed(123)
    resumed = KimiLinearForCausalLM(cfg)
    resumed.load_state_dict(saved_model)
    opt2 = MuonClip(resumed, lr=1e-2, qk_clip_tau=0.05)
    opt2.load_state_dict(saved_opt)
    assert opt2.describe_groups() == opt.describe_groups()
    train(resumed, opt2, batches[2:])
    assert any((g < 1).any() for g in opt2.last_clip_gamma.values()), "the clip must fire"
    for (n, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1.0}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"momentum": 1.0}, "momentum"),
        ({"ns_steps": 0}, "ns_steps"),
        ({"adamw_betas": (0.9,)}, "adamw_betas"),
        ({"adamw_betas": (0.9, 1.5)}, r"adamw_betas\[1\]"),
        ({"adamw_eps": 0.0}, "adamw_eps"),
        ({"qk_clip_tau": 0.0}, "qk_clip_tau"),
        ({"qk_clip_tau": float("nan")}, "qk_clip_tau"),
        ({"qk_clip_tau": 10.0, "track_max_logits": False}, "track_max_logits"),
        ({"nesterov": "yes"}, "nesterov"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = KimiLinearForCausalLM(mla_config())
    with pytest.raises(ValueError, match=match):
        MuonClip(model, **kwargs)


def test_bad_inputs_elsewhere():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        MuonClip([nn.Parameter(torch.zeros(2, 2))])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MuonClip(frozen)
    model = KimiLinearForCausalLM(mla_config())
    with pytest.raises(ValueError, match="optimizer name"):
        build_optimizer(model, "sgd")
    with pytest.raises(ValueError, match="unexpected arguments"):
        build_optimizer(model, "adamw", qk_clip_tau=10.0)
    layer = model.model.layers[0].self_attn
    with pytest.raises(ValueError, match="max_logits must be a 1-D tensor"):
        apply_qk_clip_(layer, torch.ones(4, 1), tau=1.0)
    with pytest.raises(ValueError, match="num_heads=3"):
        apply_qk_clip_(layer, torch.ones(3), tau=1.0)
    with pytest.raises(ValueError, match="tau"):
        apply_qk_clip_(layer, torch.ones(4), tau=-1.0)

    class NoTracking(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.kv_a_proj_with_mqa, self.kv_b_proj = (
                nn.Linear(4, 8),
                nn.Linear(4, 6),
                nn.Linear(4, 8),
            )

    with pytest.raises(ValueError, match="no max-logit tracking"):
        MuonClip(NoTracking(), qk_clip_tau=10.0)


# ----------------------------------------------------------------------------------------------
# the experiment script
# ----------------------------------------------------------------------------------------------
def test_experiment_quick_run(tmp_path):
    from experiments import qk_clip as module

    module.main(["--quick", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "qk_clip.json").read_text())
    assert set(data["runs"]) == {"muon", "muonclip"}
    for run in data["runs"].values():
        assert len(run["loss"]) == data["config"]["steps"]
        assert all(len(v) == data["config"]["steps"] for v in run["max_logit"].values())
    muon, clip = data["runs"]["muon"], data["runs"]["muonclip"]
    assert muon["loss"][0] == clip["loss"][0], "same initialisation and first batch"
    assert muon["summary"]["steps_with_clipping"] == 0
    assert muon["summary"]["first_step_over_tau"] is not None, "--quick must reach tau"
    assert clip["summary"]["steps_with_clipping"] > 0
    assert (tmp_path / "qk_clip.md").is_file() and (tmp_path / "qk_clip.png").is_file()
    assert os.path.getsize(tmp_path / "qk_clip.png") > 0


def test_sharded_muon_row_ranges_follow_torch_chunk() -> None:
    """The sharded Muon step locates each rank's rows as FSDP2's dim-0 Shard (torch.chunk)."""
    from kimi_linear.optim.sharded_muon import _row_range

    for rows in (1, 5, 8, 13):
        for world in (1, 2, 3, 4):
            chunks = torch.arange(rows).chunk(world)
            for rank in range(world):
                r0, r1 = _row_range(rows, world, rank)
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(r0, r1)) == expected, (rows, world, rank)


# ------------------------------------------------------- simulated ranks (single process, fast)
# The sharded and distributed rules of MuonClip were caught only by the slow 2-process tests
# (issue 25, class 8). Here the collectives run between threads of this process: each thread is
# a rank, torch.distributed's calls used by kimi_linear.optim go to _SimulatedWorld, and DTensor
# row shards are pieces of a tensor with their offsets (what local_shard returns for a shard).


class _SimulatedWorld:
    """The ``torch.distributed`` calls of :mod:`kimi_linear.optim` for ``world`` thread ranks."""

    ReduceOp = dist.ReduceOp

    def __init__(self, world: int) -> None:
        import threading

        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.local = threading.local()
        self.slots: dict[int, object] = {}

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self, group=None) -> int:
        return self.world

    def get_rank(self, group=None) -> int:
        return self.local.rank

    def get_backend(self, group=None) -> str:
        return "gloo"

    def _exchange(self, value):
        """Every rank's ``value``, in rank order (a collective: all ranks must call it)."""
        self.barrier.wait()
        self.slots[self.local.rank] = value
        self.barrier.wait()
        values = [self.slots[r] for r in range(self.world)]
        self.barrier.wait()
        return values

    def all_reduce(self, tensor, op=dist.ReduceOp.SUM, group=None) -> None:
        stacked = torch.stack(self._exchange(tensor.clone()))
        if op == dist.ReduceOp.MAX:
            tensor.copy_(stacked.amax(0))
        elif op == dist.ReduceOp.SUM:
            tensor.copy_(stacked.sum(0))
        elif op == dist.ReduceOp.AVG:
            tensor.copy_(stacked.mean(0))
        else:
            raise NotImplementedError(op)

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, group=None):
        sent = self._exchange(list(input.split(list(input_split_sizes))))
        got = [sent[src][self.local.rank] for src in range(self.world)]
        assert [t.numel() for t in got] == list(output_split_sizes), "split sizes disagree"
        output.copy_(torch.cat(got) if got else output)

    def run(self, fn):
        """``[fn(rank) for rank in range(world)]``, the ranks running concurrently."""
        import threading

        results, errors = [None] * self.world, []

        def body(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append((isinstance(e, threading.BrokenBarrierError), rank, e))
                self.barrier.abort()  # the other ranks stop waiting

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:  # the first error that is not another rank's abort
            _, rank, error = min(errors, key=lambda e: e[0])
            raise RuntimeError(f"simulated rank {rank} failed: {error!r}") from error
        return results


class _RowShard:
    """A stand-in for a DTensor row shard: ``.shape`` is the full tensor's; the data a view."""

    def __init__(self, full: torch.Tensor, rank: int, world: int) -> None:
        from kimi_linear.optim.sharded_muon import _row_range

        r0, r1 = _row_range(full.shape[0], world, rank)
        self.shape = full.shape
        self.local, self.offset = full[r0:r1], (r0,) + (0,) * (full.dim() - 1)


def _simulate_shards(monkeypatch) -> None:
    import kimi_linear.optim.qk_clip as qk_clip_mod

    real_local, real_is = qk_clip_mod.local_shard, qk_clip_mod.is_dtensor
    monkeypatch.setattr(
        qk_clip_mod,
        "local_shard",
        lambda t: (t.local, t.offset) if isinstance(t, _RowShard) else real_local(t),
    )
    monkeypatch.setattr(qk_clip_mod, "is_dtensor", lambda t: isinstance(t, _RowShard) or real_is(t))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_row_sharded_orthogonalization_reassembles_every_matrix(monkeypatch, world):
    """Each matrix's row blocks reach its owner in rank order, the owner transforms the whole
    matrix once, and each rank gets back exactly its rows (torch.chunk layout; shapes not
    divisible by the rank count, one with fewer rows than ranks)."""
    import kimi_linear.optim.sharded_muon as sharded_muon_mod
    from kimi_linear.optim.sharded_muon import _orthogonalize_row_shards, _row_range

    sim = _SimulatedWorld(world)
    monkeypatch.setattr(sharded_muon_mod, "dist", sim)
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (8, 4), (13, 2), (1, 6), (7, 7)]
    full = [torch.randn(s, generator=gen) for s in shapes]
    ns = lambda x: x @ x.T @ x + torch.arange(x.shape[0], dtype=x.dtype)[:, None]  # noqa: E731

    def rank_fn(rank: int):
        rows = [m[slice(*_row_range(m.shape[0], world, rank))] for m in full]
        return _orthogonalize_row_shards(rows, shapes, None, ns)

    for rank, out in enumerate(sim.run(rank_fn)):
        for m, o in zip(full, out):
            torch.testing.assert_close(o, ns(m)[slice(*_row_range(m.shape[0], world, rank))])


@pytest.mark.parametrize("world", [2, 3])
def test_qk_clip_on_row_shards_scales_each_row_by_its_global_head(monkeypatch, world):
    """QK-Clip of a row-sharded MLA layer: every shard scales its rows by the factor of their
    global row (head), so the shards together equal the clip of the whole weights."""
    import kimi_linear.optim.qk_clip as qk_clip_mod

    model, _ = _clip_setup()
    name, attn = next(iter(find_mla_modules(model).items()))
    twin = copy.deepcopy(attn)
    H = attn.num_heads
    max_logits = torch.linspace(0.5, 3.0, H)  # some heads over tau, some not
    gamma_ref = apply_qk_clip_(twin, max_logits, tau=1.5)
    assert (gamma_ref < 1).any() and (gamma_ref == 1).any()

    _simulate_shards(monkeypatch)
    real_scale = qk_clip_mod._scale_head_rows_

    def scale_by_shards(weight, row_scale):  # each rank scales its own row shard in place
        for rank in range(world):
            real_scale(_RowShard(weight.data, rank, world), row_scale)

    monkeypatch.setattr(qk_clip_mod, "_scale_head_rows_", scale_by_shards)
    gamma = apply_qk_clip_(attn, max_logits, tau=1.5)
    torch.testing.assert_close(gamma, gamma_ref, rtol=0, atol=0)
    for (n, a), b in zip(attn.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}.{n}")


def test_data_sharded_ranks_max_reduce_logits_and_match_one_large_batch(monkeypatch):
    """Two simulated data-parallel ranks, each on its own half of the batch (rank r takes
    chunk r), gradients averaged as DDP does: the step's max logits are the MAX over the ranks
    (rank 0's half alone has smaller maxima), so both ranks clip and step exactly as one
    process on the whole batch."""
    import kimi_linear.optim.qk_clip as qk_clip_mod

    world = 2
    _, ids = _clip_setup()
    tau = _tau_under_the_logits(ids)
    ref_model, _ = _clip_setup()
    lm_loss(ref_model, ids).backward()
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    big_model, big_opt = _one_big_batch_step(tau)
    own = _max_logits_on(ids.chunk(world)[0])  # rank 0's half alone
    assert any((own[k] < s - 1e-4).any() for k, s in big_opt.last_max_logits.items())
    sim = _SimulatedWorld(world)
    monkeypatch.setattr(qk_clip_mod, "dist", sim)  # the one max-logit all-reduce

    ranks = [_clip_setup()[0] for _ in range(world)]  # built here: the global RNG is seeded
    opts = [MuonClip(m, lr=1e-2, qk_clip_tau=tau) for m in ranks]

    def rank_fn(rank: int):
        model, opt = ranks[rank], opts[rank]
        shard = ids.chunk(world)[rank]
        lm_loss(model, shard).backward()
        for p in model.parameters():  # DDP's gradient all-reduce (mean)
            sim.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        _take_grads(model, ref_grads)  # == the large batch's (see the accumulation test)
        opt.step()
        return model, opt

    results = sim.run(rank_fn)
    for model, opt in results:
        assert set(opt.last_max_logits) == set(big_opt.last_max_logits)
        for name, s in big_opt.last_max_logits.items():
            torch.testing.assert_close(opt.last_max_logits[name], s, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(opt.last_clip_gamma[name], big_opt.last_clip_gamma[name])
        for (n, a), b in zip(model.named_parameters(), big_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
