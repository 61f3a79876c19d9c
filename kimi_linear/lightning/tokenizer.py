"""Tokenizers: the byte-level default, Hugging Face tokenizers and tiktoken BPE files.

Every tokenizer here is loaded from local files only; nothing is downloaded.

* :class:`ByteTokenizer` -- the 256 byte values plus ``<bos>``, ``<eos>`` and ``<pad>``.  It
  needs no vocabulary file, round-trips any UTF-8 text exactly and gives small models a tiny
  embedding table (259 rows); it is the default of the text data and of ``kimi-linear
  generate``.
* :class:`HFTokenizer` -- any Hugging Face tokenizer: a ``tokenizer.json`` file (the
  ``tokenizers`` library) or a saved tokenizer folder (``transformers.AutoTokenizer`` with
  ``local_files_only=True``).
* :class:`TiktokenTokenizer` -- a tiktoken BPE file (lines ``<base64 token> <rank>``, the format
  the Kimi tokenizer ships as ``tiktoken.model``) with a pre-tokenisation regex and special
  tokens.

:func:`load_tokenizer` builds any of them from a spec (``"byte"``, a path, or a dict) and
:attr:`spec` gives it back, so a prepared dataset records exactly how it was tokenised.  All of
them share the interface of :class:`Tokenizer`: ``vocab_size``, ``bos_id`` / ``eos_id`` /
``pad_id`` (``None`` when absent; ``eos_id`` is always set), ``encode(text, add_bos, add_eos)``,
``decode(ids)`` and ``batch_decode``.

The tokenizer travels with a run: a data module records its spec in its ``state_dict``
(:data:`TOKENIZER_STATE_KEY`, kept in Lightning checkpoints; :func:`find_tokenizer_spec` reads
it back), ``kimi-linear generate`` / ``export`` use it, and :func:`save_tokenizer_files` writes
a Hugging Face tokenizer into an exported model folder.
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kimi_linear.errors import UsageError, did_you_mean

if TYPE_CHECKING:
    import torch


def _ids_list(ids: Iterable[int] | torch.Tensor) -> list[int]:
    """``ids`` as a list of ints; a tensor must be 1-D.  (A tensor can only exist once torch is
    imported, so this module never imports torch itself: ``kimi-linear prepare`` stays light.)"""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [int(i) for i in ids]


def _checked_ids(ids: Iterable[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """:func:`_ids_list` of ``ids``; ``ValueError`` for an id outside ``[0, vocab_size)``."""
    ids = _ids_list(ids)
    for i in ids:
        if not 0 <= i < vocab_size:
            raise ValueError(f"ids: token id {i} outside [0, {vocab_size})")
    return ids


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
        ids = _checked_ids(ids, self.vocab_size)
        return bytes(i for i in ids if i < self.num_bytes).decode("utf-8", errors=errors)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """:meth:`decode` of each row of a ``[B, T]`` batch."""
        return [self.decode(row) for row in batch]

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


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


def _frame(ids: list[int], bos: int | None, eos: int, add_bos: bool, add_eos: bool) -> list[int]:
    if add_bos:
        if bos is None:
            raise ValueError("add_bos=True, but this tokenizer has no BOS token (bos_token)")
        ids.insert(0, bos)
    if add_eos:
        ids.append(eos)
    return ids


def _fingerprint(path: Path) -> str:
    """sha256 of a file, or of a folder's files (non-recursive, sorted by name)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    for f in files:
        digest.update(f.name.encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


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
            "sha256": _fingerprint(self.path),
        }

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (no special tokens added by the tokenizer itself)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return _frame(list(self._encode(text)), self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: Iterable[int] | torch.Tensor, errors: str = "replace") -> str:
        """Text of ``ids`` with special tokens dropped; ``ValueError`` for an id outside the vocabulary."""
        ids = _checked_ids(ids, self.vocab_size)
        return self._decode([i for i in ids if i not in self._specials])

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """:meth:`decode` of each row of a ``[B, T]`` batch."""
        return [self.decode(row) for row in batch]

    def __repr__(self) -> str:
        return (
            f"HFTokenizer({os.fspath(self.path)!r}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token!r}, bos={self.bos_token!r})"
        )


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
            "sha256": _fingerprint(self.path),
        }

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (special-token text is encoded as ordinary text)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return _frame(self._enc.encode_ordinary(text), self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: Iterable[int] | torch.Tensor, errors: str = "replace") -> str:
        """Text of ``ids`` with special tokens dropped; ``ValueError`` for an id outside the vocabulary."""
        ids = _checked_ids(ids, self.vocab_size)
        return self._enc.decode([i for i in ids if i not in self._specials], errors=errors)

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """:meth:`decode` of each row of a ``[B, T]`` batch."""
        return [self.decode(row) for row in batch]

    def __repr__(self) -> str:
        return (
            f"TiktokenTokenizer({os.fspath(self.path)!r}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token!r})"
        )


