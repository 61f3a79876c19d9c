"""Checkpoint files: save a model's weights as safetensors, load a checkpoint folder's into one.

Saving (:func:`save_pretrained`) writes ``config.json``, ``generation_config.json`` and the
weights under the release names, in one file or in ``huggingface_hub``'s shards with an index.
Loading is memory-lean and strict: :func:`plan_load` routes every stored tensor to a model built
on the meta device (headers only), the caller allocates the model once in the target dtype and
device, and :func:`fill_weights_` copies the shards in one tensor at a time, so peak host memory
stays near the model plus a few shards' pages (``benchmarks/load_memory.py``: 1.23x a 928 MiB
bf16 checkpoint, against 3.04x for reading it whole into an fp32 model).  Corrupt or truncated
``config.json``, index or safetensors files, weight files outside the folder, integer or
quantized tensors and missing or unplaced tensors raise a one-line ``ValueError`` naming the file.

This module never builds a model: it takes one (``KimiLinearForCausalLM.from_pretrained`` builds
it, casts it and calls :func:`plan_load` / :func:`fill_weights_`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimi_linear.config import KimiLinearConfig
from kimi_linear.errors import did_you_mean
from kimi_linear.hf.config_json import (
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    _read_json,
    config_from_hf,
    config_to_hf,
    generation_config,
)
from kimi_linear.hf.weight_names import Part, _no_shared_expert, _view, route_weight
from kimi_linear.layers.experts import STACKED_EXPERT_KEY, release_expert_items

__all__ = [
    "MAX_NAMED_TENSORS",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "LoadPlan",
    "NonFiniteWeightsWarning",
    "check_output_dir",
    "fill_weights_",
    "load_weights_",
    "plan_load",
    "pretrained_config",
    "save_pretrained",
]

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as a Path; ``ValueError`` when it is a file, or a non-empty folder and not
    ``overwrite`` (so an export never replaces a user's files by surprise)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output dir {str(p)!r} is a file")
    if not overwrite and p.is_dir() and any(p.iterdir()):
        names = sorted(q.name + ("/" if q.is_dir() else "") for q in p.iterdir())
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
        raise ValueError(
            f"output dir {str(p)!r} already exists and is not empty ({shown}); pass --overwrite "
            "to replace its checkpoint files, or choose another folder"
        )
    return p


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike,
    max_shard_size: int | None = None,
) -> None:
    """Write ``config.json``, ``generation_config.json`` and the weights (safetensors, release
    names) of ``model`` (a :class:`~kimi_linear.model.KimiLinearForCausalLM`) to
    ``save_directory``; every file gets the process's normal file mode (umask).

    ``max_shard_size`` (bytes): split into ``model-0000i-of-0000n.safetensors`` files of at most
    that size (a larger tensor gets a file of its own) plus ``model.safetensors.index.json``, by
    ``huggingface_hub.split_torch_state_dict_into_shards`` (transformers' layout); weights that
    fit in one file, or no ``max_shard_size``, give one ``model.safetensors`` and no index.
    Shards are written one at a time (host memory: one shard of copies).  Stale weight files of
    an earlier save in the folder are removed first.
    """
    from safetensors.torch import save_file

    if max_shard_size is not None and (
        isinstance(max_shard_size, bool)
        or not isinstance(max_shard_size, int)
        or max_shard_size <= 0
    ):
        raise ValueError(
            f"max_shard_size must be None or a positive int (bytes), got {max_shard_size!r}"
        )
    if model.device.type == "meta":
        raise ValueError(
            "cannot save a model on the meta device (its weights are not materialised)"
        )
    out = Path(save_directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"save_directory {str(out)!r} is a file")
    out.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(model.config)
    hf["dtype"] = str(model.dtype).removeprefix("torch.")
    (out / CONFIG_NAME).write_text(json.dumps(hf, indent=2) + "\n")
    (out / GENERATION_CONFIG_NAME).write_text(
        json.dumps(generation_config(model.config), indent=2) + "\n"
    )
    # safetensors writes its files owner-only (0600); give them the mode every other file of the
    # folder gets (the process umask's, e.g. 0644), so the export is readable wherever it is used
    file_mode = (out / CONFIG_NAME).stat().st_mode & 0o777
    for stale in [
        *out.glob("model-*-of-*.safetensors"),
        out / WEIGHTS_NAME,
        out / WEIGHTS_INDEX_NAME,
    ]:
        if stale.exists():
            stale.unlink()

    sd = model.state_dict()
    items = dict(release_expert_items(sd))
    # Group names into shards first (sizes only), then materialise one shard at a time.  The
    # split is huggingface_hub's (transformers' file names and index); it is given size-only
    # meta stand-ins, so views of one storage (the per-expert slices of a stacked expert
    # tensor, a tied head) are sized and placed one by one, as the files store them (copies),
    # instead of being kept together in one shard.
    if max_shard_size is None:
        files = {WEIGHTS_NAME: list(items)}
        index = None
    else:
        from huggingface_hub import split_torch_state_dict_into_shards

        split = split_torch_state_dict_into_shards(
            {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in items.items()},
            filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
            max_shard_size=max_shard_size,
        )
        files = split.filename_to_tensors
        index = (
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            if split.is_sharded
            else None
        )
    seen: set[int] = set()
    for fname, keys in files.items():
        shard = {}
        for k in keys:
            v = items[k].detach()
            storage = v.untyped_storage()
            own = (
                v.device.type == "cpu"
                and v.is_contiguous()
                and storage.nbytes() == v.numel() * v.element_size()
                and storage.data_ptr() not in seen
            )
            # safetensors refuses shared storage (tied head, per-expert views of a stacked
            # tensor): those, and non-CPU tensors, are written from a copy
            shard[k] = v if own else v.to("cpu", copy=True).contiguous()
            seen.add(storage.data_ptr())
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, file_mode)
        del shard
    if index is not None:
        (out / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


#: at most this many tensors are named in the non-finite weights warning
MAX_NAMED_TENSORS = 5


def _allowed_roots(root: Path) -> list[Path]:
    """Folders a weight file of ``root`` may resolve into: ``root`` itself, and for a snapshot
    of the Hugging Face cache (``.../snapshots/<revision>/``, whose files are symlinks to
    ``../../blobs/<hash>``) that repository's ``blobs/`` folder."""
    real = root.resolve()
    allowed = [real]
    if real.parent.name == "snapshots":
        allowed.append(real.parent.parent / "blobs")
    return allowed


def _weight_file(root: Path, name: Any, source: str) -> Path:
    """``root / name`` for a weight-file name read from ``source`` (the index, or the default
    name); ``ValueError`` naming it when it is not a relative path inside ``root`` (``..``,
    absolute paths, a symlink that resolves outside the folder), so a checkpoint's files never
    make the loader read elsewhere."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{source}: weight file names must be non-empty strings, got {name!r}")
    rel = Path(name)
    if (
        rel.is_absolute()
        or ".." in rel.parts
        or name.startswith(("/", "\\"))
        or ".." in name.split("\\")
    ):
        raise ValueError(
            f"{source}: weight file {name!r} is outside the checkpoint folder {str(root)!r} "
            "(only relative paths inside it are read)"
        )
    path = root / rel
    real = path.resolve()
    if not any(real == a or a in real.parents for a in _allowed_roots(root)):
        raise ValueError(
            f"{source}: weight file {name!r} resolves to {str(real)!r}, outside the checkpoint "
            f"folder {str(root)!r} (a symlink leaving the folder is not followed)"
        )
    return path


def _weight_files(root: Path) -> list[Path]:
    index_path = root / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        index = _read_json(index_path, "a safetensors index")
        wm = index.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ValueError(f"{index_path}: has no 'weight_map' object")
        names = set(wm.values())
        files = [_weight_file(root, f, str(index_path)) for f in sorted(names, key=str)]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{f}: listed in {index_path.name} but missing")
        return files
    if (root / WEIGHTS_NAME).is_file():
        return [_weight_file(root, WEIGHTS_NAME, str(root / WEIGHTS_NAME))]
    raise ValueError(
        f"pretrained_dir: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} in {str(root)!r}"
    )


def _open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError: header truncated or not safetensors
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def pretrained_config(
    pretrained_dir: str | os.PathLike, **config_overrides: Any
) -> KimiLinearConfig:
    """The config of checkpoint folder ``pretrained_dir`` (its ``config.json``, release or
    transformers form), with ``config_overrides`` replacing fields (e.g. ``kda_backend="torch"``);
    ``ValueError`` when the folder has no ``config.json`` or an override is not a field."""
    root = Path(pretrained_dir)
    if not (root / CONFIG_NAME).is_file():
        raise ValueError(f"pretrained_dir: no {CONFIG_NAME} in {str(root)!r}")
    config = config_from_hf(root / CONFIG_NAME)
    fields = set(config.to_dict())
    unknown = sorted(set(config_overrides) - fields)
    if unknown:
        raise ValueError(
            f"config_overrides: unknown KimiLinearConfig fields {unknown}"
            f"{did_you_mean(unknown[0], fields)}"
        )
    return config.replace(**config_overrides) if config_overrides else config


@dataclass(frozen=True)
class LoadPlan:
    """Where every stored tensor of a checkpoint folder goes in one model (:func:`plan_load`).

    ``files``: per safetensors file, ``[(stored name, [(kit name, part), ...]), ...]``;
    ``tied_head``: the file whose ``lm_head.weight`` must equal the tied embedding (or None);
    ``stored_dtype``: the stored dtype of the embedding (None when absent)."""

    files: list[tuple[Path, list[tuple[str, list[tuple[str, Part]]]]]]
    tied_head: Path | None
    stored_dtype: torch.dtype | None


def plan_load(pretrained_dir: str | os.PathLike, model: nn.Module) -> LoadPlan:
    """Route every tensor of the checkpoint folder ``pretrained_dir`` (kit, release or
    transformers layout) to ``model``'s state dict (a :class:`~kimi_linear.model.KimiLinearForCausalLM`,
    possibly on the meta device), reading only the safetensors headers.  Strict: every kit
    weight must be present and every stored tensor must have a place, with the right shape
    (``ValueError`` naming the file and tensor otherwise)."""
    root = Path(pretrained_dir)
    plan, tied_head, stored_dtype = _plan_load(root, _weight_files(root), model)
    return LoadPlan(plan, tied_head, stored_dtype)


def fill_weights_(model: nn.Module, plan: LoadPlan) -> None:
    """Copy the planned tensors into the materialised ``model`` in place, one stored tensor at a
    time, each cast to its parameter's dtype and device; a tied ``lm_head.weight`` that differs
    from the embedding is a ``ValueError``; non-finite values warn
    (:class:`NonFiniteWeightsWarning`)."""
    _fill(model, plan.files, plan.tied_head)


def load_weights_(model: nn.Module, pretrained_dir: str | os.PathLike) -> None:
    """Copy the weights of a checkpoint folder (kit, release or transformers layout) into the
    materialised ``model`` in place (each cast to the parameter's dtype and device), strictly.
    Used by ``KimiLinearLitModule(init_from=...)`` to start training from released weights."""
    root = Path(pretrained_dir)
    if not (root / CONFIG_NAME).is_file():
        raise ValueError(f"init_from: no {CONFIG_NAME} in {str(root)!r}")
    plan, tied_head, _ = _plan_load(root, _weight_files(root), model)
    _fill(model, plan, tied_head)


_Plan = list[tuple[Path, list[tuple[str, list[tuple[str, Part]]]]]]


def _plan_load(
    root: Path, files: list[Path], model: nn.Module
) -> tuple[_Plan, Path | None, torch.dtype | None]:
    """Route every stored tensor to the model's tensors and check names and shapes, reading
    only the safetensors headers.  Returns the plan, the file of a tied head to verify, and the
    stored dtype of the embedding."""
    config = model.config
    targets = dict(model.state_dict())
    tied = config.tie_word_embeddings
    if tied:
        targets.pop("lm_head.weight", None)
    plan: _Plan = []
    covered: dict[str, set[Any]] = {k: set() for k in targets}
    tied_head: Path | None = None
    stored_dtype: torch.dtype | None = None
    for path in files:
        entries = []
        with _open(path) as f:
            for key in f.keys():
                sl = f.get_slice(key)
                shape = tuple(sl.get_shape())
                st_dtype = sl.get_dtype()
                if st_dtype not in _ST_DTYPES:
                    raise ValueError(
                        f"{path}: tensor {key!r} is stored as {st_dtype}, not a float dtype "
                        f"({'/'.join(_ST_DTYPES)}); integer or quantized weights are not loaded "
                        "(a cast would not restore their values): dequantize the checkpoint first"
                    )
                if key == "model.embed_tokens.weight":
                    stored_dtype = _ST_DTYPES[st_dtype]
                if tied and key == "lm_head.weight":
                    tied_head = path
                    continue
                routes = route_weight(key, targets)
                if routes is None and _no_shared_expert(key, shape, config, path):
                    continue  # zero-width shared expert (n_shared_experts=0): nothing to load
                if routes is None:
                    raise ValueError(
                        f"{path}: tensor {key!r} has no place in this model "
                        f"({config.num_hidden_layers} layers, {list(config.layer_kinds)}); "
                        "does config.json match the weights?"
                    )
                first_t, first_part = routes[0]
                if first_part[0] == "index" and first_part[1] >= targets[first_t].shape[0]:
                    raise ValueError(
                        f"{path}: tensor {key!r} is expert {first_part[1]}, but config.json has "
                        f"num_experts={targets[first_t].shape[0]} (experts 0.."
                        f"{targets[first_t].shape[0] - 1}); does config.json match the weights?"
                    )
                if first_part[0] == "narrow":  # a packed tensor: its parts side by side
                    dim = first_part[1]
                    want_l = list(targets[first_t].shape)
                    want_l[dim] = sum(p[3] for _, p in routes)
                    want = tuple(want_l)
                else:
                    want = tuple(_view(targets[first_t], first_part).shape)
                if shape != want:
                    experts = ""
                    if STACKED_EXPERT_KEY.match(first_t) and len(shape) == len(want) == 3:
                        experts = f"; config.json has num_experts={want[0]}"
                    raise ValueError(
                        f"{path}: tensor {key!r} has shape {list(shape)}, the model expects "
                        f"{list(want)} (for {first_t}){experts}"
                    )
                for t, part in routes:
                    covered[t].add("full" if part[0] != "index" else part[1])
                entries.append((key, routes))
        plan.append((path, entries))
    missing = []
    for t, parts in covered.items():
        if "full" in parts:
            continue
        m = STACKED_EXPERT_KEY.match(t)
        if m and parts:
            gaps = sorted(set(range(targets[t].shape[0])) - parts)
            missing += [f"{m['prefix']}{e}.{m['w']}.weight" for e in gaps]
        elif m:
            missing.append(f"{m['prefix']}{{0..{targets[t].shape[0] - 1}}}.{m['w']}.weight")
        else:
            missing.append(t)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{root}: weights missing from the checkpoint: {missing[:5]}{more}")

    return plan, tied_head, stored_dtype


def _fill(model: nn.Module, plan: _Plan, tied_head: Path | None) -> None:
    """Copy the planned tensors into ``model``, one stored tensor at a time."""
    state = model.state_dict(keep_vars=True)
    nonfinite: list[str] = []
    with torch.no_grad():
        for path, entries in plan:
            with _open(path) as f:
                for key, routes in entries:
                    try:
                        src = f.get_tensor(key)
                    except Exception as e:
                        raise ValueError(f"{path}: cannot read tensor {key!r} ({e})") from None
                    bad = 0
                    for t, part in routes:
                        if part[0] == "narrow":  # a packed tensor: this target is one slice
                            dst = state[t].data
                            dst.copy_(src.narrow(part[1], part[2], part[3]))
                        else:
                            dst = _view(state[t].data, part)
                            dst.copy_(src)
                        bad += _count_nonfinite(dst)  # after the cast: overflow counts too
                    if bad:
                        nonfinite.append(f"{key} ({bad} of {src.numel()})")
                    del src
        if tied_head is not None:
            with _open(tied_head) as f:
                head = f.get_tensor("lm_head.weight")
            emb = state["model.embed_tokens.weight"]
            if not torch.equal(head.to(emb.dtype).to(emb.device), emb.data):
                raise ValueError(
                    f"{tied_head}: lm_head.weight differs from model.embed_tokens.weight but "
                    "config.json says tie_word_embeddings=true; load with "
                    "tie_word_embeddings=False to keep both matrices"
                )
    if nonfinite:
        more = len(nonfinite) - MAX_NAMED_TENSORS
        shown = ", ".join(nonfinite[:MAX_NAMED_TENSORS]) + (f" and {more} more" if more > 0 else "")
        root = plan[0][0].parent if plan else "checkpoint"
        warnings.warn(
            f"{root}: non-finite (NaN / inf) values in {len(nonfinite)} loaded weight tensor(s), "
            f"after the cast to the model's dtype: {shown}; the model's outputs may be NaN",
            NonFiniteWeightsWarning,
            stacklevel=3,
        )


class NonFiniteWeightsWarning(UserWarning):
    """A loaded checkpoint holds NaN / inf weights (or values that overflow the target dtype)."""


def _count_nonfinite(t: torch.Tensor, block: int = 1 << 22) -> int:
    """Number of NaN / inf elements of float tensor ``t`` (checked in blocks of ``block``
    elements, so the temporary is small whatever the tensor's size); 0 for other dtypes."""
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), block):
        bad += int((~torch.isfinite(flat[start : start + block])).sum())
    return bad
