"""Triton KDA kernels (kimi_linear.kernels) against the float64 token-by-token reference.

On a machine without CUDA these run under ``TRITON_INTERPRET=1`` (set by conftest.py), which
is slow: shapes are tiny (K, V in {16, 32}, H <= 3). Tolerances, by the norm-relative error of
:mod:`kimi_linear.testing`: fp32 outputs, final states and gradients within 1e-4 of the float64
reference; bf16 / fp16 within 3e-2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kimi_linear.kernels import chunk_kda, fused_recurrent_kda

from kimi_linear.ops import naive_recurrent_kda
from kimi_linear.testing import assert_rel_close, kda_inputs

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(B, T, H, K, V, *, gate=(-1.0, 0.0), h0=True, seed=0, dtype=torch.float32, N=None):
    """:func:`kimi_linear.testing.kda_inputs` on ``DEVICE``; ``h0=False`` drops the initial
    state."""
    xs = kda_inputs(B, T, H, K, V, dtype=dtype, device=DEVICE, gate=gate, N=N, seed=seed)
    if not h0:
        xs[5] = None
    return xs


def run_with_grads(fn, inputs, do, dht, **kwargs):
    """Forward ``fn``, back-propagate ``<o, do> + <final, dht>``; returns (o, final, grads)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    o, final = fn(
        *leaves[:5], initial_state=leaves[5], output_final_state=dht is not None, **kwargs
    )
    loss = (o.double() * do.double()).sum()
    if dht is not None:
        loss = loss + (final.double() * dht.double()).sum()
    loss.backward()
    return o, final, [None if x is None else x.grad for x in leaves]


def reference(inputs, do, dht):
    return run_with_grads(
        naive_recurrent_kda, [None if x is None else x.double() for x in inputs], do, dht
    )


def assert_grads_close(grads, ref_grads, rtol):
    """Every gradient within ``rtol`` of the reference's (:func:`assert_rel_close`)."""
    for name, a, b in zip(NAMES, grads, ref_grads):
        assert_rel_close(a, b, rtol, f"d{name}", zeros_atol=1e-7)


# (B, T, H, K, V, initial state, gradient into the final state)
CASES = [
    (1, 1, 1, 16, 16, False, False),
    (2, 37, 1, 16, 32, True, True),
    (1, 64, 3, 32, 32, True, False),
    (1, 130, 1, 32, 16, False, True),
    (1, 70, 1, 8, 48, True, True),  # head dims below 16 and not powers of two (masked lanes)
    (1, 20, 1, 256, 256, True, True),  # the largest heads
    (1, 70, 1, 128, 48, True, True),  # K = 128: two 64-row key blocks of the state kernels
    (2, 130, 3, 16, 16, True, True),
]


def _case_id(case):
    return "B{}-T{}-H{}-K{}-V{}-h0{:d}-ht{:d}".format(*case)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunk_matches_reference(case):
    B, T, H, K, V, h0, ht = case
    inputs = make_inputs(B, T, H, K, V, h0=h0, seed=T)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(B, H, K, V, generator=gen).to(DEVICE) if ht else None
    o, final, grads = run_with_grads(chunk_kda, inputs, do, dht)
    ro, rfinal, rgrads = reference(inputs, do, dht)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32
    assert_rel_close(o, ro, 1e-4, "o")
    if ht:
        assert final.dtype == torch.float32 and final.shape == (B, H, K, V)
        assert_rel_close(final, rfinal, 1e-4, "final state")
    assert_grads_close(grads, rgrads, rtol=1e-4)


@pytest.mark.parametrize(
    "gate", [(-20.0, 0.0), (-1e-6, 0.0)], ids=["strong-decay", "near-zero-decay"]
)
def test_chunk_extreme_gates(gate):
    B, T, H, K, V = 1, 100, 2, 16, 16
    _assert_chunk_finite_and_close(make_inputs(B, T, H, K, V, gate=gate, seed=3), grad_seed=2)


def _assert_chunk_finite_and_close(inputs, grad_seed):
    """chunk_kda on ``inputs`` (with an initial state), back-propagating random ``do`` / ``dht``
    drawn from ``grad_seed``: finite, and output, final state and gradients within 1e-4 of the
    float64 reference. Returns the reference ``(o, final_state)``."""
    B, T, H, K = inputs[0].shape
    V = inputs[2].shape[-1]
    gen = torch.Generator().manual_seed(grad_seed)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(B, H, K, V, generator=gen).to(DEVICE)
    o, final, grads = run_with_grads(chunk_kda, inputs, do, dht)
    ro, rfinal, rgrads = reference(inputs, do, dht)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    assert_rel_close(o, ro, 1e-4, "o")
    assert_rel_close(final, rfinal, 1e-4, "final state")
    assert_grads_close(grads, rgrads, rtol=1e-4)
    return ro, rfinal


