"""A byte-level tokenizer: the 256 byte values plus ``<bos>``, ``<eos>`` and ``<pad>``.

It needs no vocabulary file and no download, round-trips any UTF-8 text exactly, and gives
small models a tiny embedding table (259 rows), which is what the offline text data and the
``kimi-linear generate`` subcommand use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class ByteTokenizer:
    """Bytes ``0..255`` map to ids ``0..255``; ``bos_id = 256``, ``eos_id = 257``, ``pad_id = 258``.

    Example::

        tok = ByteTokenizer()
        ids = tok.encode("héllo", add_bos=True)   # [256, 104, 195, 169, 108, 108, 111]
        tok.decode(ids)                            # "héllo" (specials are dropped)
    """

    num_bytes: int = 256
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258
    vocab_size: int = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (its UTF-8 bytes), optionally framed by ``<bos>`` / ``<eos>``."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, errors: str = "replace") -> str:
        """Text of ``ids``: special tokens are dropped, invalid UTF-8 is replaced (``errors``).

        Raises ``ValueError`` for an id outside ``[0, vocab_size)``.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: token id {i} outside [0, {self.vocab_size})")
            if i < self.num_bytes:
                out.append(i)
        return out.decode("utf-8", errors=errors)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """:meth:`decode` of each row of a ``[B, T]`` batch."""
        return [self.decode(row) for row in batch]

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


__all__ = ["ByteTokenizer"]
