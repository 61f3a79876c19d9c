"""``kimi-linear evaluate``: lm-eval's model interface on the kit's model.

* scoring with a bigram model whose log-probabilities are known (loglikelihood, greedy flags,
  empty contexts, rolling windows, generation with stop sequences, ``<eos>`` and length caps);
* a tiny random KDA + MLA model batched and truncated equals the same model run request by
  request;
* the same numbers as ``lm_eval --model hf`` on the exported folder (slow: a subprocess with
  transformers' KimiLinear), on the offline tasks of ``tests/fixtures/lm_eval_tasks``;
* the command: results JSON + Markdown, and its errors (unknown task, a length above the
  model's limit, results that exist, lm_eval missing).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import tiny_settings
from torch import nn

from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM
from kimi_linear.cli import main as cli_main
from kimi_linear.errors import UsageError
from kimi_linear.tokenizer import ByteTokenizer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from kimi_linear.lightning import evaluate  # noqa: E402
from kimi_linear.lightning.lm_eval_model import KimiLinearLM  # noqa: E402

TESTS = Path(__file__).parent
TASKS = TESTS / "fixtures" / "lm_eval_tasks"
TASK_NAMES = ["kimi_tiny_mc", "kimi_tiny_ppl", "kimi_tiny_gen"]


# ------------------------------------------------------------------------------------------
# a bigram model: logits at position t are table[ids[t]]
# ------------------------------------------------------------------------------------------
class _OneHot(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.one_hot(ids, self.vocab).float()


class BigramLM(nn.Module):
    """The interface KimiLinearLM uses (backbone ``model``, ``lm_head``, cached forward), with
    next-token logits ``table[current token]``."""

    def __init__(self, table: torch.Tensor, max_len: int = 1024) -> None:
        super().__init__()
        V = table.shape[0]
        self.config = SimpleNamespace(
            vocab_size=V, max_position_embeddings=max_len, name="bigram", layer_kinds=()
        )
        self.model = _OneHot(V)
        self.lm_head = nn.Linear(V, V, bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(table.T)

    def new_cache(self, batch_size: int, capacity: int = 0) -> SimpleNamespace:
        return SimpleNamespace(index_select=lambda index: None)

    def forward(self, ids, cache=None, logits_to_keep=0, attention_mask=None):
        logits = self.lm_head(self.model(ids))
        return logits[:, -logits_to_keep:] if logits_to_keep else logits


def _table(seed: int = 0) -> torch.Tensor:
    V = ByteTokenizer.vocab_size
    table = 0.5 * torch.randn(V, V, generator=torch.Generator().manual_seed(seed))
    for a, b in ["ab", "bc", "c\n", "\nx", "zz"]:
        table[ord(a), ord(b)] = 12.0
    table[ord("x"), ByteTokenizer.eos_id] = 12.0
    table[ByteTokenizer.bos_id, ord("a")] = 12.0
    return table


def _bigram_logprob(table: torch.Tensor, context: list[int], continuation: list[int]):
    logp = table.log_softmax(-1)
    prev, total, greedy = context[-1], 0.0, True
    for tok in continuation:
        total += float(logp[prev, tok])
        greedy &= int(logp[prev].argmax()) == tok
        prev = tok
    return total, greedy


def _req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_loglikelihood_of_a_bigram_model():
    table, tok = _table(), ByteTokenizer()
    lm = KimiLinearLM(BigramLM(table), tokenizer=tok, batch_size=2)
    pairs = [
        ("The answer is", " b"),
        ("a", "bc"),  # greedy
        ("a", "bd"),  # same context and all but the last token: one forward for both
        ("xyz", " long continuation"),
        ("", "abc"),  # empty context: conditioned on <bos>
    ]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ctx = tok.encode(context) or [tok.bos_id]
        want, want_greedy = _bigram_logprob(table, ctx, tok.encode(continuation))
        assert logprob == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    assert [g for _, g in got] == [False, True, False, False, True]


def test_rolling_loglikelihood_is_every_token_once():
    table, tok = _table(1), ByteTokenizer()
    text = "abc and some more text, longer than two windows of eight tokens."
    for max_length in (8, 1024):  # several disjoint windows, or one
        lm = KimiLinearLM(BigramLM(table), tokenizer=tok, batch_size=3, max_length=max_length)
        (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
        want, _ = _bigram_logprob(table, [tok.bos_id], tok.encode(text))
        assert got == pytest.approx(want, abs=1e-4)


def test_generate_until_stops_at_stop_sequences_eos_and_length():
    lm = KimiLinearLM(BigramLM(_table()), tokenizer=ByteTokenizer(), batch_size=2)
    requests = [
        ("a", {"until": ["\n"]}),  # a -> b -> c -> \n (stop, cut off)
        ("qqqa", {"until": ["\n"]}),  # longer prompt in the same left-padded batch
        ("a", {"until": ["c"]}),
        ("b", {"until": []}),  # c \n x <eos>
        ("z", {"until": ["\n"], "max_gen_toks": 5}),  # z z z ... capped
        ("a", {"until": "bc"}),  # a stop that spans two tokens
    ]
    got = lm.generate_until([_req("generate_until", c, k) for c, k in requests])
    assert got == ["bc", "bc", "b", "c\nx", "zzzzz", ""]


# ------------------------------------------------------------------------------------------
# a tiny KDA + MLA model: batched and truncated == request by request
# ------------------------------------------------------------------------------------------
TINY = tiny_settings(
    num_hidden_layers=2,
    layer_types=("kda", "mla"),
    kda_head_dim=8,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    initializer_range=0.2,
)


def _tiny_model(vocab: int, max_len: int, seed: int = 0) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    cfg = KimiLinearConfig(**{**TINY, "vocab_size": vocab, "max_position_embeddings": max_len})
    return KimiLinearForCausalLM(cfg).eval()


def test_batched_scores_equal_one_request_at_a_time():
    tok, L = ByteTokenizer(), 24
    model = _tiny_model(tok.vocab_size, L)
    lm = KimiLinearLM(model, tokenizer=tok, batch_size=3)
    pairs = [
        ("short", " one"),
        ("a context much longer than the model's twenty-four positions", " and its end"),
        ("mid-sized context", " x"),
        ("mid-sized context", " y"),
        ("", "no context"),
    ]
    got = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
    assert lm.truncated == 1
    with torch.no_grad():
        for (context, continuation), (logprob, greedy) in zip(pairs, got):
            ctx = tok.encode(context) or [tok.bos_id]
            cont = tok.encode(continuation)
            row = (ctx + cont)[-(L + 1) :][:-1]  # left truncation, as lm-eval's hf model
            logp = model(torch.tensor([row])).log_softmax(-1)[0, -len(cont) :]
            target = torch.tensor(cont)
            assert logprob == pytest.approx(float(logp.gather(1, target[:, None]).sum()), abs=1e-4)
            assert greedy == bool((logp.argmax(-1) == target).all())

    text = "a document of sixty-odd bytes, scored in rolling windows of 24."
    ids = tok.encode(text)
    (rolling,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
    prefixed, want = [tok.bos_id, *ids], 0.0
    with torch.no_grad():
        for a in range(0, len(ids), L):  # window predicting ids[a:b] sees the L tokens before b
            b = min(a + L, len(ids))
            start = max(0, b - L)
            logp = model(torch.tensor([prefixed[start:b]])).log_softmax(-1)[0]
            want += sum(float(logp[j - start, ids[j]]) for j in range(a, b))
    assert rolling == pytest.approx(want, abs=1e-4)


def test_max_length_above_the_model_limit_is_an_error():
    model = _tiny_model(ByteTokenizer.vocab_size, 24)
    with pytest.raises(UsageError, match=r"max_length=25 is above the model's limit.*=24"):
        KimiLinearLM(model, tokenizer=ByteTokenizer(), max_length=25)
    with pytest.raises(UsageError, match="batch_size must be an int >= 1"):
        KimiLinearLM(model, tokenizer=ByteTokenizer(), batch_size=0)
    with pytest.raises(UsageError, match="unknown argument"):
        KimiLinearLM(model, tokenizer=ByteTokenizer(), temperature=1)


# ------------------------------------------------------------------------------------------
# an exported folder with a BPE tokenizer: the command, and lm_eval --model hf
# ------------------------------------------------------------------------------------------
def make_export(folder: str | Path, max_len: int = 64) -> Path:
    """A tiny random model + a BPE ``tokenizer.json`` trained on the fixture texts, saved as
    an exported folder that both the kit and transformers' ``AutoModelForCausalLM`` read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from kimi_linear.tokenizer import HFTokenizer, save_tokenizer_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = [
        json.loads(line)[key]
        for name, key in [("kimi_tiny_text.jsonl", "text"), ("kimi_tiny_gen.jsonl", "prompt")]
        for line in (TASKS / name).read_text().splitlines()
    ]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    bpe.save(str(folder / "bpe.json"))
    tok = HFTokenizer(folder / "bpe.json")
    model = _tiny_model(tok.vocab_size, max_len, seed=1)
    model.save_pretrained(folder)
    save_tokenizer_files(tok, folder)
    (folder / "bpe.json").unlink()
    return folder


