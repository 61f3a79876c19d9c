"""MoE expert loads (the statistics of auxiliary-loss-free balancing) count real tokens only:
the pads of a left-padded training batch are routed and computed, but never counted; packed
documents (every token real, empty documents included) count every token once."""

from __future__ import annotations

import pytest
import torch
from tiny_configs import tiny_settings

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.layers.moe import KimiMoE

SMALL = tiny_settings(intermediate_size=64, num_experts=8, first_k_dense_replace=0)
LENGTHS = [3, 11, 16]


def _model() -> KimiLinearForCausalLM:
    torch.manual_seed(0)
    return KimiLinearForCausalLM(KimiLinearConfig.from_preset("tiny", **SMALL)).train()


def _moes(model: KimiLinearForCausalLM) -> list[KimiMoE]:
    moes = [m for m in model.modules() if isinstance(m, KimiMoE)]
    assert len(moes) == 3
    return moes


def _loads(model: KimiLinearForCausalLM) -> torch.Tensor:
    return torch.stack([m.expert_load.clone() for m in _moes(model)])


def _reset(model: KimiLinearForCausalLM) -> None:
    for m in _moes(model):
        m.expert_load.zero_()
        m.last_expert_load.zero_()


def _prompts(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS]


def _left_padded(prompts: list[torch.Tensor], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(p.numel() for p in prompts)
    ids = torch.randint(0, vocab, (len(prompts), T), generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - p.numel() :] = p
        mask[i, T - p.numel() :] = 1
    return ids, mask


def _alone(model: KimiLinearForCausalLM, prompts: list[torch.Tensor]) -> torch.Tensor:
    """Expert loads of a training forward of each prompt alone (no pads), summed."""
    _reset(model)
    for p in prompts:
        model(p[None], labels=p[None]).loss.backward()
    loads = _loads(model)
    _reset(model)
    return loads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_left_padded_training_forward_counts_only_real_tokens(checkpointing: bool) -> None:
    model = _model()
    V, k = model.config.vocab_size, model.config.num_experts_per_token
    prompts = _prompts(V)
    expected = _alone(model, prompts)
    ids, mask = _left_padded(prompts, V)
    model.model.set_activation_checkpointing(checkpointing)
    out = model(ids, labels=ids, attention_mask=mask)
    out.loss.backward()  # with checkpointing, the recomputation must not count again
    loads = _loads(model)
    real = sum(LENGTHS)
    assert ids.numel() > real  # the batch does hold pads
    assert torch.equal(loads.sum(-1), torch.full((3,), float(real * k)))
    assert torch.equal(loads, expected)  # the same tokens, routed as when alone
    for m in _moes(model):  # the last forward's loads too
        assert m.last_expert_load.sum() == real * k


def test_packed_documents_count_every_token_once() -> None:
    """cu_seqlens packs (an empty document included): every token is a document token."""
    model = _model()
    V, k = model.config.vocab_size, model.config.num_experts_per_token
    prompts = _prompts(V)
    expected = _alone(model, prompts)
    ids = torch.cat(prompts)[None]
    n = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    cu = torch.tensor([0, n[1], n[1], n[2], n[3]], dtype=torch.int32)  # empty 2nd document
    model(ids, labels=ids, cu_seqlens=cu).loss.backward()
    loads = _loads(model)
    assert torch.equal(loads.sum(-1), torch.full((3,), float(ids.numel() * k)))
    assert torch.equal(loads, expected)


def test_eval_and_generation_do_not_steer_balancing() -> None:
    model = _model().eval()
    V, k = model.config.vocab_size, model.config.num_experts_per_token
    ids, mask = _left_padded(_prompts(V), V)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    for m in _moes(model):
        assert m.expert_load.sum() == 0  # evaluation adds nothing
        assert m.last_expert_load.sum() == sum(LENGTHS) * k  # statistics without the pads


def test_layer_token_mask() -> None:
    model = _model()
    moe = _moes(model)[0]
    x = torch.randn(2, 5, SMALL["hidden_size"])
    mask = torch.ones(2, 5, dtype=torch.bool)
    moe.expert_load.zero_()
    y_none = moe(x)
    load_none = moe.expert_load.clone()
    moe.expert_load.zero_()
    y_mask = moe(x, token_mask=mask)
    assert torch.equal(y_none, y_mask) and torch.equal(moe.expert_load, load_none)
    mask[0, :3] = False
    moe.expert_load.zero_()
    y_pad = moe(x, token_mask=mask)
    assert torch.equal(y_pad, y_none)  # outputs unchanged: only the counting differs
    assert moe.expert_load.sum() == 7 * SMALL["num_experts_per_token"]
    # the counted experts are exactly those the real tokens chose
    idx, _, _ = moe.gate(x.reshape(-1, SMALL["hidden_size"]))
    want = torch.bincount(idx[mask.reshape(-1)].reshape(-1), minlength=moe.num_experts).float()
    assert torch.equal(moe.expert_load, want)
    for bad, what in [
        (mask.long(), "torch.int64"),
        (mask[:, :4], "(2, 4)"),
        ([[True] * 5] * 2, "list"),
    ]:
        with pytest.raises(ValueError, match=r"token_mask must be a bool tensor \(2, 5\).*" + what):
            moe(x, token_mask=bad)
