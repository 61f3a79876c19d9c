"""Training on a prepared token dataset: :class:`TokenDataModule`.

The dataset comes from ``kimi-linear prepare`` (:mod:`~kimi_linear.lightning.data.preparation`):
each split is one token stream of whole documents, each followed by EOS, and the validation
split holds documents that are not in the training split.  The stream is cut into fixed
``seq_len`` windows (the incomplete tail dropped); training windows are shuffled from the seed
per epoch, sharded across DDP ranks and DataLoader workers, and resume exactly mid-epoch
(:class:`~kimi_linear.lightning.data.loading.ResumableDataLoader`).

Batches are ``{"input_ids": [B, T] long, "labels": [B, T] long}`` (labels aligned with the
inputs; the model shifts them).  With ``pack="reset"`` each batch also carries

* ``cu_seqlens``: int32 ``[S + 1]``, the offsets ``0 = c_0 < c_1 < ... < c_S = B * T`` of the
  ``S`` document pieces of the batch flattened to one ``[1, B * T]`` stream (every row start
  ``b * T`` is an offset, and so is every document start inside a row), so the model restarts
  its recurrent state, convolution and attention at each of them;
* ``labels`` set to ``-100`` at the first token of every piece, so no token is scored as the
  continuation of a different document (or row).

With ``pack="window"`` windows run across document boundaries (the model sees the EOS and the
next document in one context), as in plain GPT-style packing.

Instruction / chat datasets (``kimi-linear prepare --format ...``) store a loss mask beside the
tokens; a window's labels are ``-100`` wherever the mask is 0 (prompts, template tags, user
messages), read from the same token range as the window, so the mask stays aligned through any
packing (and the first-label masking of ``pack="reset"`` applies on top).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from kimi_linear.errors import UsageError, did_you_mean
from kimi_linear.lightning.data.loading import IGNORE_INDEX, _BaseDataModule
from kimi_linear.lightning.data.shards import TokenShards, read_meta
from kimi_linear.tokenizer import TOKENIZER_STATE_KEY, load_tokenizer

PACK_MODES = ("reset", "window")


class TokenWindowDataset(Dataset):
    """Window ``i`` = tokens ``[i * seq_len, (i + 1) * seq_len)`` of a split.

    Items are ``{"input_ids": [T] long, "labels": [T] long}``, plus ``"doc_starts"`` (int64,
    the positions in ``(0, T)`` where a document begins) when ``pack == "reset"``.  With a loss
    mask in the dataset, ``labels`` is ``-100`` where the mask is 0.
    """

    def __init__(self, shards: TokenShards, seq_len: int, pack: str = "reset") -> None:
        if pack not in PACK_MODES:
            raise UsageError(
                f"data.pack must be one of {list(PACK_MODES)}, got {pack!r}{did_you_mean(pack, PACK_MODES)}"
            )
        self.shards, self.seq_len, self.pack = shards, seq_len, pack
        self.num_windows = shards.num_tokens // seq_len

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range for {self.num_windows} windows")
        start, stop = index * self.seq_len, (index + 1) * self.seq_len
        ids = torch.from_numpy(self.shards.read(start, stop))
        labels = ids.clone()
        if self.shards.has_loss_mask:
            keep = torch.from_numpy(self.shards.read_loss_mask(start, stop))
            labels[~keep] = IGNORE_INDEX
        item = {"input_ids": ids, "labels": labels}
        if self.pack == "reset":
            item["doc_starts"] = torch.from_numpy(self.shards.document_starts(start, stop))
        return item


def collate_windows(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack window items into a batch; with ``doc_starts`` (``pack="reset"``), add
    ``cu_seqlens`` (int32) for the flattened ``[1, B * T]`` stream and mask each piece's first
    label with ``-100`` (see the module docstring)."""
    input_ids = torch.stack([it["input_ids"] for it in items])
    labels = torch.stack([it["labels"] for it in items])
    if "doc_starts" not in items[0]:
        return {"input_ids": input_ids, "labels": labels}
    B, T = input_ids.shape
    starts = [torch.zeros(1, dtype=torch.long)]
    for b, it in enumerate(items):
        if b:
            starts.append(torch.tensor([b * T]))
        starts.append(it["doc_starts"].long() + b * T)
    flat_starts = torch.cat(starts)
    labels.view(-1)[flat_starts] = IGNORE_INDEX
    cu_seqlens = torch.cat([flat_starts, torch.tensor([B * T])]).to(torch.int32)
    return {"input_ids": input_ids, "labels": labels, "cu_seqlens": cu_seqlens}


