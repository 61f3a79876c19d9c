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
* :func:`verify_sharded_checkpoint` -- check a sharded folder without running code from it
  (its ``.metadata`` pickle through an allow-list unpickler, its non-tensor entries and
  ``meta.pt`` with ``weights_only=True``); every load above and :class:`FSDP2Strategy`'s resume
  go through it.
* Atomic sharded saves: :class:`FSDP2Strategy` writes a new folder ``<name>.tmp`` next to the
  target and swaps it in by renames, keeping the previous folder until the new one is complete;
  :func:`recover_checkpoint_swap` finishes or rolls back a swap a kill interrupted.

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

import io
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
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
    "model_from_weights",
    "read_checkpoint_metadata",
    "recover_checkpoint_swap",
    "save_folder_atomically",
    "shard_model",
    "verify_sharded_checkpoint",
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
                from kimi_linear.lightning.callbacks import atomic_torch_save

                atomic_torch_save(checkpoint, folder / _METADATA_FILENAME)

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
        from kimi_linear.lightning.callbacks import SAFE_GLOBALS

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


#: Module -> names the ``.metadata`` pickle of a distributed checkpoint may reference (what
#: ``torch.distributed.checkpoint`` writes); anything else is refused unread.
_DCP_METADATA_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed.checkpoint.planner": frozenset({"LoadItemType", "WriteItemType"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),  # and dtypes / layouts / memory formats, checked by value
    "pathlib": frozenset({"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "slice"}),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_DCP_METADATA_GLOBALS` (no code of the file runs)."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"it references {module}.{name}, which is not allowed")


def read_checkpoint_metadata(path: str | os.PathLike) -> Any:
    """The ``torch.distributed.checkpoint`` ``Metadata`` of the sharded folder ``path``, read
    with an allow-list unpickler (``torch`` itself reads it with ``pickle.load``, running whatever a
    crafted file names).  Raises :class:`UsageError` naming the file."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError, TypeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"--ckpt_path: {os.fspath(file)!r} was refused or unreadable ({why})"
        ) from None
    if not isinstance(metadata, Metadata):
        raise UsageError(
            f"--ckpt_path: {os.fspath(file)!r} is not distributed-checkpoint metadata "
            f"(holds a {type(metadata).__name__})"
        )
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _safe_reader(path: Path) -> Any:
    """A ``FileSystemReader`` of ``path`` reading its metadata with
    :func:`read_checkpoint_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader

    class _SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_checkpoint_metadata(self.path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeFileSystemReader(path)


def verify_sharded_checkpoint(path: str | os.PathLike) -> Any:
    """Check the sharded checkpoint folder ``path`` without running code from it; returns its
    ``Metadata``.

    ``torch.distributed.checkpoint`` unpickles the folder's ``.metadata`` and its non-tensor
    entries (optimizer step counts, hyper-parameters) with plain ``pickle`` /
    ``torch.load(weights_only=False)``, and Lightning reads ``meta.pt`` with ``torch.load``:
    here ``.metadata`` goes through an allow-list unpickler, every non-tensor entry and
    ``meta.pt`` through ``torch.load(weights_only=True)``, and every storage file must lie inside
    the folder.  Raises :class:`UsageError` (one line naming the file) on the first problem.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from kimi_linear.lightning.callbacks import SAFE_GLOBALS, load_checkpoint

    p = _check_sharded(path)
    metadata = read_checkpoint_metadata(p)
    root = p.resolve()
    for index, info in (metadata.storage_data or {}).items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not (root / rel).resolve().is_relative_to(root):
            raise UsageError(
                f"--ckpt_path: {os.fspath(p / '.metadata')!r} names a storage file outside its "
                f"folder ({rel!r}); refused"
            )
        meta = metadata.state_dict_metadata.get(index.fqn)
        if not isinstance(meta, BytesStorageMetadata):
            continue
        if getattr(info, "transform_descriptors", None):
            raise UsageError(
                f"--ckpt_path: {os.fspath(p)!r}: entry {index.fqn!r} is stored transformed "
                f"({info.transform_descriptors}), which this kit does not read"
            )
        file = p / rel
        try:
            with open(file, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
                torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here is a refused file
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(
                f"--ckpt_path: {os.fspath(file)!r}: entry {index.fqn!r} was refused ({why[:200]})"
            ) from None
    load_checkpoint(p / _METADATA_FILENAME)
    return metadata


# ----------------------------------------------------------- atomic sharded saves / recovery
#: Suffixes of the folders of a save in progress: the new checkpoint being written, and the
#: previous one while the new one is renamed into place.
TMP_SUFFIX, OLD_SUFFIX = ".tmp", ".old"


def _checkpoint_phase(phase: str, path: Path) -> None:
    """Called after each step of :func:`save_folder_atomically` (``"tmp_ready"``,
    ``"written"``, ``"old_moved"``, ``"new_moved"``, ``"old_removed"``): does nothing; tests
    replace it to simulate a kill at that point."""


def _complete(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint: a file, or a sharded folder holding both
    ``.metadata`` (written by the coordinator after every rank's shards) and ``meta.pt``
    (written atomically after that)."""
    if path.is_file():
        return path.stat().st_size > 0
    return is_sharded_checkpoint(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _rename(src: Path, dst: Path) -> bool:
    try:
        os.replace(src, dst)
        return True
    except FileNotFoundError:
        return False  # another process got there first
    except OSError:
        return False  # dst is a non-empty folder: another process already restored it


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recover_checkpoint_swap(path: str | os.PathLike) -> str | None:
    """Finish or roll back an atomic save of ``path`` that a kill interrupted; returns what was
    done (``None``: nothing to do).

    Deterministic rules, from the leftovers ``<path>.tmp`` (the new checkpoint) and
    ``<path>.old`` (the previous one, moved aside during the swap):

    * ``path`` complete: it wins; ``.tmp`` (a save that had not swapped yet) and ``.old`` (a
      swap that finished) are removed;
    * else ``.tmp`` complete (killed between the two renames, or before the first one of a
      first save): ``.tmp`` becomes ``path``; ``.old`` is removed;
    * else ``.old`` complete: it becomes ``path`` again; ``.tmp`` is removed;
    * else nothing complete is left: the leftovers stay for inspection.

    Safe to call from several processes at once (renames that lose the race are skipped).
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + TMP_SUFFIX), path.with_name(path.name + OLD_SUFFIX)
    if not tmp.exists() and not old.exists():
        return None
    done = None
    if _complete(path):
        done = f"kept {path.name}"
    elif _complete(tmp):
        _remove(path)
        if _rename(tmp, path):
            done = f"moved {tmp.name} to {path.name} (the save had finished writing)"
    elif _complete(old):
        _remove(path)
        if _rename(old, path):
            done = f"restored {old.name} to {path.name} (the save had not finished)"
    else:
        return None
    for leftover in (tmp, old):
        if leftover.exists():
            _remove(leftover)
    _fsync_dir(path.parent)
    return done


def save_folder_atomically(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    is_rank_zero: bool = True,
    barrier: Callable[..., None] | None = None,
) -> None:
    """Write a checkpoint folder ``path`` so that a kill never destroys the previous one.

    Every rank calls it.  Rank 0 first recovers leftovers of an interrupted save
    (:func:`recover_checkpoint_swap`) and makes an empty ``<path>.tmp``; every rank then calls
    ``write(<path>.tmp)`` (shards, and ``meta.pt`` on rank 0, last); once all have returned,
    rank 0 renames ``path`` to ``<path>.old``, ``<path>.tmp`` to ``path``, syncs the parent
    folder and removes ``<path>.old``.  At every moment a complete checkpoint exists under
    ``path``, ``<path>.tmp`` or ``<path>.old``, and :func:`recover_checkpoint_swap` picks it.
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + TMP_SUFFIX), path.with_name(path.name + OLD_SUFFIX)
    sync = barrier or (lambda *a: None)
    if is_rank_zero:
        recover_checkpoint_swap(path)
        _remove(tmp)
        tmp.mkdir(parents=True)
        _checkpoint_phase("tmp_ready", path)
    sync("kimi_linear_checkpoint_tmp_ready")
    write(tmp)
    sync("kimi_linear_checkpoint_written")
    if is_rank_zero:
        _fsync_dir(tmp)
        _checkpoint_phase("written", path)
        if path.exists() or path.is_symlink():
            _remove(old)
            os.replace(path, old)
            _checkpoint_phase("old_moved", path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _checkpoint_phase("new_moved", path)
        _remove(old)
        _checkpoint_phase("old_removed", path)
    sync("kimi_linear_checkpoint_swapped")


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
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    p = _check_sharded(path)
    metadata = verify_sharded_checkpoint(p)
    head = "state_dict." + prefix
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith(head) or not isinstance(meta, TensorStorageMetadata):
            continue
        name = key[len(head) :]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(
                {"state_dict": {prefix + name: tensor}},
                storage_reader=_safe_reader(p),
                no_dist=True,
            )
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
    from kimi_linear.model import FP32_PARAMETER_NAMES

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    from kimi_linear.lightning.callbacks import load_checkpoint

    p = _check_sharded(path)
    verify_sharded_checkpoint(p)
    meta = load_checkpoint(p / _METADATA_FILENAME)
    hp = meta.get("hyper_parameters") or {}
    config = _config_from_hparams(hp, p)
    model = _meta_model(config)
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
    return _assign_weights(model, state, p)


def _config_from_hparams(hp: dict[str, Any], path: Path) -> Any:
    """The model config a checkpoint's hyper-parameters describe (a preset with overrides, a
    full config, or an ``init_from`` folder's config.json); data only, no code."""
    from kimi_linear.lightning.module import _init_from_config, build_config

    try:
        if hp.get("init_from") is not None and hp.get("config") is None:
            return _init_from_config(
                hp["init_from"], hp.get("preset"), None, hp.get("overrides"), hp.get("vocab_size")
            )
        return build_config(
            hp.get("preset"), hp.get("overrides"), hp.get("config"), hp.get("vocab_size")
        )
    except (UsageError, TypeError, AttributeError) as e:
        raise UsageError(f"{os.fspath(path)!r}: cannot rebuild the model config ({e})") from e


def _meta_model(config: Any) -> nn.Module:
    from kimi_linear.model import KimiLinearForCausalLM

    with torch.device("meta"):
        return KimiLinearForCausalLM(config)


def _assign_weights(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Assign ``state`` (full tensors) to the meta-built ``model``; every weight must be there."""
    config = model.config
    missing = sorted(
        n
        for n in set(model.state_dict()) - set(state)
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


def model_from_weights(
    hparams: dict[str, Any], weights: dict[str, torch.Tensor], path: str | os.PathLike
) -> nn.Module:
    """The :class:`~kimi_linear.model.KimiLinearForCausalLM` of a checkpoint's
    ``hyper_parameters`` and full ``weights`` (names without the ``model.`` prefix), built on
    the meta device and assigned (no copy).  Unlike Lightning's ``load_from_checkpoint``, nothing
    named in the file is imported or called.  Raises :class:`UsageError` naming ``path``."""
    p = Path(path)
    model = _meta_model(_config_from_hparams(hparams, p))
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if unexpected:
        raise UsageError(f"{os.fspath(p)!r}: unexpected weights for this config: {unexpected[:5]}")
    return _assign_weights(model, dict(weights), p)
