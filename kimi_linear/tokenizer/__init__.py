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

from kimi_linear.tokenizer.base import Tokenizer
from kimi_linear.tokenizer.byte import BYTE_SPECIAL_TOKENS, ByteTokenizer, byte_tokenizer_json
from kimi_linear.tokenizer.files import (
    HF_TOKENIZER_FILES,
    has_tokenizer_files,
    save_tokenizer_files,
)
from kimi_linear.tokenizer.hf_tokenizer import HFTokenizer
from kimi_linear.tokenizer.spec import (
    TOKENIZER_KINDS,
    TOKENIZER_STATE_KEY,
    find_tokenizer_spec,
    holds_recorded_files,
    load_tokenizer,
    parse_tokenizer_spec,
    tokenizer_difference,
)
from kimi_linear.tokenizer.tiktoken_bpe import TiktokenTokenizer, read_tiktoken_ranks
from kimi_linear.tokenizer.train import BPE_EOS_TOKEN, train_byte_level_bpe

__all__ = [
    "BPE_EOS_TOKEN",
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
    "train_byte_level_bpe",
]
