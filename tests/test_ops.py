"""The pure-PyTorch KDA ops: chunked form vs the token-by-token reference (and fla's reference).

Inputs follow the KDA layer: q and k L2-normalised per head, beta in (0, 1), g <= 0 (log
decay). Outputs, final states and all six gradients (dq, dk, dv, dg, dbeta, dh0) are compared:
float64 within 1e-10, float32 within 1e-4, by the norm-relative error of
:mod:`kimi_linear.testing`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kimi_linear.ops.chunk as chunk_mod
from kimi_linear.ops import naive_kda_step, naive_recurrent_kda, torch_chunk_kda
from kimi_linear.ops.checks import LOG_DECAY_FLOOR
from kimi_linear.testing import assert_rel_close

ROOT = Path(__file__).resolve().parents[1]

DECAYS = {
    "moderate": (-1.0, 0.0),
    "strong": (-20.0, 0.0),  # cumulative decay down to -1280 within a 64-token chunk
    "near_zero": (-1e-3, 0.0),
}


def make_inputs(
    B: int = 2,
    T: int = 65,
    H: int = 2,
    K: int = 16,
    V: int = 12,
    decay: str = "moderate",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """float64 KDA inputs as the layer produces them, plus a random initial state."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)
    lo, hi = DECAYS[decay]
    return {
        "q": F.normalize(rand(B, T, H, K), dim=-1),
        "k": F.normalize(rand(B, T, H, K), dim=-1),
        "v": rand(B, T, H, V),
        "g": torch.rand(B, T, H, K, generator=gen, dtype=torch.float64) * (lo - hi) + hi,
        "beta": torch.sigmoid(rand(B, T, H)),
        "initial_state": rand(B, H, K, V),
    }


GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def run_op(
    op: Callable,
    inputs: dict[str, torch.Tensor],
    dtype: torch.dtype,
    with_state: bool = True,
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Forward + backward of ``op`` on ``inputs`` cast to ``dtype``; fixed random cotangents."""
    x = {n: t.detach().to(dtype).requires_grad_() for n, t in inputs.items()}
    if not with_state:
        x.pop("initial_state")
    o, state = op(
        x["q"], x["k"], x["v"], x["g"], x["beta"],
        initial_state=x.get("initial_state"), output_final_state=with_state, **kwargs,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)).sum()
    if with_state:
        loss = (
            loss
            + (
                state * torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
            ).sum()
        )
    else:
        assert state is None
    names = [n for n in GRAD_NAMES if n in x]
    grads = torch.autograd.grad(loss, [x[n] for n in names])
    out = {"o": o.detach(), **{f"d{n}": gr for n, gr in zip(names, grads)}}
    if with_state:
        out["state"] = state.detach()
    return out


def assert_all_close(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float
) -> None:
    """Every tensor of ``want`` within ``rtol`` (:func:`kimi_linear.testing.assert_rel_close`);
    a reference of zeros (a gradient with no path to the loss) wants zeros within ``rtol``."""
    assert got.keys() == want.keys()
    for name in want:
        assert_rel_close(got[name], want[name], rtol, name, zeros_atol=rtol)


# --------------------------------------------------------------------- agreement with the reference


@pytest.mark.parametrize("with_state", [False, True], ids=["no_state", "state"])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_chunk_matches_recurrent(T: int, with_state: bool) -> None:
    inputs = make_inputs(T=T, seed=T)
    want64 = run_op(naive_recurrent_kda, inputs, torch.float64, with_state)
    assert_all_close(run_op(torch_chunk_kda, inputs, torch.float64, with_state), want64, rtol=1e-10)
    want32 = run_op(naive_recurrent_kda, inputs, torch.float32, with_state)
    got32 = run_op(torch_chunk_kda, inputs, torch.float32, with_state)
    assert got32["o"].dtype == torch.float32
    assert_all_close(got32, want32, rtol=1e-4)


@pytest.mark.parametrize("decay", ["strong", "near_zero"])
def test_chunk_matches_recurrent_extreme_decay(decay: str) -> None:
    inputs = make_inputs(T=150, H=3, decay=decay, seed=7)
    want = run_op(naive_recurrent_kda, inputs, torch.float64)
    assert_all_close(run_op(torch_chunk_kda, inputs, torch.float64), want, rtol=1e-10)
    assert_all_close(run_op(torch_chunk_kda, inputs, torch.float32), want, rtol=1e-4)


def test_very_strong_decay_stays_finite() -> None:
    """g = -1000 per step: exp(-G) would overflow even float64; differences never do."""
    inputs = make_inputs(B=1, T=80, decay="moderate", seed=3)
    inputs["g"] = inputs["g"] * 1000.0
    want = run_op(naive_recurrent_kda, inputs, torch.float64)
    assert_all_close(run_op(torch_chunk_kda, inputs, torch.float64), want, rtol=1e-10)
    assert_all_close(run_op(torch_chunk_kda, inputs, torch.float32), want, rtol=1e-4)


@pytest.mark.parametrize("decay", ["moderate", "strong", "near_zero"])
@pytest.mark.parametrize("H", [1, 3])
def test_chunk_matches_fla_naive_recurrent(H: int, decay: str) -> None:
    """fla's ``naive_recurrent_kda`` computes in float32: compare at float32 tolerance."""
    import fla.ops.kda.naive as naive  # a dependency: a broken install fails here

    inputs = make_inputs(B=1, T=130, H=H, K=32, V=16, decay=decay, seed=11)
    want = run_op(naive.naive_recurrent_kda, inputs, torch.float32)
    assert_all_close(run_op(torch_chunk_kda, inputs, torch.float32), want, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 10, 16, 40, 48, 128])
