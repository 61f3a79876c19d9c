"""Tokenizers from local files: byte (default), Hugging Face (tokenizer.json / folder), tiktoken.

A small byte-level BPE is trained at test time with ``tokenizers`` on CPython's bundled help
text; the same vocabulary written as a tiktoken file must tokenise exactly like it.
"""

from __future__ import annotations

import base64
import socket
from pathlib import Path

import pytest
import torch

from kimi_linear.errors import UsageError
from kimi_linear.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    read_tiktoken_ranks,
)


def _topics(start: int, stop: int) -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[start:stop]]


def _bytes_of_char() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet (GPT-2): printable bytes map to themselves, the
    other 68 bytes to code points 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 600-token byte-level BPE trained on 30 help topics, as tokenizer.json, as a saved
    transformers folder, and as a tiktoken file (same ranks)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("bpe")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_topics(0, 30), trainer=trainer)
    tok.save(str(root / "tokenizer.json"))
    from transformers import PreTrainedTokenizerFast

    folder = root / "hf"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    to_byte = _bytes_of_char()
    lines = [
        f"{base64.b64encode(bytes(to_byte[c] for c in t)).decode()} {i}"
        for t, i in sorted(tok.get_vocab().items(), key=lambda x: x[1])
        if t != "<|endoftext|>"
    ]
    (root / "tiktoken.model").write_text("\n".join(lines) + "\n")
    return {"json": root / "tokenizer.json", "folder": folder, "tiktoken": root / "tiktoken.model"}


TEXTS = ["héllo wörld ✓ \n\t", "def f(x):\n    return x ** 2  # 中文", ""]


def test_byte_tokenizer_is_the_default() -> None:
    tok = load_tokenizer()
    assert isinstance(tok, ByteTokenizer) and isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert tok.spec == {"kind": "byte"} and isinstance(load_tokenizer(tok.spec), ByteTokenizer)
    assert isinstance(tok, Tokenizer)
    with pytest.raises(UsageError, match="takes no options"):
        load_tokenizer("byte", eos_token="x")


@pytest.mark.parametrize("kind", ["json", "folder", "tiktoken"])
def test_round_trip_framing_and_spec(bpe: dict[str, Path], kind: str) -> None:
    options = (
        {"pattern": "gpt2", "special_tokens": {"<|endoftext|>": 0}} if kind == "tiktoken" else {}
    )
    tok = load_tokenizer(bpe[kind], **options)
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 600 and tok.eos_id == 0
    for text in [*TEXTS, *_topics(40, 42)]:
        ids = tok.encode(text)
        assert all(0 < i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode(text, add_eos=True) == [*ids, tok.eos_id]
        assert tok.decode(torch.tensor([*ids, tok.eos_id])) == text  # specials dropped
    # training text compresses well below one token per byte
    doc = _topics(0, 1)[0]
    assert len(tok.encode(doc)) < 0.6 * len(doc.encode())
    again = load_tokenizer(tok.spec)
    assert type(again) is type(tok) and again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    with pytest.raises(ValueError, match="token id 600 outside"):
        tok.decode([600])
    with pytest.raises(ValueError, match="text must be a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no BOS token"):
        tok.encode("x", add_bos=True)


def test_tiktoken_file_matches_the_hf_bpe_exactly(bpe: dict[str, Path]) -> None:
    hf = load_tokenizer(bpe["json"])
    tt = load_tokenizer(bpe["tiktoken"], pattern="gpt2", special_tokens={"<|endoftext|>": 0})
    assert isinstance(hf, HFTokenizer) and isinstance(tt, TiktokenTokenizer)
    for text in [*TEXTS, *_topics(30, 40)]:
        assert tt.encode(text) == hf.encode(text)


def test_tiktoken_specials_bos_and_own_regex(bpe: dict[str, Path]) -> None:
    tok = TiktokenTokenizer(
        bpe["tiktoken"],
        pattern=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        special_tokens=["[EOS]", "[BOS]"],
        eos_token="[EOS]",
        bos_token="[BOS]",
    )
    assert (tok.eos_id, tok.bos_id, tok.vocab_size) == (600, 601, 602)
    ids = tok.encode("print('hi')", add_bos=True, add_eos=True)
    assert ids[0] == 601 and ids[-1] == 600 and tok.decode(ids) == "print('hi')"
    # special-token text inside a document is ordinary text, never a control token
    assert 600 not in tok.encode("a [EOS] b") and tok.decode(tok.encode("a [EOS] b")) == "a [EOS] b"


def test_nothing_is_downloaded(bpe: dict[str, Path], monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("a tokenizer tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    load_tokenizer(bpe["folder"]).encode("x")
    load_tokenizer(bpe["json"]).encode("x")
    load_tokenizer(bpe["tiktoken"], pattern="gpt2").encode("x")


def test_tokenizer_errors(bpe: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(
        UsageError, match="'nope/tokenizer.json' does not exist.*nothing is downloaded"
    ):
        load_tokenizer("nope/tokenizer.json")
    with pytest.raises(UsageError, match="needs its pre-tokenisation regex"):
        load_tokenizer(bpe["tiktoken"], pattern="")
    with pytest.raises(UsageError, match="needs its pre-tokenisation regex"):
        load_tokenizer(bpe["tiktoken"])  # no pattern given
    with pytest.raises(UsageError, match="not a valid regex"):
        load_tokenizer(bpe["tiktoken"], pattern="(unclosed")
    with pytest.raises(UsageError, match="eos_token 'EOS' is not among the special tokens"):
        load_tokenizer(bpe["tiktoken"], pattern="gpt2", special_tokens=["<eos>"], eos_token="EOS")
    with pytest.raises(UsageError, match="collide with BPE ranks"):
        load_tokenizer(bpe["tiktoken"], pattern="gpt2", special_tokens={"<|endoftext|>": 5})
    with pytest.raises(UsageError, match="unknown option 'patern'.*did you mean 'pattern'"):
        load_tokenizer(bpe["tiktoken"], patern="gpt2")
    with pytest.raises(
        UsageError, match="eos_token '</S>' is not in the vocabulary.*special tokens"
    ):
        load_tokenizer(bpe["json"], eos_token="</S>")
    with pytest.raises(UsageError, match="tokenizer.kind must be one of .*did you mean 'tiktoken'"):
        load_tokenizer({"kind": "tiktokn", "path": str(bpe["tiktoken"])})
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x08\x01\x12\x00binary sentencepiece")
    with pytest.raises(UsageError, match="neither a tokenizers JSON file nor a tiktoken BPE file"):
        load_tokenizer(bad)
    broken = tmp_path / "broken.tiktoken"
    broken.write_text("IQ== 0\nnot-base64! 1\n")
    with pytest.raises(UsageError, match="line 2 is not '<base64 token> <rank>'"):
        read_tiktoken_ranks(broken)
    notjson = tmp_path / "tok.json"
    notjson.write_text("{}")
    with pytest.raises(UsageError, match="is not a tokenizers JSON file"):
        load_tokenizer(notjson)
    # a recorded fingerprint protects against a changed file
    spec = load_tokenizer(bpe["json"]).spec
    with pytest.raises(UsageError, match="changed since they were recorded"):
        load_tokenizer({**spec, "sha256": "0" * 64})
    with pytest.raises(TypeError, match="tokenizer spec must be"):
        load_tokenizer(3)  # type: ignore[arg-type]
