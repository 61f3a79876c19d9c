"""``kimi-linear prepare`` and TokenDataModule: sources, held-out documents, packed windows with
``cu_seqlens``, rank / worker sharding, exact resume, and clean errors for bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kimi_linear.cli import main
from kimi_linear.errors import UsageError
from kimi_linear.lightning.data import (
    IGNORE_INDEX,
    TokenDataModule,
    TokenShards,
    collate_windows,
    prepare,
)
from kimi_linear.lightning.data.sources import is_held_out, list_units
from kimi_linear.tokenizer import ByteTokenizer

EOS = ByteTokenizer.eos_id


def _docs(n: int = 40, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kda", "mla", "moe", "ünïcode", "✓"]
    return [
        f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randrange(3, 60)))
        for i in range(n)
    ]


def _stream(docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += [*d.encode("utf-8"), EOS]
    return out


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, object]:
    """Documents split over a text folder, a JSONL file (cut into several units) and parquet."""
    docs = _docs()
    src = tmp_path / "src"
    (src / "txt").mkdir(parents=True)
    for i, d in enumerate(docs[:10]):
        (src / "txt" / f"{i:02d}.txt").write_text(d)
    with open(src / "b.jsonl", "w") as f:
        for d in docs[10:30]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[30:]}), src / "c.parquet", row_group_size=3)
    return {"docs": docs, "src": src, "root": tmp_path}


def test_prepare_writes_every_document_once_with_eos(corpus) -> None:
    docs, src, root = corpus["docs"], corpus["src"], corpus["root"]
    out = root / "ds"
    summary = prepare([src], out, val_fraction=0.2, num_workers=2, chunk_bytes=300, progress=False)
    assert summary["documents"] == 40 and summary["skipped_not_text"] == 0
    assert summary["units"] > 4  # the JSONL and parquet files were cut into several units
    assert summary["bytes"] == sum(len(d.encode()) for d in docs)
    # sorted inputs: b.jsonl, c.parquet, then txt/ -> the documents in that order
    order = docs[10:30] + docs[30:] + docs[:10]
    val = [d for d in order if is_held_out(d, 0.2)]
    train = [d for d in order if not is_held_out(d, 0.2)]
    assert 0 < len(val) < len(train) and summary["val_documents"] == len(val)
    for split, expected in (("train", train), ("val", val)):
        shards = TokenShards(out, split)
        assert shards.read(0, shards.num_tokens).tolist() == _stream(expected)
        assert shards.num_documents == len(expected)
    # document starts inside any window, also across shard boundaries, follow the EOS tokens
    shards = TokenShards(out, "train")
    assert len(shards.shards) > 3
    stream = shards.read(0, shards.num_tokens)
    for start in range(0, shards.num_tokens - 37, 37):
        window = stream[start : start + 37]
        after_eos = [p + 1 for p in range(36) if window[p] == EOS]
        assert shards.document_starts(start, start + 37).tolist() == after_eos, start
    # the number of workers (and units) does not change the dataset
    again = prepare([src], root / "ds1", val_fraction=0.2, num_workers=0, progress=False)
    for split in ("train", "val"):
        a, b = TokenShards(out, split), TokenShards(root / "ds1", split)
        assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))
    assert again["documents"] == 40
    # ... nor its fingerprint (what a resumed run checks); the document order does
    fp = TokenDataModule(str(out)).fingerprint
    assert TokenDataModule(str(root / "ds1")).fingerprint == fp
    shuffled = root / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps({"text": d}) + "\n" for d in order[::-1]))
    prepare([shuffled], root / "ds2", val_fraction=0.2, num_workers=0, progress=False)
    assert TokenDataModule(str(root / "ds2")).fingerprint != fp
    meta = json.loads((out / "meta.json").read_text())
    assert "key_sum" not in meta["splits"]["train"]["shards"][0]


def test_prepare_skips_and_counts_non_text(corpus, tmp_path: Path) -> None:
    src = corpus["src"]
    rng = random.Random(1)
    (src / "txt" / "noise.txt").write_bytes(bytes(rng.randrange(256) for _ in range(2048)))
    (src / "txt" / "empty.txt").write_text("")
    (src / "image.png").write_bytes(b"\x89PNG\r\n")
    with open(src / "b.jsonl", "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"body": "no text field"}) + "\n")
        f.write('{"text": "bad \xff\xfe\xfd bytes"}\n'.encode("latin-1").decode("latin-1"))
    with open(src / "b.jsonl", "ab") as f:
        f.write(b'{"text": "' + bytes([0xFF, 0xFE, 0xFD]) * 10 + b'"}\n')
    summary = prepare([src], tmp_path / "ds", val_fraction=0.2, num_workers=1, progress=False)
    assert summary["documents"] == 41  # the latin-1 line is valid UTF-8 text
    assert summary["skipped_not_text"] == 2  # noise.txt and the invalid-UTF-8 record
    assert summary["skipped_empty"] == 1 and summary["skipped_bad_json"] == 1
    assert summary["skipped_no_text_field"] == 1 and summary["ignored_files"] == 1
    # random bytes alone are refused, not trained on
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    with pytest.raises(UsageError, match="no text documents found \\(1 not text"):
        prepare([noise], tmp_path / "ds2", progress=False)


def _dataset(tmp_path: Path, n: int = 60, val_fraction: float = 0.2) -> Path:
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in _docs(n)))
    prepare([src], tmp_path / "ds", val_fraction=val_fraction, num_workers=1, progress=False)
    return tmp_path / "ds"


def test_windows_cu_seqlens_and_labels(tmp_path: Path) -> None:
    path = _dataset(tmp_path)
    shards = TokenShards(path, "train")
    stream = shards.read(0, shards.num_tokens)
    dm = TokenDataModule(str(path), seq_len=32, batch_size=4, pack="reset")
    dm.setup("fit")
    assert len(dm.train_set) == shards.num_tokens // 32 and dm.vocab_size == 259
    batch = next(iter(dm.train_dataloader()))
    ids, labels, cu = batch["input_ids"], batch["labels"], batch["cu_seqlens"]
    assert ids.shape == labels.shape == (4, 32) and cu.dtype == torch.int32
    flat = ids.flatten()
    # offsets: 0, every row start, every token after an EOS inside a row, and B * T
    expected = sorted(
        {0, 128}
        | {b * 32 for b in range(4)}
        | {p + 1 for p in range(127) if flat[p] == EOS and (p + 1) % 32}
    )
    assert cu.tolist() == expected
    # each piece's first label is masked, every other label is the input token
    starts = set(cu[:-1].tolist())
    for p in range(128):
        want = IGNORE_INDEX if p in starts else int(flat[p])
        assert int(labels.flatten()[p]) == want
    # windows are the stream cut in order; training order is a seeded shuffle of them
    rows = [dm.train_set[i]["input_ids"] for i in range(len(dm.train_set))]
    assert torch.equal(torch.cat(rows), torch.from_numpy(stream[: len(rows) * 32]))
    assert any(torch.equal(ids[0], r) for r in rows)
    plain = TokenDataModule(str(path), seq_len=32, batch_size=4, pack="window")
    plain.setup("fit")
    b2 = next(iter(plain.train_dataloader()))
    assert "cu_seqlens" not in b2 and torch.equal(b2["input_ids"], ids)
    assert torch.equal(b2["labels"], ids)


def test_collate_matches_a_hand_written_batch() -> None:
    items = [
        {
            "input_ids": torch.arange(6),
            "labels": torch.arange(6),
            "doc_starts": torch.tensor([2, 5]),
        },
        {
            "input_ids": torch.arange(6),
            "labels": torch.arange(6),
            "doc_starts": torch.tensor([], dtype=torch.long),
        },
    ]
    batch = collate_windows(items)
    assert batch["cu_seqlens"].tolist() == [0, 2, 5, 6, 12]
    assert batch["labels"].tolist() == [[-100, 1, -100, 3, 4, -100], [-100, 1, 2, 3, 4, 5]]


def test_validation_documents_are_held_out(tmp_path: Path) -> None:
    path = _dataset(tmp_path)
    train, val = TokenShards(path, "train"), TokenShards(path, "val")

    def documents(shards: TokenShards) -> set[bytes]:
        stream = shards.read(0, shards.num_tokens).tolist()
        out, cur = set(), []
        for t in stream:
            if t == EOS:
                out.add(bytes(cur))
                cur = []
            else:
                cur.append(t)
        return out

    a, b = documents(train), documents(val)
    assert a and b and not a & b and len(a) + len(b) == 60


def _batches(path: Path, n: int, **kwargs) -> list[torch.Tensor]:
    import gc

    dm = TokenDataModule(str(path), seq_len=16, batch_size=3, seed=7, **kwargs)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    out = [next(it)["input_ids"] for _ in range(n)]
    del it
    gc.collect()  # stop worker processes now, not at a random later collection
    return out


def test_resume_mid_epoch_and_workers_give_the_same_batches(tmp_path: Path) -> None:
    path = _dataset(tmp_path)
    dm = TokenDataModule(str(path), seq_len=16, batch_size=3, seed=7)
    dm.setup("fit")
    loader = dm.train_dataloader()
    per_epoch = len(loader)
    straight = []
    for _ in range(2):  # two epochs
        straight += [b["input_ids"] for b in loader]
    assert len(straight) == 2 * per_epoch
    # stop after k batches (past the first epoch), save, resume in a new module
    k = per_epoch + 3
    first = TokenDataModule(str(path), seq_len=16, batch_size=3, seed=7)
    first.setup("fit")
    ld = first.train_dataloader()
    got = [b["input_ids"] for b in ld]
    it = iter(ld)
    for _ in range(3):
        got.append(next(it)["input_ids"])
    state, dm_state = ld.state_dict(), first.state_dict()
    resumed = TokenDataModule(str(path), seq_len=16, batch_size=3, seed=7)
    resumed.load_state_dict(dm_state)
    resumed.setup("fit")
    ld2 = resumed.train_dataloader()
    ld2.load_state_dict(state)
    got += [b["input_ids"] for b in ld2]
    assert len(got) == 2 * per_epoch
    assert all(torch.equal(a, b) for a, b in zip(got, straight)), k
    # two DataLoader workers deliver the same batches as none
    workers = _batches(path, 5, num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(workers, straight[:5]))
    # another seed, another order
    assert not torch.equal(_batches(path, 1, num_workers=0)[0], _batches_seed(path, 8))
    with pytest.raises(UsageError, match="another data.seq_len"):
        TokenDataModule(str(path), seq_len=32, batch_size=3, seed=7).load_state_dict(dm_state)
    with pytest.raises(UsageError, match="another dataset"):
        TokenDataModule(str(path), seq_len=16, seed=7).load_state_dict(
            {**dm_state, "fingerprint": "x"}
        )


def _batches_seed(path: Path, seed: int) -> torch.Tensor:
    dm = TokenDataModule(str(path), seq_len=16, batch_size=3, seed=seed)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))["input_ids"]


def test_ranks_get_disjoint_windows(tmp_path: Path) -> None:
    from kimi_linear.lightning.data import ResumableSampler

    path = _dataset(tmp_path)
    dm = TokenDataModule(str(path), seq_len=16, batch_size=2, seed=3)
    dm.setup("fit")
    shares = [set(ResumableSampler(dm.train_set, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert not shares[0] & shares[1] and len(shares[0]) == len(shares[1]) == len(dm.train_set) // 2


def test_token_module_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist .*kimi-linear prepare"):
        TokenDataModule(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a prepared token dataset"):
        TokenDataModule(str(tmp_path / "empty"))
    path = _dataset(tmp_path)
    with pytest.raises(UsageError, match="data.pack must be one of .*did you mean 'reset'"):
        TokenDataModule(str(path), pack="rest")
    with pytest.raises(UsageError, match="data.seq_len=100000 is longer than the train split"):
        TokenDataModule(str(path), seq_len=100_000).setup("fit")
    shard = next((path / "train").glob("*.tokens"))
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UsageError, match="wrong size"):
        TokenDataModule(str(path)).setup("fit")


def test_prepare_errors(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(UsageError, match="--input: '.*nope' does not exist"):
        prepare([tmp_path / "nope"], tmp_path / "o", progress=False)
    with pytest.raises(UsageError, match="val_fraction must be in"):
        prepare([tmp_path / "a.txt"], tmp_path / "o", val_fraction=0, progress=False)
    with pytest.raises(UsageError, match="the val split is empty"):
        prepare([tmp_path / "a.txt"], tmp_path / "o", val_fraction=1e-9, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # nothing left behind
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "meta.json").write_text("{}")
    with pytest.raises(UsageError, match="is not empty; pass --overwrite"):
        prepare([tmp_path / "a.txt"], tmp_path / "o", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="holds no prepared dataset; refusing"):
        prepare([tmp_path / "a.txt"], tmp_path / "mine", overwrite=True, progress=False)
    with pytest.raises(UsageError, match="tokenizer: 'missing.json' does not exist"):
        prepare([tmp_path / "a.txt"], tmp_path / "o2", tokenizer="missing.json", progress=False)
    pq_file = tmp_path / "t.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), pq_file)
    with pytest.raises(UsageError, match="has no column 'text'.*--text_field"):
        prepare([pq_file], tmp_path / "o3", progress=False)


def test_prepare_reads_a_file_given_twice_once(corpus, tmp_path: Path) -> None:
    src, root = corpus["src"], corpus["root"]
    once = prepare([src], root / "once", val_fraction=0.2, num_workers=0, progress=False)
    (tmp_path / "link.jsonl").symlink_to(src / "b.jsonl")
    for inputs in (
        [src / "b.jsonl", src / "b.jsonl"],
        [src, src / "b.jsonl", src / "txt"],  # a file and a folder inside the folder given
        [src, tmp_path / "link.jsonl"],  # a link to a file of the folder
    ):
        with pytest.warns(UserWarning, match=r"--input: \d+ file\(s\) given more than once"):
            units, _ = list_units(inputs)
        assert len({Path(u.path).resolve() for u in units if u.kind != "parquet"}) == len(
            [u for u in units if u.kind != "parquet"]
        )
    with pytest.warns(UserWarning, match="given more than once.*b.jsonl"):
        twice = prepare(
            [src, src / "b.jsonl"], root / "twice", val_fraction=0.2, num_workers=0,
            progress=False,
        )  # fmt: skip
    assert twice["documents"] == once["documents"] == 40
    a, b = TokenShards(root / "once", "train"), TokenShards(root / "twice", "train")
    assert np.array_equal(a.read(0, a.num_tokens), b.read(0, b.num_tokens))


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 61])  # one unit; many units cut mid-line
def test_prepare_reads_jsonl_with_a_bom_and_any_line_endings(tmp_path: Path, chunk_bytes) -> None:
    docs = _docs(12)
    lines = [json.dumps({"text": d}) for d in docs]
    files = {
        "bom.jsonl": b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n",
        "crlf.jsonl": "\r\n".join(lines).encode() + b"\r\n",
        "bom_crlf.jsonl": b"\xef\xbb\xbf" + "\r\n".join(lines).encode(),  # no final newline
        "cr.jsonl": "\r".join(lines).encode() + b"\r",  # classic Mac line endings
    }
    from kimi_linear.lightning.data.sources import SourceCounts, iter_documents

    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        units, _ = list_units([tmp_path / name], chunk_bytes=chunk_bytes)
        counts = SourceCounts()
        got = [d for u in units for d in iter_documents(u, counts)]
        assert got == docs and counts.skipped == 0, (name, counts)
    # a text file's BOM is not part of its document
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbf" + docs[0].encode())
    units, _ = list_units([tmp_path / "t.txt"])
    assert list(iter_documents(units[0], SourceCounts())) == [docs[0]]
    # a JSON record spread over lines with inner CRs is still bad JSON, counted once per piece
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\r{"text": \r\n')
    counts = SourceCounts()
    got = list(iter_documents(list_units([tmp_path / "bad.jsonl"])[0][0], counts))
    assert got == ["a"] and counts.skipped_bad_json == 1


def test_failed_overwrite_keeps_the_previous_dataset(corpus, tmp_path: Path, monkeypatch) -> None:
    from kimi_linear.lightning.data import preparation

    src, out = corpus["src"], tmp_path / "data" / "ds"
    first = prepare([src / "b.jsonl"], out, val_fraction=0.2, num_workers=0, progress=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def unchanged() -> None:
        after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert after == before
        assert [p.name for p in out.parent.iterdir()] == ["ds"]  # no staging folder left
        assert TokenDataModule(str(out)).meta["summary"]["documents"] == first["documents"]

    # an error found late (the parquet file lacks the column), and an interrupt mid-way
    with pytest.raises(UsageError, match="no column 'body'"):
        prepare([src / "txt", src / "c.parquet"], out, text_field="body", overwrite=True,
                num_workers=0, progress=False)  # fmt: skip
    unchanged()
    real, calls = preparation._process_unit, []

    def interrupted(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(preparation, "_process_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], out, val_fraction=0.2, overwrite=True, num_workers=0, progress=False)
    unchanged()
    monkeypatch.setattr(preparation, "_process_unit", real)
    # a successful overwrite replaces it (with a trained tokenizer inside, found by name)
    again = prepare([src], out, val_fraction=0.2, overwrite=True, train_bpe_vocab=300,
                    num_workers=0, progress=False)  # fmt: skip
    assert again["documents"] == 40 and [p.name for p in out.parent.iterdir()] == ["ds"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["path"] == "tokenizer.json"
    assert TokenDataModule(str(out)).tokenizer.vocab_size == 300
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_prepare_command_line_then_fit_with_resets(tmp_path: Path, monkeypatch, capsys) -> None:
    """`kimi-linear prepare --train_bpe` then a few steps of `fit` on the packed BPE data."""
    monkeypatch.chdir(tmp_path)
    rc = main(
        ["prepare", "--input", "pydoc_data.topics", "--output_dir", "ds", "--train_bpe", "300",
         "--val_fraction", "0.1", "--no_progress", "--num_workers", "1"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "documents: " in out and "tokens/s" in out
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["tokenizer"]["path"] == "tokenizer.json"
    repo = Path(__file__).resolve().parents[1]
    rc = main(
        ["fit", "--config", str(repo / "configs" / "tiny-bpe.yaml"), "--data.init_args.path", "ds",
         "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "2",
         "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
         "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
         "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--trainer.callbacks", "[]"]
    )  # fmt: skip
    assert rc == 0
    import csv

    rows = list(csv.DictReader(open(tmp_path / "runs" / "tiny-bpe" / "version_0" / "metrics.csv")))
    assert any(r.get("val/loss") for r in rows) and any(r.get("train/loss") for r in rows)
    # bad command-line input: one clean error line, exit 2
    rc = main(["prepare", "--input", "nope", "--output_dir", "x"])
    assert (
        rc == 2 and "kimi-linear: error: --input: 'nope' does not exist" in capsys.readouterr().err
    )


def _fit_tokens(root: Path, data: Path, steps: int, ckpt_in=None, save_every=None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kimi_linear.lightning.module import KimiLinearLitModule

    pl.seed_everything(0)
    dm = TokenDataModule(str(data), seq_len=16, batch_size=4, pack="reset", seed=1)
    module = KimiLinearLitModule(
        preset="tiny",
        overrides=dict(num_hidden_layers=2, kda_backend="torch", first_k_dense_replace=1),
        vocab_size=dm.vocab_size,
        lr=3e-3,
        warmup_steps=2,
        max_steps=6,  # the learning-rate schedule of the full run
    )
    callbacks = []
    if save_every:
        callbacks = [
            ModelCheckpoint(
                dirpath=root, filename="{step}", every_n_train_steps=save_every, save_top_k=-1
            )
        ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        enable_checkpointing=bool(save_every), callbacks=callbacks, default_root_dir=str(root),
    )  # fmt: skip
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_in) if ckpt_in else None)
    return module


def test_lightning_resume_on_packed_documents_is_exact(tmp_path: Path) -> None:
    """6 steps straight == 3 steps, checkpoint, resume for 3 (data order and model weights),
    with pack="reset" batches going through the module as cu_seqlens."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = _dataset(tmp_path, n=24)
        straight = _fit_tokens(tmp_path / "a", data, 6)
        _fit_tokens(tmp_path / "b", data, 3, save_every=3)
        ckpt = tmp_path / "b" / "step=3.ckpt"
        saved = torch.load(ckpt, weights_only=False)
        assert saved["TokenDataModule"]["seq_len"] == 16  # the data module's state is in it
        resumed = _fit_tokens(tmp_path / "c", data, 6, ckpt_in=ckpt)
    finally:
        torch.set_num_threads(n)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.slow
