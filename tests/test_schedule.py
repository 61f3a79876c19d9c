"""The learning-rate schedule as training applies it, and as a resumed fit changes it: a real ``KimiLinearLitModule`` trained by a
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


# ------------------------------------------------------------------------ resumed schedules
def _lr(step: int, warmup: int, total: int, min_ratio: float, base: float = BASE_LR) -> float:
    """``expected_lr`` with every schedule setting explicit."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _resume_fit(
    tmp_path,
    first_steps: int | dict,
    resume_steps: int | dict,
    changes: dict,
    first=None,
    **module_kwargs,
):
    """Train ``first_steps`` (schedule over them), then resume from that checkpoint until
    ``resume_steps`` with the module built from ``module_kwargs`` and ``ResumeOverrides``
    told about ``changes``; returns the learning rates recorded in the resumed part.  A dict
    instead of a step count holds the trainer's length arguments (e.g. ``max_epochs``)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kimi_linear.lightning.callbacks import ResumeOverrides

    def module(**kw):
        torch.manual_seed(0)
        args = dict(
            preset="tiny",
            overrides=SMALL,
            vocab_size=VOCAB,
            optimizer="adamw",
            lr=BASE_LR,
            warmup_steps=WARMUP,
            max_steps=None,
            min_lr_ratio=MIN_RATIO,
        )
        return KimiLinearLitModule(**{**args, **kw})

    def trainer(steps, callbacks):
        return pl.Trainer(
            accelerator="cpu",
            devices=1,
            **(steps if isinstance(steps, dict) else {"max_steps": steps}),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=callbacks,
            default_root_dir=tmp_path,
        )

    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(first_steps, [ckpt]).fit(
        module(**(first or {})), train_dataloaders=DataLoader(_Tokens(), batch_size=BATCH)
    )
    record, overrides = _RecordLR(), ResumeOverrides(changes)
    trainer(resume_steps, [record, overrides]).fit(
        module(**module_kwargs),
        train_dataloaders=DataLoader(_Tokens(), batch_size=BATCH),
        ckpt_path=str(tmp_path / "last.ckpt"),
    )
    return record.seen, overrides


@pytest.mark.parametrize(
    "change",
    ["trainer.max_steps", "model.max_steps", "model.warmup_steps", "model.min_lr_ratio"],
)
def test_a_resumed_fit_applies_its_new_schedule(tmp_path, change: str) -> None:
    """Decided (issue 24 item 6, issue 25 item 8): a resumed fit that changes the schedule's
    length (``trainer.max_steps`` with ``model.max_steps`` unset, or ``model.max_steps``), its
    warmup or its floor runs the *new* schedule from the restored step on: the learning rate of
    step s is the new schedule's at s, as if the run had been set up that way from the start.
    Before, the checkpoint's schedule was kept (the extra steps ran at the floor)."""
    first, total = 6, 10
    warmup, ratio, kwargs, changes = WARMUP, MIN_RATIO, {}, {}
    if change == "model.max_steps":
        kwargs, changes = {"max_steps": total}, {"max_steps": (None, total)}
    elif change == "model.warmup_steps":
        warmup = 5
        kwargs, changes = {"warmup_steps": warmup}, {"warmup_steps": (WARMUP, warmup)}
    elif change == "model.min_lr_ratio":
        ratio = 0.5
        kwargs, changes = {"min_lr_ratio": ratio}, {"min_lr_ratio": (MIN_RATIO, ratio)}
    seen, overrides = _resume_fit(tmp_path, first, total, changes, **kwargs)
    assert [s for s, _ in seen] == list(range(first, total))
    for step, lrs in seen:
        want = _lr(step, warmup, total, ratio)
        old = _lr(step, WARMUP, first, MIN_RATIO)
        assert want != pytest.approx(old, rel=1e-6)  # the test tells the schedules apart
        for lr in lrs:
            assert lr == pytest.approx(want, rel=1e-9), (change, step, lrs)
    assert len(overrides.schedule_changes) == 1
    old_fields, new_fields = overrides.schedule_changes[0]
    assert old_fields == {"warmup_steps": WARMUP, "total_steps": first, "min_ratio": MIN_RATIO}
    assert new_fields == {"warmup_steps": warmup, "total_steps": total, "min_ratio": ratio}


def test_a_resumed_fit_with_the_same_schedule_keeps_it(tmp_path) -> None:
    """A 10-step schedule interrupted at step 6 and resumed with the same settings continues
    it unchanged (nothing reported as changed)."""
    seen, overrides = _resume_fit(tmp_path, 6, 10, {}, first={"max_steps": 10}, max_steps=10)
    assert [s for s, _ in seen] == [6, 7, 8, 9] and overrides.schedule_changes == []
    for step, lrs in seen:
        assert lrs[0] == pytest.approx(_lr(step, WARMUP, 10, MIN_RATIO), rel=1e-9)


def test_a_resumed_fit_bounded_by_epochs_applies_its_new_length(tmp_path) -> None:
    """``model.max_steps`` unset and the trainer bounded by epochs: the schedule's length is the
    estimate over ``max_epochs``, resolved when training starts (the train loader is then set up
    with its restored position).  1 epoch (4 steps), resumed with ``max_epochs=3``: steps 4..11
    follow the 12-step schedule; ``ResumeOverrides`` compares the restored schedule with the
    resolved one, never with the pending length."""
    epoch = SAMPLES // BATCH
    seen, overrides = _resume_fit(tmp_path, {"max_epochs": 1}, {"max_epochs": 3}, {})
    assert [s for s, _ in seen] == list(range(epoch, 3 * epoch))
    for step, lrs in seen:
        assert lrs[0] == pytest.approx(_lr(step, WARMUP, 3 * epoch, MIN_RATIO), rel=1e-9)
    assert overrides.schedule_changes == [
        (
            {"warmup_steps": WARMUP, "total_steps": epoch, "min_ratio": MIN_RATIO},
            {"warmup_steps": WARMUP, "total_steps": 3 * epoch, "min_ratio": MIN_RATIO},
        )
    ]
    # the same epochs again: the resolved schedule equals the restored one, nothing changes
    seen, overrides = _resume_fit(tmp_path / "same", {"max_epochs": 3}, {"max_epochs": 3}, {})
    assert seen == [] and overrides.schedule_changes == []


def test_an_epoch_bounded_schedule_waits_for_the_data() -> None:
    """Under ``max_epochs`` with ``model.max_steps`` unset, ``configure_optimizers`` does not
    build the train loader (that would happen before a checkpoint's loader state is restored):
    the length is pending until ``on_train_start``, then the trainer's estimate."""
    from kimi_linear.lightning.schedule import WarmupCosine

    class _Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            self.loader_at_fit_start = trainer.train_dataloader
            fns = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas
            self.pending = {fn.total_steps for fn in fns}

    probe = _Probe()
    torch.manual_seed(0)
    module = KimiLinearLitModule(
        preset="tiny", overrides=SMALL, vocab_size=VOCAB, optimizer="adamw", lr=BASE_LR,
        warmup_steps=10, min_lr_ratio=MIN_RATIO,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(_Tokens(), batch_size=BATCH))
    assert probe.loader_at_fit_start is None and probe.pending == {None}
    # 4 steps; the warmup of 10 is shortened to 3 as for a known length
    for fn in trainer.lr_scheduler_configs[0].scheduler.lr_lambdas:
        assert fn.__dict__ == {"warmup_steps": 3, "total_steps": 4, "min_ratio": MIN_RATIO}
    assert WarmupCosine(3, None, 0.1)(7) == 1.0  # pending: no decay yet
