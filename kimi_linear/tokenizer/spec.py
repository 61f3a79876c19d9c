"""Tokenizer specs: :func:`load_tokenizer` builds a tokenizer from ``"byte"``, a path or a dict
(what a tokenizer's ``spec`` gives back), and the spec a run recorded is found and compared
(:func:`find_tokenizer_spec`, :func:`tokenizer_difference`, :func:`holds_recorded_files`)."""

from __future__ import annotations

import base64
import inspect
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kimi_linear.errors import UsageError, did_you_mean
from kimi_linear.tokenizer.base import fingerprint
from kimi_linear.tokenizer.byte import ByteTokenizer
from kimi_linear.tokenizer.hf_tokenizer import HFTokenizer
from kimi_linear.tokenizer.tiktoken_bpe import TiktokenTokenizer

__all__ = [
    "TOKENIZER_KINDS",
    "TOKENIZER_STATE_KEY",
    "find_tokenizer_spec",
    "holds_recorded_files",
    "load_tokenizer",
    "parse_tokenizer_spec",
    "tokenizer_difference",
]

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


def parse_tokenizer_spec(text: str) -> str | dict[str, Any]:
    """A command-line ``--tokenizer`` value as a :func:`load_tokenizer` spec: ``"byte"``, a
    path, or a JSON object (``'{"kind": "tiktoken", "path": ..., "pattern": "gpt2"}'``)."""

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
    if fingerprint(p) == sha:
        return True
    return p.is_dir() and any(fingerprint(f) == sha for f in p.iterdir() if f.is_file())
