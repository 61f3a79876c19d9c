"""The LightningModule: config building, schedule, MoE balancing, max-logit logging, exact resume, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from kimi_linear.config import KimiLinearConfig
from kimi_linear.hf import config_to_hf
from kimi_linear.lightning.data import SyntheticDataModule, UsageError
from kimi_linear.lightning.hparams import build_config
from kimi_linear.lightning.module import KimiLinearLitModule
from kimi_linear.lightning.schedule import WarmupCosine

REPO = Path(__file__).resolve().parents[1]
# 2 layers (KDA then MLA), MoE in the second: every code path, small and fast on CPU.
SMALL = dict(num_hidden_layers=2, kda_backend="torch", first_k_dense_replace=1)


# ------------------------------------------------------------------------------ config
def test_build_config_preset_overrides_and_vocab() -> None:
    cfg = build_config("tiny", {"num_hidden_layers": 2, "kda_gate": "head"}, vocab_size=66)
    assert (cfg.num_hidden_layers, cfg.kda_gate, cfg.vocab_size) == (2, "head", 66)
    assert build_config().name == "tiny"
    full = KimiLinearConfig.from_preset("tiny").to_dict()
    assert build_config(config=full, overrides={"hidden_size": 32}).hidden_size == 32
    hf = config_to_hf(KimiLinearConfig.from_preset("tiny"))
    assert build_config(config=hf).layer_kinds == KimiLinearConfig.from_preset("tiny").layer_kinds


def test_build_config_errors() -> None:
    with pytest.raises(
        UsageError, match="unknown KimiLinearConfig field 'hiden_size'.*did you mean 'hidden_size'"
    ):
        build_config("tiny", {"hiden_size": 32})
    full = KimiLinearConfig.from_preset("tiny").to_dict()
    with pytest.raises(UsageError, match="'hiden_size'.*did you mean 'hidden_size'"):
        build_config(config=full, overrides={"hiden_size": 32})
    with pytest.raises(
        UsageError, match="model.preset must be one of .*'tinyy'.*did you mean 'tiny'"
    ):
        build_config("tinyy")
    with pytest.raises(UsageError, match="either model.preset or model.config"):
        build_config("tiny", config={"hidden_size": 8})
    with pytest.raises(UsageError, match="model.overrides.vocab_size=100 conflicts"):
        build_config("tiny", {"vocab_size": 100}, vocab_size=66)
    with pytest.raises(UsageError, match="model: KimiLinearConfig.kda_gate must be one of"):
        build_config("tiny", {"kda_gate": "bogus"})
    with pytest.raises(UsageError, match="model.optimizer must be one of .*did you mean 'adamw'"):
        KimiLinearLitModule(preset="tiny", optimizer="adam")
    with pytest.raises(UsageError, match="model.lr must be a finite number > 0"):
        KimiLinearLitModule(preset="tiny", lr=0.0)


def test_warmup_cosine_schedule() -> None:
    f = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


# ------------------------------------------------------------------------------ training
def _data(**kw) -> SyntheticDataModule:
    kw = {
        "task": "mqar",
        "seq_len": 32,
        "batch_size": 4,
        "num_train": 64,
        "num_val": 8,
        "task_kwargs": {"num_kv_pairs": 4, "num_tokens": 64},
        **kw,
    }
    return SyntheticDataModule(**kw)


def _module(dm: SyntheticDataModule, **kw) -> KimiLinearLitModule:
    kw = {
        "preset": "tiny",
        "overrides": SMALL,
        "vocab_size": dm.vocab_size,
        "lr": 3e-3,
        "warmup_steps": 2,
        **kw,
    }
    return KimiLinearLitModule(**kw)


def _trainer(root: Path, max_steps: int, **kw) -> pl.Trainer:
    kw = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 0,
        "gradient_clip_val": 1.0,
        "default_root_dir": str(root),
        **kw,
    }
    return pl.Trainer(**kw)


@pytest.mark.parametrize("optimizer", ["adamw", "muonclip"])
def test_fit_logs_metrics_and_balances_experts(tmp_path: Path, optimizer: str) -> None:
    pl.seed_everything(0)
    dm = _data()
    module = _module(dm, optimizer=optimizer, moe_bias_update_rate=0.01)
    trainer = _trainer(
        tmp_path,
        3,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        limit_val_batches=1,
        val_check_interval=3,
    )
    trainer.fit(module, datamodule=dm)
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    cols = set(rows[0])
    for key in (
        "train/loss",
        "train/ppl",
        "train/acc",
        "train/exact_match",
        "val/loss",
        "val/ppl",
        "val/acc",
        "val/exact_match",
        "moe/balance/layer_1",
        "moe/balance/mean",
        "mla/max_logit/layer_1",
        "mla/max_logit/max",
    ):
        assert key in cols, key
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    ppls = [float(r["train/ppl"]) for r in rows if r["train/ppl"]]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert ppls[0] == pytest.approx(math.exp(losses[0]), rel=1e-4)  # ppl of the answer tokens
    balance = [float(r["moe/balance/layer_1"]) for r in rows if r["moe/balance/layer_1"]]
    assert all(1.0 <= b <= 4 / 2 + 1e-6 for b in balance)  # top-2 of 4 experts: max/mean <= 2
    moe = module.model.model.layers[1].block_sparse_moe
    bias = moe.gate.e_score_correction_bias
    # three sign steps of 0.01 per expert: the bias moved, on the 0.01 grid, and loads were reset
    assert bias.abs().max() > 0 and torch.allclose(bias / 0.01, (bias / 0.01).round(), atol=1e-4)
    assert float(bias.abs().max()) <= 0.03 + 1e-6
    max_logit = [float(r["mla/max_logit/max"]) for r in rows if r["mla/max_logit/max"]]
    assert len(max_logit) == 3 and all(math.isfinite(v) for v in max_logit)


def test_qk_clip_is_applied_through_the_module(tmp_path: Path) -> None:
    """With a tiny tau, MuonClip clips the MLA heads after each step, and the module logs the
    pre-clip max logits it read."""
    pl.seed_everything(0)
    dm = _data()
    module = _module(dm, optimizer="muonclip", qk_clip_tau=0.05, lr=1e-2)
    trainer = _trainer(tmp_path, 2, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    trainer.fit(module, datamodule=dm)
    opt = trainer.optimizers[0]
    ((name, gamma),) = opt.last_clip_gamma.items()
    assert name == "model.layers.1.self_attn"
    assert float(gamma.min()) < 1.0
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    logged = [float(r["mla/max_logit/layer_1"]) for r in rows if r.get("mla/max_logit/layer_1")]
    assert logged[-1] == pytest.approx(float(opt.last_max_logits[name].max()))
    assert logged[-1] > 0.05


def _fit_steps(
    root: Path, steps: int, ckpt_in: Path | None = None, save_every: int | None = None
) -> KimiLinearLitModule:
    """Train ``steps`` steps (8-step schedule), resuming from ``ckpt_in``; with ``save_every``,
    a ModelCheckpoint writes ``root/step={n}.ckpt`` during training as a real run does."""
    pl.seed_everything(0)
    dm = _data(num_train=24)  # 6 batches per epoch: 8 steps cross an epoch boundary
    module = _module(dm, max_steps=8)
    extra = {}
    if save_every is not None:
        extra = {
            "enable_checkpointing": True,
            "callbacks": [
                ModelCheckpoint(
                    dirpath=root, filename="{step}", every_n_train_steps=save_every, save_top_k=-1
                )
            ],
        }
    trainer = _trainer(root, steps, **extra)
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_in) if ckpt_in else None)
    module.trainer_state = {  # type: ignore[attr-defined]
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
    }
    return module


def _assert_same_state(a: dict, b: dict, path: str = "") -> None:
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{path}[{i}]")
    elif not callable(a):
        assert a == b, path


@pytest.mark.parametrize("half", [3, 6])  # mid-epoch and at the epoch boundary
def test_resume_is_exact(tmp_path: Path, half: int) -> None:
    straight = _fit_steps(tmp_path / "a", 8)
    _fit_steps(tmp_path / "b", half, save_every=half)
    ckpt = tmp_path / "b" / f"step={half}.ckpt"
    resumed = _fit_steps(tmp_path / "c", 8, ckpt_in=ckpt)
    assert resumed.trainer_state["global_step"] == straight.trainer_state["global_step"] == 8
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # weights and the router-bias buffers, bit for bit
    _assert_same_state(straight.trainer_state["optimizer"], resumed.trainer_state["optimizer"])
    _assert_same_state(straight.trainer_state["scheduler"], resumed.trainer_state["scheduler"])


def test_predict_step_and_load_from_checkpoint(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = _data()
    module = _module(dm, optimizer="adamw")
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = KimiLinearLitModule.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=False)
    assert loaded.config == module.config
    out = trainer.predict(loaded, datamodule=dm)
    ids = out[0]["input_ids"]
    module.eval()
    with torch.no_grad():
        assert torch.equal(out[0]["predictions"], module(ids).argmax(-1))


def test_batch_without_scored_labels_trains_and_is_skipped_by_metrics(tmp_path: Path) -> None:
    """A batch whose labels are all -100 (e.g. only prompts) gives the documented loss of 0 and
    no crash inside torchmetrics; perplexity and accuracy skip it, in training and evaluation
    (the validation loss and perplexity are those of the scored batch alone)."""
    pl.seed_everything(0)
    V = 64
    ids = torch.randint(0, V, (8, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:4] = -100  # the first batch of 4 rows has nothing to score
    rows = [{"input_ids": ids[i], "labels": labels[i]} for i in range(8)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    module = KimiLinearLitModule(
        preset="tiny", overrides=SMALL, vocab_size=V, lr=1e-3, warmup_steps=1, optimizer="adamw"
    )
    trainer = _trainer(
        tmp_path,
        2,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        limit_val_batches=2,
        val_check_interval=2,
    )
    trainer.fit(module, loader, loader)
    log = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    train = [r for r in log if r.get("train/loss")]
    assert [float(r["train/loss"]) for r in train][0] == 0.0
    assert [bool(r.get("train/ppl")) for r in train] == [False, True]
    assert math.isfinite(float(train[1]["train/ppl"]))
    val = next(r for r in log if r.get("val/loss"))
    assert float(val["val/loss"]) > 1.0  # the mean of the scored batch, not halved by a 0
    assert float(val["val/ppl"]) == pytest.approx(math.exp(float(val["val/loss"])), rel=1e-4)
    assert 0.0 <= float(val["val/acc"]) <= 1.0


def test_seq_len_longer_than_model_context_is_rejected(tmp_path: Path) -> None:
    dm = _data(seq_len=64)
    module = _module(dm, overrides={**SMALL, "max_position_embeddings": 32})
    with pytest.raises(
        UsageError, match="data.seq_len=64 exceeds the model's max_position_embeddings=32"
    ):
        _trainer(tmp_path, 1).fit(module, datamodule=dm)


# ------------------------------------------------------------------------------ DDP
_PROBE = '''
import torch
import lightning.pytorch as pl


class SaveRankState(pl.Callback):
    """Each rank saves its weights, buffers and optimizer step count after fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"state": {k: v.detach().cpu() for k, v in pl_module.model.state_dict().items()},
             "world_size": trainer.world_size, "global_step": trainer.global_step},
            f"{self.out_dir}/rank{trainer.global_rank}.pt",
        )
