"""One comparison rule for tests that check a computation against a reference.

``rel_error(actual, expected) = ||actual - expected||_2 / ||expected||_2`` over the whole tensor
(in float64), the per-tensor relative error of fla's tests. Unlike an element-wise ``atol`` or an
error normalised by the largest reference value, it cannot be met by an all-zero or a
half-missing result: dropping a term that carries a fraction ``p`` of a tensor's norm gives an
error of about ``p``, however small the tensor's entries are. Import it from the tests as
``from helpers import assert_rel_close`` (pytest puts ``tests/`` on ``sys.path``).

Also here, for the KDA kernel tests on CPU (interpreter) and GPU alike: inputs, a forward +
backward that returns every gradient, and the float64 reference of a packed (varlen) batch run
sequence by sequence, so that each sequence and each gradient is compared on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kimi_linear.ops import kda_recurrent

__all__ = [
    "KDA_NAMES",
    "assert_kda_close",
    "assert_rel_close",
    "kda_inputs",
    "kda_packed_reference",
    "kda_run",
    "rel_error",
]


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (``inf`` when only ``expected`` is 0
    and ``actual`` is not; 0 when both are 0)."""
    a, b = actual.detach().double(), expected.detach().double()
    diff = torch.linalg.vector_norm(a - b).item()
    ref = torch.linalg.vector_norm(b).item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / ref


def assert_rel_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    rtol: float,
    name: str = "tensor",
    *,
    min_norm: float = 1e-12,
) -> float:
    """Assert ``rel_error(actual, expected) <= rtol``, with finite values and equal shapes.

    ``expected`` must carry signal (``||expected|| > min_norm``), so that a test cannot pass
    by comparing two (near-)zero tensors; ``None`` must match ``None``. Returns the error.
    """
    if expected is None or actual is None:
        assert actual is None and expected is None, (
            f"{name}: got {'None' if actual is None else 'a tensor'}, "
            f"expected {'None' if expected is None else 'a tensor'}"
        )
        return 0.0
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    ref = torch.linalg.vector_norm(expected.detach().double()).item()
    assert ref > min_norm, f"{name}: the reference has norm {ref:.3e}: nothing to compare"
    err = rel_error(actual, expected)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e} (||ref|| = {ref:.3e})"
    return err


# ---------------------------------------------------------------------------- KDA kernels
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
) -> list[torch.Tensor]:
    """``[q, k, v, g, beta, h0]``: L2-normalised q, k ``[B, T, H, K]``, v ``[B, T, H, V]`` in
    ``dtype``; fp32 log decay g uniform in ``gate``; fp32 beta in (0, 1); fp32 initial state
    ``[N or B, H, K, V]``. Drawn on the CPU from ``seed`` (the same values on every device)."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    lo, hi = gate
    g = lo + (hi - lo) * torch.rand(B, T, H, K, generator=gen)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B if N is None else N, H, K, V, generator=gen)
    return [
        x.to(device, dtype if i < 3 else torch.float32)
        for i, x in enumerate((q, k, v, g, beta, h0))
    ]


def kda_run(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    inputs: Sequence[torch.Tensor],
    do: torch.Tensor | None,
    dht: torch.Tensor | None,
    **kwargs,
) -> list[torch.Tensor | None]:
    """``fn(q, k, v, g, beta, initial_state=h0, ...)`` on fresh leaves, back-propagating the loss
    ``<o, do> + <final_state, dht>`` (a ``None`` term is left out; ``dht=None`` also asks for no
    final state). Returns ``[o, final_state, dq, dk, dv, dg, dbeta, dh0]`` (order of
    :data:`KDA_NAMES`); a gradient autograd leaves out (no path to the loss) is zeros."""
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
    return [o, final] + [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]


def kda_packed_reference(
    inputs: Sequence[torch.Tensor],
    do: torch.Tensor | None,
    dht: torch.Tensor | None,
    offsets: Sequence[int],
) -> list[torch.Tensor | None]:
    """:func:`kda_run` of the float64 token-by-token reference on a packed batch ``[1, TT, ...]``,
    each sequence ``offsets[n]:offsets[n+1]`` run alone from its own initial-state row."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    q, k, v, g, beta, h0 = leaves
    outs, finals = [], []
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        o, final = kda_recurrent(
            *(x[:, bos:eos] for x in (q, k, v, g, beta)),
            initial_state=h0[n : n + 1],
            output_final_state=True,
        )
        outs.append(o)
        finals.append(final)
    o, final = torch.cat(outs, dim=1), torch.cat(finals)
    loss = 0.0
    if do is not None:
        loss = loss + (o * do.double()).sum()
    if dht is not None:
        loss = loss + (final * dht.double()).sum()
    loss.backward()
    grads = [torch.zeros_like(x) if x.grad is None else x.grad for x in leaves]
    return [o, final if dht is not None else None] + grads


def assert_kda_close(
    got: Sequence[torch.Tensor | None],
    ref: Sequence[torch.Tensor | None],
    rtol: float,
    offsets: Sequence[int] | None = None,
    skip: Sequence[str] = (),
) -> dict[str, float]:
    """:func:`assert_rel_close` on each of :data:`KDA_NAMES` (except ``skip``); with ``offsets``
    (a packed batch), on each non-empty sequence separately (``o`` and token gradients on its
    rows, ``ht`` / ``dh0`` on its state row), so a wrong short sequence is not hidden by a long
    one. Returns the largest error per name."""
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
        if a is None or b is None:
            assert_rel_close(a, b, rtol, name)
            continue
        for label, rows, n in pieces:
            if name in per_token:
                if offsets is not None and rows.start == rows.stop:
                    continue
                pa, pb = a[:, rows], b[:, rows]
            else:
                pa, pb = (a, b) if n < 0 else (a[n : n + 1], b[n : n + 1])
            if torch.linalg.vector_norm(pb.detach().double()) <= 1e-12:
                # e.g. dh0 of an empty sequence with no final-state gradient, or decayed to
                # nothing over a long sequence: must be (numerically) zero too
                assert pa.abs().max().item() <= 1e-6, f"{name}{label}: expected zeros"
                continue
            err = assert_rel_close(pa, pb, rtol, name + label)
            worst[name] = max(worst.get(name, 0.0), err)
    return worst
