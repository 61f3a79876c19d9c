"""The tokenizer travels with the run: a model trained on a prepared BPE dataset
(TokenDataModule) records the dataset's tokenizer in its Lightning checkpoint, ``kimi-linear
generate`` uses it (or ``--tokenizer``), and ``kimi-linear export`` copies it into the folder."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from kimi_linear.cli import main
from kimi_linear.errors import UsageError
from kimi_linear.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    find_tokenizer_spec,
    load_tokenizer,
    parse_tokenizer_spec,
    save_tokenizer_files,
)

WORDS = ["alpha", "beta", "gamma", "delta", "kda", "mla", "moe", "state", "decay", "gate"]


def _write_docs(path: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    docs = [
        f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(10, 40)))
        for i in range(n)
    ]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A dataset with a 300-id BPE tokenizer trained by ``prepare``, and a Lightning checkpoint
    of 1 training step of a 2-layer model on it (TokenDataModule, pack="reset")."""
    import lightning.pytorch as pl

    from kimi_linear.lightning.data import TokenDataModule, prepare
    from kimi_linear.lightning.module import KimiLinearLitModule

    root = tmp_path_factory.mktemp("bpe_run")
    src = _write_docs(root / "docs.jsonl", 40)
    prepare(
        [src], root / "ds", train_bpe_vocab=300, val_fraction=0.2, num_workers=1, progress=False
    )
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pl.seed_everything(0)
        dm = TokenDataModule(str(root / "ds"), seq_len=16, batch_size=2, pack="reset")
        module = KimiLinearLitModule(
            preset="tiny",
            overrides=dict(num_hidden_layers=2, kda_backend="torch", first_k_dense_replace=1),
            vocab_size=dm.vocab_size,
            warmup_steps=1,
        )
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            enable_checkpointing=False, default_root_dir=str(root),
        )  # fmt: skip
        trainer.fit(module, datamodule=dm)
        trainer.save_checkpoint(root / "model.ckpt")
    finally:
        torch.set_num_threads(n)
    return {"root": root, "ckpt": root / "model.ckpt", "tokenizer": root / "ds" / "tokenizer.json"}


def _reference(ckpt: Path, tok, prompt: str, n: int) -> str:
    """Greedy continuation computed by hand: the model, the tokenizer, decode."""
    from kimi_linear.lightning.load import load_model

    model = load_model(ckpt).eval()
    ids = torch.tensor([tok.encode(prompt, add_bos=tok.bos_id is not None)])
    out = model.generate(ids, n, temperature=0.0, eos_token_id=tok.eos_id)
    return prompt + tok.decode(out[0, ids.shape[1] :])


GEN = ["--prompt", "doc 3: alpha", "--max_new_tokens", "6", "--temperature", "0"]


def test_checkpoint_records_the_dataset_tokenizer(run) -> None:
    ckpt = torch.load(run["ckpt"], weights_only=True, map_location="cpu")
    spec = find_tokenizer_spec(ckpt)
    assert spec is not None and spec["kind"] == "hf"
    assert Path(spec["path"]) == run["tokenizer"].resolve()  # absolute, not relative to the data
    assert load_tokenizer(spec).vocab_size == 300


