"""In-device sequence splitting of the chunk kernels (``kimi_linear.kernels.split``).

The split runs (transitions, fold, states; reverse in the backward) are held to the float64
recurrence at the unsplit kernels' fp32 tolerance, dense and packed (empty, short, exact-chunk
and long sequences in one batch), with initial states and final-state gradients, multi-block
key dims, GVA and the in-kernel gate; the fold kernel is held to a torch loop; the plan, the
argument check and the automatic choice are checked on their own. Interpreter sizes.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kimi_linear.kernels import chunk_fwd, chunk_kda, split
from kimi_linear.kernels.split import (
    MIN_SEGMENT_CHUNKS,
    auto_segment_chunks,
    check_segment_chunks,
    fold_states,
    segment_plan,
)

from kimi_linear.testing import (
    assert_kda_close,
    assert_rel_close,
    kda_inputs,
    kda_reference,
    kda_run,
    rel_error,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: fp32: the unsplit kernels agree with float64 to ~3e-7 here; a segment started from a wrong
#: state, a transition missing a chunk or a wrong fold order is off by far more.
RTOL = 1e-4


@pytest.fixture
def fold_calls(monkeypatch):
    """Counts the fold launches (forward and reverse) of the chunk kernels."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("reverse", False))
        return split.fold_states(*args, **kwargs)

    monkeypatch.setattr(chunk_fwd, "fold_states", counted)
    from kimi_linear.kernels import chunk_bwd

    monkeypatch.setattr(chunk_bwd, "fold_states", counted)
    return calls


def _cotangents(B, T, H, K, V, N, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(N, H, K, V, generator=gen).to(DEVICE)
    return do, dht


@pytest.mark.parametrize(
    "T, H, K, V, segment_chunks",
    [
        (300, 2, 32, 16, 1),  # 5 segments, the last one short
        (256, 1, 80, 24, 2),  # two key blocks (BK = 128 > 64), V not a power of 2
        (200, 1, 16, 40, 3),  # one full and one short segment; V over two value blocks
    ],
)
def test_split_matches_reference(T, H, K, V, segment_chunks, fold_calls):
    B = 2
    # weak decay: states (and the initial state) still matter segments later
    inputs = kda_inputs(B, T, H, K, V, seed=T + K, gate=(-0.2, 0.0), device=DEVICE)
    do, dht = _cotangents(B, T, H, K, V, B)
    got = kda_run(chunk_kda, inputs, do, dht, segment_chunks=segment_chunks)
    assert fold_calls == [False, False, True]  # forward; backward: recompute, reverse
    assert_kda_close(got, kda_reference(inputs, do, dht), RTOL)


def test_split_varlen_matches_reference(fold_calls):
    """Packed: an empty sequence, a 1-token one, one exact chunk, one of 3 segments with a
    short tail, and one just past a segment: each equals its own float64 run."""
    lengths, H, K, V = (0, 1, 64, 300, 129), 2, 32, 16
    offsets = [0, *itertools.accumulate(lengths)]
    T, N = offsets[-1], len(lengths)
    inputs = kda_inputs(1, T, H, K, V, N=N, seed=7, gate=(-0.2, 0.0), device=DEVICE)
    do, dht = _cotangents(1, T, H, K, V, N)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    got = kda_run(chunk_kda, inputs, do, dht, cu_seqlens=cu, segment_chunks=2)
    assert fold_calls == [False, False, True]
    assert_kda_close(got, kda_reference(inputs, do, dht, offsets), RTOL, offsets=offsets)


def test_split_equals_unsplit_gva_in_kernel_gate():
    """GVA (2 value heads per key head) with the softplus gate in the kernel: the split run
    gives the unsplit run's outputs and gradients (A_log, dt_bias included) to rounding."""
    B, T, H, HV, K, V = 1, 200, 1, 2, 16, 16
    gen = torch.Generator().manual_seed(3)
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen)
    g = torch.randn(B, T, HV, K, generator=gen) - 2.0
    beta = torch.rand(B, T, HV, generator=gen)
    A_log = torch.randn(HV, generator=gen) * 0.1 - 1.0
    dt_bias = torch.randn(HV * K, generator=gen) * 0.1
    h0 = torch.randn(B, HV, K, V, generator=gen)
    do = torch.randn(B, T, HV, V, generator=gen)
    leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, g, beta, A_log, dt_bias, h0)]

    def run(segment_chunks):
        for x in leaves:
            x.grad = None
        qq, kk, vv, gg, bb, a, bias, s0 = leaves
        o, ht = chunk_kda(
            qq, kk, vv, gg, bb, initial_state=s0, output_final_state=True,
            use_gate_in_kernel=True, A_log=a, dt_bias=bias, segment_chunks=segment_chunks,
        )  # fmt: skip
        (o * do.to(DEVICE)).sum().add_((ht**2).sum()).backward()
        return [o.detach(), ht.detach(), *(x.grad.clone() for x in leaves)]

    base, got = run(0), run(1)
    names = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dA_log", "ddt_bias", "dh0")
    for name, a, b in zip(names, got, base):
        assert_rel_close(a, b, 1e-5, name=name)


