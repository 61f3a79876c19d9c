"""Checkpoint hygiene of the command line: the final step is saved, files are written
atomically, broken checkpoints and changed hyper-parameters on resume are clean errors (or are
applied), and the throughput callback logs with the losses."""

from __future__ import annotations

import csv
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from fit_configs import checkpoint_every_config

from kimi_linear.cli import main
from kimi_linear.lightning.callbacks import (
    AtomicCheckpointIO,
    KimiModelCheckpoint,
    ThroughputMonitor,
    atomic_torch_save,
)

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
FAST = [
    "--data.init_args.seq_len",
    "32",
    "--data.init_args.batch_size",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.val_check_interval",
    "3",
    "--trainer.log_every_n_steps",
    "1",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--model.warmup_steps",
    "1",
]


def _callbacks(folder: Path, every: int, peak_flops: float | None = None) -> str:
    """A second ``--config``: a *plain* Lightning ModelCheckpoint every ``every`` steps (the CLI
    upgrades it) and a ThroughputMonitor."""
    monitor: dict = {"class_path": "kimi_linear.lightning.callbacks.ThroughputMonitor"}
    if peak_flops is not None:
        monitor["init_args"] = {"peak_flops": peak_flops}
    return checkpoint_every_config(folder / "callbacks.yaml", every, monitor)


@pytest.fixture(scope="module")
def run5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``fit`` for 5 steps with a checkpoint every 3: the final step 5 is not a multiple."""
    root = tmp_path_factory.mktemp("ckpt")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        rc = main(
            ["fit", "--config", TINY, "--config", _callbacks(root, 3, peak_flops=1e11), *FAST]
            + ["--trainer.max_steps", "5"]
        )
    torch.set_num_threads(n)
    assert rc == 0
    return root / "runs" / "tiny" / "version_0"


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def test_final_step_is_saved(run5: Path) -> None:
    names = sorted(p.name for p in (run5 / "checkpoints").glob("*.ckpt"))
    assert any("step=3" in n for n in names) and any("step=5" in n for n in names), names
    assert _step(run5 / "checkpoints" / "last.ckpt") == 5
    assert not [p for p in (run5 / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_throughput_is_logged_with_the_losses(run5: Path) -> None:
    rows = list(csv.DictReader(open(run5 / "metrics.csv")))
    perf = [r for r in rows if r.get("perf/tokens_per_s")]
    assert perf and all(float(r["perf/tokens_per_s"]) > 0 for r in perf)
    assert all(0 < float(r["perf/mfu"]) for r in perf)  # peak_flops given
    assert any(r.get("train/loss") for r in perf)  # same rows as the losses


@pytest.mark.parametrize("kind", ["empty", "truncated"])
def test_broken_checkpoint_is_one_line_naming_it_and_the_others(
    run5: Path, kind: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    good = run5 / "checkpoints" / "last.ckpt"
    (folder / "good.ckpt").write_bytes(good.read_bytes())
    bad = folder / "bad.ckpt"
    bad.write_bytes(b"" if kind == "empty" else good.read_bytes()[: good.stat().st_size // 2])
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", TINY, *FAST, "--ckpt_path", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert str(bad) in err and ("empty" if kind == "empty" else "truncated") in err
    assert "other checkpoints in" in err and "good.ckpt" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["validate", "--model.preset", "small"],
            "validate of a checkpoint cannot change model.preset='small' (checkpoint: 'tiny')",
        ),
        (
            ["fit", "--model.optimizer", "adamw", "--model.overrides", '{"num_hidden_layers": 2}'],
            "resuming cannot change model.overrides={'num_hidden_layers': 2} (checkpoint: "
            "{'kda_backend': 'torch'}); model.optimizer='adamw' (checkpoint: 'muonclip')",
        ),
        (["test", "--model.lr", "0.5"], "test of a checkpoint cannot change model.lr=0.5"),
    ],
)
def test_changed_architecture_on_resume_is_refused(
    run5: Path, argv: list[str], message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = str(run5 / "checkpoints" / "last.ckpt")
    assert main([argv[0], "--config", TINY, *FAST, *argv[1:], "--ckpt_path", ckpt]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.rglob("*.ckpt"))


def test_changed_learning_rate_on_resume_is_applied(
    run5: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = str(run5 / "checkpoints" / "last.ckpt")
    argv = ["fit", "--config", TINY, "--config", _callbacks(tmp_path, 100), *FAST]
    argv += ["--model.lr", "1e-4", "--trainer.max_steps", "6", "--ckpt_path", ckpt]
    with caplog.at_level("INFO"):
        assert main(argv) == 0
    assert "model.lr: 0.003 -> 0.0001" in caplog.text
    assert "MFU not available" in caplog.text  # CPU, no peak_flops given
    last = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert last["global_step"] == 6 and last["hyper_parameters"]["lr"] == 1e-4
    groups = last["optimizer_states"][0]["param_groups"]
    assert all(g["initial_lr"] == 1e-4 for g in groups)
    # the checkpoint's schedule (5 steps, finished) is kept: lr = 1e-4 * min_lr_ratio
    assert all(g["lr"] == pytest.approx(1e-5) for g in groups)


def _other_corpus(folder: Path) -> Path:
    folder.mkdir()
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + "other text, " * 40)
    return folder


@pytest.mark.parametrize(
    "change,message",
    [
        (["--data.init_args.seq_len", "48"], "data.seq_len: 32 there, 48 now"),
        (["--data.init_args.val_fraction", "0.3"], "data.val_fraction: 0.02 there, 0.3 now"),
        (["--data.init_args.path", "{corpus}"], "another corpus (sha256 of its text): '"),
    ],
)
def test_text_data_resume_on_another_corpus_or_seq_len_is_refused(
    run5: Path, change: list[str], message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``TextDataModule`` records its corpus hash and sequence settings in the checkpoint; a
    resumed ``fit`` with another corpus or ``seq_len`` is a one-line error naming it (as
    ``TokenDataModule``), instead of silently training on other batches."""
    corpus = _other_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    ckpt = str(run5 / "checkpoints" / "last.ckpt")
    change = [a.format(corpus=corpus) for a in change]
    argv = ["fit", "--config", TINY, *FAST, *change, "--trainer.max_steps", "8"]
    assert main([*argv, "--ckpt_path", ckpt]) == 2
    err = capsys.readouterr().err
    assert message in err and "resuming would not continue" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.rglob("*.ckpt"))