def _extreme_gates(g, pattern):
    """``g [1, T >= 70, H >= 1, K >= 4]`` with -inf / huge negative log decays written in."""
    g = g.clone()
    if pattern == "neg_inf":  # complete forgetting: channels, a whole token, chunk edges
        g[0, 0, 0, :2] = -float("inf")
        g[0, 15:17, 0, 1] = -float("inf")
        g[0, 30, 0] = -float("inf")
        g[0, 63, 0, 3] = -float("inf")
        g[0, 64, 0, 0] = -float("inf")
        g[0, -1, 0, 2] = -float("inf")
    elif pattern == "huge_finite":  # one value far below -1000, then a few past the floor
        g[0, 20, 0, :] = -1e30
        g[0, 40, 0, 1] = -1e30
        g[0, 50, 0, 2] = -300.0
    else:  # all -inf: every token forgets everything before it
        g[:] = -float("inf")
    return g


@pytest.mark.parametrize("pattern", ["neg_inf", "huge_finite", "all_neg_inf"])
def test_chunk_equals_recurrence_for_any_log_decay(pattern):
    """g in [-inf, 0]: -inf (complete forgetting) and values far below -1000 give the
    recurrence's answer, forward and all gradients (finite), across chunk boundaries."""
    B, T, H, K, V = 1, 70, 1, 16, 16
    inputs = make_inputs(B, T, H, K, V, seed=31)
    inputs[3] = _extreme_gates(inputs[3], pattern)
    ro, rfinal = _assert_chunk_finite_and_close(inputs, grad_seed=4)
    fo, ffinal = fused_recurrent_kda(*inputs[:5], initial_state=inputs[5], output_final_state=True)
    assert_rel_close(fo, ro, 1e-4, "fused_recurrent o")
    assert_rel_close(ffinal, rfinal, 1e-4, "fused_recurrent final state")


@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda], ids=["chunk", "fused_recurrent"])
def test_positive_log_decay_check_is_opt_in(fn, monkeypatch):
    """The kernels check g <= 0 only with KIMI_LINEAR_CHECK_GATE=1 (the check syncs the device)."""
    q, k, v, g, beta, _ = make_inputs(1, 4, 1, 16, 16, h0=False, seed=32)
    g = g.clone()
    g[0, 2, 0, 5] = 0.5
    monkeypatch.delenv("KIMI_LINEAR_CHECK_GATE", raising=False)
    fn(q, k, v, g, beta)  # unchecked: runs (the result is undefined)
    monkeypatch.setenv("KIMI_LINEAR_CHECK_GATE", "1")
    with pytest.raises(ValueError, match=r"g must be a log decay in \[-inf, 0\]"):
        fn(q, k, v, g, beta)
    fn(q, k, v, g.clamp(max=0), beta)  # valid gates pass the check


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_chunk_16bit(dtype):
    B, T, H, K, V = 1, 80, 2, 32, 32
    inputs = make_inputs(B, T, H, K, V, seed=5, dtype=dtype)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    o, _, grads = run_with_grads(chunk_kda, inputs, do, None)
    ro, _, rgrads = reference(inputs, do, None)
    assert o.dtype == dtype
    assert all(g.dtype == x.dtype for g, x in zip(grads, inputs))
    assert_rel_close(o, ro, 3e-2, "o")
    assert_grads_close(grads, rgrads, rtol=3e-2)


