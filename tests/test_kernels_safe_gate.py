"""The kernels' safe-gate fast path (``gate_lower_bound``) against the float64 reference.

With the bounded safe gate (every ``g >= lower_bound >= -5``) the Triton kernels form the
diagonal 16-token sub-chunk factors ``exp(G_r - G_i)`` by splitting at the sub-chunk's first row
and running tensor-core products, forward and backward (:mod:`kimi_linear.kernels.chunk_fwd`).
These tests compare that path with the float64 token-by-token recurrence: output, final state and
every gradient, fp32 and bf16, dense and packed (varlen), for gates drawn at the strong end
(``g = lower_bound * sigmoid(x)`` close to -5 at every step: ``75`` of log decay inside a
sub-chunk, the range the split must survive) and the weak end (``g`` near 0). Also: the layer
hands its config's bound to the backend, the backends take or refuse the argument cleanly, and
``KIMI_LINEAR_CHECK_GATE=1`` refuses a ``g`` below the bound.

Run under ``TRITON_INTERPRET=1`` on CPU (conftest.py); shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kimi_linear.kernels import chunk_kda

from kimi_linear.backends import dispatch_chunk_kda
from kimi_linear.ops import naive_recurrent_kda
from kimi_linear.ops.checks import check_gate_lower_bound
from kimi_linear.testing import assert_kda_close, assert_rel_close, kda_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOWER = -5.0


def safe_gate_inputs(B, T, H, K, V, *, strength, dtype=torch.float32, N=None, seed=0):
    """``[q, k, v, g, beta, h0]`` with the safe gate ``g = LOWER * sigmoid(x)``: ``strength``
    "strong" puts ``x`` in [4, 8] (``g`` in about [-5, -4.9]: near the bound at every step),
    "weak" in [-12, -6] (``g`` in about [-0.012, -3e-5])."""
    xs = kda_inputs(B, T, H, K, V, dtype=dtype, device="cpu", N=N, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    lo, hi = (4.0, 8.0) if strength == "strong" else (-12.0, -6.0)
    x = lo + (hi - lo) * torch.rand(B, T, H, K, generator=gen)
    xs[3] = LOWER * torch.sigmoid(x)
    return [t.to(DEVICE) for t in xs]


def run(fn, inputs, do, dht, **kwargs):
    """``[o, final, dq, dk, dv, dg, dbeta, dh0]`` of ``fn`` back-propagating
    ``<o, do> + <final, dht>``."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, final = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kwargs)
    loss = (o.double() * do.double()).sum() + (final.double() * dht.double()).sum()
    loss.backward()
    return [o, final, *(x.grad for x in leaves)]


def reference(inputs, do, dht, cu_seqlens=None):
    return run(naive_recurrent_kda, [x.double() for x in inputs], do, dht, cu_seqlens=cu_seqlens)


