"""GPU checks of the Triton KDA kernels at realistic shapes (skipped without CUDA).

Every output and gradient is compared tensor by tensor with the float64 token-by-token reference by
the norm-based relative error of :mod:`kimi_linear.testing` (``||a - b|| / ||b||``: a dropped term
fails however small its entries, unlike an error normalised by the largest entry), for fp32 and bf16
inputs; with the loss on the outputs only, on the final state only and on both (a random final-state
gradient makes the last tokens dominate every gradient); with short tail chunks (T not a multiple of
64) and weak decay (g near 0), where terms on a chunk's last row do not vanish; and packed (varlen)
batches compared sequence by sequence with the reference (besides the kernel's own per-sequence
runs). fla's ``chunk_kda`` / ``fused_recurrent_kda`` are compared on the same inputs (fla gets
copies: some versions modify ``g`` and ``v``).

Tolerances (norm-relative): fp32 1e-3 (exact fp32 products; long sequences accumulate
rounding); bf16 2e-2 against float64 (rounding the bf16 outputs and gradients alone gives
~5e-3; fla's own tests allow 5e-3 to 2e-2) and 3e-2 against fla (two bf16 rounding paths).
The dropped terms these checks exist for give errors from 3e-2 to above 1 (measured on CPU,
small sizes). The same checks run on CPU under the interpreter (``test_kernels_grads.py``,
``test_kernels_varlen.py``), and ``tests/mutants.py`` plants such bugs to show they fail.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kimi_linear.kernels import chunk_kda, fused_recurrent_kda

from kimi_linear.ops import naive_recurrent_kda
from kimi_linear.testing import assert_kda_close, kda_inputs, kda_reference, kda_run

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
RTOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
RTOL_FLA = 3e-2
STRONG, WEAK, EXTREME = (-1.0, 0.0), (-1e-3, 0.0), (-20.0, 0.0)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _loss_grads(shape_o, shape_ht, loss, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(*shape_o, generator=gen).to(DEVICE, dtype) if "o" in loss else None
    dht = torch.randn(*shape_ht, generator=gen).to(DEVICE) if "ht" in loss else None
    return do, dht


def check_dense(B, T, H, K, V, dtype, gate, loss, seed=0):
    """Dense batch, every output and gradient against float64 (norm-relative)."""
    xs = kda_inputs(B, T, H, K, V, dtype=dtype, gate=gate, seed=seed, device=DEVICE)
    do, dht = _loss_grads((B, T, H, V), (B, H, K, V), loss, dtype)
    got = kda_run(chunk_kda, xs, do, dht)
    ref = kda_run(naive_recurrent_kda, [x.double() for x in xs], do, dht)
    assert got[0].dtype == dtype and all(g.dtype == x.dtype for g, x in zip(got[2:], xs))
    return assert_kda_close(got, ref, RTOL[dtype])


def check_packed(lengths, H, K, V, dtype, loss, seed=3):
    """Packed batch, every sequence's outputs and gradients against float64 on their own."""
    offsets = [0, *itertools.accumulate(lengths)]
    T, N = offsets[-1], len(lengths)
    xs = kda_inputs(1, T, H, K, V, dtype=dtype, N=N, seed=seed, device=DEVICE)
    do, dht = _loss_grads((1, T, H, V), (N, H, K, V), loss, dtype)
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    got = kda_run(chunk_kda, xs, do, dht, cu_seqlens=cu)
    ref = kda_reference(xs, do, dht, offsets)
    return assert_kda_close(got, ref, RTOL[dtype], offsets=offsets)


# (T, gate, loss): 1027 = 16 chunks + a 3-token tail; WEAK: g near 0, nothing decays away.
DENSE_CASES = [
    (100, STRONG, "o+ht"),
    (1027, STRONG, "o"),
    (1027, STRONG, "ht"),
    (1027, STRONG, "o+ht"),
    (259, WEAK, "o"),
    (259, WEAK, "o+ht"),
]


@DTYPES
@pytest.mark.parametrize(
    "T,gate,loss",
    DENSE_CASES,
    ids=[f"T{T}-{'weak' if gate == WEAK else 'decay'}-{loss}" for T, gate, loss in DENSE_CASES],
)
def test_against_fp64_reference(dtype, T, gate, loss):
    check_dense(2, T, 4, 128, 128, dtype, gate, loss, seed=T)


@pytest.mark.parametrize("loss", ["o", "o+ht"])
def test_strong_decay_k_ne_v_fp32(loss):
    check_dense(1, 777, 2, 64, 128, torch.float32, EXTREME, loss, seed=2)


@DTYPES
@pytest.mark.parametrize("loss", ["o", "o+ht"])
def test_varlen_against_fp64_reference(dtype, loss):
    check_packed([1, 130, 0, 63, 64, 65, 1000, 3], 4, 128, 128, dtype, loss)


def test_varlen_equals_separate_runs_bf16():
    lengths, H, K, V = [1, 63, 64, 65, 1000, 3], 4, 128, 128
    offsets = [0, *itertools.accumulate(lengths)]
    T, N = offsets[-1], len(lengths)
    xs = kda_inputs(1, T, H, K, V, dtype=torch.bfloat16, N=N, seed=3, device=DEVICE)
    do, dht = _loss_grads((1, T, H, V), (N, H, K, V), "o+ht", torch.bfloat16)
    cu = torch.tensor(offsets, device=DEVICE, dtype=torch.int32)
    packed = kda_run(chunk_kda, xs, do, dht, cu_seqlens=cu)
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        piece = [x[:, bos:eos] for x in xs[:5]] + [xs[5][n : n + 1]]
        alone = kda_run(chunk_kda, piece, do[:, bos:eos], dht[n : n + 1])
        got = [packed[0][:, bos:eos], packed[1][n : n + 1]] + [t[:, bos:eos] for t in packed[2:7]]
        got.append(packed[7][n : n + 1])
        assert_kda_close(got, alone, 1e-2)


@pytest.mark.parametrize("T", [1000, 8192])
def test_against_fla_chunk_bf16(T):
    import fla.ops.kda as fla_kda  # a dependency: a broken install fails here

    B, H, K, V = 1, 8, 128, 128
    xs = kda_inputs(B, T, H, K, V, dtype=torch.bfloat16, seed=1, device=DEVICE)
    do, dht = _loss_grads((B, T, H, V), (B, H, K, V), "o+ht", torch.bfloat16)
    ours = kda_run(chunk_kda, xs, do, dht)
    theirs = kda_run(fla_kda.chunk_kda, xs, do, dht)
    assert_kda_close(ours, theirs, RTOL_FLA)


def test_fused_recurrent_against_fla_and_inplace():
    import fla.ops.kda as fla_kda  # a dependency: a broken install fails here

    B, T, H, K, V = 16, 1, 32, 128, 128
    q, k, v, g, beta, h0 = kda_inputs(B, T, H, K, V, dtype=torch.bfloat16, seed=4, device=DEVICE)
    state = h0.clone()
    with torch.no_grad():
        o, final = fused_recurrent_kda(q, k, v, g, beta, initial_state=state, inplace_state=True)
        fo, ffinal = fla_kda.fused_recurrent_kda(
            q, k, v, g, beta, initial_state=h0.clone(), output_final_state=True
        )
    assert final is state
    assert_kda_close([o, final], [fo, ffinal], 1e-2)
