"""Context parallelism in Lightning: a ``(dp, cp)`` device mesh on top of FSDP2.

:class:`ContextParallelStrategy` is :class:`~kimi_linear.lightning.parallel.FSDP2Strategy`
with a CP degree ``cp_size``: the world of ``dp * cp`` ranks is a mesh ``(dp, cp)``; parameters
are sharded with ``fully_shard`` over all ``dp * cp`` ranks (as torchtitan's ``dp_shard_cp``);
the data loader gives every rank of a CP group the same rows (``distributed_sampler_kwargs``:
``dp`` replicas) and :func:`context_parallel_step` cuts each row (or packed row) into the
rank's shard (:func:`kimi_linear.context_parallel.shard_batch`) and runs the model with the CP
layout (:func:`kimi_linear.context_parallel.context_parallel_loss`).  The gradients are summed
over ``cp`` and averaged over ``dp`` (FSDP2's mean over all ``dp * cp`` ranks of gradients
scaled by ``cp``, done by scaling this rank's loss gradient by ``cp``), so training equals training on one device with the dp ranks' batches.
QK-Clip's max logits and the MoE loads are reduced over the world, which contains the CP group.
Checkpoints are FSDP2's sharded folders: they resume exactly and load into another world size
or CP degree (``torch.distributed.checkpoint`` reshards).

YAML (``configs/long-context-cpu.yaml``, ``configs/long-context-32k.yaml``)::

    trainer:
      strategy:
        class_path: kimi_linear.lightning.context_parallel.ContextParallelStrategy
        init_args:
          cp_size: 4

Not supported yet (a named error): HSDP (``replicate_size > 1``) with CP, ``model.compile``
with CP.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import StrategyRegistry

from kimi_linear.context_parallel import context_parallel_loss, shard_batch
from kimi_linear.errors import UsageError
from kimi_linear.lightning.parallel import FSDP2Strategy

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["CP_MESH_DIM_NAMES", "ContextParallelStrategy", "context_parallel_step"]

#: Mesh dimension names of the context-parallel mesh.
CP_MESH_DIM_NAMES = ("dp", "cp")


class ContextParallelStrategy(FSDP2Strategy):
    """FSDP2 over ``dp * cp`` ranks with context parallelism of degree ``cp_size``.

    Args:
        cp_size: the CP degree: consecutive ranks ``[i * cp_size, (i + 1) * cp_size)`` share
            the rows of a batch, each holding a contiguous ``1 / cp_size`` of every row. Must
            divide the world size; ``1`` is plain FSDP2.
        **kwargs: :class:`~kimi_linear.lightning.parallel.FSDP2Strategy`'s arguments
            (``replicate_size`` must stay 1 with ``cp_size > 1``).
    """

    def __init__(self, cp_size: int = 1, **kwargs: Any) -> None:
        if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
            raise UsageError(f"strategy.cp_size must be an int >= 1, got {cp_size!r}")
        if cp_size > 1 and kwargs.get("replicate_size", 1) != 1:
            raise UsageError(
                "strategy.cp_size > 1 with strategy.replicate_size > 1 (HSDP) is not supported "
                "yet; shard over all ranks (replicate_size: 1)"
            )
        super().__init__(**kwargs)
        self.cp_size = cp_size
        self._cp_mesh: DeviceMesh | None = None

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        if world % self.cp_size:
            raise UsageError(
                f"strategy.cp_size={self.cp_size} must divide the world size ({world} = "
                f"{self.num_nodes} node(s) x {self.num_processes} device(s))"
            )
        super().setup_environment()
        from torch.distributed.device_mesh import init_device_mesh

        self._cp_mesh = init_device_mesh(
            self.root_device.type,
            (world // self.cp_size, self.cp_size),
            mesh_dim_names=CP_MESH_DIM_NAMES,
        )

    @property
    def cp_mesh(self) -> DeviceMesh:
        """The ``(dp, cp)`` mesh."""
        if self._cp_mesh is None:
            raise RuntimeError("the (dp, cp) mesh exists once the processes are set up")
        return self._cp_mesh

    @property
    def cp_group(self) -> Any:
        """The process group of this rank's CP group."""
        return self.cp_mesh["cp"].get_group()

    @property
    def distributed_sampler_kwargs(self) -> dict[str, int]:
        """The ranks of one CP group read the same rows: ``dp`` replicas."""
        if self._cp_mesh is None:
            return super().distributed_sampler_kwargs
        return {
            "num_replicas": self.cp_mesh["dp"].size(),
            "rank": self.cp_mesh["dp"].get_local_rank(),
        }

    def setup(self, trainer: pl.Trainer) -> None:
        module = self.lightning_module
        hp = getattr(module, "hparams", {})
        if self.cp_size > 1 and hp.get("compile", False):
            raise UsageError(
                "model.compile with strategy.cp_size > 1 is not supported yet (the CP "
                "collectives run inside the layers); set model.compile: false"
            )
        super().setup(trainer)


def context_parallel_step(
    module: Any, batch: Mapping[str, torch.Tensor], stage: str
) -> torch.Tensor:
    """``KimiLinearLitModule._step`` under CP: the rank's shard of the batch's rows, the loss
    summed over the CP group (its value the global mean; its gradient this rank's share) and
    the perplexity / accuracy metrics on this rank's tokens."""
    strategy = module.trainer.strategy
    input_ids = batch["input_ids"]
    labels = batch.get("labels", input_ids)
    cu_seqlens = batch.get("cu_seqlens")
    B, T = input_ids.shape
    if cu_seqlens is not None:  # packed: the batch is one [1, B * T] stream of documents
        input_ids, labels = input_ids.reshape(1, B * T), labels.reshape(1, B * T)
    shard = shard_batch(input_ids, labels, cu_seqlens, group=strategy.cp_group)
    loss, logits = context_parallel_loss(module.model, shard)
    # FSDP2 averages gradients over all dp * cp ranks; the shards of a row must be summed: the
    # gradient is scaled by cp (FSDP2's set_gradient_divide_factor needs PREMUL_SUM, which gloo
    # lacks), the value stays the global mean loss
    cp = strategy.cp_size
    loss = loss * cp + (loss - loss * cp).detach()
    target = shard.targets
    answers = target != -100
    on_step, on_epoch = stage == "train", stage != "train"
    module.log(
        f"{stage}/loss",
        loss,
        prog_bar=True,
        on_step=on_step,
        on_epoch=on_epoch,
        sync_dist=on_epoch,
        batch_size=B,
    )
    if bool(answers.any()):
        preds = logits.detach().float()
        ppl, acc = module.metrics[f"{stage}_ppl"], module.metrics[f"{stage}_acc"]
        ppl.update(preds, target)
        acc.update(preds.argmax(-1)[answers], target[answers])
        module.log(f"{stage}/ppl", ppl, on_step=on_step, on_epoch=on_epoch, batch_size=B)
        module.log(f"{stage}/acc", acc, on_step=on_step, on_epoch=on_epoch, batch_size=B)
    return loss


#: Name in Lightning's strategy registry (``--trainer.strategy fsdp2_cp2``: CP degree 2).
for _cp in (2, 4, 8):
    _name = f"fsdp2_cp{_cp}"
    if _name not in StrategyRegistry:
        StrategyRegistry.register(
            _name,
            ContextParallelStrategy,
            description=f"kimi-linear: FSDP2 over (dp, cp) ranks with context parallel {_cp}",
            cp_size=_cp,
        )