def test_result_does_not_depend_on_chunk_size(chunk_size: int) -> None:
    inputs = make_inputs(B=1, T=100, decay="strong", seed=5)
    want = run_op(naive_recurrent_kda, inputs, torch.float64)
    got = run_op(torch_chunk_kda, inputs, torch.float64, chunk_size=chunk_size)
    assert_all_close(got, want, rtol=1e-10)


def test_grouped_gram_matches_ungrouped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Splitting the chunks into groups (to bound temporaries) changes nothing."""
    inputs = make_inputs(B=2, T=200, H=3, seed=9)
    want = run_op(torch_chunk_kda, inputs, torch.float64)
    monkeypatch.setattr(chunk_mod, "_GROUP_ELEMENTS", 1)  # one chunk per group
    assert_all_close(run_op(torch_chunk_kda, inputs, torch.float64), want, rtol=1e-12)


# Per-step decay scales that send float64 chunks (C=32, sub-chunks of 8) down each Gram path:
# factored over the whole chunk, factored per sub-chunk, exact pairwise (limit 300 in float64).
GRAM_PATHS = {"chunk_factored": 1.0, "sub_factored": 60.0, "pairwise": 400.0}


def _gram_inputs(n: int, C: int, K: int, step: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (
        F.normalize(torch.randn(n, C, K, generator=gen, dtype=torch.float64), dim=-1)
        for _ in range(2)
    )
    G = (-step * torch.rand(n, C, K, generator=gen, dtype=torch.float64)).cumsum(1)
    return q, k, G


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls = [0]
    fn = getattr(chunk_mod, name)

    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    monkeypatch.setattr(chunk_mod, name, counted)
    return calls


@pytest.mark.parametrize("path", list(GRAM_PATHS))
def test_decayed_gram_paths_match_dense_and_gradcheck(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Gram path against the pairwise definition, and its backward against finite differences."""
    sub_calls = _count_calls(monkeypatch, "_gram_forward_sub")
    pair_calls = _count_calls(monkeypatch, "_diag_forward_pairwise")
    q, k, G = _gram_inputs(2, 32, 4, GRAM_PATHS[path])
    A_qk, A_kk = chunk_mod._DecayedGram.apply(q, k, G, 8)
    assert (sub_calls[0] > 0, pair_calls[0] > 0) == {
        "chunk_factored": (False, False), "sub_factored": (True, False), "pairwise": (True, True)
    }[path]  # fmt: skip
    D = (G.unsqueeze(2) - G.unsqueeze(1)).masked_fill(
        ~torch.ones(32, 32, dtype=torch.bool).tril()[..., None], -torch.inf
    )
    dense = lambda a: torch.einsum("nrd,nid,nrid->nri", a, k, D.exp())
    torch.testing.assert_close(A_qk, dense(q), atol=1e-12, rtol=0)
    torch.testing.assert_close(A_kk, dense(k).tril(-1), atol=1e-12, rtol=0)
    args = (q[:1].requires_grad_(), k[:1].requires_grad_(), G[:1].requires_grad_(), 8)
    assert torch.autograd.gradcheck(chunk_mod._DecayedGram.apply, args, fast_mode=True)


@pytest.mark.parametrize("C,sub", [(6, 6), (9, 3)])
def test_decayed_gram_gradcheck_odd_sizes(C: int, sub: int) -> None:
    q, k, G = _gram_inputs(2, C, 3, step=100.0, seed=C)  # strong: through the sub-chunks
    args = (q.requires_grad_(), k.requires_grad_(), G.requires_grad_(), sub)
    assert torch.autograd.gradcheck(chunk_mod._DecayedGram.apply, args)  # full Jacobian


def test_mixed_decay_takes_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """One call whose chunks need different Gram paths (float32 limits) still matches."""
    sub_calls = _count_calls(monkeypatch, "_gram_forward_sub")
    pair_calls = _count_calls(monkeypatch, "_diag_forward_pairwise")
    inputs = make_inputs(B=1, T=256, H=2, decay="moderate", seed=21)
    step = torch.tensor([0.01, 5.0, 20.0, 0.5]).repeat_interleave(64)  # one scale per chunk
    inputs["g"] = inputs["g"] * step.view(1, -1, 1, 1).double()
    want = run_op(naive_recurrent_kda, inputs, torch.float64)
    assert_all_close(run_op(torch_chunk_kda, inputs, torch.float32), want, rtol=1e-4)
    assert sub_calls[0] > 0 and pair_calls[0] > 0


