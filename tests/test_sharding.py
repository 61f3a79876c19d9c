"""Seeded initialisation on simulated shards (single process, fast): the values a rank writes
into its rows must be the full tensor's values at those rows, whatever the rank count.

``tests/test_fsdp.py`` checks the same on real 2-process FSDP2 runs, but only for tensors
below :data:`SEED_BLOCK` elements (no test config has a larger one), so a block index counted
from the shard's start instead of the tensor's start went unnoticed (issue 25, class 8). Here
the shards are simulated: :func:`kimi_linear.sharding.local_shard` is made to return a piece
of a tensor and its offset, exactly what it returns for a DTensor shard.
"""

from __future__ import annotations

import pytest
import torch

import kimi_linear.sharding as sharding
from kimi_linear.sharding import SEED_BLOCK, seeded_normal_, seeded_uniform_


class _Shard:
    """A stand-in for a DTensor shard: ``.shape`` is the full tensor's, the data a piece."""

    def __init__(self, full_shape: tuple[int, ...], local: torch.Tensor, offset: tuple[int, ...]):
        self.shape = torch.Size(full_shape)
        self.local, self.offset = local, offset


@pytest.fixture
def simulated_shards(monkeypatch):
    real = sharding.local_shard
    monkeypatch.setattr(
        sharding,
        "local_shard",
        lambda t: (t.local, t.offset) if isinstance(t, _Shard) else real(t),
    )


def _fill_sharded(fill, shape, ranks: int, dim: int = 0) -> torch.Tensor:
    """Fill ``shape`` rank by rank with the pieces of an even split along ``dim`` (FSDP2's
    ``torch.chunk`` layout for dim 0), then put the pieces back together."""
    pieces = []
    start = 0
    for n in [c.shape[dim] for c in torch.empty(shape, device="meta").chunk(ranks, dim)]:
        local = torch.empty(*shape[:dim], n, *shape[dim + 1 :])
        offset = tuple(start if d == dim else 0 for d in range(len(shape)))
        fill(_Shard(shape, local, offset))
        pieces.append(local)
        start += n
    return torch.cat(pieces, dim)


@pytest.mark.parametrize("ranks", [2, 3, 5])
@pytest.mark.parametrize(
    "fill",
    [
        lambda t: seeded_normal_(t, 7, "model.embed_tokens.weight", std=0.02),
        lambda t: seeded_uniform_(t, 7, "w", -1.0, 1.0),
    ],
    ids=["normal", "uniform"],
)
def test_sharded_init_of_a_tensor_above_the_block_size_is_rank_count_free(
    simulated_shards, fill, ranks
):
    """A [6, 400000] tensor spans 2.3 blocks of 2^20 elements: every shard but the first starts
    inside a later block, and shard boundaries do not fall on block boundaries."""
    shape = (6, 400_000)
    assert shape[0] * shape[1] > 2 * SEED_BLOCK
    whole = torch.empty(shape)
    fill(whole)
    torch.testing.assert_close(_fill_sharded(fill, shape, ranks), whole, rtol=0, atol=0)


def test_sharded_init_along_dim_1_matches_the_whole_tensor(simulated_shards):
    """A shard of dim 1 (tensor parallel) slices the same rows of the stream."""
    shape = (3, 500_000)
    fill = lambda t: seeded_normal_(t, 1, "w")  # noqa: E731
    whole = fill(torch.empty(shape))
    torch.testing.assert_close(_fill_sharded(fill, shape, 3, dim=1), whole, rtol=0, atol=0)
