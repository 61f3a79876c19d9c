"""Offline data: synthetic tasks (determinism, answers by construction), byte text, resumable loading."""

from __future__ import annotations

import socket

import pytest
import torch

from kimi_linear.lightning.data import (
    IGNORE_INDEX,
    MQARTask,
    PalindromeTask,
    ResumableDataLoader,
    ResumableSampler,
    StackTask,
    SyntheticDataModule,
    SyntheticTaskDataset,
    TextDataModule,
    UsageError,
    decode_text,
    make_task,
    pack_documents,
    read_corpus,
    split_documents,
)
from kimi_linear.tokenizer import ByteTokenizer


# ------------------------------------------------------------------------ independent solvers
def solve_mqar(task: MQARTask, tokens: list[int]) -> dict[int, int]:
    """Answers {position: value} recomputed from the input: each query key (a key token after
    the context) is answered by the value that followed that key in the context."""
    P, half = task.num_kv_pairs, task.num_tokens // 2
    table = {tokens[2 * i]: tokens[2 * i + 1] for i in range(P)}
    answers = {}
    for t in range(2 * P, len(tokens) - 1):
        if 1 <= tokens[t] < half and (t - 2 * P) % 2 == 0:
            answers[t + 1] = table[tokens[t]]
    return answers


def solve_palindrome(task: PalindromeTask, tokens: list[int]) -> dict[int, int]:
    sep = tokens.index(PalindromeTask.sep_id)
    first = tokens[:sep]
    return {sep + 1 + i: v for i, v in enumerate(reversed(first))}


def solve_stack(task: StackTask, tokens: list[int]) -> dict[int, int]:
    S = task.num_stacks
    stacks: dict[int, list[int]] = {}
    answers = {}
    for t in range(0, len(tokens) - 1, 2):
        op, val = tokens[t], tokens[t + 1]
        if 1 <= op <= S:
            stacks.setdefault(op - 1, []).append(val)
        elif S < op <= 2 * S:
            answers[t + 1] = stacks[op - 1 - S].pop()
    return answers


SOLVERS = {"mqar": solve_mqar, "palindrome": solve_palindrome, "stack": solve_stack}


@pytest.mark.parametrize("name", ["mqar", "palindrome", "stack"])
@pytest.mark.parametrize("seq_len", [64, 257])
def test_task_answers_correct_by_construction(name: str, seq_len: int) -> None:
    task = make_task(name, **({"num_kv_pairs": 8} if name == "mqar" else {}))
    ds = SyntheticTaskDataset(task, seq_len, num_samples=40, seed=3)
    n_answers = 0
    for i in range(len(ds)):
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        assert ids.shape == labels.shape == (seq_len,)
        assert ids.dtype == labels.dtype == torch.long
        assert 0 <= int(ids.min()) and int(ids.max()) < task.vocab_size
        expected = SOLVERS[name](task, ids.tolist())
        got = {t: int(v) for t, v in enumerate(labels.tolist()) if v != IGNORE_INDEX}
        assert got == expected, f"example {i}"
        n_answers += len(got)
    assert n_answers > 0
    if name == "mqar":
        assert n_answers == 40 * task.num_kv_pairs  # every key queried once
    if name == "palindrome":
        assert n_answers == 40 * ((seq_len - 1) // 2)


def test_stack_has_many_pops_and_all_stacks_used() -> None:
    task = StackTask()
    ds = SyntheticTaskDataset(task, 512, num_samples=20, seed=0)
    pops = sum(int((ds[i]["labels"] != IGNORE_INDEX).sum()) for i in range(20))
    assert 0.3 < pops / (20 * 256) < 0.5
    ops = torch.cat([ds[i]["input_ids"][0::2] for i in range(20)])
    assert len(set((ops[(ops >= 1) & (ops <= 64)] - 1).tolist())) == task.num_stacks


def test_mqar_layout_follows_zoology() -> None:
    task = MQARTask(num_kv_pairs=4, num_tokens=64)
    tokens, mask = task.generate(__import__("numpy").random.default_rng(0), 64)
    keys, values = tokens[0:8:2], tokens[1:8:2]
    assert ((keys >= 1) & (keys < 32)).all() and len(set(keys.tolist())) == 4
    assert ((values >= 32) & (values < 64)).all() and len(set(values.tolist())) == 4
    assert mask.sum() == 4 and not mask[:8].any()


@pytest.mark.parametrize("answers_in_input", [False, True])
def test_mqar_answers_hidden_from_the_input_unless_asked(answers_in_input: bool) -> None:
    """Zoology's layout: the answer slot of the input is filler, so an earlier answer cannot
    reveal which values are still unqueried; ``answers_in_input=True`` feeds the answers back."""
    task = MQARTask(num_kv_pairs=8, num_tokens=64, answers_in_input=answers_in_input)
    ds = SyntheticTaskDataset(task, 64, num_samples=16, seed=1)
    for i in range(len(ds)):
        item, (tokens, mask) = ds[i], ds.example(i)
        answers = torch.from_numpy(mask)
        assert torch.equal(item["labels"][answers], torch.from_numpy(tokens)[answers])
        assert bool((item["labels"][answers] >= 32).all())  # the answers are values
        in_slots = item["input_ids"][answers]
        if answers_in_input:
            assert torch.equal(in_slots, item["labels"][answers])
        else:
            assert bool((in_slots == MQARTask.pad_id).all())
        assert torch.equal(item["input_ids"][~answers], torch.from_numpy(tokens)[~answers])


def test_same_seed_same_batches_other_seed_differs() -> None:
    def batches(seed: int, task: str) -> list[dict[str, torch.Tensor]]:
        dm = SyntheticDataModule(
            task=task,
            seq_len=48,
            batch_size=4,
            num_train=64,
            num_val=8,
            seed=seed,
            task_kwargs={"num_kv_pairs": 4} if task == "mqar" else None,
        )
        it = iter(dm.train_dataloader())
        return [next(it) for _ in range(3)] + list(dm.val_dataloader())

    for task in ("mqar", "palindrome", "stack"):
        a, b, c = batches(0, task), batches(0, task), batches(1, task)
        for x, y in zip(a, b):
            assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(
                x["labels"], y["labels"]
            )
        assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])


