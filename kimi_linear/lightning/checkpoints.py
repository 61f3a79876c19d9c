"""Checkpoint files and folders: checked, read back without running code, saved atomically.

Files are read through :func:`~kimi_linear.lightning.callbacks.load_checkpoint` (scanned, then
``weights_only=True``); :class:`~kimi_linear.lightning.parallel.FSDP2Strategy` saves and
resumes through the functions here:

* :func:`check_checkpoint_file` -- an empty or truncated ``.ckpt`` named in one line, with the
  other complete checkpoints of its folder (:func:`other_checkpoints`);
* :func:`verify_sharded_checkpoint` -- check a sharded (distributed-checkpoint) folder without
  running code from it (its ``.metadata`` pickle through an allow-list unpickler, its non-tensor
  entries and ``meta.pt`` with ``weights_only=True``); every load below and
  :class:`~kimi_linear.lightning.parallel.FSDP2Strategy`'s resume go through it;
* :func:`save_folder_atomically` / :func:`recover_checkpoint_swap` -- write a folder as
  ``<name>.tmp`` and swap it in by renames, keeping the previous one until the new one is
  complete; finish or roll back a swap a kill interrupted (:func:`recover_interrupted_save`
  also says so on stderr);
* :func:`iter_sharded_state_dict` / :func:`load_sharded_state_dict` /
  :func:`load_sharded_checkpoint` -- a sharded folder consolidated into full tensors in one
  process, tensor by tensor, without a process group.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimi_linear.errors import PROG, UsageError
from kimi_linear.layers.fp32 import fp32_tensor_names
from kimi_linear.lightning.callbacks import SAFE_GLOBALS, load_checkpoint
from kimi_linear.lightning.hparams import assign_weights, config_from_hparams, meta_model

__all__ = [
    "METADATA_FILENAME",
    "OLD_SUFFIX",
    "TMP_SUFFIX",
    "check_checkpoint_file",
    "checkpoint_problem",
    "is_sharded_checkpoint",
    "iter_sharded_state_dict",
    "load_sharded_checkpoint",
    "load_sharded_state_dict",
    "other_checkpoints",
    "read_checkpoint_metadata",
    "recover_checkpoint_swap",
    "recover_interrupted_save",
    "save_folder_atomically",
    "verify_sharded_checkpoint",
]

#: Lightning's metadata file inside a sharded checkpoint folder.
METADATA_FILENAME = "meta.pt"


# ---------------------------------------------------------------------- checkpoint files
def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` file (``None`` when it looks complete).

    A ``torch.save`` file is a zip archive whose directory sits at its end, so an empty or
    truncated file (a write killed half-way, a full disk) is caught without loading it.
    """
    p = Path(path)
    if p.is_dir():
        return None  # sharded (distributed) checkpoints are folders; Lightning checks them
    size = p.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(p):
        return (
            f"is truncated or not a checkpoint ({size:,} bytes, not a complete torch.save archive)"
        )
    return None


def other_checkpoints(path: str | os.PathLike) -> str:
    """``"; other checkpoints in DIR: a.ckpt, b.ckpt"`` (complete ones, newest first) or a note."""
    p = Path(path)
    folder = p.parent
    others = [
        q
        for q in sorted(folder.glob("*.ckpt"), key=lambda q: q.stat().st_mtime, reverse=True)
        if q.resolve() != p.resolve() and checkpoint_problem(q) is None
    ]
    if not others:
        return f"; no other complete checkpoint in {os.fspath(folder)!r}"
    return f"; other checkpoints in {os.fspath(folder)!r}: " + ", ".join(q.name for q in others)


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise a one-line :class:`UsageError` naming ``path`` and listing the other checkpoints of
    its folder when it is empty or truncated."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise UsageError(f"--ckpt_path: {os.fspath(path)!r} {problem}{other_checkpoints(path)}")


# ------------------------------------------------------------------ sharded checkpoints
def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a sharded Lightning checkpoint folder (``meta.pt`` + ``.metadata``)."""
    p = Path(path)
    return p.is_dir() and (p / METADATA_FILENAME).is_file() and (p / ".metadata").is_file()


def _check_sharded(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not is_sharded_checkpoint(p):
        raise UsageError(
            f"{os.fspath(path)!r} is not a sharded checkpoint folder (needs {METADATA_FILENAME} "
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
    load_checkpoint(p / METADATA_FILENAME)
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
        dtype: cast floating weights to it while reading (the layers' fp32 tensors,
            :func:`~kimi_linear.layers.fp32.fp32_tensor_names`, stay float32); default: as saved.
        offload_dir: put every weight in a memory-mapped file under this folder (created if
            missing; the files are unlinked at once and vanish with the model) instead of in
            process memory, so consolidating a model larger than RAM only needs disk.  Used by
            ``kimi-linear export`` with its ``--output_dir``.
    """
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype, got {dtype!r}")
    p = _check_sharded(path)
    verify_sharded_checkpoint(p)
    meta = load_checkpoint(p / METADATA_FILENAME)
    hp = meta.get("hyper_parameters") or {}
    model = meta_model(config_from_hparams(hp, p))
    expected = set(model.state_dict())
    fp32 = fp32_tensor_names(model)
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
                target = torch.float32 if name in fp32 else dtype
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
    return assign_weights(model, state, p)


def recover_interrupted_save(path: str | os.PathLike) -> None:
    """Finish or roll back a sharded save of ``path`` that a kill interrupted (``<path>.tmp`` /
    ``<path>.old`` left next to it; see :func:`recover_checkpoint_swap`)."""
    done = recover_checkpoint_swap(path)
    if done is not None:
        print(
            f"{PROG}: {os.fspath(path)!r}: an interrupted save was recovered: {done}",
            file=sys.stderr,
        )