def test_split_intermediate_states_and_bf16():
    """``return_intermediate_states`` gives the unsplit chunk-start states (fp32 to rounding);
    bf16 split runs stay within the kernels' bf16 tolerance of float64."""
    B, T, H, K, V = 1, 256, 2, 32, 32
    inputs = kda_inputs(B, T, H, K, V, seed=11, gate=(-0.2, 0.0), device=DEVICE)
    q, k, v, g, beta, h0 = inputs
    with torch.inference_mode():
        _, ht0, h_base = chunk_kda(
            q, k, v, g, beta, initial_state=h0, output_final_state=True,
            return_intermediate_states=True, segment_chunks=0,
        )  # fmt: skip
        _, ht1, h_split = chunk_kda(
            q, k, v, g, beta, initial_state=h0, output_final_state=True,
            return_intermediate_states=True, segment_chunks=1,
        )  # fmt: skip
    assert_rel_close(h_split, h_base, 1e-5, name="h")
    assert_rel_close(ht1, ht0, 1e-5, name="final_state")
    half = kda_inputs(B, T, H, K, V, seed=11, gate=(-0.2, 0.0), dtype=torch.bfloat16, device=DEVICE)
    do, dht = _cotangents(B, T, H, K, V, B)
    do = do.to(torch.bfloat16)
    got = kda_run(chunk_kda, half, do, dht, segment_chunks=1)
    base = kda_run(chunk_kda, half, do, dht, segment_chunks=0)
    ref = kda_reference(half, do, dht)
    for name, a, b, r in zip(("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"), got, base, ref):
        # the split's bf16 error is of the unsplit run's size
        assert rel_error(a, r) <= 2 * rel_error(b, r) + 1e-3, name


@pytest.mark.parametrize("reverse", [False, True])
def test_fold_kernel_matches_torch_loop(reverse):
    """The fold, forward (``s = M s + A``) and reverse (``s = M^T s + A``, last segment first),
    against a float64 loop; per sequence of 3, 1 and 2 segments."""
    gen = torch.Generator().manual_seed(0)
    H, K, V = 2, 40, 24
    plan = segment_plan((0, 192, 200, 328), 1, torch.device(DEVICE))
    NS, N = plan.num_segments, 3
    assert NS == 6
    HM = torch.randn(NS, H, K, V + K, generator=gen) / K**0.5
    A = HM[..., :V] if not reverse else torch.randn(NS, H, K, V, generator=gen)
    s0 = torch.randn(N, H, K, V, generator=gen)
    entry, final = fold_states(
        HM[..., V:].to(DEVICE), A.to(DEVICE), s0.to(DEVICE), plan, N, True, reverse
    )
    segs = plan.seq_segments.tolist()
    for n in range(N):
        s = s0[n].double()
        order = range(segs[n], segs[n + 1])
        for j in reversed(order) if reverse else order:
            assert_rel_close(entry[j].cpu(), s, 1e-6, name=f"entry[{j}]")
            M = HM[j, :, :, V:].double()
            s = (M.transpose(-1, -2) if reverse else M) @ s + A[j].double()
        assert_rel_close(final[n].cpu(), s, 1e-6, name=f"final[{n}]")