TOKENIZER_KINDS = ("byte", "hf", "tiktoken")


def _is_tiktoken_file(path: Path) -> bool:
    """Whether the first line of ``path`` reads ``<base64 token> <rank>``."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(4096).split()
        if len(first) != 2 or not first[1].isdigit():
            return False
        base64.b64decode(first[0], validate=True)
        return True
    except (OSError, ValueError):
        return False


def load_tokenizer(
    spec: str | os.PathLike | Mapping[str, Any] | None = "byte", **options: Any
) -> ByteTokenizer | HFTokenizer | TiktokenTokenizer:
    """A tokenizer from local files, described by ``spec``:

    * ``None`` or ``"byte"``: :class:`ByteTokenizer`;
    * a path: a folder or a ``*.json`` file -> :class:`HFTokenizer`; a file of
      ``<base64> <rank>`` lines -> :class:`TiktokenTokenizer` (needs ``pattern=``);
    * a dict ``{"kind": "byte" | "hf" | "tiktoken", "path": ..., **options}`` (what
      :attr:`spec` returns; a recorded ``sha256`` is checked against the files).

    ``options`` are passed to the class (``eos_token``, ``bos_token``, ``pad_token``,
    ``pattern``, ``special_tokens``, ``trust_remote_code``).  A missing path, an unknown kind or
    option, or a file of another format is a :class:`UsageError`.
    """
    if spec is None or (isinstance(spec, str) and spec == "byte"):
        if options:
            raise UsageError(
                f"tokenizer: the byte tokenizer takes no options, got {sorted(options)}"
            )
        return ByteTokenizer()
    if isinstance(spec, Mapping):
        options = {
            **{k: v for k, v in spec.items() if k not in ("kind", "path", "sha256")},
            **options,
        }
        kind, path, sha = spec.get("kind"), spec.get("path"), spec.get("sha256")
        if kind not in TOKENIZER_KINDS:
            raise UsageError(
                f"tokenizer.kind must be one of {list(TOKENIZER_KINDS)}, got {kind!r}"
                f"{did_you_mean(kind, TOKENIZER_KINDS)}"
            )
        if kind == "byte":
            return load_tokenizer("byte", **options)
        if path is None:
            raise UsageError(f"tokenizer: kind {kind!r} needs a path")
    elif isinstance(spec, (str, os.PathLike)):
        path, sha = spec, None
        p = Path(path)
        if not p.exists():
            raise UsageError(
                f"tokenizer: {os.fspath(path)!r} does not exist (give 'byte', a tokenizer.json, a "
                "tokenizer folder or a tiktoken BPE file; nothing is downloaded)"
            )
        if p.is_dir():
            files = {f.name for f in p.iterdir()}
            hf_files = {"tokenizer.json", "tokenizer_config.json"}
            kind = (
                "hf"
                if files & hf_files or not any(f.endswith((".model", ".tiktoken")) for f in files)
                else "tiktoken"
            )
            if kind == "tiktoken":
                path = next(p / f for f in sorted(files) if f.endswith((".model", ".tiktoken")))
        elif p.suffix == ".json":
            kind = "hf"
        elif _is_tiktoken_file(p):
            kind = "tiktoken"
        else:
            raise UsageError(
                f"tokenizer: {os.fspath(path)!r} is neither a tokenizers JSON file nor a tiktoken "
                "BPE file ('<base64 token> <rank>' lines); for a SentencePiece model, give its "
                "saved Hugging Face tokenizer folder"
            )
    else:
        raise TypeError(
            f"tokenizer spec must be 'byte', a path or a dict, got {type(spec).__name__}"
        )
    cls = HFTokenizer if kind == "hf" else TiktokenTokenizer
    import inspect

    allowed = [n for n in inspect.signature(cls).parameters if n != "path"]
    for k in options:
        if k not in allowed:
            raise UsageError(
                f"tokenizer: unknown option {k!r} for a {kind} tokenizer{did_you_mean(k, allowed)}; "
                f"options are {allowed}"
            )
    if not Path(path).exists():
        raise UsageError(f"tokenizer: {os.fspath(path)!r} does not exist")
    tok = cls(path, **options)
    if sha is not None and sha != tok.spec["sha256"]:
        raise UsageError(
            f"tokenizer: the files at {os.fspath(path)!r} changed since they were recorded "
            "(sha256 differs): the token ids would not match"
        )
    return tok


# ------------------------------------------------------------- the tokenizer of a run
#: Key of the :func:`load_tokenizer` spec in a data module's ``state_dict`` (kept in Lightning
#: checkpoints): how ``generate`` / ``export`` find the tokenizer a model was trained with.
TOKENIZER_STATE_KEY = "tokenizer"

#: Files of a saved Hugging Face tokenizer (copied verbatim by :func:`save_tokenizer_files`).
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "tiktoken.model",
    "chat_template.jinja",
)


def find_tokenizer_spec(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The tokenizer spec recorded in a Lightning ``checkpoint`` dict, or ``None``.

    A data module whose ``state_dict()`` holds a :data:`TOKENIZER_STATE_KEY` entry (a
    :func:`load_tokenizer` spec dict with a ``kind``) records its tokenizer there; Lightning
    saves that state under the data module's class name.  Raises :class:`UsageError` when
    several data-module states record different tokenizers.
    """
    found: list[dict[str, Any]] = []
    for key, value in checkpoint.items():
        if not isinstance(value, Mapping) or key in ("state_dict", "hyper_parameters"):
            continue
        spec = value.get(TOKENIZER_STATE_KEY)
        if isinstance(spec, Mapping) and "kind" in spec and dict(spec) not in found:
            found.append(dict(spec))
    if len(found) > 1:
        raise UsageError(f"tokenizer: the checkpoint records several tokenizers: {found}")
    return found[0] if found else None


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved Hugging Face tokenizer (``tokenizer.json`` or
    ``tokenizer_config.json``)."""
    p = Path(folder)
    return p.is_dir() and any(
        (p / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )


def parse_tokenizer_spec(text: str) -> str | dict[str, Any]:
    """A command-line ``--tokenizer`` value as a :func:`load_tokenizer` spec: ``"byte"``, a
    path, or a JSON object (``'{"kind": "tiktoken", "path": ..., "pattern": "gpt2"}'``)."""
    import json

    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"--tokenizer: {text!r} is not a valid JSON object ({e})") from None
        if not isinstance(spec, dict):
            raise UsageError(f"--tokenizer: expected a JSON object, got {text!r}")
        return spec
    return text


#: text encoded by :func:`tokenizer_difference` (ASCII, accents, CJK, emoji, code, digits)
_PROBE_TEXT = "The quick brown fox, déjà vu: 東京 🙂 def f(x):\n    return x ** 2  # 0123456789"


def tokenizer_difference(a: Any, b: Any, max_ids: int = 4096) -> str | None:
    """Why tokenizers ``a`` and ``b`` would not give the same token ids (``None`` when they
    agree): their vocabulary size and special ids, the text of single ids (all of them up to
    ``max_ids``, else ``max_ids`` evenly spaced ones and the last), and the ids of a probe text.

    It compares behaviour, not files, so the same vocabulary in another form (a
    ``tokenizer.json`` and the folder an export copied it into, the byte tokenizer and its
    ``tokenizer.json``) agrees, while another tokenizer of the same vocabulary size does not.
    """
    for attr in ("vocab_size", "eos_id", "bos_id", "pad_id"):
        va, vb = getattr(a, attr, None), getattr(b, attr, None)
        if va != vb:
            return f"{attr} {va} vs {vb}"
    n = int(a.vocab_size)
    ids = range(n) if n <= max_ids else sorted({*range(0, n, -(-n // max_ids)), n - 1})
    for i in ids:
        da, db = a.decode([i]), b.decode([i])
        if da != db:
            return f"token id {i} is {da!r} vs {db!r}"
    if a.encode(_PROBE_TEXT) != b.encode(_PROBE_TEXT):
        return f"{_PROBE_TEXT[:20]!r}... encodes to other ids"
    return None


def holds_recorded_files(spec: Mapping[str, Any], path: str | os.PathLike) -> bool:
    """Whether ``path`` (a file, or a folder's files) holds the files a recorded spec's
    ``sha256`` names: a tokenizer file that moved (or was copied into an export folder)."""
    sha, p = spec.get("sha256"), Path(path)
    if not sha or not p.exists():
        return False
    if _fingerprint(p) == sha:
        return True
    return p.is_dir() and any(_fingerprint(f) == sha for f in p.iterdir() if f.is_file())


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


def save_tokenizer_files(
    tok: ByteTokenizer | HFTokenizer | TiktokenTokenizer, output_dir: str | os.PathLike
) -> list[str]:
    """Write the files of ``tok`` into a model folder, so the folder carries its tokenizer.

    * a ``tokenizer.json`` tokenizer: the file, plus a ``tokenizer_config.json`` naming its
      special tokens (``PreTrainedTokenizerFast``), so ``transformers.AutoTokenizer`` and
      :func:`load_tokenizer` both read the folder back with the same ids;
    * a saved tokenizer folder: its tokenizer files (:data:`HF_TOKENIZER_FILES` and any
      ``tokenization_*.py``), copied verbatim;
    * the byte tokenizer: a ``tokenizer.json`` built by :func:`byte_tokenizer_json` and its
      ``tokenizer_config.json`` (special tokens in text are split as bytes,
      ``split_special_tokens``, so every text round-trips to the byte ids);
    * tiktoken files (whose pre-tokenisation regex has no standard file): nothing.

    Returns the names of the files written (``[]`` when nothing was written).
    """
    import json
    import shutil

    out = Path(output_dir)
    if isinstance(tok, ByteTokenizer):
        (out / "tokenizer.json").write_text(byte_tokenizer_json() + "\n")
        bos, eos, pad = BYTE_SPECIAL_TOKENS
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos,
            "eos_token": eos,
            "pad_token": pad,
            "split_special_tokens": True,
            "clean_up_tokenization_spaces": False,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return ["tokenizer.json", "tokenizer_config.json"]
    if isinstance(tok, HFTokenizer) and tok.path.is_file():
        shutil.copyfile(tok.path, out / "tokenizer.json")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "clean_up_tokenization_spaces": False,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return ["tokenizer.json", "tokenizer_config.json"]
    if isinstance(tok, HFTokenizer):
        names = [
            f.name
            for f in sorted(tok.path.iterdir())
            if f.is_file() and (f.name in HF_TOKENIZER_FILES or f.name.startswith("tokenization_"))
        ]
        for name in names:
            shutil.copyfile(tok.path / name, out / name)
        return names
    return []


__all__ = [
    "BYTE_SPECIAL_TOKENS",
    "ByteTokenizer",
    "HF_TOKENIZER_FILES",
    "TOKENIZER_STATE_KEY",
    "HFTokenizer",
    "TOKENIZER_KINDS",
    "TiktokenTokenizer",
    "Tokenizer",
    "byte_tokenizer_json",
    "find_tokenizer_spec",
    "has_tokenizer_files",
    "holds_recorded_files",
    "load_tokenizer",
    "parse_tokenizer_spec",
    "read_tiktoken_ranks",
    "save_tokenizer_files",
    "tokenizer_difference",
]