# --------------------------------------------------------------------------- dtypes and edge cases


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    x = make_inputs(B=1, T=70, seed=2)
    half = {n: t.to(dtype) for n, t in x.items()}
    o, state = torch_chunk_kda(**half, output_final_state=True)
    assert o.dtype == dtype and state.dtype == torch.float32
    o32, state32 = torch_chunk_kda(
        **{n: t.float() for n, t in half.items()}, output_final_state=True
    )
    torch.testing.assert_close(o, o32.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(state, state32, atol=0, rtol=0)


def test_float32_gates_with_half_inputs() -> None:
    """The layer keeps g (and often beta) in float32 while q, k, v are bf16."""
    x = make_inputs(B=1, T=40, seed=4)
    args = {n: x[n].to(torch.bfloat16) for n in ("q", "k", "v")}
    o, state = torch_chunk_kda(
        **args, g=x["g"].float(), beta=x["beta"].float(), output_final_state=True
    )
    ref, ref_state = naive_recurrent_kda(
        **args, g=x["g"].float(), beta=x["beta"].float(), output_final_state=True
    )
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=0)


def test_float64_final_state_and_defaults() -> None:
    x = make_inputs(B=1, T=20, seed=6)
    o, state = torch_chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"])
    assert state is None and o.dtype == torch.float64 and o.shape == (1, 20, 2, 12)
    _, state = torch_chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], output_final_state=True)
    assert state.dtype == torch.float64 and state.shape == (1, 2, 16, 12)
    o_scaled, _ = torch_chunk_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=0.5)
    ref, _ = naive_recurrent_kda(x["q"], x["k"], x["v"], x["g"], x["beta"], scale=0.5)
    torch.testing.assert_close(o_scaled, ref, atol=1e-10, rtol=0)


