"""GPU checks of the Triton KDA kernels at realistic shapes (skipped without CUDA).

Against the float64 token-by-token reference (fp32 and bf16 inputs) and against fla's
``chunk_kda`` / ``fused_recurrent_kda`` forward and backward on the same inputs (fla gets
copies: some versions modify ``g`` and ``v`` in place). Tolerances are relative to the largest
reference value of each tensor: fp32 2e-3 (TF32 is not used for fp32 inputs, but long sequences
accumulate rounding), bf16 2e-2 against fp64 and 5e-2 against fla (two different bf16/TF32
rounding paths).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kimi_linear.kernels import chunk_kda, fused_recurrent_kda

from kimi_linear.ops import kda_recurrent

pytestmark = pytest.mark.gpu


def inputs(B, T, H, K, V, dtype, seed=0, N=None, gate_low=-1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, device="cuda", generator=gen), dim=-1).to(dtype)
    k = F.normalize(torch.randn(B, T, H, K, device="cuda", generator=gen), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, device="cuda", generator=gen).to(dtype)
    g = gate_low * torch.rand(B, T, H, K, device="cuda", generator=gen)
    beta = torch.rand(B, T, H, device="cuda", generator=gen).to(dtype)
    h0 = torch.randn(B if N is None else N, H, K, V, device="cuda", generator=gen)
    return [q, k, v, g, beta, h0]


def fwd_bwd(fn, xs, do, dht, **kwargs):
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    o, ht = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kwargs)
    ((o.float() * do.float()).sum() + (ht.float() * dht).sum()).backward()
    return [o, ht] + [x.grad for x in leaves]


def assert_rel_close(outs, refs, rtol, names=("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0")):
    for name, a, b in zip(names, outs, refs):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = (a.double() - b.double()).abs().max().item()
        ref = b.double().abs().max().item()
        assert err <= rtol * ref + 1e-6, f"{name}: max err {err:.3e}, max |ref| {ref:.3e}"


@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float32, 2e-3), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"]
)
@pytest.mark.parametrize("T", [100, 1024])
def test_against_fp64_reference(dtype, rtol, T):
    B, H, K, V = 2, 4, 128, 128
    xs = inputs(B, T, H, K, V, dtype, seed=T)
    do = torch.randn(B, T, H, V, device="cuda").to(dtype)
    dht = torch.randn(B, H, K, V, device="cuda")
    ours = fwd_bwd(chunk_kda, xs, do, dht)
    ref = fwd_bwd(kda_recurrent, [x.double() for x in xs], do.double(), dht.double())
    assert_rel_close(ours, ref, rtol)


@pytest.mark.parametrize("T", [1000, 8192])
def test_against_fla_chunk_bf16(T):
    fla_kda = pytest.importorskip("fla.ops.kda")
    B, H, K, V = 1, 8, 128, 128
    xs = inputs(B, T, H, K, V, torch.bfloat16, seed=1)
    do = torch.randn(B, T, H, V, device="cuda").to(torch.bfloat16)
    dht = torch.randn(B, H, K, V, device="cuda")
    ours = fwd_bwd(chunk_kda, xs, do, dht)
    theirs = fwd_bwd(fla_kda.chunk_kda, xs, do, dht)
    assert_rel_close(ours, theirs, 5e-2)


def test_strong_decay_k_ne_v_fp32():
    B, T, H, K, V = 1, 777, 2, 64, 128
    xs = inputs(B, T, H, K, V, torch.float32, seed=2, gate_low=-20.0)
    do = torch.randn(B, T, H, V, device="cuda")
    dht = torch.randn(B, H, K, V, device="cuda")
    ours = fwd_bwd(chunk_kda, xs, do, dht)
    ref = fwd_bwd(kda_recurrent, [x.double() for x in xs], do.double(), dht.double())
    assert_rel_close(ours, ref, 2e-3)


def test_varlen_equals_separate_runs_bf16():
    lengths, H, K, V = [1, 63, 64, 65, 1000, 3], 4, 128, 128
    cu = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32
    )
    xs = inputs(1, sum(lengths), H, K, V, torch.bfloat16, seed=3, N=len(lengths))
    do = torch.randn(1, sum(lengths), H, V, device="cuda").to(torch.bfloat16)
    dht = torch.randn(len(lengths), H, K, V, device="cuda")
    packed = fwd_bwd(chunk_kda, xs, do, dht, cu_seqlens=cu)
    for n, (bos, eos) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        piece = [x[:, bos:eos] for x in xs[:5]] + [xs[5][n : n + 1]]
        alone = fwd_bwd(chunk_kda, piece, do[:, bos:eos], dht[n : n + 1])
        got = [packed[0][:, bos:eos], packed[1][n : n + 1]] + [t[:, bos:eos] for t in packed[2:7]]
        got.append(packed[7][n : n + 1])
        assert_rel_close(got, alone, 1e-2)


def test_fused_recurrent_against_fla_and_inplace():
    fla_kda = pytest.importorskip("fla.ops.kda")
    B, T, H, K, V = 16, 1, 32, 128, 128
    q, k, v, g, beta, h0 = inputs(B, T, H, K, V, torch.bfloat16, seed=4)
    state = h0.clone()
    with torch.no_grad():
        o, final = fused_recurrent_kda(q, k, v, g, beta, initial_state=state, inplace_state=True)
        fo, ffinal = fla_kda.fused_recurrent_kda(
            q, k, v, g, beta, initial_state=h0.clone(), output_final_state=True
        )
    assert final is state
    assert_rel_close([o, final], [fo, ffinal], 1e-2, names=("o", "ht"))
