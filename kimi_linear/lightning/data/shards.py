"""The on-disk format of a prepared token dataset (written by ``kimi-linear prepare``).

::

    DIR/meta.json                 format, version, tokenizer spec, dtype, shards, summary
    DIR/train/000000.tokens       the token ids of one work unit's documents, back to back,
                                  each document followed by EOS (raw little-endian uint16/uint32)
    DIR/train/000000.docs.npy     int64 [documents]: end offset of each document in that file
    DIR/train/000000.mask         instruction / chat data only (``prepare --format``): one uint8
                                  per token, 1 where the token is in the loss (responses), 0 on
                                  prompts; labels become -100 where it is 0
    DIR/val/...                   the same for the held-out documents

A split is the concatenation of its shards in order.  :class:`TokenShards` reads any window of
it through ``numpy.memmap`` (opened lazily in each process, so DataLoader workers do not copy
it), together with the document starts inside the window.  ``meta.json`` is written last: a
folder without it is an unfinished preparation.  Only numpy is needed here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kimi_linear.errors import UsageError

FORMAT = "kimi-linear-tokens"
VERSION = 1
META = "meta.json"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` for vocabularies up to 65,536 ids, else ``uint32``."""
    if vocab_size <= 1 << 16:
        return np.dtype("<u2")
    if vocab_size <= 1 << 32:
        return np.dtype("<u4")
    raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")