def test_generate_uses_the_recorded_tokenizer(run, capsys) -> None:
    assert main(["generate", "--ckpt_path", str(run["ckpt"]), *GEN]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    tok = HFTokenizer(run["tokenizer"], eos_token="<|endoftext|>")
    assert printed == _reference(run["ckpt"], tok, "doc 3: alpha", 6)


def test_tokenizer_flag_overrides_and_checks_the_vocabulary(run, tmp_path: Path, capsys) -> None:
    # the same tokenizer given explicitly (path, and a JSON spec) gives the same text
    assert main(["generate", "--ckpt_path", str(run["ckpt"]), *GEN]) == 0
    expected = capsys.readouterr().out
    copy = tmp_path / "tok.json"
    shutil.copyfile(run["tokenizer"], copy)
    assert main(["generate", "--ckpt_path", str(run["ckpt"]), "--tokenizer", str(copy), *GEN]) == 0
    assert capsys.readouterr().out == expected
    spec = json.dumps({"kind": "hf", "path": str(copy), "eos_token": "<|endoftext|>"})
    assert main(["generate", "--ckpt_path", str(run["ckpt"]), "--tokenizer", spec, *GEN]) == 0
    assert capsys.readouterr().out == expected
    # a tokenizer with more ids than the model's vocabulary: a clear error, exit 2
    big = tmp_path / "big"
    from kimi_linear.lightning.data import prepare

    prepare(
        [_write_docs(tmp_path / "d.jsonl", 60, seed=1)], big, train_bpe_vocab=400,
        val_fraction=0.2, num_workers=1, progress=False,
    )  # fmt: skip
    big_tok = big / "tokenizer.json"
    assert load_tokenizer(big_tok).vocab_size > 300
    rc = main(["generate", "--ckpt_path", str(run["ckpt"]), "--tokenizer", str(big_tok), *GEN])
    err = capsys.readouterr().err
    assert rc == 2 and "--tokenizer: the tokenizer has" in err
    assert "more than the model's vocabulary (300)" in err and "Traceback" not in err
    # bad --tokenizer values
    for value, message in [
        (str(tmp_path / "nope.json"), "does not exist"),
        ("{not json", "is not a valid JSON object"),
        ('{"kind": "tiktokn", "path": "x"}', "did you mean 'tiktoken'"),
    ]:
        rc = main(["generate", "--ckpt_path", str(run["ckpt"]), "--tokenizer", value, *GEN])
        err = capsys.readouterr().err
        assert rc == 2 and "--tokenizer" in err and message in err, (value, err)


def test_a_moved_or_changed_tokenizer_is_named(run, tmp_path: Path, capsys) -> None:
    """A checkpoint whose recorded tokenizer file moved or changed: one line naming it and
    suggesting --tokenizer; never a silent re-tokenisation with other ids."""
    ckpt = torch.load(run["ckpt"], weights_only=False, map_location="cpu")
    spec = find_tokenizer_spec(ckpt)
    moved = tmp_path / "moved.ckpt"
    ckpt["TokenDataModule"]["tokenizer"] = {**spec, "path": str(tmp_path / "gone.json")}
    torch.save(ckpt, moved)
    assert main(["generate", "--ckpt_path", str(moved), *GEN]) == 2
    err = capsys.readouterr().err
    assert "gone.json" in err and "does not exist" in err and "--tokenizer" in err
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(json.loads(run["tokenizer"].read_text()), indent=1))
    ckpt["TokenDataModule"]["tokenizer"] = {**spec, "path": str(changed)}
    torch.save(ckpt, moved)
    assert main(["generate", "--ckpt_path", str(moved), *GEN]) == 2
    assert "sha256 differs" in capsys.readouterr().err
    # the fix the message suggests
    assert (
        main(["generate", "--ckpt_path", str(moved), "--tokenizer", str(run["tokenizer"]), *GEN])
        == 0
    )


def test_another_tokenizer_of_the_same_vocabulary_size_is_refused(
    run, tmp_path: Path, capsys
) -> None:
    """--tokenizer with another 300-id BPE (same vocabulary size, other merges): an error naming
    the recorded tokenizer and the override flag, for a checkpoint and an exported folder; the
    override runs with a warning.  The same tokenizer in another form is accepted."""
    from kimi_linear.lightning.data import prepare

    prepare(
        [_write_docs(tmp_path / "other.jsonl", 40, seed=5)], tmp_path / "other",
        train_bpe_vocab=300, val_fraction=0.2, num_workers=1, progress=False,
    )  # fmt: skip
    other = tmp_path / "other" / "tokenizer.json"
    assert load_tokenizer(other).vocab_size == 300  # fits the model: only the ids differ
    out = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(out)]) == 0
    capsys.readouterr()
    for ckpt, where in ((run["ckpt"], "tokenizer recorded in"), (out, "tokenizer files of")):
        rc = main(["generate", "--ckpt_path", str(ckpt), "--tokenizer", str(other), *GEN])
        err = capsys.readouterr().err
        assert rc == 2 and f"--tokenizer is not the {where} " in err, err
        assert "token id" in err and "--allow_tokenizer_mismatch" in err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert (
            main(
                [
                    "generate",
                    "--ckpt_path",
                    str(ckpt),
                    "--tokenizer",
                    str(other),
                    "--allow_tokenizer_mismatch",
                    *GEN,
                ]
            )  # fmt: skip
            == 0
        )
        assert "warning: --tokenizer is not" in capsys.readouterr().err
    # the same tokenizer as the exported folder, or the original file for the folder: accepted
    for ckpt, given in ((run["ckpt"], out), (out, run["tokenizer"])):
        assert main(["generate", "--ckpt_path", str(ckpt), "--tokenizer", str(given), *GEN]) == 0
        assert "warning" not in capsys.readouterr().err
    rc = main(["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(tmp_path / "x"),
               "--tokenizer", str(other)])  # fmt: skip
    assert rc == 2 and "--allow_tokenizer_mismatch" in capsys.readouterr().err


