"""A tokenizer's files in a model folder: which ones a Hugging Face tokenizer has, and writing
them (:func:`save_tokenizer_files`) so an exported folder carries its tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kimi_linear.tokenizer.byte import BYTE_SPECIAL_TOKENS, ByteTokenizer, byte_tokenizer_json
from kimi_linear.tokenizer.hf_tokenizer import HFTokenizer
from kimi_linear.tokenizer.tiktoken_bpe import TiktokenTokenizer

__all__ = ["HF_TOKENIZER_FILES", "has_tokenizer_files", "save_tokenizer_files"]

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


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a saved Hugging Face tokenizer (``tokenizer.json`` or
    ``tokenizer_config.json``)."""
    p = Path(folder)
    return p.is_dir() and any(
        (p / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")
    )


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