def test_chunk_varlen_equals_separate_runs():
    lengths, H, K, V = [1, 50, 77], 2, 16, 16
    T = sum(lengths)
    N = len(lengths)
    inputs = make_inputs(1, T, H, K, V, seed=7, N=N)
    cu = torch.tensor([0, 1, 51, 128], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator().manual_seed(8)
    do = torch.randn(1, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(N, H, K, V, generator=gen).to(DEVICE)
    o, final, grads = run_with_grads(chunk_kda, inputs, do, dht, cu_seqlens=cu)
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        piece = [x[:, bos:eos] for x in inputs[:5]] + [inputs[5][n : n + 1]]
        po, pfinal, pgrads = run_with_grads(chunk_kda, piece, do[:, bos:eos], dht[n : n + 1])
        torch.testing.assert_close(o[:, bos:eos], po, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[n : n + 1], pfinal, atol=1e-5, rtol=1e-5)
        for name, a, b in zip(NAMES[:5], grads[:5], pgrads[:5]):
            torch.testing.assert_close(
                a[:, bos:eos], b, atol=1e-5, rtol=1e-5, msg=f"d{name}, sequence {n}"
            )
        torch.testing.assert_close(grads[5][n : n + 1], pgrads[5], atol=1e-5, rtol=1e-5)
    # and the packed run agrees with the reference sequence by sequence
    ro, rfinal = naive_recurrent_kda(
        *[x[:, 51:128].double() for x in inputs[:5]],
        initial_state=inputs[5][2:3].double(),
        output_final_state=True,
    )
    assert_rel_close(o[:, 51:128], ro, 1e-4, "o (sequence 2)")
    assert_rel_close(final[2:3], rfinal, 1e-4, "final state (sequence 2)")


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    lengths=st.lists(st.integers(0, 90), min_size=1, max_size=3),
    dims=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
)
def test_chunk_varlen_property(lengths, dims):
    """Any packing (empty sequences included) equals the reference run sequence by sequence."""
    K, V = dims
    T, H, N = sum(lengths), 1, len(lengths)
    inputs = make_inputs(1, T, H, K, V, seed=T, N=N)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    cu = torch.tensor(offsets, device=DEVICE)
    o, final = chunk_kda(
        *inputs[:5], initial_state=inputs[5], output_final_state=True, cu_seqlens=cu
    )
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        ro, rfinal = naive_recurrent_kda(
            *[x[:, bos:eos].double() for x in inputs[:5]],
            initial_state=inputs[5][n : n + 1].double(),
            output_final_state=True,
        )
        torch.testing.assert_close(o[:, bos:eos].double(), ro, atol=1e-4, rtol=0)
        torch.testing.assert_close(final[n : n + 1].double(), rfinal, atol=1e-4, rtol=0)


def test_chunk_leaves_inputs_untouched_and_takes_strided_inputs():
    B, T, H, K, V = 1, 40, 2, 16, 16
    inputs = make_inputs(B, T, H, K, V, seed=9)
    copies = [x.clone() for x in inputs]
    o, final = chunk_kda(*inputs[:5], initial_state=inputs[5], output_final_state=True)
    for name, a, b in zip(NAMES, inputs, copies):
        assert torch.equal(a, b), f"{name} was modified"
    # the same values through non-contiguous views ([B, H, T, D] transposed back)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs[:4]]
    views.append(inputs[4].transpose(1, 2).contiguous().transpose(1, 2))
    assert not views[0].is_contiguous()
    o2, final2 = chunk_kda(*views, initial_state=inputs[5], output_final_state=True)
    torch.testing.assert_close(o2, o, atol=0, rtol=0)
    torch.testing.assert_close(final2, final, atol=0, rtol=0)


def test_fused_recurrent_matches_chunk_and_fla():
    B, T, H, K, V = 2, 19, 2, 16, 32
    q, k, v, g, beta, h0 = make_inputs(B, T, H, K, V, seed=11)
    o, final = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    co, cfinal = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    torch.testing.assert_close(o, co, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, cfinal, atol=1e-5, rtol=1e-5)
    ro, rfinal = naive_recurrent_kda(
        q.double(),
        k.double(),
        v.double(),
        g.double(),
        beta.double(),
        initial_state=h0.double(),
        output_final_state=True,
    )
    assert_rel_close(o, ro, 1e-5, "o")
    import fla.ops.kda as fla_kda  # a dependency: a broken install fails here

    # fla's kernels may modify their inputs: give them copies
    fo, ffinal = fla_kda.fused_recurrent_kda(
        q.clone(),
        k.clone(),
        v.clone(),
        g.clone(),
        beta.clone(),
        initial_state=h0.clone(),
        output_final_state=True,
    )
    torch.testing.assert_close(o, fo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, ffinal, atol=1e-5, rtol=1e-5)


def test_fused_recurrent_inplace_state_and_varlen():
    H, K, V = 2, 16, 16
    lengths = [1, 5, 3]
    cu = torch.tensor([0, 1, 6, 9], dtype=torch.int64, device=DEVICE)
    q, k, v, g, beta, h0 = make_inputs(1, sum(lengths), H, K, V, seed=12, N=3)
    expected_o, expected_final = chunk_kda(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu
    )
    state = h0.clone()
    ptr = state.data_ptr()
    o, final = fused_recurrent_kda(
        q, k, v, g, beta, initial_state=state, cu_seqlens=cu, inplace_state=True
    )
    assert final is state and state.data_ptr() == ptr
    torch.testing.assert_close(state, expected_final, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o, expected_o, atol=1e-5, rtol=1e-5)
    # decode: two single-token steps on a dense batch update the same tensor
    q, k, v, g, beta, h0 = make_inputs(2, 2, H, K, V, seed=13)
    _, ref_final = naive_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    state = h0.clone()
    for t in range(2):
        fused_recurrent_kda(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            g[:, t : t + 1],
            beta[:, t : t + 1],
            initial_state=state,
            inplace_state=True,
        )
    torch.testing.assert_close(state, ref_final, atol=1e-5, rtol=1e-5)


def test_fused_recurrent_is_forward_only():
    q, k, v, g, beta, h0 = make_inputs(1, 3, 1, 16, 16, seed=14)
    q = q.clone().requires_grad_()
    o, _ = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0)
    with pytest.raises(RuntimeError, match="forward-only"):
        o.sum().backward()
    with pytest.raises(ValueError, match="initial_state requires grad"):
        fused_recurrent_kda(q, k, v, g, beta, initial_state=h0.clone().requires_grad_())