def test_state_round_trip_equals_one_pass() -> None:
    """Running [0, 100) then [100, 230) with the carried state equals one pass over [0, 230)."""
    x = make_inputs(B=2, T=230, seed=8)
    seq = {n: x[n] for n in ("q", "k", "v", "g", "beta")}
    o_full, s_full = torch_chunk_kda(
        **seq, initial_state=x["initial_state"], output_final_state=True
    )
    head = {n: t[:, :100] for n, t in seq.items()}
    tail = {n: t[:, 100:] for n, t in seq.items()}
    o1, s1 = torch_chunk_kda(**head, initial_state=x["initial_state"], output_final_state=True)
    o2, s2 = torch_chunk_kda(**tail, initial_state=s1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_full, atol=1e-10, rtol=0)
    torch.testing.assert_close(s2, s_full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
def test_empty_sequence_returns_initial_state(op: Callable) -> None:
    x = make_inputs(B=1, T=0, seed=0)
    o, state = op(
        x["q"],
        x["k"],
        x["v"],
        x["g"],
        x["beta"],
        initial_state=x["initial_state"],
        output_final_state=True,
    )
    assert o.shape == (1, 0, 2, 12)
    torch.testing.assert_close(state, x["initial_state"])


def test_inputs_are_not_modified() -> None:
    x = make_inputs(B=1, T=90, seed=12)
    before = {n: t.clone() for n, t in x.items()}
    torch_chunk_kda(**x, output_final_state=True)
    for n in x:
        assert torch.equal(x[n], before[n]), f"{n} was modified in place"


def test_no_grad_inference() -> None:
    x = {n: t.requires_grad_() for n, t in make_inputs(B=1, T=33, seed=1).items()}
    with torch.no_grad():
        o, state = torch_chunk_kda(**x, output_final_state=True)
    assert not o.requires_grad and not state.requires_grad


# ------------------------------------------------------------------------- gate numerics: g in [-inf, 0]

INF = float("inf")


def _extreme_gates(pattern: str, g: torch.Tensor) -> torch.Tensor:
    """``g`` with the extreme values of ``pattern`` written in (B >= 2, T >= 70, H >= 2, K >= 4)."""
    g = g.clone()
    if pattern == "neg_inf":  # complete forgetting: single channels, whole tokens, chunk edges
        g[0, 0, 0, :2] = -INF  # first token
        g[0, 5, 1] = -INF  # a whole token of one head
        g[1, 15:17, 0, 1] = -INF  # across a sub-chunk boundary
        g[1, 63, 1, 3] = -INF  # last token of the first chunk
        g[0, 64, :, 0] = -INF  # first token of the second chunk
        g[0, -1, 0, 2] = -INF  # last token
    elif pattern == "huge_finite":  # one value far below -1000: swallowed by a cumulative sum
        g[0, 20, 0, :] = -1e30
        g[1, 40, 1, 1] = -1e30
    elif pattern == "beyond_floor":  # just past the floor of each dtype, then mild steps
        g[0, 10, 0, 0] = -200.0
        g[1, 30, :, :] = -2000.0
    elif pattern == "all_neg_inf":
        g[1] = -INF
    return g


GATE_PATTERNS = ["neg_inf", "huge_finite", "beyond_floor", "all_neg_inf"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("pattern", GATE_PATTERNS)
def test_chunk_equals_recurrence_for_any_log_decay(pattern: str, dtype: torch.dtype) -> None:
    """-inf (complete forgetting) and values far below -1000 give the recurrence's answer in the
    chunked form, forward and backward (all gradients finite), in every Gram path."""
    x = make_inputs(B=2, T=70, H=2, K=8, V=6, seed=21)
    x["g"] = _extreme_gates(pattern, x["g"])
    want = run_op(naive_recurrent_kda, x, torch.float64)
    for chunk_size in (64, 16):
        got = run_op(torch_chunk_kda, x, dtype, chunk_size=chunk_size)
        assert_all_close(got, want, rtol=1e-10 if dtype == torch.float64 else 2e-5)


def test_strong_decay_mixed_with_neg_inf_takes_every_gram_path() -> None:
    x = make_inputs(B=2, T=70, H=2, K=8, V=6, decay="strong", seed=22)
    x["g"] = _extreme_gates("neg_inf", x["g"])
    assert_all_close(
        run_op(torch_chunk_kda, x, torch.float64),
        run_op(naive_recurrent_kda, x, torch.float64),
        1e-10,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_decay_floor_underflows_to_exactly_zero(dtype: torch.dtype) -> None:
    """The per-step clamp is exact only because exp(floor) is 0 in the compute dtype."""
    floor = torch.tensor(LOG_DECAY_FLOOR[dtype], dtype=dtype)
    assert torch.exp(floor).item() == 0.0
    assert torch.exp(floor / 4).item() > 0.0  # and not absurdly far below what is needed


@pytest.mark.parametrize("bad", [1e-3, INF], ids=["positive", "pos_inf"])
@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda, naive_kda_step])
def test_positive_log_decay_is_refused(op: Callable, bad: float) -> None:
    x = make_inputs(B=1, T=1 if op is naive_kda_step else 9, seed=2)
    x["g"][0, 0, 1, 3] = bad
    x["g"][0, 0, 0, 0] = float("nan")  # a NaN elsewhere neither hides nor replaces the error
    with pytest.raises(ValueError, match=r"g must be a log decay in \[-inf, 0\].* > 0"):
        op(**x)


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda, naive_kda_step])
def test_nan_log_decay_poisons_its_row_only(op: Callable) -> None:
    """A NaN gate is a poisoned token (tests/test_numerics.py covers the causality), not an
    error that stops the whole batch."""
    x = make_inputs(B=2, T=1 if op is naive_kda_step else 9, seed=2)
    x["g"][0, 0, 1, 3] = float("nan")
    o, state = op(**x, output_final_state=True)
    assert torch.isnan(o[0, :, 1]).all() and torch.isfinite(o[0, :, 0]).all()
    assert torch.isfinite(o[1]).all() and torch.isfinite(state[1]).all()
    assert torch.isnan(state[0, 1]).all() and torch.isfinite(state[0, 0]).all()


# ------------------------------------------------------------------------- empty and meta inputs


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("T", [0, 5])
def test_empty_batch_returns_empty_outputs(op: Callable, T: int) -> None:
    x = make_inputs(B=0, T=T, H=2, K=8, V=6)
    x["initial_state"] = x["initial_state"].requires_grad_()
    o, state = op(**x, output_final_state=True)
    assert o.shape == (0, T, 2, 6) and o.dtype == torch.float64
    assert state.shape == (0, 2, 8, 6)


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda, naive_kda_step])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "cu_seqlens"])
def test_meta_inputs_give_meta_outputs(op: Callable, packed: bool) -> None:
    """Shape inference (meta-device model init): no data touched, right shapes and dtypes."""
    T = 1 if op is naive_kda_step else 7
    B, N = (1, 3) if packed else (2, 2)
    T = N if packed and op is naive_kda_step else T
    x = {n: t.to("meta") for n, t in make_inputs(B=B, T=T, H=2, K=8, V=6).items()}
    x["initial_state"] = torch.empty(N, 2, 8, 6, device="meta")
    x = {n: t.float() for n, t in x.items()}
    kwargs = {}
    if packed:
        kwargs["cu_seqlens"] = torch.empty(N + 1, dtype=torch.int32, device="meta")
    o, state = op(**x, output_final_state=True, **kwargs)
    assert o.device.type == "meta" and o.shape == (B, T, 2, 6) and o.dtype == torch.float32
    assert state.device.type == "meta" and state.shape == (N, 2, 8, 6)
    assert state.dtype == torch.float32