def test_text_data_checkpoint_validates_on_another_corpus(
    run5: Path, tmp_path: Path, monkeypatch
) -> None:
    """Evaluating a checkpoint on other text is not a resume: it is allowed."""
    corpus = _other_corpus(tmp_path / "corpus")
    monkeypatch.chdir(tmp_path)
    ckpt = str(run5 / "checkpoints" / "last.ckpt")
    argv = ["validate", "--config", TINY, *FAST, "--data.init_args.path", str(corpus)]
    assert main([*argv, "--ckpt_path", ckpt]) == 0


# ------------------------------------------------------------------------ atomic writes
def test_atomic_save_writes_in_the_target_folder_not_the_temp_dir(
    tmp_path: Path, monkeypatch
) -> None:
    """The temporary file lives next to the target, so the rename never crosses filesystems
    (here the system temp dir is elsewhere; /dev/shm is a different filesystem when present)."""
    other = Path("/dev/shm") if os.path.isdir("/dev/shm") else tmp_path / "elsewhere"
    other = Path(tempfile.mkdtemp(dir=other))
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    seen: list[str] = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(os.fspath(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "run" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"w": torch.arange(3)}, target)
    assert torch.equal(torch.load(target)["w"], torch.arange(3))
    assert len(seen) == 1 and Path(seen[0]).parent == target.parent
    assert not list(other.iterdir()) and sorted(os.listdir(target.parent)) == ["last.ckpt"]
    other.rmdir()


