"""Byte-level language modelling on local text held in memory: :class:`TextDataModule`.

The corpus is a user-given file or folder, or by default CPython's own ``pydoc_data.topics``
(optionally plus the standard library's sources found at run time).  Documents are framed
``<bos> ... <eos>``, and whole *documents* are held out for validation (:func:`split_documents`),
so no text is in both splits.  For a large corpus or a real tokenizer, prepare a token dataset
with ``kimi-linear prepare`` and train with :class:`~kimi_linear.lightning.data.tokens.TokenDataModule`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset

from kimi_linear.errors import UsageError
from kimi_linear.lightning.data.loading import _BaseDataModule
from kimi_linear.lightning.data.sources import MAX_INVALID_FRACTION, decode_text, document_key
from kimi_linear.tokenizer import ByteTokenizer

DEFAULT_EXTENSIONS = (".txt", ".md", ".rst", ".py")


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
    path: str | os.PathLike,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    max_invalid_fraction: float = MAX_INVALID_FRACTION,
) -> list[str]:
    """Documents under ``path``: the file itself, or every file of a folder (recursively, sorted)
    whose suffix is in ``extensions``, read as UTF-8.

    A file that is not text (a NUL byte, or more than ``max_invalid_fraction`` of its bytes
    invalid UTF-8; see :func:`~kimi_linear.lightning.data.sources.decode_text`) is skipped with a
    warning giving the count; if nothing readable is left, :class:`UsageError`.
    """
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
    docs, skipped = [], []
    for f in files:
        text = decode_text(f.read_bytes(), max_invalid_fraction)
        if text is None:
            skipped.append(os.fspath(f))
        elif text:
            docs.append(text)
    if not docs:
        raise UsageError(
            f"data.path: {os.fspath(path)!r} holds no text: {len(skipped)} file(s) are binary or "
            f"not UTF-8 (more than {max_invalid_fraction:.2%} invalid bytes), e.g. {skipped[0]!r}"
            if skipped
            else f"data.path: {os.fspath(path)!r} holds only empty files"
        )
    if skipped:
        rank_zero_warn(
            f"data.path: skipped {len(skipped)} file(s) that are not text (binary or not UTF-8), "
            f"e.g. {skipped[0]!r}"
        )
    return docs


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


def split_documents(
    docs: Sequence[str], val_tokens: int, tokens_of: Any = None
) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)`` of ``docs``, holding out whole documents for validation.

    Documents are taken for validation in the order of :func:`document_key` (a fixed
    pseudo-random order, independent of the seed and of the corpus order: the held-out set is
    spread over the corpus) until they hold at least ``val_tokens`` tokens (``tokens_of(doc)``,
    default: UTF-8 bytes + 2 for the ``<bos>`` / ``<eos>`` frame).  Copies of a validation
    document go to validation too.  At least one document stays in training.  Both lists keep
    the corpus order.
    """
    if len(docs) < 2:
        raise ValueError(f"holding out documents needs at least 2 documents, got {len(docs)}")
    size = tokens_of or (lambda d: len(d.encode("utf-8")) + 2)
    keys = [document_key(d) for d in docs]
    val_keys: set[int] = set()
    total = 0
    for i in sorted(range(len(docs)), key=lambda j: keys[j]):
        if total >= val_tokens:
            break
        val_keys.add(keys[i])
        total += size(docs[i])
    val = [i for i in range(len(docs)) if keys[i] in val_keys]
    train = [i for i in range(len(docs)) if keys[i] not in val_keys]
    if not train:  # everything is one text repeated, or val_tokens covers the corpus
        train, val = val[:1], val[1:]
    return train, val