# ------------------------------------------------------------------------ packed sequences


LENGTHS = [3, 0, 17, 64, 70, 1]


def _packed(seed: int = 30) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    x = make_inputs(B=1, T=sum(LENGTHS), H=2, K=8, V=6, seed=seed)
    x["initial_state"] = torch.randn(len(LENGTHS), 2, 8, 6, dtype=torch.float64)
    offsets = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    return x, offsets


def _separate_runs(op: Callable, x: dict[str, torch.Tensor], offsets: list[int]) -> dict:
    """Each sequence alone through ``op`` (float64), gradients of the same loss as ``run_op``."""

    def packed_op(q, k, v, g, beta, initial_state, output_final_state, cu_seqlens=None):
        outs, states = [], []
        for n, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            o, s = op(
                q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], beta[:, a:b],
                initial_state=initial_state[n : n + 1], output_final_state=True,
            )  # fmt: skip
            outs.append(o)
            states.append(s)
        return torch.cat(outs, 1), torch.cat(states)

    return run_op(packed_op, x, torch.float64)


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
def test_cu_seqlens_equals_separate_runs(op: Callable) -> None:
    """Packed sequences (empty ones and ones longer than a chunk included), forward and all
    gradients, equal each sequence run alone."""
    x, cu = _packed()
    x["g"] = _extreme_gates("neg_inf", x["g"].expand(2, -1, -1, -1))[:1]
    want = _separate_runs(naive_recurrent_kda, x, cu.tolist())
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        got = run_op(op, x, dtype, cu_seqlens=cu)
        assert_all_close(got, want, rtol=rtol)


def test_decode_step_with_cu_seqlens_equals_dense() -> None:
    x = make_inputs(B=3, T=1, H=2, K=8, V=6, seed=5)
    dense = naive_kda_step(**x)
    packed = {n: t.transpose(0, 1) if n != "initial_state" else t for n, t in x.items()}
    o, state = naive_kda_step(**packed, cu_seqlens=torch.arange(4, dtype=torch.int32))
    torch.testing.assert_close(o, dense[0].transpose(0, 1))
    torch.testing.assert_close(state, dense[1])
    with pytest.raises(ValueError, match="one token per sequence"):
        naive_kda_step(**packed, cu_seqlens=torch.tensor([0, 0, 2, 3], dtype=torch.int32))


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
def test_bad_cu_seqlens_raise(op: Callable) -> None:
    x, cu = _packed()
    with pytest.raises(ValueError, match="end at T"):
        op(**x, cu_seqlens=cu[:-1])
    with pytest.raises(ValueError, match="torch.int32 or torch.int64"):
        op(**x, cu_seqlens=cu.float())
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\]"):
        op(**{**x, "initial_state": x["initial_state"][:2]}, cu_seqlens=cu)
    y = {n: t.expand(2, *t.shape[1:]) if n != "initial_state" else t for n, t in x.items()}
    with pytest.raises(ValueError, match="B == 1"):
        op(**y, cu_seqlens=cu)


# ------------------------------------------------------------------------------------- bad input