def test_lightning_resume_on_another_batch_size_trains_each_window_once(tmp_path: Path) -> None:
    """2 steps of batch 4, checkpoint, resume with batch 2 to the end of the epoch: every
    training window is trained on exactly once (the loader continues from the global sample
    position, not from "2 batches" of the new size)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from kimi_linear.lightning.module import KimiLinearLitModule

    class Rows(Callback):
        def __init__(self) -> None:
            self.rows: list[tuple[int, ...]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.rows += [tuple(r.tolist()) for r in batch["input_ids"]]

    data = _dataset(tmp_path, n=10)

    def fit(root: Path, batch_size: int, ckpt_in: Path | None = None, **kw) -> list:
        pl.seed_everything(0)
        dm = TokenDataModule(str(data), seq_len=64, batch_size=batch_size, seed=1)
        module = KimiLinearLitModule(
            preset="tiny",
            overrides=dict(num_hidden_layers=1, kda_backend="torch"),
            vocab_size=dm.vocab_size,
        )  # fmt: skip
        rows = Rows()
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            default_root_dir=str(root), **kw,
            callbacks=[rows, ModelCheckpoint(dirpath=root, filename="{step}", save_top_k=-1,
                                             every_n_train_steps=2)],
        )  # fmt: skip
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_in) if ckpt_in else None)
        return rows.rows

    before = fit(tmp_path / "a", 4, max_steps=2)
    dm = TokenDataModule(str(data), seq_len=64)
    dm.setup("fit")
    windows = {tuple(dm.train_set[i]["input_ids"].tolist()) for i in range(len(dm.train_set))}
    assert len(windows) == len(dm.train_set) and len(windows) % 2 == 0
    rest = (len(windows) - 8) // 2  # the steps of batch 2 left in the epoch
    after = fit(tmp_path / "b", 2, tmp_path / "a" / "step=2.ckpt", max_steps=2 + rest)
    seen = before + after
    assert len(before) == 8 and len(seen) == len(set(seen)), "a window was trained on twice"
    assert set(seen) == windows


@pytest.mark.parametrize("resume_batch", [4, 2])
def test_lightning_resume_of_an_epoch_bounded_run_trains_each_window_once(
    tmp_path: Path, resume_batch: int
) -> None:
    """``max_epochs=1`` and no ``max_steps`` anywhere (the schedule's length is the trainer's
    estimate, which needs the data): stopped after 2 steps of batch 4 with a checkpoint, resumed
    with batch 4 or 2 to the end of the epoch, every window is trained on at most once and the
    epoch is complete.  The estimate used to build the train loader before Lightning restored
    the loop, so the loader's saved position was never applied and the resumed epoch started
    again from sample 0."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from kimi_linear.lightning.module import KimiLinearLitModule

    class Rows(Callback):
        def __init__(self, stop_at: int | None) -> None:
            self.rows: list[tuple[int, ...]] = []
            self.stop_at = stop_at

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.rows += [tuple(r.tolist()) for r in batch["input_ids"]]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.stop_at is not None and trainer.global_step >= self.stop_at:
                trainer.should_stop = True

    data = _dataset(tmp_path, n=10)

    def fit(root: Path, batch_size: int, ckpt_in: Path | None = None) -> tuple[list, object]:
        pl.seed_everything(0)
        dm = TokenDataModule(str(data), seq_len=64, batch_size=batch_size, seed=1)
        module = KimiLinearLitModule(
            preset="tiny", overrides=dict(num_hidden_layers=1, kda_backend="torch"),
            vocab_size=dm.vocab_size, warmup_steps=1,
        )  # fmt: skip
        rows = Rows(stop_at=None if ckpt_in else 2)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            default_root_dir=str(root),
            callbacks=[rows, ModelCheckpoint(dirpath=root, filename="{step}", save_top_k=-1,
                                             every_n_train_steps=2)],
        )  # fmt: skip
        trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_in) if ckpt_in else None)
        return rows.rows, trainer

    before, _ = fit(tmp_path / "a", 4)
    dm = TokenDataModule(str(data), seq_len=64)
    dm.setup("fit")
    windows = {tuple(dm.train_set[i]["input_ids"].tolist()) for i in range(len(dm.train_set))}
    n = len(windows)
    assert n == len(dm.train_set) and n >= 12 and len(before) == 8
    after, trainer = fit(tmp_path / "b", resume_batch, tmp_path / "a" / "step=2.ckpt")
    seen = before + after
    assert len(seen) == len(set(seen)), "a window was trained on twice"
    assert len(after) == (n - 8) // resume_batch * resume_batch  # the rest of the epoch
    assert set(seen) <= windows
    # no ResumeOverrides here (plain Lightning): the restored schedule, one epoch of batch 4,
    # is kept, not replaced by the lazily resolved one of the resumed run
    lambdas = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas
    assert {fn.total_steps for fn in lambdas} == {n // 4}


def _loader_bench():
    from benchmarks import loader

    return loader


def test_loader_benchmark_rejects_bad_workers(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        _loader_bench().main(["--workers", "a,b"])
    assert e.value.code == 2 and "--workers must be comma-separated ints" in capsys.readouterr().err


@pytest.mark.slow
def test_loader_benchmark_quick_run(tmp_path: Path) -> None:
    assert _loader_bench().main(["--quick", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "loader.json").read_text())
    names = [r["entry"] for r in data["rows"]]
    assert names == ["loader/reset/w0", "loader/window/w0", "train_step"]
    assert all(r["tokens/s (median)"] > 0 for r in data["rows"])
    assert (tmp_path / "loader.md").read_text().startswith("# Loader vs training")


def test_tiny_bpe_config_resolves_and_prepare_help(capsys) -> None:
    repo = Path(__file__).resolve().parents[1]
    assert main(["fit", "--config", str(repo / "configs" / "tiny-bpe.yaml"), "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "kimi_linear.lightning.data.TokenDataModule" in out and "pack: reset" in out
    assert main(["prepare", "--help"]) == 0
    assert "--train_bpe" in capsys.readouterr().out


_BATCH_PROBE = """
import os
import torch
from lightning.pytorch.callbacks import Callback


class SaveBatches(Callback):
    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.batches = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append({k: v.detach().cpu().clone() for k, v in batch.items()})

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()}
        torch.save(
            {"batches": self.batches, "state": state, "world_size": trainer.world_size},
            os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"),
        )
"""


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_packed_windows(tmp_path: Path) -> None:
    """Two gloo processes on the prepared data with pack=reset: each rank trains on its own
    windows (never the same one), with cu_seqlens, and both end with the same weights."""
    import os
    import subprocess
    import sys
    import textwrap

    data = _dataset(tmp_path, n=40)
    (tmp_path / "batch_probe.py").write_text(textwrap.dedent(_BATCH_PROBE))
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    repo = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable, "-m", "kimi_linear.cli", "fit",
        "--config", str(repo / "configs" / "tiny-bpe.yaml"),
        "--data.init_args.path", str(data), "--data.init_args.seq_len", "32",
        "--data.init_args.batch_size", "2",
        "--model.overrides", json.dumps({"num_hidden_layers": 2, "kda_backend": "torch", "first_k_dense_replace": 1}),
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "3",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]",
        "--trainer.callbacks+=batch_probe.SaveBatches", f"--trainer.callbacks.out_dir={tmp_path}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["world_size"] == r1["world_size"] == 2
    assert len(r0["batches"]) == len(r1["batches"]) == 3
    rows = [tuple(row.tolist()) for r in (r0, r1) for b in r["batches"] for row in b["input_ids"]]
    assert len(set(rows)) == len(rows) == 12  # no window trained on twice
    assert all("cu_seqlens" in b for r in (r0, r1) for b in r["batches"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