class TextDataModule(_BaseDataModule):
    """Byte-level language modelling on local text, packed into ``seq_len``-token sequences.

    Whole documents, about ``val_fraction`` of the tokens (at least one sequence's worth), are
    held out as the validation split (also used for ``test`` and ``predict``): see
    :func:`split_documents`.  A single-document corpus cannot hold out a document; its last
    sequences are held out instead, with a warning.  Each split's documents are framed
    ``<bos> ... <eos>``, concatenated and cut into sequences.  On ``setup`` the module logs the
    Python version, the corpus size and a sha256 of the text (see :attr:`corpus_info`), since
    the default corpus depends on the interpreter.  The module's ``state_dict`` (kept in
    Lightning checkpoints) records that sha256 and the settings that shape the sequences
    (``seq_len``, ``val_fraction``, ``seed``); resuming ``fit`` on another corpus or with other
    settings is a :class:`UsageError` naming what changed, instead of a silently different
    sequence of batches (``validate`` / ``test`` of a checkpoint on any corpus are allowed).

    Args:
        path: a text file or a folder (files with a suffix in ``extensions``, recursively);
            ``None`` uses the built-in corpus (:func:`default_corpus`).  Files that are not
            text are skipped with a warning.
        seq_len: tokens per sequence.
        batch_size: sequences per batch (per device).
        val_fraction: share of the tokens held out, in ``(0, 0.5]``.
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
        tokens = sum(len(d.encode("utf-8")) + 2 for d in docs)
        T = self.seq_len
        too_short = UsageError(
            f"data.seq_len={T} is longer than the data allows: the corpus has {tokens} tokens, "
            f"and one training plus one validation sequence need {2 * T}"
        )
        if len(docs) >= 2:
            val_tokens = max(round(self.val_fraction * tokens), T)
            train_idx, val_idx = split_documents(docs, val_tokens)
            train = pack_documents([docs[i] for i in train_idx], T, self.tokenizer)
            val = pack_documents([docs[i] for i in val_idx], T, self.tokenizer)
            held_out = f"{len(val_idx)} documents"
        else:
            rank_zero_warn(
                "data.path holds a single document, so validation is the end of that document "
                "(not a held-out document); give several files for a document-level split"
            )
            packed = pack_documents(docs, T, self.tokenizer)
            n_val = max(1, round(self.val_fraction * packed.shape[0]))
            train, val = packed[:-n_val], packed[-n_val:]
            held_out = "the document's tail"
        if train.shape[0] < 1 or val.shape[0] < 1:
            raise too_short
        self.train_set = PackedTextDataset(train)
        self.val_set = self.test_set = PackedTextDataset(val)
        self.corpus_info = {
            "corpus": self.path
            or ("pydoc_data.topics" + (" + stdlib sources" if self.include_stdlib else "")),
            "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
            "documents": len(docs),
            "tokens": tokens,
            "sha256": digest.hexdigest(),
            "train_sequences": len(self.train_set),
            "val_sequences": len(self.val_set),
            "val_held_out": held_out,
        }
        rank_zero_info("text corpus: " + ", ".join(f"{k}={v}" for k, v in self.corpus_info.items()))
        if self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_hyperparams({f"corpus/{k}": v for k, v in self.corpus_info.items()})

    #: the state keys a resumed ``fit`` must match, and how the error names them
    RESUME_KEYS = {
        "corpus_sha256": "corpus (sha256 of its text)",
        "seq_len": "data.seq_len",
        "val_fraction": "data.val_fraction",
        "seed": "data.seed",
    }

    def state_dict(self) -> dict[str, Any]:
        """What a resumed ``fit`` checks: the corpus text's sha256 and the sequence settings."""
        if not self.corpus_info:
            self.setup()
        return {
            "corpus_sha256": self.corpus_info["sha256"],
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume ``fit`` on another corpus or with another ``seq_len``,
        ``val_fraction`` or ``seed`` (:class:`UsageError` naming each difference); evaluating a
        checkpoint (``validate`` / ``test`` / ``predict``) on any corpus is fine."""
        fn = getattr(getattr(self.trainer, "state", None), "fn", None)
        if fn is not None and getattr(fn, "value", fn) != "fit":
            return
        mine = self.state_dict()
        differing = [
            f"{what}: {state_dict[key]!r} there, {mine[key]!r} now"
            for key, what in self.RESUME_KEYS.items()
            if key in state_dict and state_dict[key] != mine[key]
        ]
        if differing:
            raise UsageError(
                "the checkpoint was trained with another "
                + "; ".join(differing)
                + "; resuming would not continue the same sequence of batches"
            )


__all__ = [
    "DEFAULT_EXTENSIONS",
    "PackedTextDataset",
    "TextDataModule",
    "default_corpus",
    "pack_documents",
    "read_corpus",
    "split_documents",
]
