"""A Hugging Face tokenizer from local files: a ``tokenizer.json`` (``tokenizers``) or a saved
tokenizer folder (``transformers.AutoTokenizer``, ``local_files_only=True``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_linear.errors import UsageError, did_you_mean
from kimi_linear.tokenizer.base import checked_ids, fingerprint, frame_ids

if TYPE_CHECKING:
    import torch

__all__ = ["HFTokenizer"]


_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|eos|>")


class HFTokenizer:
    """A Hugging Face tokenizer from local files: a ``tokenizer.json`` (``tokenizers``) or a
    saved tokenizer folder (``transformers.AutoTokenizer``, ``local_files_only=True``).

    ``encode`` never adds the tokenizer's own special tokens (the data path frames documents
    itself); ``decode`` drops special tokens.

    Args:
        path: a ``tokenizer.json`` file or a folder saved by ``save_pretrained``.
        eos_token: the end-of-document token; default: the folder's ``eos_token``, else the first
            of ``<|endoftext|>``, ``</s>``, ``<eos>``, ``[EOS]``, ``<|end_of_text|>``, ``<|eos|>``
            in the vocabulary.
        bos_token, pad_token: optional; default: the folder's, else none.
        trust_remote_code: let ``AutoTokenizer`` run a tokenizer class shipped in the folder
            (e.g. the Kimi release's ``tokenization_kimi.py``).  Off by default.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        p = Path(path)
        if not p.exists():
            raise UsageError(f"tokenizer: {os.fspath(path)!r} does not exist")
        self.path, self.trust_remote_code = p.resolve(), bool(trust_remote_code)
        defaults: dict[str, str | None] = {}
        if p.is_dir():
            from transformers import AutoTokenizer

            try:
                with warnings.catch_warnings():
                    # a model folder's config.json is read too; its deprecation notes (e.g.
                    # rope_scaling) are about the model, not the tokenizer
                    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
                    tok = AutoTokenizer.from_pretrained(
                        os.fspath(p), local_files_only=True, trust_remote_code=trust_remote_code
                    )
            except (OSError, ValueError, TypeError) as e:
                raise UsageError(
                    f"tokenizer: cannot load the folder {os.fspath(path)!r} with "
                    f"transformers.AutoTokenizer ({e})"
                ) from e
            vocab = dict(tok.get_vocab())
            self._encode = lambda text: list(tok.encode(text, add_special_tokens=False))
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
            self._specials = set(tok.all_special_ids)
            defaults = {"eos": tok.eos_token, "bos": tok.bos_token, "pad": tok.pad_token}
            size = max(len(tok), max(vocab.values(), default=-1) + 1)
        else:
            from tokenizers import Tokenizer as _Tokenizer

            try:
                tok = _Tokenizer.from_file(os.fspath(p))
            except Exception as e:  # the Rust side raises a plain Exception
                raise UsageError(
                    f"tokenizer: {os.fspath(path)!r} is not a tokenizers JSON file "
                    f"(tokenizer.json) ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                ) from e
            vocab = dict(tok.get_vocab(with_added_tokens=True))
            self._encode = lambda text: tok.encode(text, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
            self._specials = {
                i for i, t in tok.get_added_tokens_decoder().items() if getattr(t, "special", False)
            }
            size = max(
                tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1
            )
        self._tok, self.vocab_size = tok, int(size)

        def token_id(role: str, name: str | None) -> int | None:
            if name is None:
                return None
            if name not in vocab:
                specials = (
                    sorted(t for t, i in vocab.items() if i in self._specials) or sorted(vocab)[:20]
                )
                raise UsageError(
                    f"tokenizer: {role}_token {name!r} is not in the vocabulary of "
                    f"{os.fspath(path)!r}{did_you_mean(name, vocab)}; special tokens: {specials}"
                )
            return int(vocab[name])

        eos = (
            eos_token
            or defaults.get("eos")
            or next((t for t in _EOS_CANDIDATES if t in vocab), None)
        )
        if eos is None:
            specials = sorted(t for t, i in vocab.items() if i in self._specials)
            raise UsageError(
                f"tokenizer: {os.fspath(path)!r} has no end-of-document token; name one with "
                f"eos_token (special tokens: {specials})"
            )
        self.eos_token = eos
        self.bos_token = bos_token or defaults.get("bos")
        self.pad_token = pad_token or defaults.get("pad")
        self.eos_id = token_id("eos", eos)  # type: ignore[assignment]
        self.bos_id = token_id("bos", self.bos_token)
        self.pad_id = token_id("pad", self.pad_token)
        self._specials |= {i for i in (self.eos_id, self.bos_id, self.pad_id) if i is not None}

    @property
    def spec(self) -> dict[str, Any]:
        """The :func:`load_tokenizer` spec that rebuilds this tokenizer (with a sha256 of its files)."""
        return {
            "kind": "hf",
            "path": os.fspath(self.path),
            "eos_token": self.eos_token,
            "bos_token": self.bos_token,
            "pad_token": self.pad_token,
            "trust_remote_code": self.trust_remote_code,
            "sha256": fingerprint(self.path),
        }

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (no special tokens added by the tokenizer itself)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return frame_ids(list(self._encode(text)), self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: Iterable[int] | torch.Tensor, errors: str = "replace") -> str:
        """Text of ``ids`` with special tokens dropped; ``ValueError`` for an id outside the vocabulary."""
        ids = checked_ids(ids, self.vocab_size)
        return self._decode([i for i in ids if i not in self._specials])

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """:meth:`decode` of each row of a ``[B, T]`` batch."""
        return [self.decode(row) for row in batch]

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({os.fspath(self.path)!r}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token!r}, bos={self.bos_token!r})"
        )
