"""Packed (varlen) batches of the Triton chunk kernel against the float64 reference, per sequence.

Earlier sequences span several 64-token chunks (and later ones start mid-way through the chunk
tables), so the per-sequence chunk offsets into the stored chunk states are exercised: giving every
sequence the first sequence's chunk count, for instance, makes some sequence read another's states.
Every sequence's output, final state and every gradient (q, k, v, g, beta, initial state) is
compared on its own with the float64 token-by-token reference
(``kimi_linear.ops.naive_recurrent_kda``) by the norm-based relative error of
:mod:`kimi_linear.testing`, with and without a gradient on the final states. Runs under the Triton
interpreter on CPU (small heads).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from kimi_linear.kernels import chunk_kda

from kimi_linear.testing import assert_kda_close, kda_inputs, kda_reference, kda_run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: fp32 inputs: the kernels agree with float64 to ~1e-6 (norm-relative); a dropped term or a
#: sequence reading another's state is off by far more than this.
RTOL = 1e-4

# (sequence lengths, H, K, V): a 1-token sequence before a 3-chunk one, an empty one, an exact
# chunk, one chunk + 1, a short one; then a 3-chunk sequence first. (With wrong chunk offsets
# the first packing reads other sequences' states; the second also writes past the end of the
# state buffer, which can crash the interpreter: it runs last.)
PACKINGS = [
    ((1, 130, 0, 64, 65, 7), 1, 32, 16),
    ((130, 1, 64, 65, 7), 2, 16, 32),
]


def _offsets(lengths):
    return [0, *itertools.accumulate(lengths)]


@pytest.mark.parametrize(
    "final_grad", [True, False], ids=["with-final-state-grad", "output-grad-only"]
)
@pytest.mark.parametrize("packing", PACKINGS, ids=lambda p: "-".join(map(str, p[0])))
def test_varlen_every_sequence_and_gradient_matches_reference(packing, final_grad):
    lengths, H, K, V = packing
    offsets = _offsets(lengths)
    T, N = offsets[-1], len(lengths)
    inputs = kda_inputs(1, T, H, K, V, N=N, seed=T + H, device=DEVICE)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(1, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(N, H, K, V, generator=gen).to(DEVICE) if final_grad else None
    cu = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    got = kda_run(chunk_kda, inputs, do, dht, cu_seqlens=cu)
    ref = kda_reference(inputs, do, dht, offsets)
    assert got[0].shape == (1, T, H, V)
    assert_kda_close(got, ref, RTOL, offsets=offsets)


def test_varlen_final_state_gradient_only():
    """Only the final states carry a gradient: every gradient flows through the state path."""
    lengths, H, K, V = (130, 1, 64, 65, 7), 1, 16, 16
    offsets = _offsets(lengths)
    T, N = offsets[-1], len(lengths)
    # weak decay: the initial states still matter at the end of the 130-token sequence
    inputs = kda_inputs(1, T, H, K, V, N=N, seed=5, gate=(-0.1, 0.0), device=DEVICE)
    dht = torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    cu = torch.tensor(offsets, dtype=torch.int64, device=DEVICE)
    got = kda_run(chunk_kda, inputs, None, dht, cu_seqlens=cu)
    ref = kda_reference(inputs, None, dht, offsets)
    assert_kda_close(got, ref, RTOL, offsets=offsets)


def test_varlen_equals_dense_batch():
    """Equal-length sequences packed with ``cu_seqlens`` give the dense batch's results."""
    B, T, H, K, V = 3, 70, 1, 16, 16
    dense = kda_inputs(B, T, H, K, V, seed=6, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE)
    dht = torch.randn(B, H, K, V, generator=gen).to(DEVICE)
    got = kda_run(chunk_kda, dense, do, dht)
    packed = [x.reshape(1, B * T, *x.shape[2:]) for x in dense[:5]] + [dense[5]]
    cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=DEVICE)
    pgot = kda_run(chunk_kda, packed, do.reshape(1, B * T, H, V), dht, cu_seqlens=cu)
    for name, a, b in zip(
        ("o", "dq", "dk", "dv", "dg", "dbeta"), [got[0], *got[2:7]], [pgot[0], *pgot[2:7]]
    ):
        torch.testing.assert_close(a.reshape(b.shape), b, atol=1e-6, rtol=1e-6, msg=name)
    torch.testing.assert_close(got[1], pgot[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[7], pgot[7], atol=1e-6, rtol=1e-6)
