"""Offline data for training Kimi Linear models: synthetic recall tasks and byte-level text.

Everything here is generated or read locally; nothing is downloaded.

* :class:`SyntheticDataModule` -- the synthetic tasks of the Kimi Linear paper (section 5.1):
  multi-query associative recall (:class:`MQARTask`, Zoology's generator), :class:`PalindromeTask`
  and :class:`StackTask`.  Example ``i`` of a split is a pure function of ``(seed, split, i)``,
  at any sequence length, and its labels are ``-100`` except on the answer tokens.
* :class:`TextDataModule` -- a :class:`~kimi_linear.lightning.tokenizer.ByteTokenizer` over a
  user-given file or folder, or by default over CPython's own ``pydoc_data.topics`` (optionally
  plus the standard library's sources found at run time), packed into fixed-length sequences.

Batches are dicts ``{"input_ids": [B, T] long, "labels": [B, T] long}`` with ``labels``
aligned to ``input_ids`` (the model shifts them for next-token prediction).

Training loaders are resumable: :class:`ResumableDataLoader` reports how many batches of the
current epoch it has yielded in its ``state_dict`` (Lightning stores that in checkpoints), and on
resume skips exactly those, so ``N`` steps straight and ``N/2`` + resume for ``N/2`` see the
same batches.  Its sampler, :class:`ResumableSampler`, is a ``DistributedSampler`` (rank and
world size taken from the trainer), so Lightning leaves it in place under DDP.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import os
import platform
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kimi_linear.lightning.tokenizer import ByteTokenizer

IGNORE_INDEX = -100


class UsageError(ValueError):
    """A bad user setting (config value, path, task name) found before training starts.

    The command line prints these as one-line errors instead of a traceback.
    """


def _did_you_mean(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class SyntheticTask:
    """A synthetic sequence task: token layout, vocabulary and a seeded generator.

    Subclasses implement :meth:`generate`, returning the tokens of one example and a mask of its
    answer positions (the tokens the model is scored on).
    """

    name: ClassVar[str] = ""
    pad_id: ClassVar[int] = 0

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def min_seq_len(self) -> int:
        """The shortest sequence length an example of this task fits in."""
        raise NotImplementedError

    def generate(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """One example: ``tokens`` int64 ``[seq_len]`` and ``answer_mask`` bool ``[seq_len]``."""
        raise NotImplementedError

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len < self.min_seq_len():
            raise UsageError(
                f"data.seq_len={seq_len} is too short for task {self.name!r} with "
                f"{self._describe()}: it needs seq_len >= {self.min_seq_len()}"
            )

    def _describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


@dataclass(frozen=True)
class MQARTask(SyntheticTask):
    """Multi-query associative recall, following Zoology's generator (Arora et al., 2023).

    Layout of one example (``P = num_kv_pairs``)::

        k_1 v_1 k_2 v_2 ... k_P v_P | 0 ... k_a v_a 0 ... k_b v_b 0 ...

    Keys come from ``[1, vocab_size // 2)`` and values from ``[vocab_size // 2, vocab_size)``
    (distinct keys; values drawn with replacement).  Every key is queried once in the second
    part, at slot ``2 * gap`` with ``gap`` drawn without replacement from a power law
    ``p(gap) ~ gap ** (power_a - 1)`` (short gaps likely), and the answer -- the key's value --
    follows it.  Only the answers are scored.  Token 0 is filler.
    """

    name: ClassVar[str] = "mqar"
    num_kv_pairs: int = 16
    num_tokens: int = 256
    power_a: float = 0.01

    def __post_init__(self) -> None:
        if self.num_tokens < 4 or self.num_tokens % 2:
            raise UsageError(f"mqar num_tokens must be an even int >= 4, got {self.num_tokens}")
        if not 1 <= self.num_kv_pairs <= self.num_tokens // 2 - 1:
            raise UsageError(
                f"mqar num_kv_pairs must be in [1, num_tokens // 2 - 1 = {self.num_tokens // 2 - 1}] "
                f"(keys are distinct), got {self.num_kv_pairs}"
            )
        if not 0 < self.power_a <= 1:
            raise UsageError(f"mqar power_a must be in (0, 1], got {self.power_a}")

    @property
    def vocab_size(self) -> int:
        return self.num_tokens

    def min_seq_len(self) -> int:
        return 4 * self.num_kv_pairs

    def generate(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        P, half = self.num_kv_pairs, self.num_tokens // 2
        keys = rng.choice(np.arange(1, half), size=P, replace=False)
        values = rng.integers(half, self.num_tokens, size=P)
        tokens = np.zeros(seq_len, dtype=np.int64)
        tokens[0 : 2 * P : 2] = keys
        tokens[1 : 2 * P : 2] = values
        slots = (seq_len - 2 * P) // 2
        p = self.power_a * np.arange(1, slots + 1, dtype=np.float64) ** (self.power_a - 1)
        gaps = rng.choice(slots, size=P, replace=False, p=p / p.sum())
        query_pos = 2 * P + 2 * gaps
        tokens[query_pos] = keys
        tokens[query_pos + 1] = values
        mask = np.zeros(seq_len, dtype=bool)
        mask[query_pos + 1] = True
        return tokens, mask


@dataclass(frozen=True)
class PalindromeTask(SyntheticTask):
    """Reproduce a random sequence reversed.

    Layout: ``r_1 ... r_n SEP r_n ... r_1`` with ``n = (seq_len - 1) // 2`` symbols drawn
    uniformly from ``num_symbols`` (ids ``2 .. num_symbols + 1``; ``SEP = 1``; a trailing ``0``
    pads an even ``seq_len``).  The reversed half is scored.
    """

    name: ClassVar[str] = "palindrome"
    sep_id: ClassVar[int] = 1
    num_symbols: int = 64

    def __post_init__(self) -> None:
        if self.num_symbols < 2:
            raise UsageError(f"palindrome num_symbols must be >= 2, got {self.num_symbols}")

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 2

    def min_seq_len(self) -> int:
        return 3

    def generate(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        n = (seq_len - 1) // 2
        seq = rng.integers(2, self.num_symbols + 2, size=n)
        tokens = np.zeros(seq_len, dtype=np.int64)
        tokens[:n] = seq
        tokens[n] = self.sep_id
        tokens[n + 1 : 2 * n + 1] = seq[::-1]
        mask = np.zeros(seq_len, dtype=bool)
        mask[n + 1 : 2 * n + 1] = True
        return tokens, mask


@dataclass(frozen=True)
class StackTask(SyntheticTask):
    """``num_stacks`` independent stacks under a random stream of push and pop operations.

    The sequence is ``seq_len // 2`` (operation, value) pairs: ``PUSH_s x`` pushes value ``x``
    on stack ``s``; ``POP_s y`` pops stack ``s`` and ``y`` is the popped value, which the model
    must predict (the scored tokens).  Each operation is a pop of a uniformly chosen non-empty
    stack with probability ``pop_prob`` (when any stack is non-empty), else a push of a uniform
    value on a uniform stack.  Ids: ``0`` filler, ``PUSH_s = 1 + s``,
    ``POP_s = 1 + num_stacks + s``, values ``1 + 2 * num_stacks + x``.
    """

    name: ClassVar[str] = "stack"
    num_stacks: int = 64
    num_values: int = 64
    pop_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.num_stacks < 1:
            raise UsageError(f"stack num_stacks must be >= 1, got {self.num_stacks}")
        if self.num_values < 2:
            raise UsageError(f"stack num_values must be >= 2, got {self.num_values}")
        if not 0 <= self.pop_prob < 1:
            raise UsageError(f"stack pop_prob must be in [0, 1), got {self.pop_prob}")

    @property
    def vocab_size(self) -> int:
        return 1 + 2 * self.num_stacks + self.num_values

    def push_id(self, s: int) -> int:
        return 1 + s

    def pop_id(self, s: int) -> int:
        return 1 + self.num_stacks + s

    def value_id(self, x: int) -> int:
        return 1 + 2 * self.num_stacks + x

    def min_seq_len(self) -> int:
        return 4

    def generate(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        n_ops = seq_len // 2
        # Draw all randomness up front (vectorised), then run the stacks in one Python loop.
        coin = rng.random(n_ops)
        push_stack = rng.integers(0, self.num_stacks, size=n_ops)
        push_value = rng.integers(0, self.num_values, size=n_ops)
        pick = rng.random(n_ops)
        stacks: list[list[int]] = [[] for _ in range(self.num_stacks)]
        nonempty: list[int] = []  # ids of non-empty stacks (unordered)
        tokens = np.zeros(seq_len, dtype=np.int64)
        mask = np.zeros(seq_len, dtype=bool)
        for t in range(n_ops):
            if nonempty and coin[t] < self.pop_prob:
                j = int(pick[t] * len(nonempty))
                s = nonempty[j]
                x = stacks[s].pop()
                if not stacks[s]:
                    nonempty[j] = nonempty[-1]
                    nonempty.pop()
                tokens[2 * t] = self.pop_id(s)
                mask[2 * t + 1] = True
            else:
                s, x = int(push_stack[t]), int(push_value[t])
                if not stacks[s]:
                    nonempty.append(s)
                stacks[s].append(x)
                tokens[2 * t] = self.push_id(s)
            tokens[2 * t + 1] = self.value_id(x)
        return tokens, mask


TASKS: dict[str, type[SyntheticTask]] = {t.name: t for t in (MQARTask, PalindromeTask, StackTask)}


def make_task(name: str, **kwargs: Any) -> SyntheticTask:
    """The task ``name`` (``"mqar"``, ``"palindrome"`` or ``"stack"``) with its options."""
    if name not in TASKS:
        raise UsageError(
            f"data.task must be one of {sorted(TASKS)}, got {name!r}{_did_you_mean(name, TASKS)}"
        )
    cls = TASKS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        raise UsageError(
            f"data.task_kwargs: unknown option {unknown[0]!r} for task {name!r}"
            f"{_did_you_mean(unknown[0], fields)}; options are {fields}"
        )
    return cls(**kwargs)


_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SyntheticTaskDataset(Dataset):
    """``num_samples`` examples of ``task`` at ``seq_len``; example ``i`` depends only on
    ``(seed, split, i)`` (a NumPy ``default_rng`` seeded with that triple).

    Items are ``{"input_ids": [T] long, "labels": [T] long}`` with labels ``-100`` except at the
    answer positions, where they equal the input token.
    """

    def __init__(
        self,
        task: SyntheticTask,
        seq_len: int,
        num_samples: int,
        seed: int = 0,
        split: str = "train",
    ) -> None:
        if split not in _SPLIT_CODES:
            raise ValueError(f"split must be one of {list(_SPLIT_CODES)}, got {split!r}")
        task.check_seq_len(seq_len)
        if num_samples < 1:
            raise UsageError(f"num_samples must be >= 1, got {num_samples}")
        self.task, self.seq_len, self.num_samples, self.seed, self.split = (
            task,
            seq_len,
            num_samples,
            seed,
            split,
        )
        # Mix the task's name and options into the stream so different tasks never share one.
        self._task_code = zlib.crc32(repr(task).encode())

    def __len__(self) -> int:
        return self.num_samples

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and answer mask of example ``index`` (NumPy arrays)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], self._task_code, index])
        return self.task.generate(rng, self.seq_len)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens, mask = self.example(index)
        input_ids = torch.from_numpy(tokens)
        labels = torch.where(torch.from_numpy(mask), input_ids, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}


class PackedTextDataset(Dataset):
    """Rows of a ``[N, T]`` token tensor; labels equal the inputs (the model shifts)."""

    def __init__(self, sequences: torch.Tensor) -> None:
        if sequences.dim() != 2:
            raise ValueError(f"sequences must be [N, T], got shape {tuple(sequences.shape)}")
        self.sequences = sequences

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.sequences[index].long()
        return {"input_ids": row, "labels": row.clone()}


# ----------------------------------------------------------------------------- resumable loading
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
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


class SyntheticDataModule(_BaseDataModule):
    """Synthetic recall tasks, generated on the fly and deterministically from ``seed``.

    Args:
        task: ``"mqar"``, ``"palindrome"`` or ``"stack"``.
        seq_len: tokens per example (any length the task fits in).
        batch_size: examples per batch (per device).
        num_train: examples per training epoch (each generated when loaded).
        num_val: examples in the validation and in the test split.
        seed: seeds every example (with the split and the example's index).
        task_kwargs: the task's options: ``mqar``: ``num_kv_pairs`` (16), ``num_tokens`` (256),
            ``power_a`` (0.01); ``palindrome``: ``num_symbols`` (64); ``stack``:
            ``num_stacks`` (64), ``num_values`` (64), ``pop_prob`` (0.5).
        num_workers: DataLoader worker processes.
    """

    exact_match = True

    def __init__(
        self,
        task: str = "mqar",
        seq_len: int = 256,
        batch_size: int = 32,
        num_train: int = 100_000,
        num_val: int = 256,
        seed: int = 0,
        task_kwargs: dict[str, Any] | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__(seq_len, batch_size, seed, num_workers)
        self.save_hyperparameters()
        self.task = make_task(task, **(task_kwargs or {}))
        self.task.check_seq_len(seq_len)
        for name, v in (("num_train", num_train), ("num_val", num_val)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"data.{name} must be a positive int, got {v!r}")
        self.train_set = SyntheticTaskDataset(self.task, seq_len, num_train, seed, "train")
        self.val_set = SyntheticTaskDataset(self.task, seq_len, num_val, seed, "val")
        self.test_set = SyntheticTaskDataset(self.task, seq_len, num_val, seed, "test")

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size


# ------------------------------------------------------------------------------------ text
DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py")


def default_corpus(include_stdlib: bool = False, stdlib_max_bytes: int = 8_000_000) -> list[str]:
    """Documents of the built-in corpus: CPython's ``pydoc_data.topics`` (the help() topics, in
    sorted order), and with ``include_stdlib`` the standard library's ``.py`` sources found at
    run time (sorted by path, tests and site-packages skipped) up to ``stdlib_max_bytes``.
    """
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    if include_stdlib:
        root = Path(sysconfig.get_paths()["stdlib"])
        total = 0
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).parts
            if any(
                p in ("site-packages", "dist-packages", "test", "tests", "idle_test") for p in rel
            ):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if total + len(text) > stdlib_max_bytes:
                break
            docs.append(text)
            total += len(text)
    return docs


def read_corpus(
    path: str | os.PathLike, extensions: Sequence[str] = DEFAULT_EXTENSIONS
) -> list[str]:
    """Documents under ``path``: the file itself, or every file of a folder (recursively, sorted)
    whose suffix is in ``extensions``.  Text is read as UTF-8 (undecodable bytes replaced)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"data.path: {os.fspath(path)!r} does not exist")
    if p.is_file():
        files = [p]
    else:
        exts = {e.lower() for e in extensions}
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
        if not files:
            raise UsageError(
                f"data.path: folder {os.fspath(path)!r} has no files with suffix in {sorted(exts)}"
            )
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def pack_documents(docs: Sequence[str], seq_len: int, tokenizer: ByteTokenizer) -> torch.Tensor:
    """Tokenise ``docs`` (each framed ``<bos> ... <eos>``), concatenate, and cut the stream into
    ``[N, seq_len]`` rows (int16; the incomplete tail is dropped)."""
    stream = _frame(docs, tokenizer)
    n = len(stream) // seq_len
    return torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).copy())