def test_tokenizer_difference_compares_behaviour(run, tmp_path: Path) -> None:
    from kimi_linear import tokenizer as tk

    bpe = load_tokenizer(run["tokenizer"])
    assert tk.tokenizer_difference(bpe, load_tokenizer(run["tokenizer"])) is None
    assert tk.tokenizer_difference(ByteTokenizer(), bpe) == "vocab_size 259 vs 300"
    if hasattr(tk, "byte_tokenizer_json"):  # the byte tokenizer's tokenizer.json form agrees
        (tmp_path / "tokenizer.json").write_text(tk.byte_tokenizer_json())
        as_json = load_tokenizer(
            tmp_path / "tokenizer.json", eos_token="<eos>", bos_token="<bos>", pad_token="<pad>"
        )
        assert tk.tokenizer_difference(ByteTokenizer(), as_json) is None


def test_export_copies_the_tokenizer_and_generate_reads_it_back(
    run, tmp_path: Path, capsys
) -> None:
    assert main(["generate", "--ckpt_path", str(run["ckpt"]), *GEN]) == 0
    expected = capsys.readouterr().out
    out = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(out)]) == 0
    assert "with its tokenizer: tokenizer.json, tokenizer_config.json" in capsys.readouterr().out
    assert (out / "tokenizer.json").read_bytes() == run["tokenizer"].read_bytes()
    # the folder alone (no dataset, no checkpoint) generates the same text
    assert main(["generate", "--ckpt_path", str(out), *GEN]) == 0
    assert capsys.readouterr().out == expected
    # transformers reads the same tokenizer from the folder
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out, local_files_only=True)
    tok = HFTokenizer(run["tokenizer"], eos_token="<|endoftext|>")
    text = "doc 7: gamma kda decay"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.eos_token == "<|endoftext|>"
    # re-exporting the folder copies its tokenizer files again
    again = tmp_path / "again"
    assert main(["export", "--ckpt_path", str(out), "--output_dir", str(again)]) == 0
    assert (again / "tokenizer.json").read_bytes() == run["tokenizer"].read_bytes()
    # --tokenizer on export: checked against the model like generate
    rc = main(
        ["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(tmp_path / "x"),
         "--tokenizer", "{"]
    )  # fmt: skip
    assert rc == 2 and "--tokenizer" in capsys.readouterr().err


def test_byte_models_and_synthetic_models_are_unchanged(tmp_path: Path) -> None:
    """Nothing recorded: the byte tokenizer when the vocabulary is 259, else the error."""
    from kimi_linear.lightning.load import resolve_tokenizer

    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, ckpt)
    assert isinstance(resolve_tokenizer(None, ckpt, 259), ByteTokenizer)
    with pytest.raises(UsageError, match="vocabulary has 66 tokens.*--tokenizer"):
        resolve_tokenizer(None, ckpt, 66)
    # an explicit byte tokenizer for a larger (padded) vocabulary is the user's choice
    assert isinstance(resolve_tokenizer("byte", ckpt, 320), ByteTokenizer)
    with pytest.raises(UsageError, match="259 token ids, more than the model's vocabulary"):
        resolve_tokenizer("byte", ckpt, 66)


def test_helpers_errors(tmp_path: Path) -> None:
    a = {"kind": "hf", "path": "/a.json"}
    assert find_tokenizer_spec({"state_dict": {}, "DM": {"tokenizer": a, "seed": 0}}) == a
    assert find_tokenizer_spec({"state_dict": {}, "DM": {"seed": 0}}) is None
    with pytest.raises(UsageError, match="several tokenizers"):
        find_tokenizer_spec({"A": {"tokenizer": a}, "B": {"tokenizer": {"kind": "byte"}}})
    assert parse_tokenizer_spec("byte") == "byte"
    assert parse_tokenizer_spec('{"kind": "byte"}') == {"kind": "byte"}
    with pytest.raises(UsageError, match="JSON object"):
        parse_tokenizer_spec("{1: 2}")
    byte_dir = tmp_path / "byte"
    byte_dir.mkdir()
    assert save_tokenizer_files(ByteTokenizer(), byte_dir) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    shutil.rmtree(byte_dir)
    assert not any(tmp_path.iterdir())