def test_splits_and_tasks_use_distinct_streams() -> None:
    task = PalindromeTask()
    train = SyntheticTaskDataset(task, 32, 4, seed=0, split="train")
    val = SyntheticTaskDataset(task, 32, 4, seed=0, split="val")
    assert not torch.equal(train[0]["input_ids"], val[0]["input_ids"])
    assert SyntheticDataModule(task="stack").vocab_size == 1 + 2 * 64 + 64
    assert SyntheticDataModule(task="palindrome").vocab_size == 66
    assert SyntheticDataModule(task="mqar").vocab_size == 256


def test_synthetic_bad_input_errors() -> None:
    with pytest.raises(UsageError, match=r"data.task must be one of .*'mqr'.*did you mean 'mqar'"):
        SyntheticDataModule(task="mqr")
    with pytest.raises(
        UsageError, match="unknown option 'num_kv_pair'.*did you mean 'num_kv_pairs'"
    ):
        SyntheticDataModule(task="mqar", task_kwargs={"num_kv_pair": 4})
    with pytest.raises(UsageError, match=r"seq_len=32 is too short for task 'mqar'.*seq_len >= 64"):
        SyntheticDataModule(task="mqar", seq_len=32, task_kwargs={"num_kv_pairs": 16})
    with pytest.raises(UsageError, match="num_kv_pairs must be in"):
        MQARTask(num_kv_pairs=200, num_tokens=256)
    with pytest.raises(UsageError, match=r"mqar answers_in_input must be a bool, got 'no'"):
        SyntheticDataModule(task="mqar", task_kwargs={"answers_in_input": "no"})
    with pytest.raises(UsageError, match="data.batch_size must be a positive int"):
        SyntheticDataModule(batch_size=0)
    with pytest.raises(UsageError, match="fewer than one batch"):
        SyntheticDataModule(
            task="palindrome", seq_len=16, batch_size=8, num_train=4
        ).train_dataloader()