def _frame(docs: Sequence[str], tokenizer: ByteTokenizer) -> np.ndarray:
    parts: list[np.ndarray] = []
    bos = np.array([tokenizer.bos_id], dtype=np.int16)
    eos = np.array([tokenizer.eos_id], dtype=np.int16)
    for d in docs:
        parts += [bos, np.frombuffer(d.encode("utf-8"), dtype=np.uint8).astype(np.int16), eos]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)


class TextDataModule(_BaseDataModule):
    """Byte-level language modelling on local text, packed into ``seq_len``-token sequences.

    The last ``val_fraction`` of the packed sequences (at least one) is the validation split
    (also used for ``test`` and ``predict``); the rest is the training split.  On ``setup`` the
    module logs the Python version, the corpus size and a sha256 of the text (see
    :attr:`corpus_info`), since the default corpus depends on the interpreter.

    Args:
        path: a text file or a folder (files with a suffix in ``extensions``, recursively);
            ``None`` uses the built-in corpus (:func:`default_corpus`).
        seq_len: tokens per sequence.
        batch_size: sequences per batch (per device).
        val_fraction: share of the sequences held out, in ``(0, 0.5]``.
        include_stdlib: with the built-in corpus, also read the standard library's sources.
        stdlib_max_bytes: cap on the standard-library text.
        extensions: file suffixes read from a folder.
        seed: seeds the training order.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        path: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        include_stdlib: bool = False,
        stdlib_max_bytes: int = 8_000_000,
        extensions: list[str] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(seq_len, batch_size, seed, num_workers)
        self.save_hyperparameters()
        if path is not None and not Path(path).exists():
            raise UsageError(f"data.path: {path!r} does not exist")
        if not 0 < val_fraction <= 0.5:
            raise UsageError(f"data.val_fraction must be in (0, 0.5], got {val_fraction}")
        self.path, self.val_fraction = path, val_fraction
        self.include_stdlib, self.stdlib_max_bytes = include_stdlib, stdlib_max_bytes
        self.extensions = tuple(extensions) if extensions else DEFAULT_EXTENSIONS
        self.tokenizer = ByteTokenizer()
        self.corpus_info: dict[str, Any] = {}

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def load_documents(self) -> list[str]:
        if self.path is None:
            return default_corpus(self.include_stdlib, self.stdlib_max_bytes)
        return read_corpus(self.path, self.extensions)

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_set", None) is not None:
            return
        docs = self.load_documents()
        digest = hashlib.sha256()
        for d in docs:
            digest.update(d.encode("utf-8"))
        packed = pack_documents(docs, self.seq_len, self.tokenizer)
        tokens = sum(len(d.encode("utf-8")) + 2 for d in docs)
        if packed.shape[0] < 2:
            raise UsageError(
                f"data.seq_len={self.seq_len} is longer than the data allows: the corpus has "
                f"{tokens} tokens, and one training plus one validation sequence need "
                f"{2 * self.seq_len}"
            )
        n_val = max(1, round(self.val_fraction * packed.shape[0]))
        self.train_set = PackedTextDataset(packed[:-n_val])
        self.val_set = self.test_set = PackedTextDataset(packed[-n_val:])
        self.corpus_info = {
            "corpus": self.path
            or ("pydoc_data.topics" + (" + stdlib sources" if self.include_stdlib else "")),
            "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
            "documents": len(docs),
            "tokens": tokens,
            "sha256": digest.hexdigest(),
            "train_sequences": len(self.train_set),
            "val_sequences": n_val,
        }
        rank_zero_info("text corpus: " + ", ".join(f"{k}={v}" for k, v in self.corpus_info.items()))
        if self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_hyperparams({f"corpus/{k}": v for k, v in self.corpus_info.items()})


__all__ = [
    "IGNORE_INDEX",
    "MQARTask",
    "PackedTextDataset",
    "PalindromeTask",
    "ResumableDataLoader",
    "ResumableSampler",
    "StackTask",
    "SyntheticDataModule",
    "SyntheticTask",
    "SyntheticTaskDataset",
    "TASKS",
    "TextDataModule",
    "UsageError",
    "default_corpus",
    "make_task",
    "pack_documents",
    "read_corpus",
]
