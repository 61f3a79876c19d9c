"""Helpers that make initialisation and optimizer steps independent of how tensors are sharded.

Model and optimizer code stay free of parallelism (the sharding plan lives in
:mod:`kimi_linear.lightning.parallel`); what they need from a sharded parameter, a
``torch.distributed.tensor.DTensor`` as made by FSDP2's ``fully_shard``, is in this module:

* :func:`local_shard` -- the local piece of a (possibly) sharded tensor and its offset in the
  full tensor (a plain tensor is its own shard at offset 0);
* :func:`seeded_normal_` / :func:`seeded_uniform_` -- fill a tensor with values that depend only
  on ``(seed, name, position in the full tensor)``, never on the number of ranks or on which rank
  holds which rows.

The seeded stream
-----------------
The full tensor of a parameter, flattened in row-major order, is cut into blocks of
:data:`SEED_BLOCK` elements.  Block ``b`` of parameter ``name`` is drawn from its own
``torch.Generator`` seeded with ``blake2b(f"{seed}/{name}/{b}")`` (63 bits).  A rank holding rows
``[r0, r1)`` of a dim-0 shard (FSDP2's layout) draws only the blocks that cover those rows, so the
memory needed is one shard plus at most two blocks, and the values it writes are exactly the ones
a single process would write into the same rows.  Values depend on the device type the generator
runs on (CPU and CUDA use different generators) but not on the number of ranks or the mesh shape.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

__all__ = [
    "SEED_BLOCK",
    "is_dtensor",
    "local_shard",
    "param_seed",
    "seeded_normal_",
    "seeded_uniform_",
]

#: Elements per independently seeded block of a parameter's flattened full tensor.
SEED_BLOCK = 1 << 20


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (sharded or replicated)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def local_shard(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``(local tensor, global offset)`` of ``t``.

    For a DTensor the local tensor is ``t.to_local()`` (a view that writes through to ``t``) and
    the offset is where its first element sits in the full tensor, one entry per dim; a plain
    tensor is returned as is with offset ``(0, ...)``.
    """
    if not is_dtensor(t):
        return t, (0,) * t.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t.to_local()  # type: ignore[attr-defined]
    shape, offset = compute_local_shape_and_global_offset(
        t.shape,
        t.device_mesh,
        t.placements,  # type: ignore[attr-defined]
    )
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(
            f"local shard of shape {tuple(local.shape)} does not match the layout of its DTensor "
            f"{tuple(t.shape)} with placements {t.placements} (expected {tuple(shape)})"  # type: ignore[attr-defined]
        )
    return local, tuple(int(o) for o in offset)


def param_seed(seed: int, name: str, block: int = 0) -> int:
    """The 63-bit generator seed of block ``block`` of parameter ``name`` under ``seed``."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _check_seed_args(seed: int, name: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str (the parameter's name), got {name!r}")


@torch.no_grad()
def _seeded_fill_(
    t: Tensor, seed: int, name: str, draw: str, scale: float = 1.0, shift: float = 0.0
) -> Tensor:
    """Fill ``t`` (plain or DTensor) with ``draw * scale + shift`` (computed in fp32), where
    ``draw`` is ``"normal"`` (N(0, 1)) or ``"uniform"`` (U[0, 1)) from the seeded stream of
    ``name`` (see the module docstring); returns ``t``."""
    _check_seed_args(seed, name)
    local, offset = local_shard(t)
    if local.numel() == 0:
        return t
    if local.device.type == "meta":
        raise ValueError(f"{name}: cannot fill a meta tensor; materialize it first (to_empty)")
    full_shape = tuple(t.shape)
    if not full_shape:  # 0-d: one element
        full_shape, offset = (1,), (0,)
    row = math.prod(full_shape[1:])
    total = math.prod(full_shape)
    r0, r1 = offset[0], offset[0] + (local.shape[0] if local.dim() else 1)
    start, stop = r0 * row, r1 * row  # flat range of the rows this shard touches
    device = local.device
    pieces = []
    for b in range(start // SEED_BLOCK, (stop - 1) // SEED_BLOCK + 1):
        b0, b1 = b * SEED_BLOCK, min((b + 1) * SEED_BLOCK, total)
        gen = torch.Generator(device=device).manual_seed(param_seed(seed, name, b))
        fn = torch.randn if draw == "normal" else torch.rand
        vals = fn(b1 - b0, generator=gen, device=device, dtype=torch.float32)
        pieces.append(vals[max(start, b0) - b0 : min(stop, b1) - b0])
    rows = torch.cat(pieces).view(r1 - r0, *full_shape[1:])
    # other dims (a shard of dim >= 1, e.g. tensor parallel): slice the rows drawn
    index = tuple(
        slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:] if local.dim() else ())
    )
    vals = rows[(slice(None), *index)].reshape(local.shape)
    if scale != 1.0 or shift != 0.0:
        vals = vals * scale + shift
    local.copy_(vals)
    return t


def seeded_normal_(t: Tensor, seed: int, name: str, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """``t <- N(mean, std)`` from the seeded stream of ``name``: the same full tensor whether
    ``t`` is whole or a DTensor sharded over any number of ranks.  Computed in fp32, then cast
    to ``t.dtype``.  Returns ``t``."""
    if not (isinstance(std, (int, float)) and std >= 0 and math.isfinite(std)):
        raise ValueError(f"std must be a finite number >= 0, got {std!r}")
    return _seeded_fill_(t, seed, name, "normal", float(std), float(mean))


def seeded_uniform_(t: Tensor, seed: int, name: str, low: float = 0.0, high: float = 1.0) -> Tensor:
    """``t <- U[low, high)`` from the seeded stream of ``name`` (see :func:`seeded_normal_`)."""
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"need finite low <= high, got low={low!r}, high={high!r}")
    return _seeded_fill_(t, seed, name, "uniform", float(high - low), float(low))
