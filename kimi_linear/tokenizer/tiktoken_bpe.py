"""A tiktoken BPE file (``<base64 token> <rank>`` lines, the Kimi tokenizer's ``tiktoken.model``)
with its pre-tokenisation regex and special tokens, read offline."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_linear.errors import UsageError, did_you_mean
from kimi_linear.tokenizer.base import checked_ids, fingerprint, frame_ids

if TYPE_CHECKING:
    import torch

__all__ = ["TiktokenTokenizer", "read_tiktoken_ranks"]


def _named_patterns() -> dict[str, str]:
    """Pre-tokenisation regexes known by name (taken from tiktoken's own package, not copied)."""
    from tiktoken_ext import openai_public

    return {"gpt2": openai_public.r50k_pat_str}


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken BPE file: one ``<base64 token> <rank>`` per line.

    Raises :class:`UsageError` naming the file and line for anything else (a binary file, a
    SentencePiece model, a malformed or repeated entry).
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"tokenizer: {os.fspath(path)!r} does not exist or is not a file")
    ranks: dict[bytes, int] = {}
    seen: set[int] = set()
    with open(p, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError("expected two fields")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except ValueError as e:
                raise UsageError(
                    f"tokenizer: {os.fspath(path)!r} line {lineno} is not '<base64 token> <rank>' "
                    f"({e}); a tiktoken BPE file was expected"
                ) from None
            if token in ranks or rank in seen or rank < 0:
                raise UsageError(
                    f"tokenizer: {os.fspath(path)!r} line {lineno}: repeated token or rank {rank}"
                )
            ranks[token] = rank
            seen.add(rank)
    if not ranks:
        raise UsageError(f"tokenizer: {os.fspath(path)!r} is empty")
    return ranks


class TiktokenTokenizer:
    """A tiktoken BPE file (``<base64 token> <rank>`` lines), read offline.

    The Kimi tokenizer ships in this format (``tiktoken.model``); its pre-tokenisation regex is
    the ``pat_str`` of the release's ``tokenization_kimi.py``, and its special tokens follow the
    ranks.  ``encode`` treats special-token text inside documents as plain text.

    Args:
        path: the BPE file.
        pattern: the pre-tokenisation regex (``regex`` syntax, as tiktoken), or a known name:
            ``"gpt2"`` (GPT-2 / r50k).  Required: a BPE file does not record it.
        special_tokens: ``{token: id}``, or a list of tokens numbered from the first id after
            the ranks; default: ``[eos_token]`` plus ``bos_token`` / ``pad_token`` when given.
        eos_token: the end-of-document token (must be among the special tokens).
        bos_token, pad_token: optional special tokens.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        pattern: str | None = None,
        special_tokens: Mapping[str, int] | Sequence[str] | None = None,
        eos_token: str = "<|endoftext|>",
        bos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        import regex
        import tiktoken

        if not isinstance(pattern, str) or not pattern:
            raise UsageError(
                "tokenizer: a tiktoken file needs its pre-tokenisation regex: pattern="
                f"<regex> or one of {sorted(_named_patterns())}"
            )
        named = _named_patterns()
        pat = named.get(pattern, pattern)
        try:
            regex.compile(pat)
        except regex.error as e:
            raise UsageError(f"tokenizer: pattern {pattern!r} is not a valid regex ({e})") from None
        ranks = read_tiktoken_ranks(path)
        first = max(ranks.values()) + 1
        if special_tokens is None:
            special_tokens = [t for t in (eos_token, bos_token, pad_token) if t is not None]
        if isinstance(special_tokens, Mapping):
            specials = {str(k): int(v) for k, v in special_tokens.items()}
        else:
            specials = {str(t): first + i for i, t in enumerate(dict.fromkeys(special_tokens))}
        clash = sorted(set(specials.values()) & set(ranks.values()))
        if clash:
            raise UsageError(f"tokenizer: special token ids {clash[:5]} collide with BPE ranks")
        for role, name in (("eos", eos_token), ("bos", bos_token), ("pad", pad_token)):
            if name is not None and name not in specials:
                raise UsageError(
                    f"tokenizer: {role}_token {name!r} is not among the special tokens "
                    f"{sorted(specials)}{did_you_mean(name, specials)}"
                )
        self.path, self.pattern = Path(path).resolve(), pattern
        self.special_tokens = specials
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self._enc = tiktoken.Encoding(
            name=f"kimi-linear:{self.path.name}",
            pat_str=pat,
            mergeable_ranks=ranks,
            special_tokens=specials,
        )
        self._specials = set(specials.values())
        self.vocab_size = max([first - 1, *specials.values()]) + 1
        self.eos_id = specials[eos_token]
        self.bos_id = specials[bos_token] if bos_token is not None else None
        self.pad_id = specials[pad_token] if pad_token is not None else None

    @property
    def spec(self) -> dict[str, Any]:
        """The :func:`load_tokenizer` spec that rebuilds this tokenizer (with a sha256 of the file)."""
        return {
            "kind": "tiktoken",
            "path": os.fspath(self.path),
            "pattern": self.pattern,
            "special_tokens": dict(self.special_tokens),
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "sha256": fingerprint(self.path),
        }

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token text is encoded as ordinary text)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return frame_ids(
            self._enc.encode_ordinary(text), self.bos_id, self.eos_id, add_bos, add_eos
        )

    def decode(self, ids: Iterable[int] | torch.Tensor, errors: str = "replace") -> str:
        """Text of ``ids`` with special tokens dropped; ``ValueError`` for an id outside the vocabulary."""
        ids = checked_ids(ids, self.vocab_size)
        return self._enc.decode([i for i in ids if i not in self._specials], errors=errors)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """:meth:`decode` of each row of a ``[B, T]`` batch."""
        return [self.decode(row) for row in batch]

    def __repr__(self) -> str:
        return (
            f"TiktokenTokenizer({os.fspath(self.path)!r}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token!r})"
        )
