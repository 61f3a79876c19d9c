"""Row-wise input transforms of :func:`kimi_linear.kernels.chunk_kda`, forward and backward.

fla's flags that transform an input before the chunked pipeline, as one-pass Triton kernels
(one read, one write per tensor; no torch temporaries, fp32 arithmetic):

* ``use_qk_l2norm_in_kernel``: ``y = x / sqrt(||x||^2 + 1e-6)`` per row of q and of k (the
  decode kernel's and fla's formula); backward ``dx = r (dy - y (y . dy))`` with
  ``r = 1 / sqrt(||x||^2 + 1e-6)``, from the kept ``y`` (input dtype) and ``r`` (fp32, one
  value per row);
* ``use_beta_sigmoid_in_kernel``: ``beta = c * sigmoid(b)`` (``c = 2`` with
  ``allow_neg_eigval``, else 1), kept in fp32; backward ``db = d_beta * c * s (1 - s)`` from
  the logits.

The gate (``use_gate_in_kernel``) is not here: it is fused into the chunked pipeline's
cumulative-sum kernel and its gradient into the backward's last kernel
(:mod:`kimi_linear.kernels.chunk_fwd`, :mod:`kimi_linear.kernels.chunk_bwd`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import checked_grid, next_pow2

__all__ = ["beta_sigmoid_bwd", "beta_sigmoid_fwd", "l2norm_bwd", "l2norm_fwd"]

#: The epsilon under the square root of the L2 norm (fla's and the decode kernel's).
L2NORM_EPS = 1e-6
#: Rows per program of the L2-norm kernels; elements per program of the sigmoid kernels.
_ROWS, _BLOCK = 16, 1024


@triton.jit
def _l2norm_fwd_kernel(x, y, rstd, n_rows, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """``y = x * r``, ``r = 1 / sqrt(sum x^2 + eps)`` per row of a contiguous ``[n_rows, D]``;
    grid ``(cdiv(n_rows, BR),)``."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    b_x = tl.load(x + off, mask=mask, other=0.0).to(tl.float32)
    b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) + 1e-6)
    tl.store(y + off, (b_x * b_r[:, None]).to(y.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, b_r, mask=rows < n_rows)


@triton.jit
def _l2norm_bwd_kernel(
    y, rstd, dy, dx, n_rows, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr
):
    """``dx = r (dy - y sum(y dy))`` per row; grid ``(cdiv(n_rows, BR),)``."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    off = rows[:, None] * D + cols[None, :]
    b_y = tl.load(y + off, mask=mask, other=0.0).to(tl.float32)
    b_dy = tl.load(dy + off, mask=mask, other=0.0).to(tl.float32)
    b_r = tl.load(rstd + rows, mask=rows < n_rows, other=0.0)
    b_dx = b_r[:, None] * (b_dy - b_y * tl.sum(b_y * b_dy, axis=1)[:, None])
    tl.store(dx + off, b_dx.to(dx.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_fwd_kernel(x, y, n, c, BLOCK: tl.constexpr):
    """``y = c * sigmoid(x)`` elementwise; grid ``(cdiv(n, BLOCK),)``."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    b_x = tl.load(x + off, mask=off < n, other=0.0).to(tl.float32)
    tl.store(y + off, (c * tl.sigmoid(b_x)).to(y.dtype.element_ty), mask=off < n)


@triton.jit
def _sigmoid_bwd_kernel(x, dy, dx, n, c, BLOCK: tl.constexpr):
    """``dx = dy * c * s (1 - s)``, ``s = sigmoid(x)``; grid ``(cdiv(n, BLOCK),)``."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    b_s = tl.sigmoid(tl.load(x + off, mask=off < n, other=0.0).to(tl.float32))
    b_dy = tl.load(dy + off, mask=off < n, other=0.0).to(tl.float32)
    tl.store(dx + off, (b_dy * c * b_s * (1.0 - b_s)).to(dx.dtype.element_ty), mask=off < n)


def l2norm_fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: ``x [..., D]`` (contiguous) L2-normalised along its last dim (x's dtype)
    and the fp32 ``1 / sqrt(||x||^2 + 1e-6)`` per row (``x.shape[:-1]``)."""
    D = x.shape[-1]
    y = torch.empty_like(x)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    n_rows = rstd.numel()
    if n_rows:
        BD = next_pow2(D)
        _l2norm_fwd_kernel[checked_grid(triton.cdiv(n_rows, _ROWS))](
            x, y, rstd, n_rows, D=D, BD=BD, BR=_ROWS
        )
    return y, rstd


def l2norm_bwd(y: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`l2norm_fwd`'s input from its output ``y``, ``rstd`` and ``dy`` (all
    contiguous), in ``y``'s dtype."""
    D = y.shape[-1]
    dx = torch.empty_like(y)
    n_rows = rstd.numel()
    if n_rows:
        _l2norm_bwd_kernel[checked_grid(triton.cdiv(n_rows, _ROWS))](
            y, rstd, dy.contiguous(), dx, n_rows, D=D, BD=next_pow2(D), BR=_ROWS
        )
    return dx


def beta_sigmoid_fwd(b: torch.Tensor, c: float) -> torch.Tensor:
    """``c * sigmoid(b)`` of contiguous logits ``b``, in fp32 (what the kernels compute in: a
    16-bit copy would round beta once more than the logits' dtype requires)."""
    y = torch.empty_like(b, dtype=torch.float32)
    if b.numel():
        _sigmoid_fwd_kernel[checked_grid(triton.cdiv(b.numel(), _BLOCK))](
            b, y, b.numel(), float(c), BLOCK=_BLOCK
        )
    return y


def beta_sigmoid_bwd(b: torch.Tensor, dy: torch.Tensor, c: float) -> torch.Tensor:
    """Gradient of :func:`beta_sigmoid_fwd` with respect to its logits ``b`` (b's dtype)."""
    dx = torch.empty_like(b)
    if b.numel():
        _sigmoid_bwd_kernel[checked_grid(triton.cdiv(b.numel(), _BLOCK))](
            b, dy.contiguous(), dx, b.numel(), float(c), BLOCK=_BLOCK
        )
    return dx