def _bad_cases() -> list[tuple[str, dict, str]]:
    x = make_inputs(B=2, T=10, H=2, K=8, V=6).copy()
    x = {n: t.float() for n, t in x.items()}
    cases = [
        ("q_rank", {"q": x["q"][0]}, "q must be 4-D"),
        ("k_shape", {"k": x["k"][:, :5]}, "k must have the shape of q"),
        ("g_shape", {"g": x["g"][..., :4]}, r"g must be \[B, T, HV, K\]"),
        ("v_shape", {"v": x["v"][:, :1]}, "v must be"),
        ("v_heads", {"v": x["v"][:, :, :1]}, "num_v_heads HV=1.* multiple of .*num_heads H=2"),
        ("beta_shape", {"beta": x["beta"].unsqueeze(-1)}, "beta must be"),
        ("k_dtype", {"k": x["k"].double()}, "k must have the dtype of q"),
        ("v_dtype", {"v": x["v"].half()}, "v must have the dtype of q"),
        ("int_q", {"q": x["q"].long()}, "q must have a floating dtype"),
        (
            "int_beta",
            {"beta": torch.ones(2, 10, 2, dtype=torch.int32)},
            "beta must have a floating dtype",
        ),
        ("state_shape", {"initial_state": x["initial_state"][:, :1]}, "initial_state must be"),
        (
            "state_int",
            {"initial_state": x["initial_state"].int()},
            "initial_state must be floating",
        ),
        ("state_list", {"initial_state": [[0.0]]}, "initial_state must be a torch.Tensor"),
        ("v_list", {"v": x["v"].tolist()}, "v must be a torch.Tensor"),
        ("scale", {"scale": -1.0}, "scale must be"),
        ("scale_inf", {"scale": INF}, "scale must be None or a positive finite number, got inf"),
        ("scale_nan", {"scale": float("nan")}, "scale must be None or a positive finite number"),
        ("scale_bool", {"scale": True}, "scale must be None or a positive finite number"),
        ("scale_vector", {"scale": torch.ones(2)}, "scale must be .* shape \\(2,\\)"),
        ("scale_tensor_inf", {"scale": torch.tensor(INF)}, "positive finite number, got inf"),
        (
            "scale_requires_grad",
            {"scale": torch.tensor(0.5, requires_grad=True)},
            "scale is a constant of the op",
        ),
    ]
    return [(name, {**x, **change}, msg) for name, change, msg in cases]


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_value_error(op: Callable, case: tuple[str, dict, str]) -> None:
    _, kwargs, msg = case
    with pytest.raises(ValueError, match=msg):
        op(**kwargs)


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
def test_zero_dim_tensor_scale_equals_float(op: Callable) -> None:
    x = make_inputs(B=1, T=10)
    o_float, _ = op(**x, scale=0.25)
    o_tensor, _ = op(**x, scale=torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(o_tensor, o_float, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size", [0, -64, 2.5, True, "64", None])
def test_bad_chunk_size_raises_value_error(chunk_size: object) -> None:
    x = make_inputs(B=1, T=10)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        torch_chunk_kda(**x, chunk_size=chunk_size)


# ------------------------------------------------------------------------------------- benchmark


def test_benchmark_quick_runs(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kda_cpu", "--quick", "--impls", "torch_chunk_kda,naive_recurrent_kda", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "kda_cpu.json").read_text())
    assert {"benchmark", "env", "config", "rows", "summary"} <= data.keys()
    row = data["rows"][0]
    assert {"T", "impl", "pass", "ms", "status"} <= row.keys()
    assert {r["impl"] for r in data["rows"]} >= {"torch_chunk_kda", "naive_recurrent_kda"}
    assert (tmp_path / "kda_cpu.md").exists()


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
def test_autocast_does_not_lower_compute_precision(op: Callable) -> None:
    """Under bf16 autocast (mixed-precision training) the ops still compute in float32."""
    x = {n: t.float().requires_grad_() for n, t in make_inputs(B=1, T=100, seed=13).items()}
    outs = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            o, state = op(**x, output_final_state=True)
        # backward outside the autocast region, as training loops (and Lightning) do
        grads = torch.autograd.grad(o.square().sum() + state.square().sum(), list(x.values()))
        outs.append({"o": o.detach(), "state": state.detach(), **dict(zip(x, grads))})
    assert outs[1]["o"].dtype == torch.float32
    assert_all_close(outs[1], outs[0], rtol=1e-6)


def test_outputs_are_contiguous() -> None:
    x = make_inputs(B=2, T=70, seed=14)
    for dtype in (torch.float32, torch.bfloat16):
        o, state = torch_chunk_kda(
            **{n: t.to(dtype) for n, t in x.items()}, output_final_state=True
        )
        assert o.is_contiguous() and state.is_contiguous()


# ------------------------------------------------------------- the hand-written backward (H9)


def _chunked_kda_inputs(n: int, b: int, C: int, K: int, V: int, step: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    q, k = (F.normalize(torch.randn(n, b, C, K, **f64), dim=-1) for _ in range(2))
    v = torch.randn(n, b, C, V, **f64)
    G = (-step * torch.rand(n, b, C, K, **f64)).cumsum(dim=-2)
    beta = torch.sigmoid(torch.randn(n, b, C, 1, **f64))
    S0 = torch.randn(b, K, V, **f64)
    return q, k, v, G, beta, S0


def _record_gram_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    paths: list[str] = []
    fn = chunk_mod._gram_path

    def recorded(*args, **kwargs):
        paths.append(fn(*args, **kwargs))
        return paths[-1]

    monkeypatch.setattr(chunk_mod, "_gram_path", recorded)
    return paths


@pytest.mark.parametrize(
    "step, offset, path",
    [(0.5, 0.0, "zero"), (0.5, -400.0, "mid"), (200.0, 0.0, "sub")],
    ids=["factored_zero", "factored_mid", "sub_chunks"],
)
def test_chunked_kda_function_gradcheck(
    step: float, offset: float, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hand-written backward of the whole chunked computation (solve through the inverse,
    reverse state pass, element-wise factors, Gram matrices) against finite differences, on
    every Gram path: factored around 0 (every |G| <= FACTORED_LIMIT, 300 in float64), factored
    around each chunk's middle (a span within 2 * FACTORED_LIMIT, further from 0: the offset),
    and the grouped one (sub-chunks) that a larger span selects."""
    calls = _count_calls(monkeypatch, "_gram_grouped")
    paths = _record_gram_paths(monkeypatch)
    q, k, v, G, beta, S0 = _chunked_kda_inputs(3, 2, 8, 4, 3, step)
    args = tuple(x.requires_grad_() for x in (q, k, v, G + offset, beta, S0))
    fn = lambda *a: chunk_mod._ChunkedKDA.apply(*a, 0.7, 4)
    assert torch.autograd.gradcheck(fn, args, fast_mode=True)
    assert set(paths) == {path}
    assert (calls[0] > 0) == (path == "sub")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunk_first_token_far_below_the_limit_takes_the_mid_path(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A strong decay on the first token of every chunk (beyond FACTORED_LIMIT) and weak decay
    after it: the factored path around each chunk's middle; outputs, final state and every
    gradient agree with the recurrence (in float64 to 1e-10)."""
    paths = _record_gram_paths(monkeypatch)
    inputs = make_inputs(T=64, seed=3)
    limit = chunk_mod.FACTORED_LIMIT[dtype]
    inputs["g"] = inputs["g"].clone()
    inputs["g"][:, ::16] = -1.5 * limit  # each chunk's first token (chunk 16)
    x = {n: t.detach().to(dtype).requires_grad_() for n, t in inputs.items()}
    results = []
    for op in (torch_chunk_kda, naive_recurrent_kda):
        kw = {"chunk_size": 16} if op is torch_chunk_kda else {}
        o, s = op(**x, output_final_state=True, **kw)
        results.append((o, s, *torch.autograd.grad((o.square().sum() + s.sum()), list(x.values()))))
    assert paths and set(paths) == {"mid"}
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for got, want in zip(*results):
        assert (got - want).abs().max().item() < tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("C", [8, 15, 16, 32, 40, 64])
def test_unit_lower_inverse_matches_dense_inverse(C: int) -> None:
    """The (blocked, for even C >= 16) inverse the chunked form solves the UT transform with."""
    gen = torch.Generator().manual_seed(C)
    k = F.normalize(torch.randn(6, C, 8, generator=gen, dtype=torch.float64), dim=-1)
    beta = torch.rand(6, C, 1, generator=gen, dtype=torch.float64)
    M = (k @ k.transpose(-1, -2)).tril(-1) * beta
    want = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + M).transpose(-1, -2)
    assert (chunk_mod._unit_lower_inverse_t(M) - want).abs().max().item() < 1e-12


def test_chunked_kda_without_final_state_gradient() -> None:
    """Only ``o`` used: the final-state cotangent is absent, the gradients still match."""
    inputs = make_inputs(T=100, seed=5)
    x = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    outs = []
    for op in (torch_chunk_kda, naive_recurrent_kda):
        o, _ = op(x["q"], x["k"], x["v"], x["g"], x["beta"], initial_state=x["initial_state"])
        outs.append(torch.autograd.grad(o.square().sum(), list(x.values())))
    for got, want in zip(*outs):
        assert (got - want).abs().max().item() < 1e-10


def test_default_chunk_size_is_the_module_constant() -> None:
    import inspect

    default = inspect.signature(torch_chunk_kda).parameters["chunk_size"].default
    assert default == chunk_mod.DEFAULT_CHUNK_SIZE == 32


# ------------------------------------------------------------------- benchmark: interleaving


def _kda_cpu():
    from benchmarks import kda_cpu

    return kda_cpu


def test_benchmark_interleaves_rounds_in_rotating_order() -> None:
    kda_cpu = _kda_cpu()
    calls: list[str] = []

    class Fake:
        def __init__(self, name: str, slow: bool = False) -> None:
            self.name, self.slow = name, slow

        def warmup(self) -> None:
            calls.append(f"warm-{self.name}")
            if self.slow:
                import time

                time.sleep(0.02)

        def __call__(self) -> None:
            calls.append(self.name)
            if self.slow:
                import time

                time.sleep(0.02)

    runners = {"a": Fake("a"), "b": Fake("b"), "c": Fake("c"), "slow": Fake("slow", True)}
    samples = kda_cpu.time_interleaved(runners, reps=3, slow_s=0.01)
    # the slow warm-up is confirmed by a second run before the runner is left out of the rounds
    assert calls[:5] == ["warm-a", "warm-b", "warm-c", "warm-slow", "slow"]
    # each round runs a, b, c once (the slow one keeps its warm-up), starting one place later
    assert calls[5:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert [len(samples[k]) for k in ("a", "b", "c", "slow")] == [3, 3, 3, 1]


def test_benchmark_baseline_revision_loads_and_agrees() -> None:
    kda_cpu = _kda_cpu()
    impls = kda_cpu.load_impls(None, with_fla=False, baseline="HEAD")
    assert list(impls) == ["torch_chunk_kda", "naive_recurrent_kda", "torch_chunk_kda@HEAD"]
    x = kda_cpu.make_inputs(1, 40, 2, 8, 8)
    o_now, o_then = impls["torch_chunk_kda"](*x)[0], impls["torch_chunk_kda@HEAD"](*x)[0]
    assert (o_now - o_then).abs().max().item() < 1e-5


def test_benchmark_bad_baseline_exits_with_message(capsys: pytest.CaptureFixture) -> None:
    kda_cpu = _kda_cpu()
    with pytest.raises(SystemExit):
        kda_cpu.main(["--quick", "--baseline", "no-such-revision", "--out-dir", "/nonexistent"])
    assert "--baseline 'no-such-revision'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ GVA


def _gva_inputs(B: int, T: int, H: int, G: int, seed: int = 3) -> dict[str, torch.Tensor]:
    """float64 GVA inputs: q, k on ``H`` heads; v, g, beta, initial_state on ``G * H``."""
    x = make_inputs(B=B, T=T, H=G * H, K=8, V=6, seed=seed)
    x["q"], x["k"] = x["q"][:, :, :H].contiguous(), x["k"][:, :, :H].contiguous()
    return x


def _run_grads(op: Callable, x: dict, G: int, repeat: bool, **kwargs) -> dict[str, torch.Tensor]:
    """Outputs, final state and every input gradient of ``op`` on ``x`` (q and k repeated
    onto the value heads inside the graph when ``repeat``: their gradients sum per group)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    q, k = leaves["q"], leaves["k"]
    if repeat:
        q, k = q.repeat_interleave(G, dim=2), k.repeat_interleave(G, dim=2)
    o, S = op(
        q, k, leaves["v"], leaves["g"], leaves["beta"],
        initial_state=leaves.get("initial_state"), output_final_state=True, **kwargs,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
    loss.backward()
    return {"o": o, "S": S, **{f"d{n}": t.grad for n, t in leaves.items()}}


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("with_state", [False, True], ids=["h0=0", "h0"])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
def test_gva_equals_repeated_qk(op: Callable, G: int, with_state: bool, varlen: bool) -> None:
    """GVA (q, k on H heads, the rest on G * H) equals the same call with q and k repeated per
    group (float64, 1e-12); dq, dk are the repeated call's gradients summed over the group."""
    x = _gva_inputs(B=1 if varlen else 2, T=37, H=2, G=G)
    kwargs = {}
    if varlen:
        kwargs["cu_seqlens"] = torch.tensor([0, 5, 21, 37])
        x["initial_state"] = torch.randn(3, *x["initial_state"].shape[1:], dtype=torch.float64)
    if not with_state:
        x.pop("initial_state")
    got = _run_grads(op, x, G, repeat=False, **kwargs)
    want = _run_grads(op, x, G, repeat=True, **kwargs)
    assert got["o"].shape == x["v"].shape and got["dq"].shape == x["q"].shape
    for name in want:
        assert_rel_close(got[name], want[name], 1e-12, name=name)


def test_gva_chunk_equals_recurrent() -> None:
    """The two torch ops agree with each other on GVA inputs (float64)."""
    x = _gva_inputs(B=2, T=40, H=2, G=2)
    got = _run_grads(torch_chunk_kda, x, 2, repeat=False)
    want = _run_grads(naive_recurrent_kda, x, 2, repeat=False)
    for name in want:
        assert_rel_close(got[name], want[name], 1e-10, name=name)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_gva_step_equals_recurrent(packed: bool) -> None:
    """naive_kda_step on GVA inputs: one token of the recurrence (state [N, HV, K, V])."""
    x = _gva_inputs(B=3, T=1, H=2, G=2)
    want = naive_recurrent_kda(**x, output_final_state=True)
    if packed:
        y = {n: (t.transpose(0, 1) if n != "initial_state" else t) for n, t in x.items()}
        o, S = naive_kda_step(**y, cu_seqlens=torch.tensor([0, 1, 2, 3]))
        o = o.transpose(0, 1)
    else:
        o, S = naive_kda_step(**x)
    assert S.shape == (3, 4, 8, 6)
    assert_rel_close(o, want[0], 1e-12, name="o")
    assert_rel_close(S, want[1], 1e-12, name="S")


@pytest.mark.parametrize("op", [torch_chunk_kda, naive_recurrent_kda], ids=["chunk", "recurrent"])
def test_gva_bad_head_count(op: Callable) -> None:
    x = _gva_inputs(B=1, T=4, H=2, G=2)
    x["q"], x["k"] = x["q"][:, :, :1].expand(1, 4, 3, 8), x["k"][:, :, :1].expand(1, 4, 3, 8)
    with pytest.raises(ValueError, match=r"num_v_heads HV=4\) must be .*num_heads H=3\)"):
        op(**x)
    y = _gva_inputs(B=1, T=4, H=2, G=2)
    with pytest.raises(ValueError, match=r"initial_state must be \[N, H, K, V\] = \[1, 4, 8, 6\]"):
        op(**{**y, "initial_state": y["initial_state"][:, :2]})
