"""The one comparison rule of a fast path against its reference, and KDA reference runs.

Used by the test suite and the GPU suite (``python -m benchmarks.gpu_check``) alike.

The rule: ``rel_error(actual, expected) = ||actual - expected||_2 / ||expected||_2`` over the
whole tensor, in float64 (the per-tensor relative error of fla's tests). Unlike an element-wise
``atol`` or an error normalised by the largest reference value, it cannot be met by an all-zero
or a half-missing result: dropping a term that carries a fraction ``p`` of a tensor's norm gives
an error of about ``p``, however small the tensor's entries are. A missing (``None``) or
non-finite tensor has error ``inf``; so has any difference from an all-zero reference.
:func:`assert_rel_close` asserts it with a message naming the tensor, its error, the tolerance
and both shapes; :data:`KDA_RTOL` holds the tolerance of a KDA kernel against the float64
reference per input dtype (the GPU suite's; a test may hold a path to a tighter one).

KDA reference runs (shapes: ``B`` batch, ``T`` tokens, ``H`` heads, ``K`` key / query head dim,
``V`` value head dim, ``N`` sequences of a packed batch): :func:`kda_inputs` draws inputs as the
layer makes them, :func:`kda_run` runs forward + backward of any KDA function and returns every
compared tensor (:data:`KDA_NAMES`), :func:`kda_reference` runs the float64 reference (each
packed sequence alone), :func:`assert_kda_close` compares them tensor by tensor (per sequence
for a packed batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from kimi_linear.ops.naive import naive_recurrent_kda

__all__ = [
    "KDA_INPUT_NAMES",
    "KDA_NAMES",
    "KDA_RTOL",
    "assert_kda_close",
    "assert_rel_close",
    "kda_cotangents",
    "kda_inputs",
    "kda_reference",
    "kda_run",
    "per_sequence",
    "rel_error",
]

#: Norm-relative tolerance of a KDA path against the float64 reference, by input dtype: fp32 and
#: bf16 for the Triton / fla kernels (the GPU suite), fp64 for the chunked op against the
#: recurrence (the same maths in another order).
KDA_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 2e-3,
    torch.bfloat16: 3e-2,
}


def rel_error(actual: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    """``||actual - expected|| / ||expected||`` in float64.

    ``inf`` when either is ``None`` or non-finite, or when ``expected`` is all zeros and
    ``actual`` is not; 0 when both are all zeros.
    """
    if actual is None or expected is None:
        return math.inf
    a, b = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    diff = torch.linalg.vector_norm(a - b).item()
    ref = torch.linalg.vector_norm(b).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def assert_rel_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    rtol: float,
    name: str = "tensor",
    *,
    min_norm: float = 1e-12,
    zeros_atol: float | None = None,
) -> float:
    """Assert ``rel_error(actual, expected) <= rtol``, with finite values and equal shapes.

    ``expected`` must carry signal (``||expected|| > min_norm``), so that a test cannot pass by
    comparing two (near-)zero tensors; with ``zeros_atol``, a reference without signal is
    accepted instead when ``actual`` is zeros too (``max |actual| <= zeros_atol``, e.g. a
    gradient with no path to the loss). ``None`` must match ``None``. Returns the error.
    """
    if expected is None or actual is None:
        assert actual is None and expected is None, (
            f"{name}: got {'None' if actual is None else 'a tensor'}, "
            f"expected {'None' if expected is None else 'a tensor'}"
        )
        return 0.0
    shapes = f"shape {tuple(actual.shape)}, reference {tuple(expected.shape)}"
    assert actual.shape == expected.shape, f"{name}: {shapes} differ"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values ({shapes})"
    ref = torch.linalg.vector_norm(expected.detach().double()).item()
    if zeros_atol is not None and ref <= min_norm:
        most = actual.detach().abs().max().item() if actual.numel() else 0.0
        assert most <= zeros_atol, (
            f"{name}: expected zeros (the reference has norm {ref:.3e}), got max |x| = "
            f"{most:.3e} > {zeros_atol:.1e} ({shapes})"
        )
        return 0.0
    assert ref > min_norm, f"{name}: the reference has norm {ref:.3e}: nothing to compare"
    err = rel_error(actual, expected)
    assert err <= rtol, (
        f"{name}: relative error {err:.3e} > {rtol:.1e} (||ref|| = {ref:.3e}, {shapes})"
    )
    return err


# ---------------------------------------------------------------------------- KDA runs
#: Names of the inputs of a KDA function, in :func:`kda_inputs` order.
KDA_INPUT_NAMES = ("q", "k", "v", "g", "beta", "h0")
#: Names of the compared KDA tensors: output, final state, then the gradients.
KDA_NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0")


def kda_inputs(
    B: int,
    T: int,
    H: int,
    K: int,
    V: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gate: tuple[float, float] = (-1.0, 0.0),
    N: int | None = None,
    seed: int = 0,
    state_scale: float = 1.0,
    beta_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """``[q, k, v, g, beta, h0]`` as the layer makes them: L2-normalised q, k ``[B, T, H, K]``,
    v ``[B, T, H, V]`` in ``dtype``; fp32 log decay g ``[B, T, H, K]`` uniform in ``gate``;
    beta ``[B, T, H]`` in (0, 1), in ``beta_dtype``; fp32 initial state ``[N or B, H, K, V]`` of
    entries ~ N(0, ``state_scale``^2). Drawn from ``seed`` by a generator on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device)

    q = F.normalize(randn(B, T, H, K), dim=-1)
    k = F.normalize(randn(B, T, H, K), dim=-1)
    v = randn(B, T, H, V)
    lo, hi = gate
    g = lo + (hi - lo) * torch.rand(B, T, H, K, generator=gen, device=device)
    beta = torch.rand(B, T, H, generator=gen, device=device)
    h0 = randn(B if N is None else N, H, K, V)
    if state_scale != 1.0:
        h0 = h0 * state_scale
    return [q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(beta_dtype), h0]


