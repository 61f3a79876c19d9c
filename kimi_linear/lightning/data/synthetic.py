"""The synthetic tasks of the Kimi Linear paper (section 5.1), generated offline.

Multi-query associative recall (:class:`MQARTask`, Zoology's generator), :class:`PalindromeTask`
and :class:`StackTask`.  Example ``i`` of a split is a pure function of ``(seed, split, i)``, at
any sequence length, and its labels are ``-100`` except on the answer tokens.
:class:`SyntheticDataModule` serves them to Lightning.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from kimi_linear.errors import UsageError, did_you_mean
from kimi_linear.lightning.data.loading import IGNORE_INDEX, _BaseDataModule


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

    def model_input(self, tokens: np.ndarray, answer_mask: np.ndarray) -> np.ndarray:
        """The model's input for one example of :meth:`generate`: the tokens themselves, answers
        included (teacher forcing), unless the task hides its answers (MQAR)."""
        return tokens

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

    Layout of one example (``P = num_kv_pairs``; ``_`` is the answer slot)::

        k_1 v_1 k_2 v_2 ... k_P v_P | 0 ... k_a _ 0 ... k_b _ 0 ...

    Keys come from ``[1, vocab_size // 2)`` and values from ``[vocab_size // 2, vocab_size)``,
    both distinct within an example.  Every key is queried once in the second part, at slot
    ``2 * gap`` with ``gap`` drawn without replacement from a power law
    ``p(gap) ~ gap ** (power_a - 1)`` (short gaps likely); the answer -- the key's value -- is
    the label of the slot after it.  Only the answers are scored.  Token 0 is filler.

    As in Zoology, the answer slot of the *input* holds filler, not the answer
    (``answers_in_input=False``): were the answers fed back, an earlier answer would reveal
    which values are still unqueried, and a model could score well above chance by elimination
    instead of recall (a 2-layer MLA-only model settles at about 0.39 answer accuracy that way,
    with 8 pairs: ``experiments/synthetic_tasks.py``).  ``answers_in_input=True`` feeds them back.
    """

    name: ClassVar[str] = "mqar"
    num_kv_pairs: int = 16
    num_tokens: int = 256
    power_a: float = 0.01
    answers_in_input: bool = False

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
        if not isinstance(self.answers_in_input, bool):
            raise UsageError(f"mqar answers_in_input must be a bool, got {self.answers_in_input!r}")

    @property
    def vocab_size(self) -> int:
        return self.num_tokens

    def min_seq_len(self) -> int:
        return 4 * self.num_kv_pairs

    def generate(self, rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        P, half = self.num_kv_pairs, self.num_tokens // 2
        keys = rng.choice(np.arange(1, half), size=P, replace=False)
        values = rng.choice(np.arange(half, self.num_tokens), size=P, replace=False)
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

    def model_input(self, tokens: np.ndarray, answer_mask: np.ndarray) -> np.ndarray:
        """Filler in the answer slots unless ``answers_in_input`` (see the class docstring)."""
        return tokens if self.answers_in_input else np.where(answer_mask, self.pad_id, tokens)


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
            f"data.task must be one of {sorted(TASKS)}, got {name!r}{did_you_mean(name, TASKS)}"
        )
    cls = TASKS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in kwargs if k not in fields]
    if unknown:
        raise UsageError(
            f"data.task_kwargs: unknown option {unknown[0]!r} for task {name!r}"
            f"{did_you_mean(unknown[0], fields)}; options are {fields}"
        )
    return cls(**kwargs)


_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class SyntheticTaskDataset(Dataset):
    """``num_samples`` examples of ``task`` at ``seq_len``; example ``i`` depends only on
    ``(seed, split, i)`` (a NumPy ``default_rng`` seeded with that triple).

    Items are ``{"input_ids": [T] long, "labels": [T] long}`` with labels ``-100`` except at the
    answer positions, where they hold the answer; ``input_ids`` is the task's
    :meth:`~SyntheticTask.model_input` (the answer too, except in MQAR's answer slots).
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
        input_ids = torch.from_numpy(self.task.model_input(tokens, mask))
        labels = torch.where(torch.from_numpy(mask), torch.from_numpy(tokens), IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}


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
            ``power_a`` (0.01), ``answers_in_input`` (False); ``palindrome``: ``num_symbols``
            (64); ``stack``: ``num_stacks`` (64), ``num_values`` (64), ``pop_prob`` (0.5).
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


__all__ = [
    "MQARTask",
    "PalindromeTask",
    "StackTask",
    "SyntheticDataModule",
    "SyntheticTask",
    "SyntheticTaskDataset",
    "TASKS",
    "make_task",
]
