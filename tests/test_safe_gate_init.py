"""Initialisation of the KDA decay parameters for the safe gate
``g = lower_bound * sigmoid(exp(A_log) * (f + dt_bias))``: ``A_log = 0`` (as fla's KDA layer
with ``safe_gate``) and Mamba's ``dt_bias``, so the starting decays are spread log-uniformly
instead of stuck at ``exp(g) == 1`` behind a saturated sigmoid."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.layers.kda import KimiDeltaAttention
from kimi_linear.ops.gate import kda_gate

LOWER = -5.0
D, H, K = 64, 4, 32


def _layer(lower_bound: float | None, seed: int = 0) -> KimiDeltaAttention:
    cfg = KimiLinearConfig.from_preset(
        "tiny",
        hidden_size=D,
        kda_num_heads=H,
        kda_head_dim=K,
        kda_backend="torch",
        kda_gate_lower_bound=lower_bound,
    )
    torch.manual_seed(seed)
    return KimiDeltaAttention(cfg, layer_idx=0)


def _gate_at_init(layer: KimiDeltaAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """``g`` for a zero gate projection (``f = 0``, the init's typical value) and its slope
    ``dg/df``, per channel."""
    f = torch.zeros(1, 1, H, K, requires_grad=True)
    g = kda_gate(f, layer.A_log, layer.dt_bias, layer.config.kda_gate_lower_bound)
    (slope,) = torch.autograd.grad(g.sum(), f)
    return g.detach().flatten(), slope.flatten()


def _fp32_no_decay(g: torch.Tensor) -> torch.Tensor:
    """Channels whose per-token decay ``exp(g)`` rounds to exactly 1 in fp32."""
    return torch.exp(g.float()) == 1.0


def test_safe_gate_starts_with_a_spread_of_decays_and_live_gradients() -> None:
    layer = _layer(LOWER)
    assert torch.equal(layer.A_log, torch.zeros_like(layer.A_log))
    g, slope = _gate_at_init(layer)
    # g ~ lower_bound * dt with dt log-uniform in [1e-3, 1e-1]
    dt = F.softplus(layer.dt_bias)
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert g.min() >= LOWER * torch.sigmoid(torch.tensor(math.log(math.expm1(0.1)))) - 1e-6
    assert g.max() <= LOWER * torch.sigmoid(torch.tensor(math.log(math.expm1(1e-3)))) + 1e-7
    assert g.min() < -0.2 and g.max() > -0.02  # both fast and slow channels
    assert not _fp32_no_decay(g).any()
    assert (slope.abs() > 1e-3).all()  # the sigmoid is far from saturation


def test_the_release_init_would_saturate_the_safe_gate() -> None:
    """Why the safe gate gets its own init: A ~ U[1, 16] scales the sigmoid's argument up to
    -110, so most channels start with no decay at all and no gradient through the gate."""
    layer = _layer(LOWER)
    layer.reset_gate_parameters(a_range=KimiDeltaAttention.A_RANGE)
    g, slope = _gate_at_init(layer)
    assert _fp32_no_decay(g).float().mean() > 0.5
    assert (slope.abs() < 1e-6).float().mean() > 0.5


def test_release_gate_init_is_unchanged() -> None:
    layer = _layer(None)
    a = layer.A_log.exp()
    assert layer.init_a_range == KimiDeltaAttention.A_RANGE == (1.0, 16.0)
    assert (a >= 1.0).all() and (a <= 16.0).all() and a.std() > 0
    g, _ = _gate_at_init(layer)
    assert g.min() >= -1.6 - 1e-5 and g.max() <= -1e-3 * (1 - 1e-5)


def test_seeded_and_plain_model_init_use_the_same_rule() -> None:
    cfg = KimiLinearConfig.from_preset("tiny", kda_backend="torch", kda_gate_lower_bound=LOWER)
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(cfg)
    kdas = [m for m in model.modules() if isinstance(m, KimiDeltaAttention)]
    assert kdas
    for seed in (None, 3):
        for m in kdas:
            m.A_log.data.fill_(1.0)
        model.reset_parameters(seed=seed)
        for m in kdas:
            assert torch.equal(m.A_log, torch.zeros_like(m.A_log)), seed
            dt = F.softplus(m.dt_bias)
            assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)


def test_matches_fla_safe_gate_init() -> None:
    """fla's KDA layer with ``safe_gate``: ``A_log = 0`` and the same ``dt_bias`` recipe."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import fla.layers as fla_layers  # a dependency: a broken install fails here

        torch.manual_seed(0)
        ref = fla_layers.KimiDeltaAttention(
            hidden_size=D, head_dim=K, num_heads=H, safe_gate=True, lower_bound=LOWER
        )
    ours = _layer(LOWER)
    assert torch.equal(ref.A_log.detach(), torch.zeros(H))
    assert torch.equal(ours.A_log.flatten(), ref.A_log.detach())
    for p in (ref.dt_bias.detach(), ours.dt_bias.detach()):
        dt = F.softplus(p)
        assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