def _bad_input_cases():
    q, k, v, g, beta, h0 = make_inputs(1, 8, 2, 16, 16, seed=15)
    base = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)
    big = make_inputs(1, 2, 1, 512, 16, h0=False)
    cases = {
        "k-shape": (dict(base, k=k[..., :8]), "k must have the shape of q"),
        "v-shape": (dict(base, v=v[:, :4]), "v must be"),
        "beta-shape": (dict(base, beta=beta[..., None]), "beta must be"),
        "float64": (
            dict(base, q=q.double(), k=k.double(), v=v.double()),
            "q must have a floating dtype",
        ),
        "dtype-mismatch": (dict(base, v=v.half()), "v must have the dtype of q"),
        "device-mismatch": (dict(base, g=torch.empty(g.shape, device="meta")), "g is on meta"),
        "K-too-large": (dict(zip(NAMES, big)), "exceeds the kernels' maximum 256"),
        "state-shape": (dict(base, initial_state=h0[:, :1]), "initial_state must be"),
        "cu-start": (
            dict(base, initial_state=None, cu_seqlens=torch.tensor([1, 8])),
            "must start at 0",
        ),
        "cu-end": (dict(base, initial_state=None, cu_seqlens=torch.tensor([0, 5])), "end at T=8"),
        "cu-order": (
            dict(base, initial_state=None, cu_seqlens=torch.tensor([0, 6, 3, 8])),
            "non-decreasing",
        ),
        "cu-dtype": (
            dict(base, initial_state=None, cu_seqlens=torch.tensor([0.0, 8.0])),
            "torch.int32 or torch.int64",
        ),
        "cu-batch": (
            dict(
                base,
                **{n: torch.cat([x, x]) for n, x in zip(NAMES[:5], (q, k, v, g, beta))},
                initial_state=None,
                cu_seqlens=torch.tensor([0, 8]),
            ),
            "B == 1",
        ),
    }
    return {name: (kwargs, msg) for name, (kwargs, msg) in cases.items()}


BAD = _bad_input_cases()


@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda], ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise(fn, case):
    kwargs, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        fn(**kwargs)