'''


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path: Path) -> None:
    (tmp_path / "ddp_probe.py").write_text(textwrap.dedent(_PROBE))
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "kimi_linear.cli",
        "fit",
        "--config",
        str(REPO / "configs" / "mqar.yaml"),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.val_check_interval",
        "3",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.precision",
        "32-true",
        "--model.overrides",
        json.dumps(SMALL),
        "--data.init_args.seq_len",
        "64",
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_val",
        "8",
        "--trainer.callbacks+=ddp_probe.SaveRankState",
        f"--trainer.callbacks.out_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["global_step"] == r1["global_step"] == 3
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    bias = [v for k, v in r0["state"].items() if k.endswith("e_score_correction_bias")]
    assert bias and any(b.abs().max() > 0 for b in bias)


def test_memory_and_speed_switches_reach_the_model() -> None:
    """``model.activation_checkpointing`` / ``model.compile`` (H7): wired to the decoder layers;
    bad values are one-line usage errors."""
    from kimi_linear.errors import UsageError
    from kimi_linear.lightning.module import KimiLinearLitModule

    m = KimiLinearLitModule(preset="tiny", activation_checkpointing=True)
    assert m.model.model.activation_checkpointing is True
    m = KimiLinearLitModule(preset="tiny", compile={"backend": "eager"})
    assert all(layer._compiled_call_impl is not None for layer in m.model.model.layers)
    with pytest.raises(UsageError, match="model.activation_checkpointing must be true or false"):
        KimiLinearLitModule(preset="tiny", activation_checkpointing="yes")
    with pytest.raises(UsageError, match="model.compile must be true, false or a dict"):
        KimiLinearLitModule(preset="tiny", compile="max-autotune")


def test_fsdp2_strategy_is_registered_and_unsharded_runs_use_no_mesh() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    from kimi_linear.lightning.parallel import FSDP2Strategy, fsdp_mesh

    assert StrategyRegistry["fsdp2"]["strategy"] is FSDP2Strategy  # --trainer.strategy fsdp2
    module = KimiLinearLitModule(preset="tiny")
    assert fsdp_mesh(module) is None  # no trainer: built whole, on the CPU


# ------------------------------------------------------------------------------ throughput
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, seq: int = 16) -> None:
        self.ids = torch.randint(0, 32, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


class _Clock(pl.Callback):
    """A fake ``perf_counter``: training batch ``i`` (from 1) takes ``0.1 * i`` seconds, a
    validation batch ``dv``, nothing else takes time."""

    def __init__(self, dv: float = 0.0) -> None:
        self.now, self.batches, self.dv, self.val_batches = 1000.0, 0, dv, 0
        self.durations: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def on_train_batch_start(self, *args) -> None:
        self.batches += 1
        self.durations.append(0.1 * self.batches)
        self.now += self.durations[-1]

    def on_validation_batch_start(self, *args) -> None:
        self.val_batches += 1
        self.now += self.dv


def _throughput_fit(monkeypatch, clock: _Clock, steps: int, every: int, **trainer_kwargs):
    """Fit with our ThroughputMonitor on Lightning's clock replaced by ``clock``; returns the
    module and ``[(global step, perf metrics)]`` as the monitor logged them."""
    import types

    import lightning.pytorch.callbacks.throughput_monitor as lightning_monitor

    from kimi_linear.lightning.callbacks import ThroughputMonitor

    fake = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(lightning_monitor, "time", fake)
    torch.manual_seed(0)
    module = KimiLinearLitModule(preset="tiny", overrides=SMALL, vocab_size=32, max_steps=steps)
    logged: list[tuple[int, dict[str, float]]] = []
    log_dict = module.log_dict

    def spy(metrics, *args, **kwargs):
        if any(k.startswith("perf/") for k in metrics):
            logged.append((module.trainer.global_step, dict(metrics)))
        return log_dict(metrics, *args, **kwargs)

    module.log_dict = spy
    loader = torch.utils.data.DataLoader(_Tokens(), batch_size=2)  # 2 x 16 tokens
    monitor = ThroughputMonitor(peak_flops=1e12, log_every_n_steps=every)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[clock, monitor], **trainer_kwargs,
    )  # fmt: skip
    val = {"val_dataloaders": loader} if trainer_kwargs.get("limit_val_batches") else {}
    trainer.fit(module, train_dataloaders=loader, **val)
    return module, logged


@pytest.mark.parametrize(
    "accumulate, validation",
    [(1, False), (2, False), (1, True)],
    ids=["plain", "accumulate", "val"],
)
def test_throughput_monitor_logs_tokens_step_time_and_mfu(monkeypatch, accumulate, validation):
    """Lightning's ThroughputMonitor fed by our analytic FLOPs logs the hand-written monitor's
    metrics: every ``log_every_n_steps`` optimizer steps, over the batches since the previous
    log, ``perf/tokens_per_s`` = tokens / seconds (all ranks), ``perf/step_time_s`` = seconds per
    optimizer step (its micro-batches included), ``perf/mfu`` = tokens/s * flops_per_token(T) /
    peak; a fake clock with a different duration for every batch, equal to 1e-9.  Validation
    time (30 s a batch) is left out of the training windows (the hand-written monitor counted
    it), and under gradient accumulation the first window is the first steps' (it logged one
    micro-batch at step 0)."""
    from kimi_linear.flops import flops_per_token, kda_flops_chunk

    steps, every, tokens = 6, 2, 2 * 16
    kwargs = dict(accumulate_grad_batches=accumulate)
    if validation:
        kwargs.update(limit_val_batches=2, val_check_interval=3)
    clock = _Clock(dv=30.0)
    module, logged = _throughput_fit(monkeypatch, clock, steps, every, **kwargs)
    assert [s for s, _ in logged] == [2, 4, 6]
    config = module.config
    fpt = flops_per_token(config, 16, training=True, kda_chunk_len=kda_flops_chunk(config, "cpu"))
    for step, m in logged:
        window = clock.durations[(step - every) * accumulate : step * accumulate]
        tokens_per_s = len(window) * tokens / sum(window)
        assert m["perf/tokens_per_s"] == pytest.approx(tokens_per_s, rel=1e-9), step
        assert m["perf/step_time_s"] == pytest.approx(sum(window) / every, rel=1e-9), step
        assert m["perf/mfu"] == pytest.approx(tokens_per_s * fpt / 1e12, rel=1e-9), step
        assert "perf/peak_memory_gib" not in m  # CUDA only
    assert (clock.val_batches > 0) == validation  # validation ran (and took its 30 s)


def test_throughput_monitor_needs_token_batches(monkeypatch) -> None:
    from kimi_linear.lightning.callbacks import _rows

    with pytest.raises(ValueError, match="2-D 'input_ids' tensor"):
        _rows({"ids": torch.zeros(2, 3)})


def test_peak_flops_come_from_lightning_and_our_corrections(monkeypatch) -> None:
    """Lightning's ``get_available_flops`` for the GPUs it knows; our table where it has no
    figure (H200 as it names itself), reads L40S as an L4, or lists the non-tensor rate
    (RTX 4090 bf16)."""
    from lightning.fabric.utilities import throughput

    from kimi_linear.lightning import callbacks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    for name, precision, expected in [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4e12),  # Lightning's
        ("NVIDIA A100-SXM4-80GB", "tf32", 156e12),  # Lightning's
        ("Tesla T4", "fp16", 65e12),  # Lightning's (the hand-written table had no T4)
        ("NVIDIA H200", "bf16", 989.4e12),  # ours: Lightning has none (its H200 rows are sparse)
        ("NVIDIA L40S", "bf16", 362.05e12),  # ours: Lightning reads it as an L4 (121e12)
        ("NVIDIA GeForce RTX 4090", "bf16", 165.2e12),  # ours: Lightning lists 82.6e12
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert callbacks.peak_flops_of(cuda, precision) == expected, name
        lightning_value = throughput.get_available_flops(
            cuda, callbacks._LIGHTNING_DTYPES[precision]
        )
        if name in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "Tesla T4"):
            assert lightning_value == expected
        else:  # the corrections are needed: drop an entry when Lightning gets it right
            assert lightning_value != expected
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Imaginary X1")
    with pytest.warns(UserWarning, match="FLOPs not found"):
        assert callbacks.peak_flops_of(cuda, "bf16") is None
    with pytest.raises(ValueError, match="precision must be one of"):
        callbacks.peak_flops_of(cuda, "int8")
    assert callbacks.peak_flops_of(torch.device("cpu"), "fp32") is None