class _Explodes:
    def __reduce__(self):
        raise RuntimeError("killed half-way")


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(1000)}, target)
    before = target.read_bytes()
    with pytest.raises((RuntimeError, pickle.PicklingError), match="killed half-way"):
        atomic_torch_save({"w": torch.zeros(1000), "bad": _Explodes()}, target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_the_cli_trainer_writes_atomically(tmp_path: Path, monkeypatch) -> None:
    from kimi_linear.lightning.cli import build_cli

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", TINY, "--config", _callbacks(tmp_path, 3), *FAST], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert any(type(cb) is KimiModelCheckpoint for cb in cli.trainer.callbacks)


def test_throughput_monitor_bad_arguments() -> None:
    with pytest.raises(ValueError, match="peak_flops must be None or a finite number > 0"):
        ThroughputMonitor(peak_flops=0)
    with pytest.raises(ValueError, match="log_every_n_steps must be None or an int >= 1"):
        ThroughputMonitor(log_every_n_steps=0)


# ------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_gives_the_same_loss_gradients_and_moe_loads() -> None:
    from kimi_linear.config import KimiLinearConfig
    from kimi_linear.model import KimiLinearForCausalLM

    torch.manual_seed(0)
    cfg = KimiLinearConfig.from_preset("tiny", kda_backend="torch")
    model = KimiLinearForCausalLM(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    moes = [m for m in model.modules() if hasattr(m, "expert_load")]
    results = []
    for enabled in (False, True):
        model.zero_grad()
        for m in moes:
            m.expert_load.zero_()
        model.model.set_activation_checkpointing(enabled)
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, [m.expert_load.clone() for m in moes]))
    (l0, g0, m0), (l1, g1, m1) = results
    # same ops in the same order: identical up to float32 rounding of re-run kernels
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.parameters()))
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(m0, m1):
        assert torch.equal(a, b)  # tokens counted once, not again by the recomputation
    with pytest.raises(TypeError, match="enabled must be a bool"):
        model.model.set_activation_checkpointing("yes")  # type: ignore[arg-type]


def test_peak_flops_lookup(monkeypatch) -> None:
    from kimi_linear.lightning import callbacks

    assert callbacks.peak_flops_of(torch.device("cpu"), "fp32") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, precision, expected in [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),
        ("NVIDIA H100 PCIe", "bf16", 756.0e12),
        ("NVIDIA A100-SXM4-80GB", "tf32", 156.0e12),
        ("Tesla T4", "fp16", 65e12),  # Lightning's get_available_flops
        ("NVIDIA Imaginary X1", "fp16", None),  # known to no table: MFU not logged
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert callbacks.peak_flops_of(torch.device("cuda", 0), precision) == expected, name


