"""The LightningModule that trains :class:`~kimi_linear.model.KimiLinearForCausalLM`.

One job: the LightningModule (one class, hence above ~600 lines); its config comes from
:mod:`.hparams`, its schedule from :mod:`.schedule`, its sharding plan from :mod:`.parallel`.

:class:`KimiLinearLitModule` adds to the model:

* next-token loss (labels aligned with ``input_ids``; ``-100`` ignored), with torchmetrics
  perplexity and token accuracy for train / val / test, and exact-match accuracy (every answer
  token of a sequence right) when the data module marks its task as answer-scored;
* MuonClip by default (:mod:`kimi_linear.optim`) or AdamW, with a linear-warmup + cosine
  learning-rate schedule stepped every optimizer step;
* after every optimizer step, the auxiliary-loss-free router-bias update of each MoE layer
  (``KimiMoE.update_bias``; expert loads are summed over ranks), with the per-layer load
  balance ``max(load) / mean(load)`` logged as ``moe/balance/layer_{i}``;
* the MLA layers' per-head max pre-softmax logits (QK-Clip's ``S_max``) logged as
  ``mla/max_logit/layer_{i}`` (from MuonClip's ``last_max_logits``, or recorded by the module
  itself under AdamW).

The model is built from a :class:`~kimi_linear.config.KimiLinearConfig` described by a preset
name plus overrides, or by a full config dict (:func:`~kimi_linear.lightning.hparams.build_config`),
so a YAML config can say::

    model:
      preset: tiny
      overrides: {num_hidden_layers: 2, kda_gate: head}

The model itself is built in :meth:`KimiLinearLitModule.configure_model` (Lightning calls it once
the processes are set up; reading ``module.model`` earlier builds it too): on the meta device,
sharded with FSDP2 per decoder layer when the trainer's strategy shards
(:mod:`kimi_linear.lightning.parallel`), then materialized and initialised per shard from
per-parameter seeded streams (``reset_parameters(seed=init_seed)``), so the same seed gives the
same weights on any number of ranks.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.text import Perplexity

from kimi_linear import hf
from kimi_linear.errors import UsageError, did_you_mean
from kimi_linear.lightning import finetune
from kimi_linear.lightning.callbacks import load_checkpoint
from kimi_linear.lightning.context_parallel import context_parallel_step
from kimi_linear.lightning.data import IGNORE_INDEX
from kimi_linear.lightning.hparams import build_config, init_from_config
from kimi_linear.lightning.parallel import FSDP2Strategy, fsdp_mesh, shard_model
from kimi_linear.lightning.schedule import WarmupCosine
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.optim import build_optimizer

OPTIMIZERS = ("muonclip", "adamw")
_STAGES = ("train", "val", "test")


def _layer_index(module_name: str) -> str:
    """``"model.layers.3.self_attn"`` -> ``"3"`` (the module name itself if there is none)."""
    parts = module_name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts):
            return parts[i + 1]
    return module_name


class KimiLinearLitModule(pl.LightningModule):
    """Trains a Kimi Linear causal LM on batches ``{"input_ids": [B, T], "labels": [B, T]}``.

    A batch may also carry ``"cu_seqlens"`` (int32 document offsets of the batch flattened to
    ``[1, B * T]``, as :class:`~kimi_linear.lightning.data.TokenDataModule` gives with
    ``pack="reset"``): the model then runs on the flattened stream and restarts at each document.

    Args:
        preset: name of a :data:`~kimi_linear.config.PRESETS` entry (``tiny`` when neither this
            nor ``config`` is given).
        overrides: :class:`KimiLinearConfig` fields replaced on top of the preset / config.
        config: a full config dict (our field names, or a released HF ``config.json`` dict).
        vocab_size: the data's vocabulary size; the CLI links it from ``data.vocab_size``.
        optimizer: ``"muonclip"`` (Muon for hidden matrices + AdamW elsewhere, QK-Clip on MLA)
            or ``"adamw"``.
        lr: peak learning rate (shared by all parameter groups).
        weight_decay: decoupled weight decay (norms, biases, ``A_log``, ``dt_bias`` get none).
        betas: AdamW betas.
        warmup_steps: linear warmup length in optimizer steps.
        max_steps: length of the cosine schedule in optimizer steps; ``None`` uses the
            trainer's ``estimated_stepping_batches`` (under ``max_epochs``, resolved when
            training starts, after a checkpoint's loader position is restored).
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        qk_clip_tau: QK-Clip threshold of MuonClip (``None``: no clipping; ignored by AdamW).
        moe_bias_update_rate: router-bias step size (``None``: ``config.moe_bias_update_rate``;
            ``0`` disables balancing).
        log_max_logits: log the MLA per-head max logits (recorded by the MLA layers; under
            MuonClip they are recorded anyway for the clip).
        init_seed: seed of the weight initialisation (per-parameter streams, independent of the
            number of ranks); ``None``: ``torch.initial_seed()`` (the run's ``seed_everything``
            seed), taken from rank 0.
        activation_checkpointing: recompute each decoder layer in the backward pass instead of
            keeping its activations (``KimiLinearModel.set_activation_checkpointing``).
        compile: ``torch.compile`` each decoder layer (``True``, or a dict of ``torch.compile``
            arguments such as ``{mode: max-autotune}``; ``KimiLinearModel.compile_layers``).
        init_from: a checkpoint folder (``config.json`` + safetensors: the release layout, a
            ``save_pretrained`` / ``kimi-linear export`` folder or a transformers-saved one)
            whose config and weights the training starts from (``kimi_linear.hf``); not with
            ``preset`` / ``config``; ``overrides`` may change fields that keep the weights'
            shapes (e.g. ``kda_backend``).
        lora: LoRA fine-tuning through peft (:mod:`kimi_linear.lightning.finetune`): a dict of
            :class:`~kimi_linear.lightning.finetune.LoraOptions` fields (``targets``, ``r``,
            ``alpha``, ``dropout``, ``rslora``), usually with ``init_from``.  Only the adapters
            train; QK-Clip and the MoE router-bias update are off (they would change the frozen
            base); ``kimi-linear export`` merges the adapters into the weights.
    """

    def __init__(
        self,
        preset: str | None = None,
        overrides: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        vocab_size: int | None = None,
        optimizer: str = "muonclip",
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        qk_clip_tau: float | None = 100.0,
        moe_bias_update_rate: float | None = None,
        log_max_logits: bool = True,
        init_seed: int | None = None,
        init_from: str | None = None,
        activation_checkpointing: bool = False,
        compile: bool | dict[str, Any] = False,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if optimizer not in OPTIMIZERS:
            raise UsageError(
                f"model.optimizer must be one of {list(OPTIMIZERS)}, got {optimizer!r}{did_you_mean(optimizer, OPTIMIZERS)}"
            )
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise UsageError(f"model.lr must be a finite number > 0, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise UsageError(f"model.weight_decay must be >= 0, got {weight_decay!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise UsageError(f"model.warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if max_steps is not None and (
            isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1
        ):
            raise UsageError(f"model.max_steps must be None or a positive int, got {max_steps!r}")
        if not 0 <= min_lr_ratio <= 1:
            raise UsageError(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        if qk_clip_tau is not None and not qk_clip_tau > 0:
            raise UsageError(f"model.qk_clip_tau must be None or > 0, got {qk_clip_tau!r}")
        if moe_bias_update_rate is not None and not moe_bias_update_rate >= 0:
            raise UsageError(
                f"model.moe_bias_update_rate must be None or >= 0, got {moe_bias_update_rate!r}"
            )
        if init_seed is not None and (
            isinstance(init_seed, bool) or not isinstance(init_seed, int) or init_seed < 0
        ):
            raise UsageError(f"model.init_seed must be None or an int >= 0, got {init_seed!r}")
        if not isinstance(activation_checkpointing, bool):
            raise UsageError(
                f"model.activation_checkpointing must be true or false, got {activation_checkpointing!r}"
            )
        if not isinstance(compile, (bool, dict)):
            raise UsageError(
                f"model.compile must be true, false or a dict of torch.compile arguments, got {compile!r}"
            )

        if init_from is not None:
            self.config = init_from_config(init_from, preset, config, overrides, vocab_size)
        else:
            self.config = build_config(preset, overrides, config, vocab_size)
        self._lora = None
        if lora is not None:  # LoRA (kimi_linear.lightning.finetune): checked before any work
            self._lora = finetune.LoraOptions.from_value(lora)
            finetune.require_peft()
            finetune.check_targets(self.config, self._lora)
        V = self.config.vocab_size
        metrics: dict[str, nn.Module] = {}
        for stage in _STAGES:
            metrics[f"{stage}_ppl"] = Perplexity(ignore_index=IGNORE_INDEX)
            metrics[f"{stage}_acc"] = MulticlassAccuracy(
                num_classes=V, average="micro", ignore_index=IGNORE_INDEX
            )
            metrics[f"{stage}_exact"] = MeanMetric()
        self.metrics = nn.ModuleDict(metrics)
        self._moe: dict[str, nn.Module] = {}
        self._mla: dict[str, nn.Module] = {}
        self._step_stats: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ the model
    @property
    def model(self) -> KimiLinearForCausalLM:
        """The :class:`KimiLinearForCausalLM` (built by :meth:`configure_model` on first use)."""
        if "model" not in self._modules:
            self.configure_model()
        return self._modules["model"]  # type: ignore[return-value]

    def _init_seed(self) -> int:
        seed = self.hparams.init_seed
        if seed is None:
            seed = torch.initial_seed() & ((1 << 63) - 1)
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            seed = trainer.strategy.broadcast(seed, src=0)  # every rank must draw the same weights
        return int(seed)

    def configure_model(self) -> None:
        """Build the model (once): on the meta device, sharded under an FSDP2 strategy, then
        materialized and initialised per shard (see the module docstring).

        Order, as torchtitan: build on meta -> (per-layer wrappers) -> ``fully_shard`` per layer
        -> ``to_empty`` on the device -> ``reset_parameters(seed)``.
        """
        if "model" in self._modules:
            return
        with torch.device("meta"):
            model = KimiLinearForCausalLM(self.config)
        model.model.set_activation_checkpointing(
            self.hparams.get("activation_checkpointing", False)
        )
        compile_args = self.hparams.get("compile", False)
        if compile_args:
            model.model.compile_layers(**({} if compile_args is True else dict(compile_args)))
        mesh = fsdp_mesh(self)
        if mesh is not None:
            strategy = self.trainer.strategy
            if isinstance(strategy, FSDP2Strategy):
                shard_model(
                    model,
                    mesh,
                    reshard_after_forward=strategy.reshard_after_forward,
                    mp_policy=strategy.mixed_precision_policy(),
                )
            else:
                shard_model(model, mesh)
            device = strategy.root_device
        else:
            device = torch.device("cpu")  # Lightning moves it to the accelerator afterwards
        model.to_empty(device=device)
        model.reset_parameters(seed=self._init_seed())
        if self.hparams.get("init_from") is not None:
            if mesh is not None:
                self._load_init_from_sharded(model)
            else:
                try:  # the pretrained weights (kimi_linear.hf), strict
                    hf.load_weights_(model, self.hparams.init_from)
                except ValueError as e:
                    raise UsageError(f"model.init_from: {e}") from e
        if self._lora is not None:
            self._apply_lora(model, mesh)
        self.model = model
        self._moe = {name: m for name, m in model.named_modules() if hasattr(m, "update_bias")}
        self._mla = {name: m for name, m in model.named_modules() if hasattr(m, "reset_max_logits")}
        if self.hparams.log_max_logits:
            for m in self._mla.values():
                m.record_max_logits = True

    def _apply_lora(self, model: KimiLinearForCausalLM, mesh: Any) -> None:
        """Inject the LoRA adapters (after the base weights are loaded) and freeze the rest; the
        ``PeftModel`` handle is kept outside the module tree (its parameters are the model's)."""
        if mesh is not None:
            raise UsageError(
                "model.lora: LoRA is not supported with a sharded strategy (FSDP2) yet; train "
                "the adapters with a single device or DDP"
            )
        self.__dict__["peft_model"] = finetune.apply_lora(model, self._lora)
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(
            f"LoRA ({', '.join(self._lora.targets)}): {finetune.trainable_summary(model)}"
        )

    def save_adapter(self, path: str) -> None:
        """Write the LoRA adapters alone (peft's format) to the folder ``path``."""
        if self._lora is None:
            raise UsageError("save_adapter: this module has no model.lora")
        self.configure_model()
        finetune.save_adapter(self.__dict__["peft_model"], path)

    def _load_init_from_sharded(self, model: KimiLinearForCausalLM) -> None:
        """``init_from`` into a sharded model: rank 0 reads the full weights into a CPU copy
        (``hf.load_weights_``), then they are broadcast tensor by tensor and each rank keeps its
        shards (``set_model_state_dict(broadcast_from_rank0=True)``)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        strategy = self.trainer.strategy
        full: dict[str, torch.Tensor] = {}
        error = None
        if strategy.global_rank == 0:
            with torch.device("meta"):
                source = KimiLinearForCausalLM(self.config)
            source.to_empty(device="cpu")
            try:
                hf.load_weights_(source, self.hparams.init_from)
            except ValueError as e:
                error = f"model.init_from: {e}"
            full = source.state_dict()
        error = strategy.broadcast(error, src=0)  # every rank stops, or none does
        if error is not None:
            raise UsageError(error)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: Any = None,
        hparams_file: str | os.PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> KimiLinearLitModule:
        """The module saved in a Lightning checkpoint file, read without running code from it.

        Lightning's own loader unpickles the file and imports and calls the ``_instantiator``
        it names; here the file is read by
        :func:`~kimi_linear.lightning.callbacks.load_checkpoint` (scanned, then
        ``weights_only=True``) and the module is built from its recorded hyper-parameters
        (``kwargs`` override them, as in Lightning). ``weights_only=False`` says the file is
        trusted and hands the call to Lightning's loader unchanged.

        Raises:
            UsageError: the file was refused or is not a kimi-linear checkpoint, or
                ``hparams_file`` was given (a YAML beside the checkpoint is not read here).
        """
        if weights_only is False:
            return super().load_from_checkpoint(  # type: ignore[return-value]
                checkpoint_path,
                map_location=map_location,
                hparams_file=hparams_file,
                strict=strict,
                weights_only=False,
                **kwargs,
            )
        where = "load_from_checkpoint"
        if hparams_file is not None:
            raise UsageError(
                f"{where}: hparams_file is not read by the safe loader (the checkpoint records "
                "its hyper-parameters); pass overrides as keyword arguments, or weights_only=False "
                "for Lightning's loader on a trusted file"
            )
        ckpt = load_checkpoint(checkpoint_path, map_location or "cpu", what=where)
        hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
        if not isinstance(hp, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise UsageError(
                f"{where}: {os.fspath(checkpoint_path)!r} is not a kimi-linear Lightning "
                "checkpoint (no state_dict / hyper_parameters)"
            )
        accepted = inspect.signature(cls.__init__).parameters
        unknown = sorted(k for k in kwargs if k not in accepted)
        if unknown:
            raise UsageError(
                f"{where}: unknown keyword argument(s) {unknown}{did_you_mean(unknown[0], accepted)}"
            )
        init = {k: v for k, v in hp.items() if k in accepted and k != "self"}
        init.update(kwargs)
        module = cls(**init)
        module.configure_model()  # the model is built here, as Lightning's loader does
        module.on_load_checkpoint(ckpt)
        module.load_state_dict(ckpt["state_dict"], strict=True if strict is None else strict)
        tensors = (t for t in ckpt["state_dict"].values() if isinstance(t, torch.Tensor))
        first = next(tensors, None)  # where map_location put the weights, as Lightning's loader
        return module.to(first.device) if first is not None else module

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A run started with ``init_from`` saves the resolved config instead of the folder's
        path, so its checkpoints load (``generate``, ``export``, resume) without that folder."""
        hp = checkpoint.get("hyper_parameters")
        if isinstance(hp, dict) and hp.get("init_from") is not None:
            hp.update(init_from=None, preset=None, overrides=None, config=self.config.to_dict())

    # ------------------------------------------------------------------ forward / metrics
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, V]`` of ``input_ids: [B, T]``."""
        return self.model(input_ids)

    def _exact_match_enabled(self) -> bool:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        return bool(getattr(dm, "exact_match", False))

    def _step(self, batch: Mapping[str, torch.Tensor], stage: str) -> torch.Tensor:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise ValueError(
                "batch must be a dict with 'input_ids' [B, T] (and optionally 'labels' [B, T])"
            )
        if getattr(getattr(self._trainer, "strategy", None), "cp_size", 1) > 1:
            return context_parallel_step(self, batch, stage)  # this rank's shard of the rows
        input_ids = batch["input_ids"]
        labels = batch.get("labels", input_ids)
        cu_seqlens = batch.get("cu_seqlens")
        if cu_seqlens is None:
            loss, logits = self.model(input_ids, labels=labels)
        else:
            # Packed documents (TokenDataModule, pack="reset"): cu_seqlens are the document
            # offsets of the batch flattened to one [1, B * T] stream (every row start included).
            B, T = input_ids.shape
            loss, logits = self.model(
                input_ids.reshape(1, B * T), labels=labels.reshape(1, B * T), cu_seqlens=cu_seqlens
            )
            logits = logits.reshape(B, T, -1)
        preds = logits[:, :-1].detach().float()
        target = labels[:, 1:]
        answers = target != IGNORE_INDEX
        on_step, on_epoch = stage == "train", stage != "train"
        B = input_ids.shape[0]
        if not bool(answers.any()):
            # No scored label in the batch (every label -100): the model's loss is exactly 0
            # with zero gradients (documented); the metrics have nothing to count, so they skip
            # the batch (torchmetrics cannot update on zero tokens), and an evaluation mean
            # does not count it either.
            if stage == "train":
                self.log(f"{stage}/loss", loss, prog_bar=True, on_step=True, batch_size=B)
            return loss
        pred_ids = preds.argmax(-1)
        ppl, acc = self.metrics[f"{stage}_ppl"], self.metrics[f"{stage}_acc"]
        if stage == "train":
            ppl(preds, target)
            acc(pred_ids[answers], target[answers])
        else:
            ppl.update(preds, target)
            acc.update(pred_ids[answers], target[answers])
        self.log(
            f"{stage}/loss",
            loss,
            prog_bar=True,
            on_step=on_step,
            on_epoch=on_epoch,
            sync_dist=on_epoch,
            batch_size=B,
        )
        self.log(f"{stage}/ppl", ppl, on_step=on_step, on_epoch=on_epoch, batch_size=B)
        self.log(
            f"{stage}/acc",
            acc,
            prog_bar=stage != "train",
            on_step=on_step,
            on_epoch=on_epoch,
            batch_size=B,
        )
        if self._exact_match_enabled():
            has_answer = answers.any(dim=1)
            seq_ok = ((pred_ids == target) | ~answers).all(dim=1) & has_answer
            exact = self.metrics[f"{stage}_exact"]
            if not has_answer.any():
                return loss
            if stage == "train":
                exact(seq_ok[has_answer].float())
            else:
                exact.update(seq_ok[has_answer].float())
            self.log(
                f"{stage}/exact_match",
                exact,
                prog_bar=stage != "train",
                on_step=on_step,
                on_epoch=on_epoch,
                batch_size=B,
            )
        return loss

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def predict_step(
        self, batch: Mapping[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, torch.Tensor]:
        """Greedy next-token predictions: ``predictions[:, t]`` is the argmax after ``input_ids[:, :t+1]``."""
        logits = self.model(batch["input_ids"])
        return {"input_ids": batch["input_ids"], "predictions": logits.argmax(-1)}

    # ------------------------------------------------------------------ set-up checks
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len > self.config.max_position_embeddings:
            raise UsageError(
                f"data.seq_len={seq_len} exceeds the model's max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        vocab = getattr(dm, "vocab_size", None)
        if vocab is not None and vocab > self.config.vocab_size:
            raise UsageError(
                f"the data's vocabulary ({vocab}) is larger than the model's vocab_size={self.config.vocab_size}"
            )

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        kwargs: dict[str, Any] = dict(
            lr=hp.lr, weight_decay=hp.weight_decay, adamw_betas=tuple(hp.betas)
        )
        if hp.optimizer == "muonclip":
            kwargs.update(
                # LoRA: QK-Clip would rescale the frozen query / kv_b_proj weights, so it is
                # off; the max logits are still tracked for the logs
                qk_clip_tau=hp.qk_clip_tau if self._lora is None else None,
                track_max_logits=(hp.qk_clip_tau is not None and self._lora is None)
                or hp.log_max_logits,
            )
        optimizer = build_optimizer(self.model, hp.optimizer, **kwargs)
        fields = {
            "warmup_steps": hp.warmup_steps,
            "total_steps": None,
            "min_ratio": hp.min_lr_ratio,
        }
        total = hp.max_steps
        if total is None and self.trainer.max_epochs == -1:  # bounded by steps: no data needed
            total = self._schedule_length()
        # Otherwise the length is the trainer's estimate over max_epochs, which needs the train
        # loader: asking for it here would build the loader before Lightning restores the fit
        # loop from a checkpoint, and the loader's saved position would never be applied (a
        # resumed epoch would start again from its first sample).  It is resolved in
        # on_train_start, when the loader exists with its restored state.
        if total is not None:
            fields = WarmupCosine.resolved(fields, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(**fields))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def _schedule_length(self) -> int:
        """The cosine's length when ``model.max_steps`` is unset: the trainer's
        ``estimated_stepping_batches`` (needs the train loader unless ``max_epochs == -1``)."""
        est = self.trainer.estimated_stepping_batches
        if not math.isfinite(est) or est < 1:
            raise UsageError(
                "model.max_steps is needed for the learning-rate schedule when the trainer has "
                "neither max_steps nor max_epochs (or its data has no length)"
            )
        return int(est)

    def resolve_lr_schedule(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        """``fields`` of a :class:`WarmupCosine` (its ``__dict__``) with a pending length
        (``total_steps=None``: ``model.max_steps`` unset under ``max_epochs``) resolved to the
        trainer's estimate; other fields are returned unchanged.  Call it once the train loader
        is set up (``on_train_start``): :class:`~kimi_linear.lightning.callbacks.ResumeOverrides`
        resolves the fresh schedule it compares with the restored one through it."""
        if "total_steps" in fields and fields["total_steps"] is None:
            return WarmupCosine.resolved(fields, self._schedule_length())
        return dict(fields)

    def on_train_start(self) -> None:
        """Resolve a schedule whose length waited for the data (see ``configure_optimizers``)
        and set the learning rate of the current step from it.  A schedule restored from a
        checkpoint (or replaced by ``ResumeOverrides``) already has its length and is kept."""
        for cfg in self.trainer.lr_scheduler_configs:
            sch = cfg.scheduler
            lambdas = getattr(sch, "lr_lambdas", [])
            pending = [
                fn for fn in lambdas if isinstance(fn, WarmupCosine) and fn.total_steps is None
            ]
            for fn in pending:
                fn.__dict__.update(self.resolve_lr_schedule(fn.__dict__))
            if pending:
                step = sch.last_epoch
                for group, base, fn in zip(sch.optimizer.param_groups, sch.base_lrs, lambdas):
                    group["lr"] = base * fn(step)
                sch._last_lr = [g["lr"] for g in sch.optimizer.param_groups]

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """The optimizer step, then the MoE router-bias update and the max-logit bookkeeping."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        stats: dict[str, torch.Tensor] = {}
        for name, moe in self._moe.items():
            # LoRA keeps the router bias (part of the frozen base): rate 0 only counts the loads
            rate = 0.0 if self._lora is not None else self.hparams.moe_bias_update_rate
            load = moe.update_bias(rate=rate)
            if load.sum() > 0:
                stats[f"moe/balance/layer_{_layer_index(name)}"] = (
                    load.max() / load.mean()
                ).detach()
        inner = getattr(optimizer, "optimizer", optimizer)
        last = getattr(inner, "last_max_logits", None)
        if last is not None and getattr(inner, "track_max_logits", False):
            max_logits = dict(last)
        else:
            max_logits = {}
            for name, m in self._mla.items():
                if m.max_logits is not None:
                    max_logits[name] = m.max_logits.detach().clone()
                m.reset_max_logits()
            if (
                max_logits
                and torch.distributed.is_available()
                and torch.distributed.is_initialized()
            ):
                names = sorted(max_logits)
                flat = torch.stack([max_logits[n].max() for n in names])
                torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.MAX)
                max_logits = {n: v for n, v in zip(names, flat)}
        for name, v in max_logits.items():
            stats[f"mla/max_logit/layer_{_layer_index(name)}"] = v.max()
        self._step_stats = stats

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._step_stats:
            return
        balances = [v for k, v in self._step_stats.items() if k.startswith("moe/")]
        logits = [v for k, v in self._step_stats.items() if k.startswith("mla/")]
        stats = dict(self._step_stats)
        if balances:
            stats["moe/balance/mean"] = torch.stack(balances).mean()
        if logits:
            stats["mla/max_logit/max"] = torch.stack(logits).max()
        # The max logits are max-reduced over ranks (by MuonClip, or above) and the loads summed
        # in update_bias: every rank holds the same values, no further sync needed.
        self.log_dict({k: v.float() for k, v in stats.items()}, on_step=True, on_epoch=False)
        self._step_stats = {}


__all__ = ["KimiLinearLitModule", "OPTIMIZERS"]
