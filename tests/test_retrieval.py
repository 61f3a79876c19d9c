"""``kimi-linear retrieval``: seeded RULER-style prompts sized in tokens, teacher-forced scoring
(checked with an oracle whose answers we set, and batched == one by one on a real model), the
side-by-side cache bytes / decode time of the all-MLA twin, the report files and the errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from tiny_configs import tiny_settings
from torch import nn

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.cli import main as cli_main
from kimi_linear.errors import UsageError
from kimi_linear.lightning import retrieval as R
from kimi_linear.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
TINY = tiny_settings(
    vocab_size=ByteTokenizer.vocab_size,
    num_hidden_layers=4,
    layer_types=("kda", "kda", "kda", "mla"),
    kda_head_dim=8,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    initializer_range=0.2,
    max_position_embeddings=1024,
)


def _tiny(**changes) -> KimiLinearForCausalLM:
    torch.manual_seed(0)
    return KimiLinearForCausalLM(KimiLinearConfig(**{**TINY, **changes})).eval()


@pytest.mark.parametrize("task", list(R.TASKS))
def test_prompts_fill_the_length_and_place_the_needle(task):
    length = 1500
    filler = max(len(TOK.encode(f)) for f in R.FILLER) + 1
    where = []
    for depth in (0.0, 0.5, 1.0):
        s = R.make_sample(task, TOK, length, depth, seed="0")
        total = len(s.prompt_ids) + len(s.answer_ids)
        assert length - filler < total <= length
        assert list(s.prompt_ids) == TOK.encode(s.prompt)
        assert list(s.answer_ids) == TOK.encode(s.answer)
        value = s.answer.strip()
        assert len(value) == R.DIGITS[task] and value.isdigit()
        assert s.prompt.count(value) == (2 if task == "passkey" else 1)  # in the needle only
        start = len(R.TASKS[task]["intro"])  # the haystack's span in the prompt
        end = s.prompt.rindex("\n")
        needle = s.prompt.rfind(".", 0, s.prompt.index(value)) + 1  # after the sentence before
        where.append((needle - start) / (end - start))
        if task == "niah_multikey":
            assert s.prompt.count("One of the special magic numbers for") == 4
        assert R.make_sample(task, TOK, length, depth, seed="0") == s  # seeded
        assert R.make_sample(task, TOK, length, depth, seed="1").answer != s.answer
    assert (
        where[0] < 0.03 < 0.4 < where[1] < 0.6 < 0.9 < where[2]
    )  # needle at the start, middle, end


def test_lengths_that_do_not_fit_are_errors():
    with pytest.raises(UsageError, match=r"--lengths: 100 tokens cannot hold a niah_single prompt"):
        R.make_sample("niah_single", TOK, 100, 0.5, seed="0")
    with pytest.raises(
        UsageError, match=r"unknown retrieval task 'paskey' \(did you mean 'passkey'"
    ):
        R.make_sample("paskey", TOK, 1000, 0.5, seed="0")
    with pytest.raises(UsageError, match=r"--lengths: 2048 is above the model's limit .*=1024"):
        R.run_grid({"hybrid": _tiny()}, TOK, ["passkey"], [512, 2048], [0.5], progress=False)


class Oracle(nn.Module):
    """Knows each sample: at the answer positions it predicts the answer, except the token
    positions listed in ``wrong`` (by answer text), where it predicts something else."""

    def __init__(self, samples, wrong: dict[str, list[int]]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=TOK.vocab_size, max_position_embeddings=10**6)
        self.rows = {tuple(s.prompt_ids + s.answer_ids[:-1]): s for s in samples}
        self.wrong = wrong

    def forward(self, ids, logits_to_keep=0, attention_mask=None):
        B, T = ids.shape
        logits = torch.zeros(B, logits_to_keep, TOK.vocab_size)
        for b in range(B):
            real = ids[b] if attention_mask is None else ids[b][attention_mask[b].bool()]
            s = self.rows[tuple(real.tolist())]
            A = len(s.answer_ids)
            for i, tok in enumerate(s.answer_ids):
                pick = (tok + 1) % TOK.vocab_size if i in self.wrong.get(s.answer, []) else tok
                logits[b, logits_to_keep - A + i, pick] = 5.0
        return logits


def test_scoring_follows_the_answer_positions():
    # different tasks in one batch: different prompt and answer lengths, left-padded
    samples = [
        R.make_sample("passkey", TOK, 300, 0.5, seed="a"),
        R.make_sample("niah_single", TOK, 500, 0.2, seed="b"),
        R.make_sample("niah_multikey", TOK, 620, 0.9, seed="c"),
        R.make_sample("passkey", TOK, 410, 0.0, seed="d"),
    ]
    assert len({len(s.prompt_ids) for s in samples}) == 4
    wrong = {samples[1].answer: [0], samples[2].answer: [3, 7]}
    for batch_size in (1, 3, 4):
        got = R.score_samples(Oracle(samples, wrong), samples, batch_size)
        assert [g["retrieved"] for g in got] == [True, False, False, True]
        assert [g["token_accuracy"] for g in got] == pytest.approx([1, 7 / 8, 6 / 8, 1])
        logp_hit = 5.0 - torch.tensor([5.0] + [0.0] * (TOK.vocab_size - 1)).logsumexp(0).item()
        logp_miss = -torch.tensor([5.0] + [0.0] * (TOK.vocab_size - 1)).logsumexp(0).item()
        want = [6 * logp_hit, 7 * logp_hit + logp_miss, 6 * logp_hit + 2 * logp_miss, 6 * logp_hit]
        assert [g["logprob"] for g in got] == pytest.approx(want, abs=1e-4)


def test_batched_scores_equal_one_at_a_time_on_a_real_model():
    model = _tiny()
    samples = R.make_cell("niah_single", TOK, 420, 0.5, 2, seed=0) + R.make_cell(
        "passkey", TOK, 300, 0.25, 2, seed=0
    )
    one = R.score_samples(model, samples, batch_size=1)
    batched = R.score_samples(model, samples, batch_size=4)
    for a, b in zip(one, batched):
        assert a["retrieved"] == b["retrieved"]
        assert a["token_accuracy"] == b["token_accuracy"]
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)


def test_grid_sets_the_twin_beside_the_model(tmp_path):
    model = _tiny()
    twin = KimiLinearForCausalLM(model.config.all_mla_twin()).eval()
    models = {"hybrid": model, "all-mla": twin}
    result = R.run_grid(
        models,
        TOK,
        ["passkey"],
        [300, 600],
        [0.0, 1.0],
        samples=1,
        decode_steps=2,
        score={"hybrid": True, "all-mla": False},
        progress=False,
    )
    assert [(c["model"], c["length"], c["depth"]) for c in result["cells"]] == [
        ("hybrid", 300, 0.0),
        ("hybrid", 300, 1.0),
        ("hybrid", 600, 0.0),
        ("hybrid", 600, 1.0),
    ]
    for row in result["lengths"]:
        n = row["length"]
        for name, m in models.items():
            assert row[name]["cache_bytes"] == m.config.kv_cache_bytes(n, 1, 4)["total"]
            assert row[name]["decode_s_per_token"] > 0
        # one MLA layer of four: the twin caches 4x the latents, and more with the length
        assert row["all-mla"]["cache_bytes"] > row["hybrid"]["cache_bytes"]
    result["settings"] = dict(
        ckpt_path="x",
        command="kimi-linear retrieval ...",
        models=list(models),
        scored={"hybrid": True, "all-mla": False},
        model_info={"hybrid": "tiny", "all-mla": "tiny twin"},
        tasks=["passkey"],
        lengths=[300, 600],
        depths=[0.0, 1.0],
        samples=1,
        seed=0,
        decode_steps=2,
        device="cpu",
        dtype="torch.float32",
        tokenizer="byte",
    )
    md = R.markdown_report(result)
    assert "| length | hybrid accuracy | hybrid answer tokens | hybrid cache |" in md
    assert "### hybrid: passkey" in md and "### all-mla" not in md
    pytest.importorskip("matplotlib")
    assert R.plot_heatmaps(result, tmp_path / "r.png").stat().st_size > 1000


def test_unknown_task_is_named_before_any_work(tmp_path, capsys):
    argv = ["retrieval", "--ckpt_path", str(tmp_path), "--tasks", "passkey,niah_singel"]
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "kimi-linear: error: --tasks: unknown retrieval task 'niah_singel' (did you mean "
        "'niah_single'?); choose from passkey, niah_single, niah_multikey"
    )


@pytest.mark.slow  # ~13 s: imports Lightning (checkpoint loading) and times two models
def test_command(tmp_path, capsys):
    folder = tmp_path / "model"
    _tiny(max_position_embeddings=512).save_pretrained(folder)
    argv = ["retrieval", "--ckpt_path", str(folder), "--tasks", "passkey", "--lengths", "300,400"]
    argv += ["--depths", "0,1", "--samples", "1", "--decode_steps", "1"]
    assert cli_main(argv) == 0
    out = folder / "eval"
    result = json.loads((out / "retrieval.json").read_text())
    assert result["settings"]["models"] == ["hybrid", "all-mla"]
    assert len(result["cells"]) == 4 and len(result["lengths"]) == 2
    assert (out / "retrieval.md").is_file()
    capsys.readouterr()
    assert cli_main(argv) == 2  # results exist
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main([*argv, "--overwrite", "--lengths", "600"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "kimi-linear: error: --lengths: 600 is above the model's limit (max_position_embeddings=512)"
    )
    assert cli_main([*argv, "--overwrite", "--twin", str(folder)]) == 2
    assert "expected an all-MLA model" in capsys.readouterr().err
