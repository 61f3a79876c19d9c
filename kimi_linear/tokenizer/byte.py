"""The byte-level tokenizer (the default): 256 byte ids plus ``<bos>``, ``<eos>``, ``<pad>``,
and the same vocabulary as a Hugging Face ``tokenizer.json`` (:func:`byte_tokenizer_json`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kimi_linear.tokenizer.base import checked_ids

if TYPE_CHECKING:
    import torch

__all__ = ["BYTE_SPECIAL_TOKENS", "ByteTokenizer", "byte_tokenizer_json"]


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

    @property
    def spec(self) -> dict[str, Any]:
        """The :func:`load_tokenizer` spec that rebuilds this tokenizer."""
        return {"kind": "byte"}

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
        ids = checked_ids(ids, self.vocab_size)
        return bytes(i for i in ids if i < self.num_bytes).decode("utf-8", errors=errors)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """:meth:`decode` of each row of a ``[B, T]`` batch."""
        return [self.decode(row) for row in batch]

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE convention (GPT-2): each byte as one printable character; printable
    Latin-1 bytes stand for themselves, the other 68 get the characters from U+0100 on."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, shifted = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + shifted)
            shifted += 1
    return out


#: Names of the byte tokenizer's special tokens in its ``tokenizer.json`` (ids 256, 257, 258).
BYTE_SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")


def byte_tokenizer_json() -> str:
    """The :class:`ByteTokenizer` as a ``tokenizers`` JSON (``tokenizer.json``), built with the
    ``tokenizers`` library: a byte-level pre-tokenizer and decoder, a BPE model whose vocabulary
    is the 256 bytes at ids ``0..255`` with no merges, and ``<bos>`` / ``<eos>`` / ``<pad>`` at
    256 / 257 / 258.  Encoding gives the byte tokenizer's ids exactly, for any text; with
    ``add_special_tokens=True`` (transformers' default) ``<bos>`` is prepended, as
    ``kimi-linear generate`` does.  Decoding drops specials and replaces invalid UTF-8 as
    :meth:`ByteTokenizer.decode` does."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as _Tokenizer

    chars = _bytes_to_unicode()
    tok = _Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in BYTE_SPECIAL_TOKENS]
    )
    bos = BYTE_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ByteTokenizer.bos_id)]
    )
    ids = [tok.token_to_id(t) for t in BYTE_SPECIAL_TOKENS]
    if ids != [ByteTokenizer.bos_id, ByteTokenizer.eos_id, ByteTokenizer.pad_id]:
        raise RuntimeError(f"byte tokenizer.json: special tokens got ids {ids}")
    return tok.to_str(pretty=True)