# ------------------------------------------------------------------------------------ text
def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "héllo wörld ✓ \n\t"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert max(ids) < tok.vocab_size == 259
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode([0xFF, 104]) == "\ufffdh"  # invalid UTF-8 is replaced, never raises
    with pytest.raises(ValueError, match="token id 300 outside"):
        tok.decode([300])
    with pytest.raises(ValueError, match="text must be a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_text_module_packs_a_folder(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("first document " * 20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second ✓ " * 30)
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    dm = TextDataModule(path=str(tmp_path), seq_len=32, batch_size=2, val_fraction=0.25)
    dm.setup("fit")
    tok = ByteTokenizer()
    docs = ["first document " * 20, "second ✓ " * 30]
    train_idx, val_idx = split_documents(
        docs, max(round(0.25 * sum(len(d.encode()) + 2 for d in docs)), 32)
    )
    assert len(train_idx) == len(val_idx) == 1  # whole documents held out
    for ds, idx in ((dm.train_set, train_idx), (dm.val_set, val_idx)):
        stream = tok.encode(docs[idx[0]], True, True)
        n = len(stream) // 32
        assert ds.sequences.long().flatten().tolist() == stream[: n * 32]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32) and torch.equal(batch["input_ids"], batch["labels"])
    assert dm.vocab_size == 259 and dm.corpus_info["documents"] == 2
    assert dm.corpus_info["sha256"] and dm.corpus_info["python"].split()[1].startswith("3.")


def test_split_documents_holds_out_whole_documents() -> None:
    docs = [f"document {i} " * (10 + i) for i in range(50)] + ["a copy"] * 3
    train, val = split_documents(docs, val_tokens=3000)
    assert sorted(train + val) == list(range(len(docs))) and not set(train) & set(val)
    assert sum(len(docs[i].encode()) + 2 for i in val) >= 3000 and len(val) >= 3
    texts_train, texts_val = {docs[i] for i in train}, {docs[i] for i in val}
    assert not texts_train & texts_val  # copies of a document stay together
    # spread over the corpus (not its tail) and independent of the corpus order
    assert set(val) != set(range(len(docs) - len(val), len(docs)))
    rev_train, rev_val = split_documents(docs[::-1], val_tokens=3000)
    assert {docs[::-1][i] for i in rev_val} == texts_val
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(["one"], 10)


def test_default_corpus_validation_is_held_out_documents() -> None:
    """The built-in corpus holds out whole help topics spread over the alphabet (before, the
    validation split was the alphabetical tail: mostly one ASCII table, far easier to predict)."""
    from pydoc_data.topics import topics

    dm = TextDataModule(seq_len=128, val_fraction=0.02)
    dm.setup("fit")
    docs = [topics[k] for k in sorted(topics)]
    train, val = split_documents(docs, max(round(0.02 * dm.corpus_info["tokens"]), 128))
    assert 2 <= len(val) and not set(train) & set(val)
    assert len(dm.val_set) == sum(len(docs[i].encode()) + 2 for i in val) // 128
    assert set(val) != set(range(len(docs) - len(val), len(docs)))  # not the alphabetical tail


def test_binary_files_are_skipped_or_refused(tmp_path) -> None:
    import random

    rng = random.Random(0)
    (tmp_path / "noise.txt").write_bytes(bytes(rng.randrange(256) for _ in range(4096)))
    with pytest.raises(UsageError, match="holds no text: 1 file.*binary or not UTF-8"):
        TextDataModule(path=str(tmp_path / "noise.txt"), seq_len=16).setup("fit")
    (tmp_path / "good.txt").write_text("plain text " * 40)
    (tmp_path / "more.txt").write_text("more plain text " * 40)
    with pytest.warns(UserWarning, match="skipped 1 file"):
        docs = read_corpus(tmp_path)
    assert len(docs) == 2
    assert decode_text("héllo".encode()) == "héllo"
    assert decode_text(b"a\x00b") is None
    assert decode_text(b"x" * 2000 + b"\xff") == "x" * 2000 + "\ufffd"  # 1 bad byte in 2001
    assert decode_text(b"x" * 100 + b"\xff\xfe") is None


def test_text_module_errors(tmp_path) -> None:
    with pytest.raises(UsageError, match="data.path: '.*missing.txt' does not exist"):
        TextDataModule(path=str(tmp_path / "missing.txt"))
    small = tmp_path / "small.txt"
    small.write_text("only a few bytes")
    dm = TextDataModule(path=str(small), seq_len=64)
    with pytest.raises(
        UsageError, match=r"data.seq_len=64 is longer than the data allows.*18 tokens"
    ):
        dm.setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="has no files with suffix"):
        TextDataModule(path=str(tmp_path / "empty")).setup("fit")
    with pytest.raises(UsageError, match="val_fraction"):
        TextDataModule(val_fraction=0.9)