@pytest.mark.slow  # ~25 s: imports Lightning and runs lm-eval's whole pipeline
def test_command_writes_json_and_markdown(tmp_path, capsys):
    folder = make_export(tmp_path / "export")
    argv = ["evaluate", "--ckpt_path", str(folder), "--tasks", ",".join(TASK_NAMES)]
    argv += ["--include_path", str(TASKS), "--limit", "3", "--batch_size", "2"]
    assert cli_main(argv) == 0
    stem = "lm_eval_" + "+".join(TASK_NAMES)
    results = json.loads((folder / "eval" / f"{stem}.json").read_text())
    assert set(TASK_NAMES) <= set(results["results"])
    assert 0.0 <= results["results"]["kimi_tiny_mc"]["acc,none"] <= 1.0
    assert results["kimi_linear"]["model"]["max_length"] == 64
    assert "kimi_tiny_ppl" in (folder / "eval" / f"{stem}.md").read_text()
    capsys.readouterr()
    # the results exist now: not replaced without --overwrite
    assert cli_main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err


def test_command_errors(tmp_path, capsys, monkeypatch):
    folder = make_export(tmp_path / "export", max_len=32)
    base = ["evaluate", "--ckpt_path", str(folder), "--include_path", str(TASKS)]

    # an unknown task names the closest one (stock tasks replaced by the local ones here: a
    # full lm-eval index takes ~30 s to build)
    from lm_eval.tasks import TaskManager

    real = TaskManager.__init__

    def local_only(self, *args, **kwargs):
        kwargs["include_defaults"] = False
        real(self, *args, **kwargs)

    monkeypatch.setattr(TaskManager, "__init__", local_only)
    assert cli_main([*base, "--tasks", "kimi_tiny_mcq"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kimi-linear: error: --tasks: unknown lm-eval task 'kimi_tiny_mcq'")
    assert "(did you mean 'kimi_tiny_mc'?)" in err and "\n" not in err

    assert cli_main([*base, "--tasks", "kimi_tiny_mc", "--max_length", "33"]) == 2
    err = capsys.readouterr().err
    assert "max_length=33 is above the model's limit (max_position_embeddings=32)" in err

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # not installed
    assert cli_main([*base, "--tasks", "kimi_tiny_mc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "kimi-linear: error: evaluate needs lm-evaluation-harness: lm_eval is not installed "
        f"({evaluate.INSTALL})"
    )


@pytest.mark.slow
def test_same_numbers_as_lm_eval_hf(tmp_path):
    """Per document, our responses equal ``lm_eval --model hf`` on the exported folder: every
    loglikelihood within 1e-4 (fp32; the two KDA implementations differ by ~1e-6 relative), the
    same greedy flags and generations, and so the same metrics."""
    pytest.importorskip("transformers.models.kimi_linear")
    folder = make_export(tmp_path / "export")
    out = tmp_path / "hf.json"
    proc = subprocess.run(
        [sys.executable, str(TESTS / "lm_eval_hf_worker.py"), str(folder), str(TASKS), str(out)]
        + TASK_NAMES,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    hf = json.loads(out.read_text())

    from lm_eval.tasks import TaskManager

    ours = lm_eval.simple_evaluate(
        model=KimiLinearLM(str(folder), batch_size=2),
        tasks=TASK_NAMES,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        log_samples=True,
    )
    n_checked = 0
    for task in TASK_NAMES:
        rows = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        assert len(rows) == len(hf["samples"][task]) > 0
        for mine, theirs in zip(rows, hf["samples"][task]):
            for a, b in zip(mine["resps"], theirs):
                a, b = a[0], b[0]
                if isinstance(a, str):
                    assert a == b
                elif isinstance(a, (list, tuple)):  # (logprob, is_greedy)
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and bool(a[1]) == bool(b[1])
                else:
                    assert a == pytest.approx(b, abs=1e-4)
                n_checked += 1
        for metric, value in ours["results"][task].items():
            if isinstance(value, float) and math.isfinite(value) and "stderr" not in metric:
                assert value == pytest.approx(hf["results"][task][metric], rel=1e-4), metric
    assert n_checked >= 8 * 4 + 6 + 6
