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
* :func:`iter_sharded_state_dict` / :func:`load_sharded_state_dict` /
  :func:`load_sharded_checkpoint` -- read a sharded (distributed-checkpoint) Lightning checkpoint
  folder back into full tensors in one process, tensor by tensor, without a process group.

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

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from kimi_linear.errors import UsageError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "FSDP2Strategy",
    "MESH_DIM_NAMES",
    "STRATEGY_NAME",
    "fsdp_mesh",
    "is_sharded_checkpoint",
    "iter_sharded_state_dict",
    "load_sharded_checkpoint",
    "load_sharded_state_dict",
    "shard_model",
]

#: Mesh dimension names of the HSDP mesh (replicate, shard).
MESH_DIM_NAMES = ("dp_replicate", "dp_shard")
#: Lightning's metadata file inside a sharded checkpoint folder.
_METADATA_FILENAME = "meta.pt"
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


# ------------------------------------------------------------------ sharded checkpoints
def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded Lightning checkpoint folder (``meta.pt`` + ``.metadata``)."""
    p = Path(path)
    return p.is_dir() and (p / _METADATA_FILENAME).is_file() and (p / ".metadata").is_file()


def _check_sharded(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not is_sharded_checkpoint(p):
        raise UsageError(
            f"{os.fspath(path)!r} is not a sharded checkpoint folder (needs {_METADATA_FILENAME} "
            "and .metadata, as written by FSDP2Strategy / ModelParallelStrategy)"
        )
    return p


def iter_sharded_state_dict(
    path: str | os.PathLike, prefix: str = "model."
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` of each weight of a sharded checkpoint, one tensor at a time.

    Reads ``state_dict.<prefix><name>`` entries of the distributed checkpoint in ``path`` (the
    LightningModule's ``model.`` prefix is stripped) without a process group: each tensor is
    assembled from all rank files and yielded before the next one is read, so peak memory is
    one tensor, whatever the number of ranks that wrote it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    p = _check_sharded(path)
    metadata = FileSystemReader(p).read_metadata()
    head = "state_dict." + prefix
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(head) or not isinstance(meta, TensorStorageMetadata):
            continue
        name = key[len(head) :]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load({"state_dict": {prefix + name: tensor}}, checkpoint_id=p, no_dist=True)
        yield name, tensor


def load_sharded_state_dict(
    path: str | os.PathLike, prefix: str = "model."
) -> dict[str, torch.Tensor]:
    """The full state dict of the model in a sharded checkpoint (see :func:`iter_sharded_state_dict`)."""
    return dict(iter_sharded_state_dict(path, prefix))


def load_sharded_checkpoint(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    offload_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """The :class:`~kimi_linear.model.KimiLinearForCausalLM` of a sharded checkpoint folder.

    The config comes from the hyper-parameters in ``meta.pt``; the model is built on the meta
    device and each consolidated tensor is assigned as it is read (one tensor at a time, never
    the model twice).

    Args:
        dtype: cast floating weights to it while reading (those named in
            :data:`~kimi_linear.model.FP32_PARAMETER_NAMES` stay float32); default: as saved.
        offload_dir: put every weight in a memory-mapped file under this folder (created if
            missing; the files are unlinked at once and vanish with the model) instead of in
            process memory, so consolidating a model larger than RAM only needs disk.  Used by
            ``kimi-linear export`` with its ``--output_dir``.
    """
    from kimi_linear.lightning.module import build_config
    from kimi_linear.model import FP32_PARAMETER_NAMES, KimiLinearForCausalLM

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    p = _check_sharded(path)
    meta = torch.load(p / _METADATA_FILENAME, map_location="cpu", weights_only=False)
    hp = meta.get("hyper_parameters") or {}
    try:
        config = build_config(
            hp.get("preset"), hp.get("overrides"), hp.get("config"), hp.get("vocab_size")
        )
    except UsageError as e:
        raise UsageError(f"{os.fspath(path)!r}: cannot rebuild the model config ({e})") from e
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    expected = set(model.state_dict())
    offload = None
    if offload_dir is not None:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        offload = Path(tempfile.mkdtemp(prefix=".kimi-linear-offload-", dir=offload_dir))
    state = {}
    try:
        for name, tensor in iter_sharded_state_dict(p):
            if name not in expected:
                raise UsageError(f"{os.fspath(path)!r}: unexpected weight {name!r} for this config")
            target = tensor.dtype
            if dtype is not None and tensor.is_floating_point():
                keep = name.rsplit(".", 1)[-1] in FP32_PARAMETER_NAMES
                target = torch.float32 if keep else dtype
            if offload is not None and tensor.numel() > 0:
                file = offload / f"{len(state)}.bin"
                mapped = torch.from_file(str(file), shared=True, size=tensor.numel(), dtype=target)
                file.unlink()  # the mapping keeps the data until the tensor is freed
                tensor = mapped.view(tensor.shape).copy_(tensor)
            elif target != tensor.dtype:
                tensor = tensor.to(target)
            state[name] = tensor
    finally:
        if offload is not None:
            shutil.rmtree(offload, ignore_errors=True)
    missing = sorted(
        n
        for n in expected - set(state)
        if not (config.tie_word_embeddings and n == "lm_head.weight")
    )
    if missing:
        raise UsageError(f"{os.fspath(path)!r}: weights missing from the checkpoint: {missing[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # non-persistent buffers (MoE load statistics) are not in checkpoints: zero them
    for mod in model.modules():
        for bname, buf in list(mod._buffers.items()):
            if buf is not None and buf.device.type == "meta":
                mod._buffers[bname] = torch.zeros(buf.shape, dtype=buf.dtype)
    return model