def write_shard(
    root: str | os.PathLike,
    split: str,
    index: int,
    tokens: np.ndarray,
    doc_ends: np.ndarray,
    loss_mask: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write one shard of ``split`` (``tokens`` in the dataset dtype, ``doc_ends`` cumulative
    int64, optionally ``loss_mask``: bool / uint8 per token, 1 = in the loss); returns its
    ``meta.json`` entry."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if len(doc_ends) == 0 or int(doc_ends[-1]) != len(tokens):
        raise ValueError("doc_ends must be non-empty and end at len(tokens)")
    if loss_mask is not None and len(loss_mask) != len(tokens):
        raise ValueError(f"loss_mask has {len(loss_mask)} entries for {len(tokens)} tokens")
    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{index:06d}"
    tokens.tofile(folder / f"{name}.tokens")
    np.save(folder / f"{name}.docs.npy", doc_ends.astype(np.int64))
    entry = {
        "tokens": f"{split}/{name}.tokens",
        "docs": f"{split}/{name}.docs.npy",
        "num_tokens": len(tokens),
        "num_documents": len(doc_ends),
    }
    if loss_mask is not None:
        np.asarray(loss_mask, dtype=np.uint8).tofile(folder / f"{name}.mask")
        entry["mask"] = f"{split}/{name}.mask"
        entry["num_loss_tokens"] = int(np.count_nonzero(loss_mask))
    return entry


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    """The ``meta.json`` of a prepared dataset, checked for format and version."""
    path = Path(root) / META
    if not Path(root).exists():
        raise UsageError(
            f"data.path: {os.fspath(root)!r} does not exist (create it with kimi-linear prepare)"
        )
    if not path.is_file():
        raise UsageError(
            f"data.path: {os.fspath(root)!r} is not a prepared token dataset (no {META}; an "
            "interrupted kimi-linear prepare leaves none)"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"data.path: cannot read {os.fspath(path)!r} ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UsageError(
            f"data.path: {os.fspath(path)!r} is not a {FORMAT} v{VERSION} dataset "
            f"(format={meta.get('format')!r}, version={meta.get('version')!r})"
        )
    return meta


class TokenShards:
    """One split of a prepared dataset as a single token stream.

    Attributes:
        num_tokens: tokens in the split.
        num_documents: documents in the split.
        has_loss_mask: every shard has a loss mask (instruction / chat data): see
            :meth:`read_loss_mask`.
    """

    def __init__(self, root: str | os.PathLike, split: str, meta: dict[str, Any] | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.split = Path(root), split
        meta = meta if meta is not None else read_meta(root)
        self.dtype = np.dtype(meta["dtype"])
        self.shards = list(meta["splits"][split]["shards"])
        for s in self.shards:
            f = self.root / s["tokens"]
            if not f.is_file() or f.stat().st_size != s["num_tokens"] * self.dtype.itemsize:
                raise UsageError(
                    f"data.path: shard {os.fspath(f)!r} is missing or has the wrong size "
                    "(the dataset is damaged; prepare it again)"
                )
        with_mask = ["mask" in s for s in self.shards]
        if any(with_mask) and not all(with_mask):
            raise UsageError(
                f"data.path: {os.fspath(self.root)!r}: some {split} shards have a loss mask and "
                "some do not (the dataset is damaged; prepare it again)"
            )
        self.has_loss_mask = bool(with_mask) and all(with_mask)
        for s in self.shards if self.has_loss_mask else ():
            f = self.root / s["mask"]
            if not f.is_file() or f.stat().st_size != s["num_tokens"]:
                raise UsageError(
                    f"data.path: loss mask {os.fspath(f)!r} is missing or has the wrong size "
                    "(the dataset is damaged; prepare it again)"
                )
        counts = np.array([s["num_tokens"] for s in self.shards], dtype=np.int64)
        #: start offset of each shard in the split's stream, plus the total at the end
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_tokens = int(self.offsets[-1])
        self.num_documents = sum(int(s["num_documents"]) for s in self.shards)
        self._tokens: list[np.ndarray] | None = None
        self._docs: list[np.ndarray] | None = None
        self._masks: list[np.ndarray] | None = None

    def _open(self) -> None:
        self._tokens = [
            np.memmap(self.root / s["tokens"], dtype=self.dtype, mode="r") for s in self.shards
        ]
        self._docs = [np.load(self.root / s["docs"], mmap_mode="r") for s in self.shards]
        if self.has_loss_mask:
            self._masks = [
                np.memmap(self.root / s["mask"], dtype=np.uint8, mode="r") for s in self.shards
            ]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokens"] = state["_docs"] = state["_masks"] = None  # re-opened in each worker
        return state

    def _spans(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """``(shard, local_start, local_stop)`` pieces covering ``[start, stop)``."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"window [{start}, {stop}) outside [0, {self.num_tokens})")
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces = []
        i = first
        while start < stop:
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            end = min(stop, hi)
            if end > start:
                pieces.append((i, start - lo, end - lo))
            start = max(start, end)
            i += 1
        return pieces

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the split (int64)."""
        if self._tokens is None:
            self._open()
        assert self._tokens is not None
        parts = [self._tokens[i][a:b] for i, a, b in self._spans(start, stop)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def read_loss_mask(self, start: int, stop: int) -> np.ndarray:
        """Loss flags of tokens ``[start, stop)`` (bool; all ``True`` without a loss mask)."""
        if not self.has_loss_mask:
            return np.ones(stop - start, dtype=bool)
        if self._tokens is None:
            self._open()
        assert self._masks is not None
        parts = [self._masks[i][a:b] for i, a, b in self._spans(start, stop)]
        return np.concatenate(parts).astype(bool) if parts else np.zeros(0, bool)

    def document_starts(self, start: int, stop: int) -> np.ndarray:
        """Positions ``p`` in ``(0, stop - start)`` (relative to ``start``) where a document
        begins inside the window ``[start, stop)`` (int64, increasing)."""
        if self._docs is None:
            self._open()
        assert self._docs is not None
        found = []
        for i, a, b in self._spans(start, stop):
            ends = self._docs[i]
            lo, hi = np.searchsorted(ends, a, side="right"), np.searchsorted(ends, b, side="left")
            found.append(np.asarray(ends[lo:hi], dtype=np.int64) + int(self.offsets[i]) - start)
            if b == int(self.offsets[i + 1] - self.offsets[i]) and self.offsets[i + 1] < stop:
                found.append(np.array([self.offsets[i + 1] - start], dtype=np.int64))
        out = np.concatenate(found) if found else np.zeros(0, np.int64)
        return np.unique(out[(out > 0) & (out < stop - start)])


__all__ = [
    "FORMAT",
    "META",
    "SPLITS",
    "TokenShards",
    "VERSION",
    "read_meta",
    "token_dtype",
    "write_shard",
]
