"""The ``kimi-linear`` command line: fit / resume / export / generate through the real entry point,
``--print_config`` of every shipped config, and clean one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

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


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _checkpoint_every(folder: Path, steps: int) -> str:
    """A second ``--config`` replacing tiny.yaml's callbacks: checkpoints every ``steps``."""
    path = folder / "ckpt_every.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "callbacks": [
                        {
                            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {
                                "save_last": True,
                                "every_n_train_steps": steps,
                                "save_top_k": -1,
                            },
                        },
                        {
                            "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                            "init_args": {"logging_interval": "step"},
                        },
                    ]
                }
            }
        )
    )
    return str(path)


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