def test_export_names_a_tokenizer_it_cannot_copy(run, tmp_path: Path, capsys) -> None:
    """A tiktoken file has no standard Hugging Face form: export says so instead of silently
    writing a folder without it."""
    import base64

    bpe = tmp_path / "bytes.tiktoken"
    bpe.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    spec = json.dumps({"kind": "tiktoken", "path": str(bpe), "pattern": "gpt2"})
    out = tmp_path / "export"
    rc = main(
        ["export", "--ckpt_path", str(run["ckpt"]), "--output_dir", str(out), "--tokenizer", spec,
         "--allow_tokenizer_mismatch"]  # not the tokenizer it was trained with (a BPE)
    )  # fmt: skip
    assert rc == 0
    assert "the tokenizer (tiktoken) was not copied; pass it to generate as --tokenizer" in (
        capsys.readouterr().out
    )
    assert not (out / "tokenizer.json").exists()
    assert main(["generate", "--ckpt_path", str(out), "--tokenizer", spec, *GEN]) == 0


def test_sharded_checkpoint_folders_record_it_in_meta_pt(run, tmp_path: Path) -> None:
    """Lightning's distributed (FSDP2) checkpoints keep the data module state in meta.pt."""
    from kimi_linear.lightning.load import resolve_tokenizer

    spec = find_tokenizer_spec(torch.load(run["ckpt"], weights_only=True, map_location="cpu"))
    folder = tmp_path / "step=1.ckpt"
    folder.mkdir()
    torch.save({"epoch": 0, "TokenDataModule": {"seed": 0, "tokenizer": spec}}, folder / "meta.pt")
    tok = resolve_tokenizer(None, folder, 300)
    assert isinstance(tok, HFTokenizer) and tok.spec == spec


def test_cli_fit_on_tiny_bpe_then_generate_and_export(run, tmp_path: Path, monkeypatch, capsys):
    """The user's path: `kimi-linear fit --config configs/tiny-bpe.yaml` (its checkpoint
    callback), then `generate` and `export` from last.ckpt with no tokenizer argument."""
    shutil.copytree(run["root"] / "ds", tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    repo = Path(__file__).resolve().parents[1]
    rc = main(
        ["fit", "--config", str(repo / "configs" / "tiny-bpe.yaml"), "--data.init_args.path", "ds",
         "--data.init_args.seq_len", "16", "--data.init_args.batch_size", "2",
         "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    )  # fmt: skip
    assert rc == 0
    last = next(tmp_path.rglob("last.ckpt"))
    capsys.readouterr()
    assert main(["generate", "--ckpt_path", str(last), *GEN]) == 0
    tok = HFTokenizer(tmp_path / "ds" / "tokenizer.json", eos_token="<|endoftext|>")
    assert capsys.readouterr().out.rstrip("\n") == _reference(last, tok, "doc 3: alpha", 6)
    assert main(["export", "--ckpt_path", str(last), "--output_dir", "exported"]) == 0
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


def test_byte_tokenizer_json_round_trips_the_byte_ids(tmp_path: Path) -> None:
    """The byte tokenizer's tokenizer.json (built with the tokenizers library) gives the byte
    ids for any text, special-token names in the text included, and its folder loads back as a
    tokenizer equal to ours (issue 24)."""
    from tokenizers import Tokenizer

    from kimi_linear.tokenizer import byte_tokenizer_json

    tok = Tokenizer.from_str(byte_tokenizer_json())
    tok.encode_special_tokens = True  # "<eos>" in a text is text (split_special_tokens)
    ours = ByteTokenizer()
    rng = random.Random(0)
    texts = ["", " a  b\n\t\r\n", "<bos><eos><pad>", "é日本🙂\x00\x7f", "".join(
        chr(rng.randrange(0x20, 0x3000)) for _ in range(200)
    )]  # fmt: skip
    for text in texts:
        enc = tok.encode(text, add_special_tokens=False)
        assert enc.ids == ours.encode(text), text
        assert tok.encode(text).ids[:1] == [ours.bos_id] or text == ""
        assert tok.decode(enc.ids) == text
    assert tok.decode([104, 0xC3]) == ours.decode([104, 0xC3])  # a cut UTF-8 sequence
    save_tokenizer_files(ours, tmp_path)
    back = load_tokenizer(str(tmp_path))
    assert (back.vocab_size, back.bos_id, back.eos_id, back.pad_id) == (259, 256, 257, 258)
    for text in texts:
        assert back.encode(text, add_bos=True, add_eos=True) == ours.encode(text, True, True)
        assert back.decode(ours.encode(text, True, True)) == text
