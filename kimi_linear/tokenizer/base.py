"""What every tokenizer here shares: the :class:`Tokenizer` interface and small id helpers.

Torch is never imported (``kimi-linear prepare`` stays light): a tensor of ids is recognised
only when torch is already loaded.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = ["Tokenizer", "checked_ids", "fingerprint", "frame_ids", "ids_list"]


def ids_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
    """``ids`` as a list of ints; a tensor must be 1-D.  (A tensor can only exist once torch is
    imported, so this module never imports torch itself: ``kimi-linear prepare`` stays light.)"""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


def checked_ids(ids: Iterable[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """:func:`ids_list` of ``ids``; ``ValueError`` for an id outside ``[0, vocab_size)``."""
    ids = ids_list(ids)
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ValueError(f"ids: token id {i} outside [0, {vocab_size})")
    return ids


@runtime_checkable
class Tokenizer(Protocol):
    """What the data path and ``generate`` need from a tokenizer (all classes here satisfy it)."""

    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None

    @property
    def spec(self) -> dict[str, Any]: ...

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int] | torch.Tensor, errors: str = "replace") -> str: ...


def frame_ids(ids: list[int], bos: int | None, eos: int, add_bos: bool, add_eos: bool) -> list[int]:
    if add_bos:
        if bos is None:
            raise ValueError("add_bos=True, but this tokenizer has no BOS token (bos_token)")
        ids.insert(0, bos)
    if add_eos:
        ids.append(eos)
    return ids


def fingerprint(path: Path) -> str:
    """sha256 of a file, or of a folder's files (non-recursive, sorted by name)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    for f in files:
        digest.update(f.name.encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
