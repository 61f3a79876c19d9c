"""Grouped (node-limited) MoE routing as DeepSeek-V3, and the moe_layer_freq layer rule."""

import pytest
import torch

from kimi_linear import KimiLinearConfig
from kimi_linear.layers.moe import MoEGate


def reference_grouped_topk(scores, bias, groups, topk_group, k):
    """Token by token: score each group by the sum of its two best biased scores, keep the best
    ``topk_group`` groups, then take the ``k`` best biased scores among their experts."""
    E = scores.shape[1]
    size = E // groups
    chosen = []
    for s in scores + bias:
        group_score = [sorted(s[g * size : (g + 1) * size].tolist())[-2:] for g in range(groups)]
        kept = sorted(range(groups), key=lambda g: -sum(group_score[g]))[:topk_group]
        allowed = [e for g in kept for e in range(g * size, (g + 1) * size)]
        best = sorted(allowed, key=lambda e: -s[e].item())[:k]
        chosen.append(sorted(best))
    return chosen


@pytest.mark.parametrize("groups, topk_group, k", [(4, 2, 3), (8, 3, 4), (2, 1, 2)])
def test_grouped_routing_matches_reference(groups, topk_group, k):
    torch.manual_seed(0)
    gate = MoEGate(16, 16, k, num_groups=groups, topk_group=topk_group)
    with torch.no_grad():
        gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(40, 16)
    idx, weight, scores = gate(x)
    ref = reference_grouped_topk(scores, gate.e_score_correction_bias, groups, topk_group, k)
    assert sorted(map(sorted, idx.tolist())) == sorted(ref)
    assert [sorted(r) for r in idx.tolist()] == ref
    torch.testing.assert_close(weight.sum(-1), torch.ones(40))  # renormalised, scale 1


def test_one_group_and_all_groups_are_plain_topk():
    torch.manual_seed(1)
    plain = MoEGate(16, 8, 2)
    x = torch.randn(30, 16)
    for groups, topk_group in ((1, 1), (4, 4)):
        grouped = MoEGate(16, 8, 2, num_groups=groups, topk_group=topk_group)
        grouped.load_state_dict(plain.state_dict())
        assert torch.equal(grouped(x)[0].sort(-1).values, plain(x)[0].sort(-1).values)


def test_grouped_routing_errors():
    with pytest.raises(ValueError, match="num_groups must divide"):
        MoEGate(16, 8, 2, num_groups=3)
    with pytest.raises(ValueError, match="num_groups must divide"):
        MoEGate(16, 8, 2, num_groups=8)  # groups of one expert have no top-2
    with pytest.raises(ValueError, match="topk_group"):
        MoEGate(16, 8, 2, num_groups=4, topk_group=5)
    with pytest.raises(ValueError, match="fewer than top_k"):
        MoEGate(16, 8, 4, num_groups=4, topk_group=1)
    for bad, match in (
        (dict(num_expert_group=3), "num_expert_group must divide"),
        (dict(num_expert_group=2, topk_group=3), "topk_group"),
        (dict(moe_layer_freq=0), "moe_layer_freq"),
    ):
        with pytest.raises(ValueError, match=match):
            KimiLinearConfig.from_preset("tiny", **bad)


def test_moe_layer_freq():
    cfg = KimiLinearConfig.from_preset(
        "tiny", num_hidden_layers=6, layer_types=None, first_k_dense_replace=1, moe_layer_freq=2
    )
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