def test_segment_plan():
    dev = torch.device("cpu")
    plan = segment_plan((0, 0, 300, 364), 2, dev)
    # the empty sequence keeps one empty segment; 300 tokens -> 128 + 128 + 44; 64 -> one
    assert plan.cu_seqlens.tolist() == [0, 0, 128, 256, 300, 364]
    assert plan.chunk_offsets.tolist() == [0, 0, 2, 4, 5, 6]
    assert plan.seq_segments.tolist() == [0, 1, 4, 5]
    assert (plan.num_segments, plan.max_segments, plan.segment_chunks) == (5, 3, 2)
    assert segment_plan((0, 128, 256), 2, dev) is None  # nothing longer than a segment
    assert segment_plan((0, 300), 0, dev) is None


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_segment_chunks_argument_errors(bad):
    with pytest.raises(ValueError, match="segment_chunks"):
        check_segment_chunks(bad)
    q = torch.zeros(1, 64, 1, 16)
    with pytest.raises(ValueError, match="segment_chunks"):
        chunk_kda(q, q, q, q, q[..., 0], segment_chunks=bad)


def test_auto_segment_chunks(monkeypatch):
    assert auto_segment_chunks(1, 10_000, 128, "cpu") == 0  # never on the CPU
    monkeypatch.setattr(split, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    # B=1 H=16 T=64K, V=128: 64 programs on 132 SMs -> ceil(264 / 64) = 5 segments of 205
    assert auto_segment_chunks(16, 1024, 128, cuda) == 205
    # B=2 H=64: 512 programs fill the SMs; B=1 H=32 T=1M: 128 programs, more than half the
    # SMs (the cost model finds no gain there below 1.3 us per step); short sequences never
    assert auto_segment_chunks(128, 128, 128, cuda) == 0
    assert auto_segment_chunks(32, 16384, 128, cuda) == 0
    assert auto_segment_chunks(16, 16384, 128, cuda) == -(-16384 // 5)
    assert auto_segment_chunks(1, 2 * MIN_SEGMENT_CHUNKS - 1, 128, cuda) == 0
    # one program: the chain 2C/S + S is shortest near S = sqrt(2C) (C = 2048: S = 64)
    assert auto_segment_chunks(1, 2048, 16, cuda) == 32
    # segments keep MIN_SEGMENT_CHUNKS chunks: 128 chunks -> 8 segments of 16 (chain 40)
    assert auto_segment_chunks(1, 128, 16, cuda) == 16
    # a split that does not halve the chain is not made: 2 segments of 20 (chain 42 vs 40),
    # or B=2 H=8 T=2K (2 segments of 16)
    assert auto_segment_chunks(1, 40, 16, cuda) == 0
    assert auto_segment_chunks(16, 32, 128, cuda) == 0


def test_plan_for_env_and_packed_batches(monkeypatch):
    monkeypatch.setattr(split, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(split, "segment_plan", lambda offsets, n, device: n)  # the choice
    long = (0, 65536)
    assert split.plan_for(long, 16, 128, cuda, None) == 205
    assert split.plan_for(long, 16, 128, cuda, 7) == 7  # the argument wins
    # many short sequences and one long one: the long one alone bounds the chain
    packed = (0, *range(64, 64 * 200, 64), 64 * 200 + 65536)
    assert split.plan_for(packed, 16, 128, cuda, None) == 205
    monkeypatch.setenv(split.SEGMENT_CHUNKS_ENV, "0")
    assert split.plan_for(long, 16, 128, cuda, None) == 0
    assert split.plan_for(long, 16, 128, cuda, 3) == 3
    monkeypatch.setenv(split.SEGMENT_CHUNKS_ENV, "12")
    assert split.plan_for(long, 16, 128, cuda, None) == 12
    monkeypatch.setenv(split.SEGMENT_CHUNKS_ENV, "auto")
    assert split.plan_for(long, 16, 128, cuda, None) == 205
    monkeypatch.setenv(split.SEGMENT_CHUNKS_ENV, "-2")
    with pytest.raises(ValueError, match=split.SEGMENT_CHUNKS_ENV):
        split.plan_for(long, 16, 128, cuda, None)


def test_split_without_states():
    """No initial state and no final state: the folds start from zeros and keep nothing."""
    B, T, H, K, V = 1, 200, 1, 16, 16
    q, k, v, g, beta, _ = kda_inputs(B, T, H, K, V, seed=4, gate=(-0.2, 0.0), device=DEVICE)
    do = torch.randn(B, T, H, V, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]

    def run(segment_chunks):
        for x in leaves:
            x.grad = None
        o, ht = chunk_kda(*leaves, segment_chunks=segment_chunks)
        assert ht is None
        (o * do).sum().backward()
        return [o.detach(), *(x.grad.clone() for x in leaves)]

    for name, a, b in zip(("o", "dq", "dk", "dv", "dg", "dbeta"), run(1), run(0)):
        assert_rel_close(a, b, 1e-5, name=name)
