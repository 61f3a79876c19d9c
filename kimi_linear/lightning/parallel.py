"""The sharding plan: FSDP2 (``fully_shard``) per decoder layer, through Lightning.

The model code knows nothing of parallelism (torchtitan style); this module holds the plan and
the Lightning glue:

* :class:`FSDP2Strategy` -- Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy`
  with every rank data-parallel (no tensor parallelism) and a configurable HSDP shape
  ``(replicate_size, world_size / replicate_size)``: parameters are sharded inside each group
  of ``world_size / replicate_size`` ranks and replicated across the groups.
  ``replicate_size=1`` (default) is plain FSDP over the whole world.
* :func:`fsdp_mesh` -- the device mesh a module should be sharded over under the trainer's
  strategy (``None`` when the strategy does not shard with FSDP2).
* :func:`shard_model` -- ``fully_shard`` on each ``KimiDecoderLayer``, then on the root (which
  holds the embedding, final norm and LM head, tied or not).
* Atomic sharded saves: :class:`FSDP2Strategy` writes a new folder ``<name>.tmp`` next to the
  target and swaps it in by renames, keeping the previous folder until the new one is complete
  (:func:`~kimi_linear.lightning.checkpoints.save_folder_atomically`); its resume finishes or
  rolls back a swap a kill interrupted and verifies a sharded folder without running code from
  it first.  Reading sharded folders back (consolidation, verification) is
  :mod:`kimi_linear.lightning.checkpoints`' job.

How the pieces run (:meth:`KimiLinearLitModule.configure_model`): under an FSDP2 strategy the model
is built on the meta device, sharded, materialized per shard with ``to_empty`` and initialised
with ``reset_parameters(seed=...)``, whose per-parameter seeded streams give the same full
weights for any number of ranks (:mod:`kimi_linear.sharding`).  Sharded checkpoints are
Lightning's: ``ModelParallelStrategy`` saves a folder (``torch.distributed.checkpoint``, one file
per rank plus ``meta.pt``) and resumes from it exactly (weights, optimizer state, step).

Example (2 processes on CPU with gloo; GPUs: ``configs/small-fsdp.yaml``)::

    kimi-linear fit --config configs/tiny.yaml --trainer.devices 2 --trainer.strategy fsdp2
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from kimi_linear.errors import UsageError
from kimi_linear.lightning.callbacks import SAFE_GLOBALS, atomic_torch_save
from kimi_linear.lightning.checkpoints import (
    METADATA_FILENAME,
    recover_checkpoint_swap,
    save_folder_atomically,
    verify_sharded_checkpoint,
)

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["FSDP2Strategy", "MESH_DIM_NAMES", "STRATEGY_NAME", "fsdp_mesh", "shard_model"]

#: Mesh dimension names of the HSDP mesh (replicate, shard).
MESH_DIM_NAMES = ("dp_replicate", "dp_shard")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 / HSDP through Lightning's ``ModelParallelStrategy``.

    Every rank is data-parallel (the ``tensor_parallel`` dimension of Lightning's mesh has size
    1, so the distributed sampler gives each rank its own batches); parameters are sharded with
    ``fully_shard`` per decoder layer over a mesh of shape ``(replicate_size, world_size /
    replicate_size)``.

    Args:
        replicate_size: number of replicas (HSDP); ``1`` shards over all ranks (FSDP).  Must
            divide the world size.  A typical multi-node choice is the number of nodes (shard
            inside a node, replicate across nodes).
        reshard_after_forward: free the gathered parameters after each layer's forward (FSDP's
            ZeRO-3); ``False`` keeps them until the backward (ZeRO-2-like, more memory, fewer
            all-gathers).
        param_dtype: FSDP2 mixed precision: the dtype parameters are all-gathered and computed
            in (``"bfloat16"``; ``None`` keeps their dtype).  With it, use
            ``trainer.precision: 32-true`` (the policy replaces autocast).
        reduce_dtype: dtype of the gradient reduce-scatter (``"float32"`` recommended with
            ``param_dtype: bfloat16``; ``None``: the parameter dtype).
        save_distributed_checkpoint: save sharded checkpoint folders (one file per rank; the
            default) instead of a full checkpoint gathered on rank 0.
        process_group_backend: ``"nccl"`` / ``"gloo"``; default: by device.
        timeout: collective timeout.
    """

    def __init__(
        self,
        replicate_size: int = 1,
        reshard_after_forward: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = None,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        _check_int("strategy.replicate_size", replicate_size)
        if not isinstance(reshard_after_forward, bool):
            raise UsageError(
                f"strategy.reshard_after_forward must be a bool, got {reshard_after_forward!r}"
            )
        for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in _DTYPES:
                raise UsageError(
                    f"strategy.{name} must be None or one of {sorted(_DTYPES)}, got {value!r}"
                )
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.replicate_size = replicate_size
        self.reshard_after_forward = reshard_after_forward
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self._fsdp_mesh: DeviceMesh | None = None

    def setup_environment(self) -> None:
        world = self.num_nodes * self.num_processes
        if world % self.replicate_size:
            raise UsageError(
                f"strategy.replicate_size={self.replicate_size} must divide the world size "
                f"({world} = {self.num_nodes} node(s) x {self.num_processes} device(s))"
            )
        # all ranks data-parallel; no tensor parallelism
        self._data_parallel_size = world
        self._tensor_parallel_size = 1
        super().setup_environment()
        if self.replicate_size == 1:
            self._fsdp_mesh = self.device_mesh["data_parallel"]
        else:
            from torch.distributed.device_mesh import init_device_mesh

            self._fsdp_mesh = init_device_mesh(
                self.root_device.type,
                (self.replicate_size, world // self.replicate_size),
                mesh_dim_names=MESH_DIM_NAMES,
            )

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """The 1-D (FSDP) or 2-D ``(dp_replicate, dp_shard)`` (HSDP) mesh parameters shard over."""
        if self._fsdp_mesh is None:
            raise RuntimeError("the FSDP2 mesh exists once the processes are set up")
        return self._fsdp_mesh

    def mixed_precision_policy(self) -> Any:
        """The ``fully_shard`` mixed-precision policy of ``param_dtype`` / ``reduce_dtype``."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(
            param_dtype=_DTYPES[self.param_dtype] if self.param_dtype else None,
            reduce_dtype=_DTYPES[self.reduce_dtype] if self.reduce_dtype else None,
        )

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        """Save like ``ModelParallelStrategy``, but a sharded folder atomically: the shards and
        ``meta.pt`` go to ``<name>.tmp``, which replaces ``<name>`` only once complete (see
        :func:`save_folder_atomically`); a kill at any moment leaves the previous checkpoint
        or the new one, never a mix, and the next load or save recovers the names."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported"
            )
        from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save

        path = Path(self.broadcast(filepath))
        state = {"state_dict": checkpoint.pop("state_dict")}
        for i, optim_state in enumerate(checkpoint.pop("optimizer_states", [])):
            state[f"optimizer_{i}"] = optim_state

        def write(folder: Path) -> None:
            _distributed_checkpoint_save(state, folder)
            if self.global_rank == 0:
                atomic_torch_save(checkpoint, folder / METADATA_FILENAME)

        save_folder_atomically(
            path, write, is_rank_zero=self.global_rank == 0, barrier=self.barrier
        )

    def load_checkpoint(
        self, checkpoint_path: Any, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Resume like ``ModelParallelStrategy``, after finishing an interrupted save's swap
        (rank 0) and checking a sharded folder without running code from it
        (:func:`verify_sharded_checkpoint`)."""
        path = Path(self.broadcast(checkpoint_path))
        if self.global_rank == 0:
            recover_checkpoint_swap(path)
        self.barrier("kimi_linear_recover_checkpoint")
        if path.is_dir():
            verify_sharded_checkpoint(path)
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return super().load_checkpoint(
                path, weights_only=True if weights_only is None else weights_only
            )


#: Name of :class:`FSDP2Strategy` in Lightning's strategy registry (``--trainer.strategy fsdp2``).
STRATEGY_NAME = "fsdp2"
if STRATEGY_NAME not in StrategyRegistry:
    StrategyRegistry.register(
        STRATEGY_NAME,
        FSDP2Strategy,
        description="kimi-linear: FSDP2 per decoder layer through ModelParallelStrategy",
    )


def fsdp_mesh(module: Any) -> DeviceMesh | None:
    """The mesh to shard ``module`` (a LightningModule) over, or ``None`` (no FSDP2 strategy).

    :class:`FSDP2Strategy` gives its (HSDP) mesh.  Plain ``ModelParallelStrategy`` gives its
    ``data_parallel`` mesh, and needs ``tensor_parallel_size=1`` (the kit has no tensor
    parallelism: ranks along that dimension would see the same batches).
    """
    trainer = getattr(module, "_trainer", None)
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    if isinstance(strategy, FSDP2Strategy):
        return strategy.fsdp_mesh
    if isinstance(strategy, ModelParallelStrategy):
        mesh = strategy.device_mesh
        if mesh["tensor_parallel"].size() != 1:
            raise UsageError(
                "ModelParallelStrategy: kimi-linear shards with FSDP2 only (no tensor parallelism); "
                f"set tensor_parallel_size=1 and data_parallel_size=<world size> (got mesh {mesh}), "
                "or use kimi_linear.lightning.parallel.FSDP2Strategy"
            )
        return mesh["data_parallel"]
    return None


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
) -> nn.Module:
    """``fully_shard`` each decoder layer of ``model`` (a ``KimiLinearForCausalLM``), then the root.

    Every parameter becomes a DTensor sharded on dim 0 over ``mesh`` (1-D: FSDP; 2-D
    ``(replicate, shard)``: HSDP); stacked experts ``[E, out, in]`` are thus split by expert.
    The root group holds the embedding, final norm and LM head (tied weights stay together).
    Works on meta-device modules (shard first, then ``to_empty`` + init).  Returns ``model``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"shard_model needs a KimiLinearForCausalLM (model.model.layers), got {type(model).__name__}"
        )
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    # the root's parameters are used last in the forward (LM head): keep them for the backward
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model
