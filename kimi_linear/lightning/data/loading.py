"""Resumable, seeded, rank-sharded loading shared by every data module of the kit.

:class:`ResumableDataLoader` records in its ``state_dict`` (Lightning stores that in
checkpoints) the *global sample position* of the current epoch: how many samples of the epoch's
permutation all ranks together have consumed.  The permutation depends on the seed and the epoch
only, and rank ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...``, so after ``k`` steps of
``B`` samples per rank the consumed samples are exactly the first ``k * W * B`` positions.  A
resume continues from that position and splits the rest of the epoch's permutation across the
ranks and batch size of the resumed run, so ``N`` steps straight and ``N/2`` + resume for ``N/2``
see the same batches, and a run resumed on another number of ranks or another batch size sees
every remaining sample of the epoch once (only the usual ``drop_last`` tail of fewer than one
global batch is left out).  A checkpoint of another training set (size) or shuffle seed cannot
be continued exactly and is refused with a :class:`~kimi_linear.errors.UsageError`.

Its sampler, :class:`ResumableSampler`, is a ``DistributedSampler`` (rank and world size taken
from the trainer), so Lightning leaves it in place under DDP; the batches of a map-style dataset
are split across DataLoader worker processes by the DataLoader itself, in sampler order, so the
number of workers never changes the batches.

Why not torchdata's ``StatefulDataLoader`` (issue 24 item 9: a kept library where it does the
same job): it checkpoints the iterator of *this* topology (the batches or samples each rank's
sampler has yielded, worker states), so it continues exactly only with the same number of
ranks, batch size and workers; this loader records one global sample position of the epoch's
seeded permutation and splits the rest across whatever ranks and batch size the resumed run
has (``tests/test_data_tokens.py``: resume on another batch size trains every window once),
and refuses a checkpoint of another data set or seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kimi_linear.errors import UsageError

IGNORE_INDEX = -100


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` (seeded shuffle per epoch, rank's share) that can start part-way.

    The epoch's order is the permutation ``p`` of the dataset drawn from ``seed + epoch`` (the
    same on every rank, whatever the world size).  ``start`` (a global sample position, reset to
    0 by the next ``__iter__``) makes that iteration yield this rank's share of ``p[start:]``:
    positions ``start + rank, start + rank + W, ...``, ``(len(p) - start) // W`` of them, so all
    ``W`` ranks get equally many and together cover ``p[start:]`` up to a tail of fewer than ``W``.
    With ``start == 0`` this is exactly ``DistributedSampler``'s order.  Works for
    ``num_replicas=1`` without ``torch.distributed`` being initialised.  When ``owned`` (set by
    :class:`ResumableDataLoader`), ``set_epoch`` calls from outside (the trainer) are ignored:
    the loader counts epochs itself.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0
        self.owned = False

    def set_epoch(self, epoch: int) -> None:
        if not self.owned:
            super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        if start == 0:
            return super().__iter__()
        if not self.drop_last:
            raise ValueError("ResumableSampler can start part-way only with drop_last=True")
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        rest = order[start:]
        per_rank = len(rest) // self.num_replicas
        return iter(rest[self.rank : per_rank * self.num_replicas : self.num_replicas])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that resumes exactly mid-epoch, also on
    another number of ranks or another batch size.

    The loader counts epochs itself (a pass that ran to its end advances the shuffle to the
    next epoch) and records in its ``state_dict``::

        {"epoch": e, "samples": s, "world_size": W, "batch_size": B, "dataset_size": N,
         "seed": seed}

    where ``s`` is the global sample position of epoch ``e``: the samples all ranks together
    have consumed (``batches * W * B``).  After ``load_state_dict`` the next iteration continues
    epoch ``e`` from position ``s``, splitting the rest of its permutation across this loader's
    ranks and batch size (see :class:`ResumableSampler`), without loading the consumed samples;
    when fewer than one global batch (``W * B`` of this loader) is left, it starts epoch
    ``e + 1``.  A state of another dataset size or shuffle seed is refused
    (:class:`~kimi_linear.errors.UsageError`): its positions would name other samples.  A state
    of the first format (``{"epoch", "batches"}``, without the topology) is read as saved by the
    same world size and batch size.

    Lightning saves and restores this state with the fit loop (``_Stateful`` loaders; rank 0's
    state, equal on every rank), and does not pre-fetch loaders with a length, so "yielded"
    equals "trained on".  Owning the epoch count keeps the shuffle independent of the trainer's
    epoch bookkeeping, which differs between a straight and a resumed run when a checkpoint
    falls on an epoch boundary.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise ValueError(
                f"ResumableDataLoader needs a ResumableSampler, got {type(self.sampler).__name__}"
            )
        if self.batch_size is None or not self.drop_last or not self.sampler.drop_last:
            raise ValueError(
                "ResumableDataLoader needs a batch_size and drop_last=True (loader and sampler): "
                "only whole batches have a global sample position"
            )
        self.sampler.owned = True
        self._epoch = 0
        self._samples = 0  # global sample position in the current epoch
        self._started = False
        self._pending: dict[str, int] | None = None

    @property
    def _global_batch(self) -> int:
        """Samples all ranks consume per step: ``world_size * batch_size``."""
        return self.sampler.num_replicas * (self.batch_size or 1)  # type: ignore[attr-defined]

    def _epoch_done(self, samples: int) -> bool:
        """Whether fewer than one global batch of the epoch is left after ``samples``."""
        return len(self.dataset) - samples < self._global_batch  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if self._pending is not None:
            epoch, start = self._pending["epoch"], self._pending["samples"]
        elif self._started and self._epoch_done(self._samples):
            epoch, start = self._epoch + 1, 0
        else:
            epoch, start = self._epoch, 0
        if start and self._epoch_done(start):  # saved at (or, on fewer ranks, near) the end
            epoch, start = epoch + 1, 0
        self._pending, self._started = None, True
        sampler.epoch, sampler.start = epoch, start
        self._epoch, self._samples = epoch, start
        return self._count(super().__iter__())

    def _count(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._samples += self._global_batch
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {
            "epoch": self._epoch,
            "samples": self._samples,
            "world_size": sampler.num_replicas,
            "batch_size": int(self.batch_size or 1),
            "dataset_size": len(self.dataset),  # type: ignore[arg-type]
            "seed": sampler.seed,
        }

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        n = len(self.dataset)  # type: ignore[arg-type]
        seed = self.sampler.seed  # type: ignore[attr-defined]
        epoch = int(state_dict["epoch"])
        if "samples" in state_dict:
            samples = int(state_dict["samples"])
            saved_n = int(state_dict.get("dataset_size", n))
            if saved_n != n:
                raise UsageError(
                    f"the checkpoint's data loader state is for a training set of {saved_n} "
                    f"samples, this one has {n}; its position ({samples} samples into epoch "
                    f"{epoch}) cannot be continued exactly"
                )
            saved_seed = int(state_dict.get("seed", seed))
            if saved_seed != seed:
                raise UsageError(
                    f"the checkpoint's data loader shuffled with data.seed={saved_seed}, this run "
                    f"with {seed}; its position in epoch {epoch} cannot be continued exactly"
                )
        else:  # first format: batches of this rank, saved by this topology
            samples = int(state_dict["batches"]) * self._global_batch
        if not 0 <= samples <= n:
            raise UsageError(
                f"the checkpoint's data loader position ({samples} samples into epoch {epoch}) "
                f"is outside the training set of {n} samples"
            )
        self._pending = {"epoch": epoch, "samples": samples}


def _rank_and_world(trainer: pl.Trainer | None) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
    # data-parallel replicas only: the ranks of a context-parallel group read the same rows
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    if isinstance(kwargs, dict) and "rank" in kwargs and "num_replicas" in kwargs:
        return int(kwargs["rank"]), int(kwargs["num_replicas"])
    return trainer.global_rank, trainer.world_size


class _BaseDataModule(pl.LightningDataModule):
    """Loader plumbing shared by the data modules: resumable seeded training order."""

    train_set: Dataset
    val_set: Dataset
    test_set: Dataset
    #: whether exact-match accuracy over the answer tokens is meaningful (synthetic tasks)
    exact_match: bool = False
    #: the DataLoaders' ``collate_fn`` (``None``: PyTorch's default, stacking the items' tensors)
    collate_fn: Callable[[list[Any]], Any] | None = None

    def __init__(self, seq_len: int, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__()
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"data.{name} must be a positive int, got {v!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise UsageError(f"data.num_workers must be an int >= 0, got {num_workers!r}")
        self.seq_len, self.batch_size, self.seed, self.num_workers = (
            seq_len,
            batch_size,
            seed,
            num_workers,
        )

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def train_dataloader(self) -> ResumableDataLoader:
        rank, world = _rank_and_world(self.trainer)
        if len(self.train_set) < self.batch_size * world:
            raise UsageError(
                f"the training split has {len(self.train_set)} sequences, fewer than one batch "
                f"(data.batch_size={self.batch_size} x {world} device(s))"
            )
        sampler = ResumableSampler(
            self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


__all__ = ["IGNORE_INDEX", "ResumableDataLoader", "ResumableSampler"]
