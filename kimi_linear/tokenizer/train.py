"""Training a byte-level BPE tokenizer (Hugging Face ``tokenizers``) on local texts, offline."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from kimi_linear.errors import UsageError

__all__ = ["BPE_EOS_TOKEN", "train_byte_level_bpe"]

#: The end-of-document token of a trained BPE tokenizer (its only special token).
BPE_EOS_TOKEN = "<|endoftext|>"


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, output: str | os.PathLike) -> Path:
    """Train a byte-level BPE tokenizer with :data:`BPE_EOS_TOKEN` as its EOS on ``texts`` and
    save it to ``output`` (a ``tokenizer.json``, read back by :func:`load_tokenizer`).

    Raises :class:`UsageError` when ``vocab_size`` cannot hold the 256 bytes and the EOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 257:
        raise UsageError(f"--train_bpe must be >= 257 (256 bytes + EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(output)
    tok.save(os.fspath(out))
    return out