class TokenDataModule(_BaseDataModule):
    """A prepared token dataset (``kimi-linear prepare``) as packed ``seq_len`` windows.

    Args:
        path: the folder written by ``kimi-linear prepare`` (with ``meta.json``).
        seq_len: tokens per window.
        batch_size: windows per batch (per device).
        pack: ``"reset"``: batches carry ``cu_seqlens`` so the model restarts at each document
            (and no label crosses a document); ``"window"``: plain windows across documents.
        seed: seeds the per-epoch shuffle of the training windows.
        num_workers: DataLoader worker processes (they split the batches; the batches do not
            depend on their number).

    The vocabulary size (linked into the model by the CLI) and the tokenizer come from the
    dataset's ``meta.json``.  The module's ``state_dict`` (kept in Lightning checkpoints)
    records the dataset's fingerprint, the window settings and the tokenizer spec (read by
    ``kimi-linear generate`` / ``export``); resuming on another dataset,
    ``seq_len``, ``pack`` or ``seed`` is a :class:`UsageError` instead of a silently different
    order.
    """

    def __init__(
        self,
        path: str,
        seq_len: int = 512,
        batch_size: int = 8,
        pack: str = "reset",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(seq_len, batch_size, seed, num_workers)
        self.save_hyperparameters()
        if pack not in PACK_MODES:
            raise UsageError(
                f"data.pack must be one of {list(PACK_MODES)}, got {pack!r}{did_you_mean(pack, PACK_MODES)}"
            )
        self.path, self.pack = str(path), pack
        self.meta = read_meta(path)
        self.collate_fn = collate_windows
        self._tokenizer: Any = None

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def tokenizer(self) -> Any:
        """The tokenizer the dataset was prepared with (loaded from its recorded spec)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def tokenizer_spec(self) -> dict[str, Any]:
        """The dataset's :func:`~kimi_linear.tokenizer.load_tokenizer` spec, with a
        tokenizer stored inside the dataset given by its absolute path."""
        spec = dict(self.meta["tokenizer"])
        if "path" in spec and not Path(spec["path"]).is_absolute():
            spec["path"] = str((Path(self.path) / spec["path"]).resolve())
        return spec

    @property
    def fingerprint(self) -> str:
        """sha256 of what decides the token streams: the tokenizer (its spec and file hash, not
        its path), the vocabulary, and per split the token and document counts and the ordered
        document checksum.  Not the shard layout or the timing: preparing the same corpus again,
        with any number of workers, gives the same fingerprint."""
        keys = ("format", "version", "vocab_size", "dtype")
        content = {k: self.meta.get(k) for k in keys}
        content["tokenizer"] = {k: v for k, v in self.meta["tokenizer"].items() if k != "path"}
        content["splits"] = {
            name: {k: split.get(k) for k in ("num_documents", "num_tokens", "checksum")}
            for name, split in self.meta["splits"].items()
        }
        if self.meta.get("records") is not None:  # instruction / chat data: form and template
            content["records"] = self.meta["records"]
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_set", None) is not None:
            return
        T = self.seq_len
        splits = {}
        for split in ("train", "val"):
            shards = TokenShards(self.path, split, self.meta)
            if shards.num_tokens < T:
                raise UsageError(
                    f"data.seq_len={T} is longer than the {split} split of {self.path!r} "
                    f"({shards.num_tokens} tokens in {shards.num_documents} documents)"
                )
            splits[split] = TokenWindowDataset(shards, T, self.pack)
        self.train_set = splits["train"]
        self.val_set = self.test_set = splits["val"]

    def state_dict(self) -> dict[str, Any]:
        """What a resume checks, plus the tokenizer spec (``TOKENIZER_STATE_KEY``), which
        ``kimi-linear generate`` / ``export`` read from the checkpoint."""
        return {
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
            "pack": self.pack,
            "seed": self.seed,
            TOKENIZER_STATE_KEY: self.tokenizer_spec,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("fingerprint", "seq_len", "pack", "seed"):
            if key in state_dict and state_dict[key] != mine[key]:
                what = "dataset (meta.json)" if key == "fingerprint" else f"data.{key}"
                raise UsageError(
                    f"the checkpoint was trained with another {what}: "
                    f"{state_dict[key]!r} there, {mine[key]!r} now; resuming would not continue "
                    "the same sequence of batches"
                )


__all__ = ["PACK_MODES", "TokenDataModule", "TokenWindowDataset", "collate_windows"]
