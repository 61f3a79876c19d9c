"""Tensor-core operand precision of the Triton KDA kernels, checked on CPU under the interpreter.

On a GPU, bf16 / fp16 inputs feed bf16 / fp16 operands into the tensor-core products (fp32
accumulation; the within-chunk block inversion is exact fp32); the interpreter instead
multiplied the raw bit patterns of bf16 operands, truncated fp32 -> bf16 casts and ignores
TF32. ``kimi_linear.kernels.utils.patch_interpreter`` corrects the first two (always on under
the interpreter) and ``emulate_tf32`` rounds fp32 operands of TF32 products as a GPU does (our
kernels have none left; the switch stays on in the 16-bit test so that one added later is
seen), so these tests see the rounding error the GPU will have. Tolerance: per-tensor norm-relative error 1e-2 against the
float64 reference, where bf16 rounding gives 2e-3 to 5e-3 (the error of fla 0.6's bf16
kernels at the same shapes is 2e-3 to 3e-3 on the outputs, final states, dq and dv).
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from kimi_linear.kernels import chunk_kda
from kimi_linear.kernels.utils import emulate_tf32, interpret_mode

from kimi_linear.ops import naive_recurrent_kda
from kimi_linear.testing import assert_kda_close, kda_inputs, kda_run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
interpreter_only = pytest.mark.skipif(
    not interpret_mode(), reason="checks the CPU interpreter's numerics"
)


@triton.jit
def _dot_kernel(a, b, c, CAST: tl.constexpr, PREC: tl.constexpr):
    o = tl.arange(0, 16)
    x = tl.load(a + o[:, None] * 16 + o[None, :])
    y = tl.load(b + o[:, None] * 16 + o[None, :])
    if CAST:
        x, y = x.to(tl.bfloat16), y.to(tl.bfloat16)
    tl.store(c + o[:, None] * 16 + o[None, :], tl.dot(x, y, input_precision=PREC))


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 to TF32 (10-bit mantissa), nearest even."""
    bits = x.view(torch.int32).to(torch.int64)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.to(torch.int32).view(torch.float32)


@interpreter_only
@pytest.mark.parametrize("cast", [False, True], ids=["bf16-inputs", "cast-in-kernel"])
def test_interpreter_bf16_dot_multiplies_values(cast):
    """bf16 operands (loaded or cast from fp32 with round-to-nearest-even) multiply exactly."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    c = torch.empty(16, 16)
    args = (a, b) if cast else (a.bfloat16(), b.bfloat16())
    _dot_kernel[(1,)](*args, c, CAST=cast, PREC="ieee")
    want = a.bfloat16().double() @ b.bfloat16().double()
    torch.testing.assert_close(c.double(), want, atol=1e-5, rtol=0)


@interpreter_only
def test_emulate_tf32_rounds_tf32_operands_only():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 16, generator=gen), torch.randn(16, 16, generator=gen)
    c = torch.empty(16, 16)
    exact = a.double() @ b.double()
    rounded = _tf32(a).double() @ _tf32(b).double()
    assert (exact - rounded).abs().max() > 1e-3  # the two are distinguishable
    _dot_kernel[(1,)](a, b, c, CAST=False, PREC="tf32")
    torch.testing.assert_close(c.double(), exact, atol=1e-5, rtol=0)  # switch off: exact
    with emulate_tf32():
        _dot_kernel[(1,)](a, b, c, CAST=False, PREC="tf32")
        torch.testing.assert_close(c.double(), rounded, atol=1e-5, rtol=0)
        _dot_kernel[(1,)](a, b, c, CAST=False, PREC="ieee")  # ieee products stay exact
        torch.testing.assert_close(c.double(), exact, atol=1e-5, rtol=0)
    _dot_kernel[(1,)](a, b, c, CAST=False, PREC="tf32")
    torch.testing.assert_close(c.double(), exact, atol=1e-5, rtol=0)  # restored on exit


# (B, T, H, K, V, loss)
CASES = [(1, 67, 2, 32, 32, "o+ht"), (1, 130, 1, 64, 32, "o")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-T{}-H{}-K{}-V{}-{}".format(*c))
def test_16bit_with_gpu_rounding_matches_reference(case, dtype):
    """16-bit inputs with the GPU's operand rounding (bf16/fp16 products, fp32 solve)."""
    B, T, H, K, V, loss = case
    inputs = kda_inputs(B, T, H, K, V, dtype=dtype, seed=T + K, device=DEVICE)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(B, T, H, V, generator=gen).to(DEVICE, dtype) if "o" in loss else None
    dht = torch.randn(B, H, K, V, generator=gen).to(DEVICE) if "ht" in loss else None
    with emulate_tf32():
        got = kda_run(chunk_kda, inputs, do, dht)
    ref = kda_run(naive_recurrent_kda, [x.double() for x in inputs], do, dht)
    assert all(g.dtype == x.dtype for g, x in zip(got[2:], inputs))
    assert_kda_close(got, ref, 1e-2)


def test_fp16_states_beyond_fp16_range():
    """fp16 inputs whose state exceeds fp16's range (65504): the stored chunk states and the
    products with them use bf16 (fp32's range), so nothing overflows (facts: fp16 staging of
    the state overflows)."""
    B, T, H, K, V = 1, 130, 1, 32, 32
    inputs = kda_inputs(B, T, H, K, V, dtype=torch.float16, seed=3, device=DEVICE)
    inputs[5] = inputs[5] * 3e4  # initial state entries up to ~1e5
    gen = torch.Generator().manual_seed(5)
    # small output gradients keep dq (~ dO S) inside fp16's range
    do = (1e-2 * torch.randn(B, T, H, V, generator=gen)).to(DEVICE, torch.float16)
    dht = torch.randn(B, H, K, V, generator=gen).to(DEVICE)
    assert inputs[5].abs().max() > 65504  # the first chunk-start state is out of fp16 range
    got = kda_run(chunk_kda, inputs, do, dht)
    ref = kda_run(naive_recurrent_kda, [x.double() for x in inputs], do, dht)
    assert all(torch.isfinite(x).all() for x in got if x is not None)
    assert_kda_close(got, ref, 1e-2)
