"""Resumable, seeded, rank-sharded loading shared by every data module of the kit.

:class:`ResumableDataLoader` reports how many batches of the current epoch it has yielded in its
``state_dict`` (Lightning stores that in checkpoints), and on resume skips exactly those, so
``N`` steps straight and ``N/2`` + resume for ``N/2`` see the same batches.  Its sampler,
:class:`ResumableSampler`, is a ``DistributedSampler`` (rank and world size taken from the
trainer), so Lightning leaves it in place under DDP; the batches of a map-style dataset are
split across DataLoader worker processes by the DataLoader itself, in sampler order, so the
number of workers never changes the batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kimi_linear.errors import UsageError

IGNORE_INDEX = -100


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` (seeded shuffle per epoch, rank's share) that can start part-way.

    ``skip`` samples of this rank's order for the current epoch are dropped by the next
    ``__iter__`` (then ``skip`` resets to 0).  Works for ``num_replicas=1`` without
    ``torch.distributed`` being initialised.  When ``owned`` (set by
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
        self.skip = 0
        self.owned = False

    def set_epoch(self, epoch: int) -> None:
        if not self.owned:
            super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` that resumes exactly mid-epoch.

    The loader counts epochs itself (a pass that ran to its end advances the shuffle to the
    next epoch) and records ``{"epoch", "batches"}`` -- the batches of that epoch yielded so far
    -- in its ``state_dict``; after ``load_state_dict`` the next iteration continues that epoch,
    skipping those batches without loading them.  Lightning saves and restores this state with
    the fit loop (``_Stateful`` loaders), and does not pre-fetch loaders with a length, so
    "yielded" equals "trained on".  Owning the epoch count keeps the shuffle independent of the
    trainer's epoch bookkeeping, which differs between a straight and a resumed run when a
    checkpoint falls on an epoch boundary.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise ValueError(
                f"ResumableDataLoader needs a ResumableSampler, got {type(self.sampler).__name__}"
            )
        self.sampler.owned = True
        self._epoch = 0
        self._yielded = 0
        self._started = False
        self._pending: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        per_epoch = len(self)
        if self._pending is not None:
            epoch, skip = self._pending["epoch"], self._pending["batches"]
            if skip >= per_epoch:  # saved at the very end of an epoch
                epoch, skip = epoch + 1, 0
        elif self._started and self._yielded >= per_epoch:
            epoch, skip = self._epoch + 1, 0
        else:
            epoch, skip = self._epoch, 0
        self._pending, self._started = None, True
        sampler.epoch, sampler.skip = epoch, skip * (self.batch_size or 1)
        self._epoch, self._yielded = epoch, skip
        return self._count(super().__iter__())

    def _count(self, it: Iterator[Any]) -> Iterator[Any]:
        for batch in it:
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._yielded}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._pending = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}


def _rank_and_world(trainer: pl.Trainer | None) -> tuple[int, int]:
    if trainer is None:
        return 0, 1
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
