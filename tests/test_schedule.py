"""The learning-rate schedule as training applies it: a real ``KimiLinearLitModule`` trained by a
Lightning ``Trainer`` (tiny model, CPU, a few steps), its optimizer's learning rate read before
every batch and compared with linear warmup + cosine decay, written out here independently of
``WarmupCosine``. Epochs are shorter than the run, so a schedule stepped per epoch (or per batch
under gradient accumulation) instead of per optimizer step fails.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kimi_linear.lightning.module import KimiLinearLitModule

VOCAB, SEQ, BATCH, SAMPLES = 32, 16, 2, 8  # 4 batches per epoch
BASE_LR, WARMUP, MIN_RATIO = 1e-2, 3, 0.1
SMALL = dict(num_hidden_layers=2, kda_backend="torch", first_k_dense_replace=1)


def expected_lr(step: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): ``(step + 1) / WARMUP`` of the base
    during warmup, then cosine from the base to ``MIN_RATIO`` of it at ``total`` steps."""
    if step < WARMUP:
        return BASE_LR * (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / (total - WARMUP))
    return BASE_LR * (MIN_RATIO + (1 - MIN_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


class _Tokens(Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(
            0, VOCAB, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(0)
        )

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i]}


class _RecordLR(pl.Callback):
    """(optimizer step, learning rate of every parameter group) before each training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[float]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.seen.append((trainer.global_step, [g["lr"] for g in groups]))


def _fit(
    optimizer: str, schedule_steps: int | None, **trainer_kwargs
) -> tuple[_RecordLR, pl.Trainer]:
    torch.manual_seed(0)
    module = KimiLinearLitModule(
        preset="tiny",
        overrides=SMALL,
        vocab_size=VOCAB,
        optimizer=optimizer,
        lr=BASE_LR,
        warmup_steps=WARMUP,
        max_steps=schedule_steps,
        min_lr_ratio=MIN_RATIO,
    )
    record = _RecordLR()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(_Tokens(), batch_size=BATCH))
    return record, trainer


def _assert_schedule(record: _RecordLR, total: int, batches_per_step: int = 1) -> None:
    assert len(record.seen) == total * batches_per_step
    for i, (step, lrs) in enumerate(record.seen):
        assert step == i // batches_per_step
        want = expected_lr(step, total)
        assert len(lrs) >= 1
        for lr in lrs:
            assert lr == pytest.approx(want, rel=1e-9), f"batch {i}, optimizer step {step}: {lrs}"


@pytest.mark.parametrize("optimizer", ["adamw", "muonclip"])
def test_lr_follows_warmup_cosine_every_optimizer_step(optimizer: str) -> None:
    total = 9  # over 2 epochs of 4 batches: warmup, cosine, the last step
    record, trainer = _fit(optimizer, total, max_steps=total)
    _assert_schedule(record, total)
    # after the last step the schedule has reached its floor
    for g in trainer.optimizers[0].param_groups:
        assert g["lr"] == pytest.approx(BASE_LR * MIN_RATIO, rel=1e-9)


def test_lr_steps_per_optimizer_step_under_gradient_accumulation() -> None:
    total = 5  # 10 batches: two per optimizer step
    record, _ = _fit("adamw", total, max_steps=total, accumulate_grad_batches=2)
    _assert_schedule(record, total, batches_per_step=2)


def test_lr_schedule_length_from_max_epochs() -> None:
    """Without ``model.max_steps`` the cosine spans the trainer's estimated optimizer steps."""
    record, _ = _fit("adamw", None, max_epochs=2)
    _assert_schedule(record, total=2 * SAMPLES // BATCH)
