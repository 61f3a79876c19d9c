"""Offline data for training Kimi Linear models, by job:

* :mod:`.synthetic` -- the synthetic recall tasks of the Kimi Linear paper (MQAR, palindrome,
  stack) and :class:`SyntheticDataModule`;
* :mod:`.text` -- byte-level text held in memory (a file, a folder, or CPython's bundled
  ``pydoc_data.topics``) with held-out documents: :class:`TextDataModule`;
* :mod:`.sources`, :mod:`.preparation`, :mod:`.shards` -- ``kimi-linear prepare``: local text /
  JSONL / parquet tokenised in parallel into a chunked token dataset;
* :mod:`.tokens` -- :class:`TokenDataModule` over a prepared dataset: packed windows, with
  ``cu_seqlens`` document offsets when ``pack="reset"``;
* :mod:`.loading` -- seeded, rank-sharded, exactly resumable loading shared by the modules.

Errors are :class:`~kimi_linear.errors.UsageError` (re-exported here).  Nothing is downloaded.
Names are imported lazily, so ``kimi-linear prepare`` (numpy only) never loads torch or Lightning.
Batches are dicts ``{"input_ids": [B, T] long, "labels": [B, T] long}`` with ``labels`` aligned
to ``input_ids`` (the model shifts them), plus ``"cu_seqlens"`` for packed documents.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "UsageError": "kimi_linear.errors",
    "did_you_mean": "kimi_linear.errors",
    "IGNORE_INDEX": ".loading",
    "ResumableDataLoader": ".loading",
    "ResumableSampler": ".loading",
    "prepare": ".preparation",
    "prepare_main": ".preparation",
    "TokenShards": ".shards",
    "read_meta": ".shards",
    "BUILTIN_CORPUS": ".sources",
    "decode_text": ".sources",
    "document_key": ".sources",
    "TASKS": ".synthetic",
    "MQARTask": ".synthetic",
    "PalindromeTask": ".synthetic",
    "StackTask": ".synthetic",
    "SyntheticDataModule": ".synthetic",
    "SyntheticTask": ".synthetic",
    "SyntheticTaskDataset": ".synthetic",
    "make_task": ".synthetic",
    "DEFAULT_EXTENSIONS": ".text",
    "PackedTextDataset": ".text",
    "TextDataModule": ".text",
    "default_corpus": ".text",
    "pack_documents": ".text",
    "read_corpus": ".text",
    "split_documents": ".text",
    "PACK_MODES": ".tokens",
    "TokenDataModule": ".tokens",
    "TokenWindowDataset": ".tokens",
    "collate_windows": ".tokens",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = _EXPORTS[name]
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = sorted(_EXPORTS)