def test_default_corpus_never_touches_the_network(monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the text data module tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    dm = TextDataModule(seq_len=256, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 256)
    assert dm.corpus_info["corpus"] == "pydoc_data.topics" and dm.corpus_info["tokens"] > 100_000
    # deterministic: the same text, the same hash
    dm2 = TextDataModule(seq_len=256)
    dm2.setup("fit")
    assert dm2.corpus_info["sha256"] == dm.corpus_info["sha256"]


def test_pack_documents_drops_incomplete_tail() -> None:
    # "<bos>abc<eos><bos>de<eos>" is 9 tokens: rows of 4 keep 8 of them, rows of 3 all
    assert pack_documents(["abc", "de"], 3, ByteTokenizer()).tolist() == [
        [256, 97, 98],
        [99, 257, 256],
        [100, 101, 257],
    ]
    assert pack_documents(["abc", "de"], 4, ByteTokenizer()).tolist() == [
        [256, 97, 98, 99],
        [257, 256, 100, 101],
    ]


# ----------------------------------------------------------------------- resumable loading
def _loader(num_replicas: int = 1, rank: int = 0) -> ResumableDataLoader:
    ds = SyntheticTaskDataset(PalindromeTask(), 16, num_samples=40, seed=0)
    sampler = ResumableSampler(ds, num_replicas=num_replicas, rank=rank, shuffle=True, seed=5)
    return ResumableDataLoader(ds, batch_size=4, sampler=sampler, drop_last=True)


def test_resumable_loader_skips_consumed_batches() -> None:
    full = [b["input_ids"] for b in _loader()]
    assert len(full) == 10
    first = _loader()
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    assert (state["epoch"], state["samples"], state["world_size"], state["batch_size"]) == (
        0,
        12,
        1,
        4,
    )
    resumed = _loader()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == 7 and all(torch.equal(a, b) for a, b in zip(rest, full[3:]))
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["samples"]) == (0, 40)
    # the skip applies once: the next pass is the next epoch, complete and reshuffled
    nxt = [b["input_ids"] for b in resumed]
    assert len(nxt) == 10 and not torch.equal(nxt[0], full[0])
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["samples"]) == (1, 40)
    # the loader owns the epoch count: the trainer's set_epoch does not change the order
    resumed.sampler.set_epoch(7)
    assert torch.equal(
        next(iter(resumed))["input_ids"], next(iter(_loader_at_epoch(2)))["input_ids"]
    )
    # a state saved at the very end of an epoch resumes at the start of the next one
    end = _loader()
    end.load_state_dict({"epoch": 0, "batches": 10})  # the first format: same topology
    assert torch.equal(next(iter(end))["input_ids"], nxt[0])


def _loader_at_epoch(epoch: int) -> ResumableDataLoader:
    loader = _loader()
    loader.load_state_dict({"epoch": epoch, "samples": 0})
    return loader


def test_resumable_sampler_shards_ranks() -> None:
    idx = [set(_loader(2, r).sampler) for r in range(2)]
    assert not idx[0] & idx[1] and len(idx[0] | idx[1]) == 40


def test_resumable_loader_requires_its_sampler() -> None:
    ds = SyntheticTaskDataset(PalindromeTask(), 16, num_samples=8)
    with pytest.raises(ValueError, match="needs a ResumableSampler"):
        ResumableDataLoader(ds, batch_size=2)


def _topology_loaders(n: int, world: int, batch: int, seed: int = 5) -> list[ResumableDataLoader]:
    """One loader per simulated rank over a dataset whose sample ``i`` is the number ``i``."""
    ds = list(range(n))
    return [
        ResumableDataLoader(
            ds,
            batch_size=batch,
            sampler=ResumableSampler(ds, num_replicas=world, rank=r, seed=seed),
            drop_last=True,
        )
        for r in range(world)
    ]


def _steps(loaders: list[ResumableDataLoader], steps: int | None) -> list[int]:
    """Run every simulated rank for ``steps`` steps (``None``: to the end of the epoch)."""
    its = [iter(ld) for ld in loaders]
    seen: list[int] = []
    step = 0
    while steps is None or step < steps:
        batches = [next(it, None) for it in its]
        if batches[0] is None:
            assert all(b is None for b in batches), "ranks ran out of batches at different steps"
            break
        seen += [int(x) for b in batches for x in b]
        step += 1
    return seen


