"""Gradients of the Triton chunk kernel against the float64 reference, tensor by tensor.

Each gradient (q, k, v, g, beta, initial state) must be within a norm-based relative error of the
float64 token-by-token reference (``kimi_linear.testing.assert_rel_close``: an error normalised by
the tensor's own norm, not by its largest entry nor by another tensor's scale), for losses on the
outputs only, on the final state only, and on both; with short tail chunks (T not a multiple of 64:
terms on the chunk's last row that vanish for full chunks under decay) and a weak-decay case (g near
0: nothing decays away). A dropped term in any gradient fails here. The same checks run at realistic
shapes on a GPU in ``test_kernels_gpu.py``; these run under the Triton interpreter on CPU at small
sizes, so CI proves the checks can fail.
"""

from __future__ import annotations

import pytest
import torch
from kimi_linear.kernels import chunk_kda

from kimi_linear.ops import naive_recurrent_kda
from kimi_linear.testing import assert_kda_close, kda_inputs, kda_run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Norm-relative tolerances against float64: fp32 inputs agree to ~1e-6; 16-bit inputs
#: (16-bit operands, outputs and gradients) to ~5e-3 (bf16) and less (fp16).
RTOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

STRONG, WEAK = (-1.0, 0.0), (-1e-3, 0.0)
# (B, T, H, K, V, gate, loss): loss on the outputs ("o"), the final state ("ht") or both.
CASES = [
    (1, 67, 2, 16, 32, STRONG, "o"),  # one chunk + a 3-token tail chunk
    (1, 67, 2, 16, 32, STRONG, "o+ht"),
    (1, 67, 1, 32, 16, STRONG, "ht"),
    (2, 133, 1, 16, 16, STRONG, "o"),  # two chunks + a 5-token tail
    (1, 67, 2, 16, 32, WEAK, "o"),
    (1, 130, 1, 16, 16, WEAK, "o+ht"),
    (1, 64, 1, 32, 32, WEAK, "ht"),  # exact chunk, nothing decays: all state terms count
]


def _case_id(case):
    B, T, H, K, V, gate, loss = case
    return f"B{B}-T{T}-H{H}-K{K}-V{V}-{'weak' if gate == WEAK else 'decay'}-{loss}"


def _loss_grads(B, T, H, K, V, loss, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE, dtype) if "o" in loss else None
    dht = torch.randn(B, H, K, V, generator=gen).to(DEVICE) if "ht" in loss else None
    return do, dht


def _reference(inputs, do, dht):
    return kda_run(naive_recurrent_kda, [x.double() for x in inputs], do, dht)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_gradients_match_reference_per_tensor(case):
    B, T, H, K, V, gate, loss = case
    inputs = kda_inputs(B, T, H, K, V, gate=gate, seed=T + K, device=DEVICE)
    do, dht = _loss_grads(B, T, H, K, V, loss, torch.float32)
    got = kda_run(chunk_kda, inputs, do, dht)
    ref = _reference(inputs, do, dht)
    assert_kda_close(got, ref, RTOL[torch.float32])


@pytest.mark.parametrize("loss", ["o", "o+ht"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gradients_16bit_short_tail(dtype, loss):
    B, T, H, K, V = 1, 67, 2, 32, 32
    inputs = kda_inputs(B, T, H, K, V, dtype=dtype, seed=8, device=DEVICE)
    do, dht = _loss_grads(B, T, H, K, V, loss, dtype)
    got = kda_run(chunk_kda, inputs, do, dht)
    ref = _reference(inputs, do, dht)
    assert got[0].dtype == dtype
    assert all(g.dtype == x.dtype for g, x in zip(got[2:], inputs))
    assert_kda_close(got, ref, RTOL[dtype])
