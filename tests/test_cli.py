"""The ``kimi-linear`` command line: fit / resume / export / generate through the real entry point,
``--print_config`` of every shipped config, and clean one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fit_configs import checkpoint_every_config

from kimi_linear.cli import SUBCOMMANDS, main, overview
from kimi_linear.lightning.module import KimiLinearLitModule
from kimi_linear.model import KimiLinearForCausalLM

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
# tiny.yaml shrunk for a test: short sequences, small batches, few steps, one val batch.
FAST = [
    "--data.init_args.seq_len",
    "64",
    "--data.init_args.batch_size",
    "4",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--model.warmup_steps",
    "2",
]


def _checkpoint_every(folder: Path, steps: int) -> str:
    """A second ``--config`` replacing tiny.yaml's callbacks: checkpoints every ``steps``."""
    lr_monitor = {
        "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
        "init_args": {"logging_interval": "step"},
    }
    return checkpoint_every_config(folder / "ckpt_every.yaml", steps, lr_monitor)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``kimi-linear fit --config configs/tiny.yaml`` for 12 steps (checkpoints at 6 and 12)."""
    root = tmp_path_factory.mktemp("fit")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        rc = main(
            [
                "fit",
                "--config",
                TINY,
                "--config",
                _checkpoint_every(root, 6),
                *FAST,
                "--trainer.max_steps",
                "12",
                "--trainer.val_check_interval",
                "6",
            ]
        )
    torch.set_num_threads(n)
    assert rc == 0
    run = root / "runs" / "tiny" / "version_0"
    return {"root": root, "run": run, "ckpt": run / "checkpoints" / "last.ckpt"}


def _metrics(run: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def test_fit_on_tiny_yaml_learns_checkpoints_and_logs(trained: dict[str, Path]) -> None:
    run = trained["run"]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    assert (
        "last.ckpt" in ckpts
        and any("step=6" in c for c in ckpts)
        and any("step=12" in c for c in ckpts)
    )
    rows = _metrics(run)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # from ~5.6 (uniform over 259 bytes)
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[1] < val[0]
    for key in (
        "train/ppl",
        "train/acc",
        "val/ppl",
        "val/acc",
        "moe/balance/mean",
        "mla/max_logit/max",
        "lr-MuonClip/muon",
    ):
        assert any(r.get(key) for r in rows), key
    assert (run / "config.yaml").is_file()
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["corpus/corpus"] == "pydoc_data.topics" and len(hparams["corpus/sha256"]) == 64


def test_resume_through_the_cli_matches_the_straight_run(
    trained: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """6 steps + ``--ckpt_path`` for 6 more give exactly the weights of 12 steps straight."""
    monkeypatch.chdir(tmp_path)
    half = next((trained["run"] / "checkpoints").glob("*step=6*.ckpt"))
    rc = main(
        [
            "fit",
            "--config",
            TINY,
            "--config",
            _checkpoint_every(tmp_path, 6),
            *FAST,
            "--trainer.max_steps",
            "12",
            "--trainer.val_check_interval",
            "6",
            "--ckpt_path",
            str(half),
        ]
    )
    assert rc == 0
    resumed = torch.load(
        tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False
    )
    straight = torch.load(trained["ckpt"], weights_only=False)
    assert resumed["global_step"] == straight["global_step"] == 12
    for k, v in straight["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    for a, b in zip(
        straight["optimizer_states"][0]["state"].values(),
        resumed["optimizer_states"][0]["state"].values(),
    ):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


def test_export_then_from_pretrained_gives_the_same_logits(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(trained["ckpt"]), "--output_dir", str(out)]) == 0
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "kimi_linear" and hf["vocab_size"] == 259
    assert hf["linear_attn_config"]["full_attn_layers"] == [4]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_conv1d.weight" in keys
    assert "model.layers.3.self_attn.kv_a_proj_with_mqa.weight" in keys
    assert "model.layers.1.block_sparse_moe.experts.0.w1.weight" in keys  # release per-expert names
    assert "model.layers.1.block_sparse_moe.gate.e_score_correction_bias" in keys

    module = KimiLinearLitModule.load_from_checkpoint(trained["ckpt"], weights_only=False).eval()
    loaded = KimiLinearForCausalLM.from_pretrained(out, kda_backend="torch").eval()
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), module.model(ids), rtol=0, atol=0)


def test_export_bfloat16(trained: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    assert (
        main(
            [
                "export",
                "--ckpt_path",
                str(trained["ckpt"]),
                "--output_dir",
                str(out),
                "--dtype",
                "bfloat16",
            ]
        )
        == 0
    )
    model = KimiLinearForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.A_log.dtype == torch.float32


def test_generate_from_checkpoint_and_export(
    trained: dict[str, Path], tmp_path: Path, capsys
) -> None:
    args = ["--prompt", "def ", "--max_new_tokens", "12", "--temperature", "0"]
    assert main(["generate", "--ckpt_path", str(trained["ckpt"]), *args]) == 0
    from_ckpt = capsys.readouterr().out
    assert from_ckpt.startswith("def ")
    out = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(trained["ckpt"]), "--output_dir", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", "--ckpt_path", str(out), *args]) == 0
    assert capsys.readouterr().out == from_ckpt  # greedy: the same text
    assert (
        main(
            [
                "generate",
                "--ckpt_path",
                str(trained["ckpt"]),
                "--prompt",
                "x",
                "--max_new_tokens",
                "4",
                "--temperature",
                "0.9",
                "--top_k",
                "5",
                "--top_p",
                "0.9",
                "--num_samples",
                "2",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.count("--- sample") == 2


@pytest.mark.parametrize("name", ["tiny", "small", "mqar", "palindrome", "stack"])
def test_print_config_of_every_shipped_config(name: str, capsys) -> None:
    assert main(["fit", "--config", str(REPO / "configs" / f"{name}.yaml"), "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["optimizer"] == "muonclip"
    assert cfg["data"]["class_path"].startswith("kimi_linear.lightning.")
    if name in ("mqar", "palindrome", "stack"):
        assert cfg["data"]["init_args"]["task"] == name


def test_overview_help(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out == overview() and all(f"  {name} " in out for name in SUBCOMMANDS)
    assert all(
        c in SUBCOMMANDS
        for c in ("fit", "validate", "test", "predict", "generate", "export", "info")
    )
    assert main([]) == 2
    assert "a subcommand is required" in capsys.readouterr().err


def test_unknown_subcommand_suggests_the_closest(capsys) -> None:
    assert main(["fitt", "--config", TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown subcommand 'fitt' (did you mean 'fit'?)" in err
    assert main(["inf"]) == 2
    assert "did you mean 'info'?" in capsys.readouterr().err


def test_every_subcommand_entry_point_resolves_and_documents_itself(capsys) -> None:
    for name, sub in SUBCOMMANDS.items():
        assert callable(sub.load()), name
        assert main([name, "--help"]) == 0, name
        assert "usage" in capsys.readouterr().out.lower(), name


BAD = [
    (
        ["fit", "--config", TINY, "--model.lrr", "3"],
        "unrecognized arguments: --model.lrr 3 (did you mean 'model.lr'?)",
    ),
    (["fit", "--config", TINY, "--trainer.max_stepz", "3"], "did you mean 'trainer.max_steps'?"),
    (
        ["fit", "--data", "SyntheticDataModule", "--data.task", "mqr"],
        "data.task must be one of ['mqar', 'palindrome', 'stack'], got 'mqr' (did you mean 'mqar'?)",
    ),
    (
        ["fit", "--data", "TextDataModule", "--data.path", "/no/such/corpus"],
        "data.path: '/no/such/corpus' does not exist",
    ),
    (
        ["fit", "--config", TINY, "--data.init_args.seq_len", "1000000"],
        "data.seq_len=1000000 is longer than the data allows",
    ),
    (["fit", "--config", TINY, "--model.preset", "tinyy"], "model.preset must be one of"),
    (
        ["fit", "--config", TINY, "--model.overrides", '{"hiden_size": 8}'],
        "unknown KimiLinearConfig field 'hiden_size'",
    ),
    (
        ["fit", "--data", "SyntheticDataModule", "--data.task", "mqar", "--data.seq_len", "16"],
        "data.seq_len=16 is too short for task 'mqar'",
    ),
    (["frobnicate"], "unknown subcommand 'frobnicate'"),
    (
        ["export", "--ckpt_path", "/no/such.ckpt", "--output_dir", "x"],
        "--ckpt_path: '/no/such.ckpt' does not exist",
    ),
    (
        ["fit", "--config", TINY, "--ckpt_path", "/no/such.ckpt"],
        "--ckpt_path: '/no/such.ckpt' does not exist",
    ),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a[-2:]) for a, _ in BAD])
def test_bad_input_is_one_clean_error_before_training(
    argv: list[str], message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_bad_yaml_key_is_reported_with_a_hint(tmp_path: Path, monkeypatch, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  preset: tiny\n  overides: {num_hidden_layers: 2}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "model.overides" in err and "did you mean 'model.overrides'?" in err


def test_generate_rejects_a_synthetic_task_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "palindrome.yaml"),
            "--trainer.max_steps",
            "1",
            "--data.init_args.seq_len",
            "16",
            "--data.init_args.batch_size",
            "2",
            "--data.init_args.num_val",
            "2",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert rc == 0
    ckpt = next(tmp_path.rglob("last.ckpt"))
    capsys.readouterr()
    assert main(["generate", "--ckpt_path", str(ckpt), "--prompt", "hi"]) == 2
    assert "the model's vocabulary has 66 tokens" in capsys.readouterr().err


def test_console_script_entry_point_is_declared() -> None:
    if sys.version_info < (3, 11):
        import tomli as tomllib  # pragma: no cover
    else:
        import tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["kimi-linear"] == "kimi_linear.cli:main"


# ----------------------------------------------------------------- logs, resume, plot (issue 24)
def test_metrics_csv_is_dense_one_row_per_step(trained: dict[str, Path]) -> None:
    """Every metric logged at a step is on that step's one row (not one row per logging call):
    loss, learning rate, MoE balance and MLA max logit side by side."""
    rows = _metrics(trained["run"])
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and len(steps) >= 12
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == 12
    for r in train:
        assert r["lr-MuonClip/muon"] and r["mla/max_logit/max"] and r["moe/balance/mean"], r
    assert all(r.get("train/loss") for r in rows if r.get("lr-MuonClip/muon"))


def test_resume_continues_the_run_folder_with_the_checkpoint_data_and_a_longer_schedule(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    """``fit --ckpt_path runs/tiny/version_0/checkpoints/last.ckpt --trainer.max_steps 8`` after
    a 6-step run: the data settings come from the checkpoint (not repeated here), the metrics
    continue in version_0 (no version_1), and the 2 extra steps follow the 8-step cosine instead
    of the 6-step schedule's floor (issue 24 items 3 and 6)."""
    import logging

    monkeypatch.chdir(tmp_path)
    every = _checkpoint_every(tmp_path, 6)
    first = ["fit", "--config", TINY, "--config", every, *FAST, "--trainer.max_steps", "6"]
    first += ["--trainer.val_check_interval", "6"]
    with caplog.at_level(logging.INFO):
        assert main(first) == 0
    assert "run folder runs/tiny/version_0 (writing" in caplog.text
    run = tmp_path / "runs" / "tiny" / "version_0"
    caplog.clear()
    resume = ["fit", "--config", TINY, "--config", every, "--trainer.max_steps", "8"]
    resume += ["--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1"]
    resume += ["--trainer.limit_val_batches", "1", "--model.warmup_steps", "2"]
    resume += ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    with caplog.at_level(logging.INFO):
        assert main(resume) == 0
    log = caplog.text
    assert "data from the checkpoint: TextDataModule(path=None, seq_len=64, batch_size=4)" in log
    assert "data.seq_len=128 (checkpoint: 64; pass --data.seq_len to use it)" in log
    assert "run folder runs/tiny/version_0 (continuing at step 6" in log
    assert "total_steps=6" in log and "total_steps=8" in log
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 8
    assert ckpt["datamodule_hyper_parameters"]["seq_len"] == 64
    rows = _metrics(run)
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 7
    lrs = {int(r["step"]): float(r["lr-MuonClip/muon"]) for r in rows if r["lr-MuonClip/muon"]}
    assert sorted(lrs) == list(range(8))
    base, warmup, ratio = 3e-3, 2, 0.1

    def lr(step: int, total: int) -> float:
        if step < warmup:
            return base * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return base * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    for step in range(6):
        assert lrs[step] == pytest.approx(lr(step, 6), rel=1e-6), step
    for step in (6, 7):
        assert lrs[step] == pytest.approx(lr(step, 8), rel=1e-6), step
        assert lrs[step] > base * ratio * 1.5  # not the 6-step schedule's floor