def kda_cotangents(
    inputs: Sequence[torch.Tensor], *, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream gradients for :func:`kda_run`: ``do`` like ``v`` (``[B, T, H, V]``, its dtype)
    and an fp32 ``dht`` like the initial state (``[N, H, K, V]``), drawn from ``seed``."""
    q, _, v, _, _, h0 = inputs
    N, H, K, V = h0.shape
    gen = torch.Generator(device=v.device).manual_seed(seed)
    do = torch.randn(v.shape, generator=gen, device=v.device).to(v.dtype)
    dht = torch.randn(N, H, K, V, generator=gen, device=v.device)
    return do, dht


def kda_run(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    inputs: Sequence[torch.Tensor],
    do: torch.Tensor | None,
    dht: torch.Tensor | None,
    **kwargs: Any,
) -> list[torch.Tensor | None]:
    """``fn(q, k, v, g, beta, initial_state=h0, ...)`` on fresh leaves, back-propagating the loss
    ``<o, do> + <final_state, dht>`` (in float64; a ``None`` term is left out; ``dht=None`` also
    asks for no final state). Returns ``[o, final_state, dq, dk, dv, dg, dbeta, dh0]`` (order of
    :data:`KDA_NAMES`); a gradient autograd leaves out (no path to the loss) is zeros. Copies
    keep ``inputs`` intact for implementations that modify their inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, final = fn(
        *leaves[:5], initial_state=leaves[5], output_final_state=dht is not None, **kwargs
    )
    loss = 0.0
    if do is not None:
        loss = loss + (o.double() * do.double()).sum()
    if dht is not None:
        loss = loss + (final.double() * dht.double()).sum()
    loss.backward()
    return [o.detach(), None if final is None else final.detach()] + [
        torch.zeros_like(x) if x.grad is None else x.grad for x in leaves
    ]


def per_sequence(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a KDA function without ``cu_seqlens`` support a packed-varlen interface: each
    sequence ``cu_seqlens[n]:cu_seqlens[n+1]`` of a ``[1, TT, ...]`` batch runs alone from its
    own initial-state row (outputs concatenated, final states stacked ``[N, H, K, V]``)."""

    def wrapped(q, k, v, g, beta, initial_state=None, output_final_state=False, cu_seqlens=None):
        if cu_seqlens is None:
            return fn(
                q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state
            )
        bounds = cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else list(cu_seqlens)
        outs, states = [], []
        for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
            o, ht = fn(
                *(x[:, bos:eos] for x in (q, k, v, g, beta)),
                initial_state=None if initial_state is None else initial_state[n : n + 1],
                output_final_state=True,
            )
            outs.append(o)
            states.append(ht)
        return torch.cat(outs, dim=1), torch.cat(states, dim=0)

    return wrapped


def kda_reference(
    inputs: Sequence[torch.Tensor],
    do: torch.Tensor | None,
    dht: torch.Tensor | None,
    offsets: Sequence[int] | torch.Tensor | None = None,
    *,
    op: Callable[..., Any] = naive_recurrent_kda,
) -> list[torch.Tensor | None]:
    """:func:`kda_run` of the float64 reference ``op`` (default the token-by-token recurrence)
    on ``inputs`` cast to float64; with ``offsets`` (a packed batch ``[1, TT, ...]``), each
    sequence ``offsets[n]:offsets[n+1]`` runs alone from its own initial-state row. The final
    state is ``None`` when ``dht`` is."""
    kwargs = {} if offsets is None else {"cu_seqlens": offsets}
    out = kda_run(per_sequence(op), [x.detach().double() for x in inputs], do, dht, **kwargs)
    if dht is None:
        out[1] = None
    return out


def assert_kda_close(
    got: Sequence[torch.Tensor | None],
    ref: Sequence[torch.Tensor | None],
    rtol: float | Mapping[str, float],
    offsets: Sequence[int] | None = None,
    skip: Sequence[str] = (),
) -> dict[str, float]:
    """:func:`assert_rel_close` on each of :data:`KDA_NAMES` (except ``skip``); ``rtol`` is one
    tolerance or one per name (key ``"*"`` for the others). With ``offsets`` (a packed batch),
    on each non-empty sequence separately (``o`` and token gradients on its rows, ``ht`` /
    ``dh0`` on its state row), so a wrong short sequence is not hidden by a long one. Returns
    the largest error per name."""
    worst: dict[str, float] = {}
    per_token = {"o", "dq", "dk", "dv", "dg", "dbeta"}
    pieces: list[tuple[str, slice, int]] = []
    if offsets is None:
        pieces.append(("", slice(None), -1))
    else:
        for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
            pieces.append((f" (sequence {n}, tokens {bos}:{eos})", slice(bos, eos), n))
    for name, a, b in zip(KDA_NAMES, got, ref):
        if name in skip:
            continue
        tol = rtol if isinstance(rtol, (int, float)) else rtol.get(name, rtol["*"])
        if a is None or b is None:
            assert_rel_close(a, b, tol, name)
            continue
        for label, rows, n in pieces:
            if name in per_token:
                if offsets is not None and rows.start == rows.stop:
                    continue
                pa, pb = a[:, rows], b[:, rows]
            else:
                pa, pb = (a, b) if n < 0 else (a[n : n + 1], b[n : n + 1])
            # a reference of zeros (dh0 of an empty sequence with no final-state gradient, or
            # decayed to nothing over a long sequence) wants (numerical) zeros
            err = assert_rel_close(pa, pb, tol, name + label, zeros_atol=1e-6)
            worst[name] = max(worst.get(name, 0.0), err)
    return worst