@pytest.mark.slow
def test_activation_memory_benchmark(tmp_path: Path) -> None:
    """``benchmarks/activation_memory.py`` on the tiny preset: checkpointing keeps fewer bytes;
    a bad length is an argparse error."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.activation_memory", "--preset", "tiny"]
        + ["--seq-lens", "64", "--threads", "1", "--out-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    (row,) = json.loads((tmp_path / "activation_memory.json").read_text())["rows"]
    assert 0 < row["checkpointed_bytes"] < row["plain_bytes"]
    assert row["checkpointed_tensors"] < row["plain_tensors"]
    bad = subprocess.run(
        [sys.executable, "-m", "benchmarks.activation_memory", "--seq-lens", "0"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_generate_and_export_name_a_truncated_checkpoint(
    run5: Path, tmp_path: Path, capsys
) -> None:
    good = run5 / "checkpoints" / "last.ckpt"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:1000])
    for argv in (
        ["generate", "--ckpt_path", str(bad), "--prompt", "x"],
        ["export", "--ckpt_path", str(bad), "--output_dir", str(tmp_path / "out")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{str(bad)!r} is truncated" in err, argv


# ------------------------------------------------------------ no code runs from a checkpoint
def _load(path: Path) -> dict:
    """One of our own (trusted) checkpoint files, as a dict."""
    return dict(torch.load(path, map_location="cpu", weights_only=True))


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the marker file proves the code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sharded_copy(ckpt: dict, folder: Path, step: int | None = None) -> Path:
    """``ckpt`` (a single-file Lightning checkpoint's dict) saved as a sharded folder by
    ``FSDP2Strategy`` in this process (``torch.distributed.checkpoint`` without a group)."""
    import warnings

    from kimi_linear.lightning.parallel import FSDP2Strategy

    ckpt = dict(ckpt)
    if step is not None:
        ckpt["global_step"] = step
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process")
        FSDP2Strategy().save_checkpoint(ckpt, folder)
    return folder


def _hostile_checkpoints(run5: Path, root: Path, marker: Path) -> dict[str, Path]:
    """A payload in each place a checkpoint can carry one: a ``.ckpt``'s pickle, a sharded
    folder's ``meta.pt``, its ``.metadata`` pickle and a non-tensor entry of its shards."""
    import torch.distributed.checkpoint as dcp

    good = _load(run5 / "checkpoints" / "last.ckpt")
    out = {}
    out["ckpt"] = root / "evil.ckpt"
    torch.save({**good, "callbacks": {"x": _Payload(marker)}}, out["ckpt"])
    out["meta.pt"] = _sharded_copy(good, root / "meta_pt.ckpt")
    torch.save({**good, "payload": _Payload(marker)}, out["meta.pt"] / "meta.pt")
    out[".metadata"] = _sharded_copy(good, root / "metadata.ckpt")
    (out[".metadata"] / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    out["entry"] = _sharded_copy(good, root / "entry.ckpt")
    state = {"state_dict": {k: v.clone() for k, v in good["state_dict"].items()}}
    state["optimizer_0"] = {"param_groups": [{"lr": _Payload(marker)}]}
    for f in out["entry"].iterdir():
        if f.name != "meta.pt":
            f.unlink()
    dcp.save(state, checkpoint_id=out["entry"], no_dist=True)
    assert not marker.exists()  # writing them ran nothing
    return out


@pytest.mark.parametrize("where", ["ckpt", "meta.pt", ".metadata", "entry"])
def test_a_checkpoint_payload_never_runs(
    run5: Path, where: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A checkpoint carrying a pickle payload is refused on every path that reads it (fit and
    validate --ckpt_path, generate, export, and the FSDP2 strategy's resume) with one line
    naming the file, and its code never runs."""
    marker = tmp_path / "payload-ran"
    evil = _hostile_checkpoints(run5, tmp_path, marker)[where]
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["fit", "--config", TINY, *FAST, "--trainer.max_steps", "8", "--ckpt_path", str(evil)],
        ["validate", "--config", TINY, *FAST, "--ckpt_path", str(evil)],
        ["generate", "--ckpt_path", str(evil), "--prompt", "x", "--max_new_tokens", "1"],
        ["export", "--ckpt_path", str(evil), "--output_dir", str(tmp_path / "out")],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert str(evil) in err and ("refused" in err or "could not be read" in err), (argv, err)
        assert not marker.exists(), argv
    if where != "ckpt":  # the strategy's own resume path (Python API), checked the same way
        from kimi_linear.errors import UsageError
        from kimi_linear.lightning.parallel import FSDP2Strategy

        with pytest.raises(UsageError, match="refused|could not be read"):
            FSDP2Strategy().load_checkpoint(evil)
    assert not marker.exists()


def test_load_checkpoint_allow_list(tmp_path: Path) -> None:
    """Plain values (paths, namespaces) that hyper-parameters may hold load; a reference to
    anything else is refused before unpickling, naming it."""
    import argparse

    from kimi_linear.errors import UsageError
    from kimi_linear.lightning.callbacks import load_checkpoint

    ok = {"w": torch.ones(2), "p": Path("/x"), "ns": argparse.Namespace(a=1), "t": (1, "a")}
    torch.save(ok, tmp_path / "ok.ckpt")
    got = load_checkpoint(tmp_path / "ok.ckpt")
    assert got["p"] == Path("/x") and got["ns"].a == 1 and torch.equal(got["w"], torch.ones(2))
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(marker)}, tmp_path / "bad.ckpt")
    with pytest.raises(
        UsageError, match=r"bad\.ckpt' was refused: it references (io|builtins)\.open"
    ):
        load_checkpoint(tmp_path / "bad.ckpt")
    assert not marker.exists()


def test_pretrained_folders_run_no_code(run5: Path, tmp_path: Path, monkeypatch) -> None:
    """``from_pretrained`` and ``--model.init_from`` read config.json and safetensors only: a
    folder that also ships a pickled ``pytorch_model.bin`` and remote code (``auto_map``) loads
    without running either."""
    import json

    from kimi_linear.model import KimiLinearForCausalLM

    marker = tmp_path / "payload-ran"
    folder = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(run5 / "checkpoints" / "last.ckpt"),
                 "--output_dir", str(folder)]) == 0  # fmt: skip
    torch.save({"x": _Payload(marker)}, folder / "pytorch_model.bin")
    (folder / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_modeling.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    KimiLinearForCausalLM.from_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    argv = ["fit", "--config", TINY, *FAST, "--model.preset", "null", "--model.init_from"]
    assert main([*argv, str(folder), "--trainer.max_steps", "1"]) == 0
    assert not marker.exists()


# ------------------------------------------------------------------ atomic sharded saves
_PHASES = ["writing", "tmp_ready", "written", "old_moved", "new_moved", "old_removed"]


@pytest.mark.parametrize("phase", _PHASES)
def test_sharded_save_killed_at_every_phase_keeps_a_checkpoint(
    run5: Path, phase: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A kill at any phase of a sharded (FSDP2) save leaves a complete checkpoint: the previous
    one until the new one is complete and swapped in; the next reader (here ``export``)
    recovers the name deterministically and leaves no ``.tmp`` / ``.old`` behind."""
    import lightning.fabric.strategies.model_parallel as lmp

    from kimi_linear.lightning import checkpoints

    load_checkpoint = _load
    good = _load(run5 / "checkpoints" / "last.ckpt")
    path = _sharded_copy(good, tmp_path / "last.ckpt", step=1)
    newer = dict(good, state_dict={k: v + 1 for k, v in good["state_dict"].items()})

    class Killed(Exception):
        pass

    if phase == "writing":  # half the shard files written, then the process dies

        def half(state, folder):
            (Path(folder) / "__0_0.distcp").write_bytes(b"partial")
            raise Killed

        monkeypatch.setattr(lmp, "_distributed_checkpoint_save", half)
    else:

        def kill(name, p):
            if name == phase:
                raise Killed

        monkeypatch.setattr(checkpoints, "_checkpoint_phase", kill)
    with pytest.raises(Killed):
        _sharded_copy(newer, path, step=2)
    monkeypatch.undo()
    expected = 1 if phase in ("writing", "tmp_ready", "written") else 2
    out = tmp_path / "out"
    assert main(["export", "--ckpt_path", str(path), "--output_dir", str(out)]) == 0
    assert "interrupted save was recovered" in capsys.readouterr().err or phase == "old_removed"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("last")) == ["last.ckpt"]
    assert load_checkpoint(path / "meta.pt")["global_step"] == expected
    weights = checkpoints.load_sharded_state_dict(path)
    source = good if expected == 1 else newer
    for name, tensor in weights.items():
        assert torch.equal(tensor, source["state_dict"]["model." + name]), name
    # and the next save after the kill works and replaces it
    _sharded_copy(good, path, step=3)
    assert load_checkpoint(path / "meta.pt")["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("last")) == ["last.ckpt"]


def test_recover_checkpoint_swap_rules(tmp_path: Path) -> None:
    from kimi_linear.lightning.checkpoints import recover_checkpoint_swap

    def folder(name: str, step: int, complete: bool = True) -> Path:
        p = tmp_path / name
        p.mkdir()
        (p / ".metadata").write_bytes(b"x")
        if complete:
            torch.save({"global_step": step}, p / "meta.pt")
        return p

    def step() -> int:
        return torch.load(tmp_path / "c.ckpt" / "meta.pt")["global_step"]

    assert recover_checkpoint_swap(tmp_path / "c.ckpt") is None  # nothing to do
    folder("c.ckpt.old", 1), folder("c.ckpt.tmp", 2)  # killed between the two renames
    assert "moved c.ckpt.tmp" in recover_checkpoint_swap(tmp_path / "c.ckpt") and step() == 2
    folder("c.ckpt.tmp", 3, complete=False)  # a save killed while writing
    assert recover_checkpoint_swap(tmp_path / "c.ckpt") == "kept c.ckpt" and step() == 2
    import shutil

    shutil.move(tmp_path / "c.ckpt", tmp_path / "c.ckpt.old")
    folder("c.ckpt.tmp", 4, complete=False)  # only the previous one is complete
    assert "restored c.ckpt.old" in recover_checkpoint_swap(tmp_path / "c.ckpt") and step() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ckpt"]


_KILL_WORKER = """
import sys, warnings, torch
from pathlib import Path
from kimi_linear.lightning.parallel import FSDP2Strategy
warnings.filterwarnings("ignore")
path, strategy = Path(sys.argv[1]), FSDP2Strategy()
for step in range(1, 10**6):
    w = torch.full((512, 1024), float(step))  # 2 MiB per tensor, 8 tensors
    ckpt = {"state_dict": {f"model.w{i}": w + i for i in range(8)}, "optimizer_states": [],
            "global_step": step}
    strategy.save_checkpoint(ckpt, path)
    print(step, flush=True)
"""


@pytest.mark.slow
def test_sharded_save_survives_kill_9(tmp_path: Path) -> None:
    """A real ``kill -9`` at random moments of back-to-back sharded saves: after each kill the
    checkpoint recovers to a complete, self-consistent one (every tensor of the same step)."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from kimi_linear.lightning.callbacks import load_checkpoint
    from kimi_linear.lightning.checkpoints import load_sharded_state_dict, recover_checkpoint_swap

    path = tmp_path / "last.ckpt"
    rng = random.Random(0)
    last_seen = 0
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_WORKER, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip()  # at least one save finished
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover_checkpoint_swap(path)
        step = load_checkpoint(path / "meta.pt")["global_step"]
        weights = load_sharded_state_dict(path)
        assert len(weights) == 8 and step >= 1
        for i in range(8):
            assert torch.equal(weights[f"w{i}"], torch.full((512, 1024), float(step + i)))
        last_seen = step
    assert last_seen >= 1


def test_load_from_checkpoint_never_runs_a_payload(run5: Path, tmp_path: Path) -> None:
    """``KimiLinearLitModule.load_from_checkpoint`` (the Python API) reads a checkpoint with
    ``weights_only=True`` and builds the module from its hyper-parameters: a trusted file gives
    the trained weights back, a payload is refused before it runs, and ``weights_only=False``
    remains the explicit way to use Lightning's loader on a trusted file."""
    from kimi_linear.errors import UsageError
    from kimi_linear.lightning.module import KimiLinearLitModule

    good = run5 / "checkpoints" / "last.ckpt"
    module = KimiLinearLitModule.load_from_checkpoint(good)
    saved = _load(good)["state_dict"]
    for k, v in module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    trusted = KimiLinearLitModule.load_from_checkpoint(good, weights_only=False)
    assert all(torch.equal(v, saved[k]) for k, v in trusted.state_dict().items())
    with pytest.raises(UsageError, match="unknown keyword argument"):
        KimiLinearLitModule.load_from_checkpoint(good, lrr=1.0)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({**_load(good), "callbacks": {"x": _Payload(marker)}}, evil)
    with pytest.raises(UsageError, match=r"evil\.ckpt' was refused"):
        KimiLinearLitModule.load_from_checkpoint(evil)
    assert not marker.exists()