def test_run_logger_merges_steps_resumes_and_writes_tensorboard(tmp_path: Path) -> None:
    from kimi_linear.lightning.logs import RunLogger

    log = RunLogger(str(tmp_path), name="x", tensorboard=False)
    for step in range(5):
        log.log_metrics({"train/loss": 5.0 - step}, step)
        log.log_metrics({"lr": 0.1 * step}, step)
    log.log_metrics({"val/loss": 1.5}, 4)
    log.save()  # periodic: the last row may still grow
    assert [r["step"] for r in _metrics(Path(log.log_dir))] == ["0", "1", "2", "3"]
    log.finalize("success")
    rows = _metrics(Path(log.log_dir))
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert rows[4]["train/loss"] == "1.0" and rows[4]["lr"] and rows[4]["val/loss"] == "1.5"
    # resumed at step 2: the rows past it (to be trained again) are dropped, step 2's row grows
    again = RunLogger(str(tmp_path), name="x", tensorboard=False)
    again.resume_at(0, 2)
    again.log_metrics({"val/acc": 0.5}, 2)
    again.log_metrics({"train/loss": 9.0}, 3)
    again.finalize("success")
    rows = _metrics(Path(again.log_dir))
    assert again.log_dir == log.log_dir
    assert [r["step"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[2]["train/loss"] == "3.0" and rows[2]["val/acc"] == "0.5"
    assert rows[3]["train/loss"] == "9.0" and not rows[3]["lr"]
    pytest.importorskip("tensorboard")
    tb = RunLogger(str(tmp_path), name="tb")
    assert tb.tensorboard
    tb.log_metrics({"train/loss": 1.0}, 0)
    tb.finalize("success")
    assert list(Path(tb.log_dir).glob("events.out.tfevents.*"))


def test_progress_bar_has_no_negative_epoch_count() -> None:
    from types import SimpleNamespace

    from kimi_linear.lightning.callbacks import KimiRichProgressBar

    pytest.importorskip("rich")
    bar = KimiRichProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=120)
    assert bar._get_train_description(0).strip() == "Epoch 0 (max_steps 120)"
    bar._trainer = SimpleNamespace(max_epochs=3, max_steps=-1)
    assert bar._get_train_description(1).strip() == "Epoch 1/2"


def test_plot_draws_runs_to_a_png(trained: dict[str, Path], tmp_path: Path, capsys) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "two.png"
    run = trained["run"]
    assert main(["plot", str(run), str(run / "metrics.csv"), "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and "2 runs" in capsys.readouterr().out
    from kimi_linear.plot import read_metrics

    metrics = read_metrics(run / "metrics.csv")
    for key in ("train/loss", "lr-MuonClip/muon", "mla/max_logit/max"):  # no throughput here
        assert len(metrics[key]) >= 2, key


def test_plot_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(["plot", str(tmp_path / "nope")]) == 2
    assert "RUN: " in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "has no metrics.csv" in capsys.readouterr().err
    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,1.0\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "plot needs matplotlib" in err and "kimi-linear[plot]" in err


# ----------------------------------------------------------------------- export (issue 24)
def test_byte_export_loads_in_transformers_with_the_same_greedy_ids(
    trained: dict[str, Path], tmp_path: Path
) -> None:
    """A byte-tokenizer model's export carries a tokenizer.json that ``AutoTokenizer`` reads
    with our ids, special-token ids in config.json and generation_config.json, files of the
    normal mode; ``AutoModelForCausalLM`` decodes the same greedy ids as the kit."""
    import os
    import stat

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kimi_linear.tokenizer import ByteTokenizer

    out = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(trained["ckpt"]), "--output_dir", str(out)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f.name
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (256, 257, 258)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {
        "bos_token_id": 256,
        "eos_token_id": 257,
        "pad_token_id": 258,
        "do_sample": False,
    }
    tok = AutoTokenizer.from_pretrained(out)
    ours = ByteTokenizer()
    for text in ("def f(x):\n\treturn x", "héllo 日本 🙂", "<eos> is text here", ""):
        assert tok(text)["input_ids"] == ours.encode(text, add_bos=True), text
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    model = KimiLinearForCausalLM.from_pretrained(out).eval()
    ids = tok("def ", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model.generate(ids, 12, temperature=0, eos_token_id=257)
        got = hf.generate(ids, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()


def test_export_into_an_existing_folder_names_what_is_there(
    trained: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["export", "--ckpt_path", str(trained["ckpt"]), "--output_dir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists and is not empty (notes.txt)" in err
    assert "--overwrite" in err and (out / "notes.txt").read_text() == "mine"
    assert main([*args, "--overwrite"]) == 0 and (out / "tokenizer.json").is_file()


# --------------------------------------------------------------------- generate (issue 24)
def test_generate_streams_and_reports_speed(trained: dict[str, Path], capsys) -> None:
    """One prompt is printed token by token (the same text as --no_stream), with time to first
    token and tokens/s on stderr; --help documents greedy and sampling and names no fixed
    tokenizer."""
    args = ["generate", "--ckpt_path", str(trained["ckpt"]), "--prompt", "def "]
    args += ["--max_new_tokens", "8", "--temperature", "0"]
    assert main(args) == 0
    streamed = capsys.readouterr()
    assert main([*args, "--no_stream"]) == 0
    assert capsys.readouterr().out == streamed.out and streamed.out.startswith("def ")
    assert "time to first token" in streamed.err and "tokens/s" in streamed.err
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--temperature 0 is greedy" in text and "--top_p" in text and "--seed" in text
    assert "using the tokenizer the model was trained with" in text
    assert "byte tokenizer" not in SUBCOMMANDS["generate"].summary