def test_inplace_state_needs_fp32_contiguous_state():
    q, k, v, g, beta, h0 = make_inputs(1, 2, 2, 16, 16, seed=16)
    with pytest.raises(ValueError, match="needs an initial_state"):
        fused_recurrent_kda(q, k, v, g, beta, inplace_state=True)
    with pytest.raises(ValueError, match="contiguous float32"):
        fused_recurrent_kda(q, k, v, g, beta, initial_state=h0.half(), inplace_state=True)
    with pytest.raises(ValueError, match="contiguous float32"):
        fused_recurrent_kda(q, k, v, g, beta, initial_state=h0.transpose(2, 3), inplace_state=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU guard only applies without CUDA")
@pytest.mark.parametrize("fn", [chunk_kda, fused_recurrent_kda], ids=["chunk", "fused_recurrent"])
def test_cpu_without_interpreter_is_refused(fn, monkeypatch):
    q, k, v, g, beta, _ = make_inputs(1, 4, 1, 16, 16, h0=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="torch backend"):
        fn(q, k, v, g, beta)


def test_benchmark_quick_runs(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.kernel_speed",
            "--quick",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.rglob("kernels.*"))
    assert {"kernels.json", "kernels.md"} <= set(files), files


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["--dtype", "bf16", "--head-dim", "128"],
        ["--dtype", "fp32", "--head-dim", "64", "--value-dim", "32", "--arch", "80"],
    ],
    ids=["sm90-bf16-128", "sm80-fp32-64x32"],
)
def test_kernels_compile_for_gpu_without_one(args):
    """Triton's ahead-of-time compiler catches GPU-only errors the interpreter cannot see."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "kimi_linear.kernels.compile_check", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| _")]
    # every kernel of kernel_specs, the SAFE_GATE variants as extra rows
    assert len(rows) >= 12 and all("| yes |" in row for row in rows), proc.stdout


def test_chunk_keeps_intermediates_only_when_gradients_will_flow(monkeypatch):
    """The forward keeps G, Aqk and N for the backward only with grad mode on and an input that
    requires grad; under no_grad / inference it keeps nothing beyond the output."""
    import kimi_linear.kernels.chunk as chunk_mod

    calls = []
    real = chunk_mod.chunk_kda_fwd

    def spy(*args, keep=False, **kwargs):
        calls.append(keep)
        return real(*args, keep=keep, **kwargs)

    monkeypatch.setattr(chunk_mod, "chunk_kda_fwd", spy)
    q, k, v, g, beta, h0 = make_inputs(1, 70, 1, 16, 16, seed=9)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    with torch.no_grad():
        o_nograd, _ = chunk_kda(*leaves)
    with torch.inference_mode():
        chunk_kda(*leaves)
    chunk_kda(q, k, v, g, beta)  # grad mode on, nothing requires grad
    o, _ = chunk_kda(*leaves)
    assert calls == [False, False, False, True]
    assert o_nograd.grad_fn is None and o.grad_fn is not None
    node = o.grad_fn
    while "ChunkKDA" not in type(node).__name__:
        node = node.next_functions[0][0]
    assert len([t for t in node.saved_tensors if t is not None]) == 5 + 3  # inputs + G, Aqk, N
    torch.testing.assert_close(o, o_nograd)  # the same output either way
    o.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)


def test_tune_bucket_is_coarse_and_checked():
    from kimi_linear.kernels.utils import tune_bucket, tune_buckets

    sizes = (0, 1, 3, 4, 15, 16, 4096, 8191, 16383, 16384)
    assert [tune_bucket(n) for n in sizes] == [1, 1, 1, 4, 4, 16, 4096, 4096, 4096, 16384]
    assert tune_buckets(8192 * 4, 32 * 4) == {"T_BUCKET": 16384, "NH_BUCKET": 64}
    with pytest.raises(TypeError, match="n must be an int"):
        tune_bucket(4.0)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_kernels_gva_match_torch_op(varlen):
    """GVA (q, k on H heads; v, g, beta, states on HV = 2H): chunk_kda (with gradients) and
    fused_recurrent_kda against the torch op's own GVA (float64 naive_recurrent_kda, q and k
    not repeated), fp32 within 1e-4."""
    H, G, K, V, T = 1, 2, 16, 16, 21
    B, N = (1, 3) if varlen else (2, None)
    q, k, v, g, beta, h0 = make_inputs(B, T, H * G, K, V, seed=7, N=N)
    q, k = q[:, :, :H].contiguous(), k[:, :, :H].contiguous()
    kwargs = {"cu_seqlens": torch.tensor([0, 4, 15, 21], device=DEVICE)} if varlen else {}
    inputs = [q, k, v, g, beta, h0]
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H * G, V, generator=gen).to(DEVICE)
    dht = torch.randn(*h0.shape, generator=gen).to(DEVICE)
    o, final, grads = run_with_grads(chunk_kda, inputs, do, dht, **kwargs)
    ro, rfinal, rgrads = run_with_grads(
        naive_recurrent_kda, [x.double() for x in inputs], do, dht, **kwargs
    )
    assert o.shape == v.shape and final.shape == h0.shape and grads[0].shape == q.shape
    assert_rel_close(o, ro, 1e-4, "o")
    assert_rel_close(final, rfinal, 1e-4, "final state")
    assert_grads_close(grads, rgrads, rtol=1e-4)
    fo, ffinal = fused_recurrent_kda(
        q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs
    )
    assert_rel_close(fo, ro, 1e-4, "fused_recurrent o")
    assert_rel_close(ffinal, rfinal, 1e-4, "fused_recurrent final state")