@pytest.mark.parametrize(
    ("before", "after"),
    [((2, 4), (1, 4)), ((1, 4), (2, 4)), ((1, 4), (1, 2)), ((1, 2), (1, 4)), ((2, 2), (3, 4))],
    ids=["2-ranks-to-1", "1-rank-to-2", "batch-4-to-2", "batch-2-to-4", "2x2-to-3x4"],
)
def test_resume_on_another_topology_sees_each_sample_of_the_epoch_once(before, after) -> None:
    n = 48  # a multiple of every global batch above but 3 x 4: that run drops a tail
    first = _topology_loaders(n, *before)
    seen_before = _steps(first, 3)
    state = first[0].state_dict()
    assert state["samples"] == 3 * before[0] * before[1]
    assert all(ld.state_dict() == state for ld in first)  # every rank saves the same state
    resumed = _topology_loaders(n, *after)
    for ld in resumed:
        ld.load_state_dict(state)
    seen_after = _steps(resumed, None)
    seen = seen_before + seen_after
    assert len(seen) == len(set(seen)), "a sample was repeated"
    # what was seen is a prefix of the epoch's permutation, short of one epoch by less than one
    # global batch of the resumed run (drop_last); here exactly one epoch when it divides
    order = list(ResumableSampler(list(range(n)), seed=5))
    assert sorted(seen) == sorted(order[: len(seen)])
    assert n - len(seen) < after[0] * after[1]
    if (n - len(seen_before)) % (after[0] * after[1]) == 0:
        assert sorted(seen) == list(range(n))
    # the next epoch is a complete epoch of the new topology, reshuffled
    nxt = _steps(resumed, None)
    assert len(set(nxt)) == len(nxt) == (n // (after[0] * after[1])) * after[0] * after[1]
    assert nxt[: after[1]] != seen[: after[1]]  # reshuffled
    assert resumed[0].state_dict()["epoch"] == 1


def test_resume_of_another_dataset_or_seed_is_refused() -> None:
    state = _topology_loaders(48, 2, 4)[0].state_dict()
    with pytest.raises(UsageError, match="training set of 48 samples, this one has 40"):
        _topology_loaders(40, 1, 4)[0].load_state_dict(state)
    with pytest.raises(UsageError, match="data.seed=5, this run with 6"):
        _topology_loaders(48, 1, 4, seed=6)[0].load_state_dict(state)
    with pytest.raises(UsageError, match="outside the training set"):
        _topology_loaders(48, 1, 4)[0].load_state_dict({**state, "samples": 49})
    ds = list(range(8))
    with pytest.raises(ValueError, match="drop_last=True"):
        ResumableDataLoader(ds, batch_size=2, sampler=ResumableSampler(ds), drop_last=False)


def test_genuine_replacement_characters_are_text(tmp_path) -> None:
    """U+FFFD is a valid character (EF BF BD): a short document that holds one, or many, is
    text, and only bytes that are really invalid count against ``max_invalid_fraction``
    (issue 25: counting every U+FFFD as invalid dropped such documents as binary)."""
    from kimi_linear.lightning.data.sources import SourceCounts, iter_documents, list_units

    short = "ok \ufffd"  # 6 bytes: one U+FFFD is half its bytes
    assert decode_text(short.encode()) == short
    assert decode_text(("\ufffd" * 50).encode()) == "\ufffd" * 50
    # 2000 bytes of text, five genuine U+FFFD and one invalid byte: 1 invalid byte in 2016
    mixed = b"x" * 2000 + "\ufffd".encode() * 5 + b"\xff"
    assert decode_text(mixed) == "x" * 2000 + "\ufffd" * 6
    assert decode_text(b"x" * 100 + "\ufffd".encode() * 5 + b"\xff\xfe") is None  # 2 in 115
    # through the readers: a text file and a JSONL record
    (tmp_path / "a.txt").write_text(short, encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "caf\\ufffd"}\n', encoding="utf-8")
    units, _ = list_units([tmp_path])
    counts = SourceCounts()
    docs = [d for u in units for d in iter_documents(u, counts)]
    assert sorted(docs) == sorted([short, "caf\ufffd"]) and counts.skipped_binary == 0
    (tmp_path / "c.txt").write_text("text " * 40 + "\ufffd", encoding="utf-8")
    assert "text " * 40 + "\ufffd" in read_corpus(tmp_path)