def grads_in(B, T, H, K, V, N=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(N or B, H, K, V, generator=gen).to(DEVICE)
    return do, dht


# Norm-relative tolerances, about 4x what the exact (pairwise) path reaches on these inputs.
# fp32: the products are exact fp32 ("ieee"): ~1e-7, but dg ~2e-5 under strong decay on both
# paths (dg is a small difference of the larger per-row terms, each rounded in fp32); bf16:
# 16-bit operands, ~5e-3 (dg on the fast path too: its within-sub-chunk pairs are rounded
# products, as the pairs across sub-chunks already are on both paths).
RTOL = {
    torch.float32: {"*": 1e-5, "dg": 1e-4},
    torch.bfloat16: {"*": 2e-2},
    torch.float16: {"*": 2e-2},
}


@pytest.mark.parametrize("strength", ["strong", "weak"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_fast_path_matches_reference(strength, dtype):
    """Dense batch, a short tail chunk (T = 2 * 64 + 18, so the last sub-chunk is partial).
    fp16 inputs take bf16 operands on the fast path (its split factors exceed fp16's range)."""
    B, T, H, K, V = 2, 146, 1, 32, 16
    inputs = safe_gate_inputs(B, T, H, K, V, strength=strength, dtype=dtype, seed=11)
    do, dht = grads_in(B, T, H, K, V)
    got = run(chunk_kda, inputs, do, dht, gate_lower_bound=LOWER)
    assert_kda_close(got, reference(inputs, do, dht), RTOL[dtype])


@pytest.mark.parametrize("strength", ["strong", "weak"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fast_path_varlen_matches_reference(strength, dtype):
    """Packed sequences, a multi-chunk one first, every sequence checked (each against its own
    float64 run through the reference's cu_seqlens)."""
    lengths, H, K, V = [83, 1, 40], 2, 16, 32
    T, N = sum(lengths), len(lengths)
    inputs = safe_gate_inputs(1, T, H, K, V, strength=strength, dtype=dtype, N=N, seed=12)
    cu = torch.tensor([0, 83, 84, 124], dtype=torch.int32, device=DEVICE)
    do, dht = grads_in(1, T, H, K, V, N=N, seed=2)
    got = run(chunk_kda, inputs, do, dht, cu_seqlens=cu, gate_lower_bound=LOWER)
    assert_kda_close(got, reference(inputs, do, dht, cu_seqlens=cu), RTOL[dtype])


def test_fast_path_and_exact_path_agree_in_fp32():
    """The two paths differ only in how the diagonal sub-chunk factors are formed."""
    B, T, H, K, V = 1, 64, 1, 16, 16
    inputs = safe_gate_inputs(B, T, H, K, V, strength="strong", seed=13)
    do, dht = grads_in(B, T, H, K, V, seed=3)
    fast = run(chunk_kda, inputs, do, dht, gate_lower_bound=LOWER)
    exact = run(chunk_kda, inputs, do, dht)
    assert_kda_close(fast, [x.double() for x in exact], {"*": 1e-5, "dg": 1e-4})


def test_fast_path_is_taken(monkeypatch):
    """gate_lower_bound reaches the forward and backward kernels as the safe_gate switch."""
    import kimi_linear.kernels.chunk as chunk_mod

    seen = {}
    fwd, bwd = chunk_mod.chunk_kda_fwd, chunk_mod.chunk_kda_bwd

    def spy_fwd(*args, safe_gate=False, **kwargs):
        seen["fwd"] = safe_gate
        return fwd(*args, safe_gate=safe_gate, **kwargs)

    def spy_bwd(*args, safe_gate=False, **kwargs):
        seen["bwd"] = safe_gate
        return bwd(*args, safe_gate=safe_gate, **kwargs)

    monkeypatch.setattr(chunk_mod, "chunk_kda_fwd", spy_fwd)
    monkeypatch.setattr(chunk_mod, "chunk_kda_bwd", spy_bwd)
    inputs = safe_gate_inputs(1, 20, 1, 16, 16, strength="weak", seed=14)
    do, dht = grads_in(1, 20, 1, 16, 16)
    run(chunk_kda, inputs, do, dht, gate_lower_bound=-2.5)
    assert seen == {"fwd": True, "bwd": True}
    run(chunk_kda, inputs, do, dht)
    assert seen == {"fwd": False, "bwd": False}


@pytest.mark.parametrize("bad", [0.0, -5.5, 1.0, True, "x", float("nan")])
def test_bad_lower_bound_is_refused(bad):
    inputs = safe_gate_inputs(1, 4, 1, 16, 16, strength="weak")
    with pytest.raises(ValueError, match="gate_lower_bound must be None or a number in"):
        chunk_kda(*inputs[:5], gate_lower_bound=bad)
    with pytest.raises(ValueError, match="gate_lower_bound must be None or a number in"):
        dispatch_chunk_kda(*inputs[:5], backend="torch", gate_lower_bound=bad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gate_below_bound_is_caught_with_the_check(backend, monkeypatch):
    """KIMI_LINEAR_CHECK_GATE=1: a g below the promised bound is refused with a clear error on
    every backend; without the env var the call runs (the kernels' result is then undefined)."""
    q, k, v, g, beta, _ = safe_gate_inputs(1, 20, 1, 16, 16, strength="strong", seed=15)
    bad = g.clone()
    bad[0, 7, 0, 3] = -6.0  # below the bound
    monkeypatch.delenv("KIMI_LINEAR_CHECK_GATE", raising=False)
    dispatch_chunk_kda(q, k, v, bad, beta, backend=backend, gate_lower_bound=LOWER)
    monkeypatch.setenv("KIMI_LINEAR_CHECK_GATE", "1")
    with pytest.raises(ValueError, match=r"g must be >= gate_lower_bound=-5.0 everywhere"):
        dispatch_chunk_kda(q, k, v, bad, beta, backend=backend, gate_lower_bound=LOWER)
    dispatch_chunk_kda(q, k, v, g, beta, backend=backend, gate_lower_bound=LOWER)  # within: passes
    # the g <= 0 check still applies alongside
    with pytest.raises(ValueError, match=r"g must be a log decay in \[-inf, 0\]"):
        dispatch_chunk_kda(q, k, v, g.abs(), beta, backend=backend, gate_lower_bound=LOWER)


def test_bound_check_tolerates_rounding_only():
    g = torch.full((4,), -4.71, dtype=torch.float32).to(torch.bfloat16)  # rounds below -4.71
    assert g[0].item() < -4.71
    check_gate_lower_bound(g, -4.71)  # under half an ulp below: accepted
    with pytest.raises(ValueError, match="below"):
        check_gate_lower_bound(torch.tensor([-4.75]), -4.71)
    # NaN is a poisoned token the ops isolate (tests/test_numerics.py), not a broken promise
    check_gate_lower_bound(torch.tensor([-1.0, float("nan")]), -4.71)
    with pytest.raises(ValueError, match="below"):
        check_gate_lower_bound(torch.tensor([-4.75, float("nan")]), -4.71)


@pytest.mark.parametrize("lower_bound", [None, -5.0])
def test_layer_passes_its_bound_to_the_backend(lower_bound, monkeypatch):
    """The KDA layer hands config.kda_gate_lower_bound to dispatch_chunk_kda (the safe gate's promise)."""
    import kimi_linear.layers.kda as kda_mod
    from kimi_linear.config import KimiLinearConfig

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("gate_lower_bound", "missing"))
        return dispatch_chunk_kda(*args, **kwargs)

    monkeypatch.setattr(kda_mod, "dispatch_chunk_kda", spy)
    config = KimiLinearConfig.from_preset(
        "tiny", kda_backend="torch", kda_gate_lower_bound=lower_bound
    )
    layer = kda_mod.KimiDeltaAttention(config, layer_idx=0)
    x = torch.randn(1, 5, config.hidden_size)
    layer(x)
    assert seen == [lower_bound]


@pytest.mark.parametrize("name", ["triton", "fla", "torch"])
def test_dispatch_hands_the_bound_to_each_backend(name):
    """dispatch_chunk_kda: the Triton op gets ``gate_lower_bound``, fla's gets its own safe-gate
    arguments, the torch op (exact for any g) gets neither; no bound, no extra argument."""
    from kimi_linear.backends import KDABackend

    seen = []

    def fake_chunk(q, k, v, g, beta, **kwargs):
        seen.append(kwargs)
        return v, None

    backend = KDABackend(name, fake_chunk, fake_chunk)
    q, k, v, g, beta, _ = safe_gate_inputs(1, 8, 1, 16, 16, strength="weak")
    dispatch_chunk_kda(q, k, v, g, beta, backend=backend, gate_lower_bound=-5)
    dispatch_chunk_kda(q, k, v, g, beta, backend=backend)
    expected = {
        "triton": {"gate_lower_bound": -5.0},
        "fla": {"safe_gate": True, "lower_bound": -5.0},
        "torch": {},
    }[name]
    extra = {"gate_lower_bound", "safe_gate", "lower_bound"}
    assert {key: val for key, val in seen[0].items() if key in extra} == expected
    assert not extra & set(seen[1])


# ------------------------------------------------- gate-parameter gradients (fla's bar, fp16/bf16)
def gate_param_run(kda_fn, dtype, seed, reference=False, **kwargs):
    """fla's ``test_chunk`` with ``use_gate_in_kernel`` (its input draws), the gate formed by
    :func:`kimi_linear.ops.gate.kda_gate` (safe gate, ``lower_bound = LOWER``) outside the kernel:
    q, k, v ``rand`` in ``dtype`` (L2-normalised), raw gate ``f ~ N(0, 1)``, ``A_log ~ N(0, 1)``
    ``[H]``, ``dt_bias ~ N(0, 1)`` ``[H * K]``, beta = sigmoid(N(0, 1)), fp32 h0. Back-propagates
    ``<o, do> + <ht, dht>``; returns ``{o, ht, dq, dk, dv, dg, dbeta, dA, dbias, dh0}``.
    ``reference``: the same values, everything (gate included) in float64."""
    from kimi_linear.ops.gate import kda_gate

    B, T, H, K = 1, 128, 4, 32
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.rand(B, T, H, K, generator=gen).to(dtype) for _ in range(3))
    f = torch.randn(B, T, H, K, generator=gen)
    A_log, dt_bias = torch.randn(H, generator=gen), torch.randn(H * K, generator=gen)
    beta = torch.randn(B, T, H, generator=gen).sigmoid().to(dtype)
    h0 = torch.randn(B, H, K, K, generator=gen)
    do, dht = torch.randn(B, T, H, K, generator=gen), torch.randn(B, H, K, K, generator=gen)
    cast = torch.float64 if reference else None
    leaves = [
        x.to(DEVICE, cast or x.dtype).detach().requires_grad_()
        for x in (q, k, v, f, beta, h0, A_log, dt_bias)
    ]
    q, k, v, f, beta, h0, A_log, dt_bias = leaves
    g = kda_gate(f, A_log, dt_bias, lower_bound=LOWER)
    g.retain_grad()
    o, ht = kda_fn(
        F.normalize(q, dim=-1),
        F.normalize(k, dim=-1),
        v,
        g,
        beta,
        initial_state=h0,
        output_final_state=True,
        **kwargs,
    )
    loss = (o.double() * do.to(o.device).double()).sum()
    (loss + (ht.double() * dht.to(o.device).double()).sum()).backward()
    grads = (q.grad, k.grad, v.grad, g.grad, beta.grad, A_log.grad, dt_bias.grad, h0.grad)
    names = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dA", "dbias", "dh0")
    return dict(zip(names, (o, ht, *grads)))


# fla's tolerances (tests/ops/test_kda.py, test_chunk, fp16), the gate-parameter gradients at
# the bar of its safe-gate cases; bf16 (3 mantissa bits fewer) at 2x, the exact (pairwise) path
# reaches about half of each.
FLA_RTOL = {"o": 5e-3, "ht": 5e-3, "dq": 8e-3, "dk": 8e-3, "dv": 8e-3, "dg": 2e-2}
FLA_RTOL |= {"dbeta": 2e-2, "dA": 8e-3, "dbias": 8e-3, "dh0": 8e-3}


@pytest.mark.parametrize(
    "dtype, seed", [(torch.float16, 1), (torch.bfloat16, 1)], ids=["fp16", "bf16"]
)
def test_fast_path_gate_parameter_grads_at_fla_tolerance(dtype, seed):
    """dg chained through the safe gate into ``A_log`` / ``dt_bias`` (summed over every token)
    against float64. The sum does not average a systematic dg error away: the diagonal
    sub-chunk's pair terms enter dG twice (row side +, column side -) and cancel in exact
    arithmetic; computed from 16-bit operands the two sides round differently, and the reverse
    cumulative sum adds each residue into every earlier row of the chunk. Before the fix (16-bit
    operands there) fp16 gave dbias 5e-2, dA 2e-2; bf16 dbias 5e-2."""
    got = gate_param_run(chunk_kda, dtype, seed, gate_lower_bound=LOWER)
    ref = gate_param_run(naive_recurrent_kda, dtype, seed, reference=True)
    scale = 1.0 if dtype == torch.float16 else 2.0
    for name, tol in FLA_RTOL.items():
        assert_rel_close(got[name], ref[name], tol * scale, name)
