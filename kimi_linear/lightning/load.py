"""The trained model and its tokenizer behind a ``--ckpt_path``, for generate, export,
evaluate and retrieval.

* :func:`check_device` -- a ``--device`` value present on this machine, checked before any
  checkpoint is read;
* :func:`load_model` -- the :class:`~kimi_linear.model.KimiLinearForCausalLM` of a Lightning
  checkpoint file, a sharded checkpoint folder or an exported folder, without running code from
  the file;
* :func:`resolve_tokenizer` -- the tokenizer the model was trained with (``--tokenizer``, the
  one recorded in the checkpoint, the folder's tokenizer files, or the byte tokenizer), checked
  against the model's vocabulary and, for ``--tokenizer``, against the recorded one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from kimi_linear.errors import UsageError
from kimi_linear.lightning.callbacks import load_checkpoint
from kimi_linear.lightning.checkpoints import (
    check_checkpoint_file,
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    recover_interrupted_save,
)
from kimi_linear.lightning.finetune import model_from_lora_checkpoint
from kimi_linear.lightning.hparams import model_from_weights
from kimi_linear.model import KimiLinearForCausalLM
from kimi_linear.tokenizer import (
    ByteTokenizer,
    find_tokenizer_spec,
    has_tokenizer_files,
    holds_recorded_files,
    load_tokenizer,
    parse_tokenizer_spec,
    tokenizer_difference,
)

__all__ = ["MISMATCH_HELP", "TOKENIZER_HELP", "check_device", "load_model", "resolve_tokenizer"]


def check_device(device: str | torch.device, arg: str = "--device") -> torch.device:
    """``device`` as a :class:`torch.device`, refused with a :class:`UsageError` naming ``arg``
    when it is not a device name or not present on this machine (``cuda`` without a CUDA device,
    ``cuda:3`` with two GPUs), before any checkpoint is read (a missing device used to surface
    as an error about the checkpoint)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(
            f"{arg}: {str(device)!r} is not a device name (expected cpu, cuda, cuda:N or mps)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            )
            raise UsageError(
                f"{arg}: {str(device)!r} but there is no CUDA device here "
                f"(torch {torch.__version__}, {build}); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"{arg}: {str(device)!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{arg}: {str(device)!r} but MPS is not available here; use --device cpu")
    return dev


def load_model(path: str | os.PathLike, device: str = "cpu") -> Any:
    """The :class:`KimiLinearForCausalLM` of a Lightning checkpoint file, a sharded (FSDP2,
    distributed-checkpoint) checkpoint folder, or an exported folder.

    No code from the file runs: a ``.ckpt`` is read with ``weights_only=True`` (allow-listed,
    :func:`~kimi_linear.lightning.callbacks.load_checkpoint`) and the model is built from its
    recorded config (Lightning's ``load_from_checkpoint`` would also import and call the
    ``_instantiator`` a checkpoint names); a sharded folder is checked by
    :func:`~kimi_linear.lightning.checkpoints.verify_sharded_checkpoint`; an exported folder holds
    JSON and safetensors only.

    Raises:
        UsageError: ``device`` is not present here (:func:`check_device`), or the path is not
            a checkpoint.
    """
    device = check_device(device)
    p = Path(path)
    recover_interrupted_save(p)
    if not p.exists():
        raise UsageError(f"--ckpt_path: {os.fspath(path)!r} does not exist")
    if is_sharded_checkpoint(p):  # consolidated tensor by tensor in this process
        return load_sharded_checkpoint(p).to(device)
    if p.is_dir():
        try:
            return KimiLinearForCausalLM.from_pretrained(p, device=device)
        except ValueError as e:
            raise UsageError(f"--ckpt_path: {e}") from e
    check_checkpoint_file(p)  # empty / truncated: name it and the folder's other checkpoints
    ckpt = load_checkpoint(p)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not isinstance(ckpt.get("hyper_parameters"), dict):
        raise UsageError(
            f"--ckpt_path: {os.fspath(path)!r} is not a kimi-linear Lightning checkpoint "
            "(no state_dict / hyper_parameters)"
        )
    weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if ckpt["hyper_parameters"].get("lora") is not None:  # a LoRA run: adapters merged
        return model_from_lora_checkpoint(ckpt["hyper_parameters"], weights, p).to(device)
    return model_from_weights(ckpt["hyper_parameters"], weights, p).to(device)


TOKENIZER_HELP = (
    "the tokenizer: 'byte', a tokenizer.json, a Hugging Face tokenizer folder, or a JSON "
    'load_tokenizer spec such as \'{"kind": "tiktoken", "path": "FILE", "pattern": '
    "\"gpt2\"}'; default: the one recorded in the checkpoint (the training data's), the "
    "folder's tokenizer files, else the byte tokenizer"
)


MISMATCH_HELP = (
    "use --tokenizer even when it differs from the tokenizer the model was trained with "
    "(recorded in the checkpoint, or the folder's tokenizer files); a warning instead of an error"
)


def _recorded_tokenizer_spec(path: Path) -> dict[str, Any] | None:
    """The tokenizer spec a Lightning checkpoint (file, or sharded folder's ``meta.pt``)
    recorded from its data module (``None`` when it recorded none)."""
    source = path / "meta.pt" if path.is_dir() else path
    if not source.is_file():
        return None
    ckpt = load_checkpoint(source)  # weights_only, allow-listed: no code from the file runs
    if not isinstance(ckpt, dict):
        return None
    spec = find_tokenizer_spec(ckpt)
    if isinstance(spec, dict) and spec.get("trust_remote_code"):
        # a file never decides to run a tokenizer folder's Python code: that takes an explicit
        # --tokenizer '{..., "trust_remote_code": true}'
        spec = {**spec, "trust_remote_code": False}
    if spec is None:
        # the byte-level text data records no tokenizer state: its class says it all
        data = ckpt.get("datamodule_hyper_parameters") or {}
        if str(data.get("_class_path", "")).endswith(".TextDataModule"):
            spec = {"kind": "byte"}
    return spec


def _check_trained_tokenizer(tok: Any, ckpt_path: Path, allow_mismatch: bool) -> None:
    """``--tokenizer`` (loaded as ``tok``) must be the tokenizer the model at ``ckpt_path`` was
    trained with when that is known (recorded in the checkpoint, or the folder's tokenizer
    files): the same ids for the same text (compared by behaviour, so a copy or an exported
    form agrees), or, when the recorded files are gone or changed, files with the recorded
    sha256.  Otherwise a :class:`UsageError`, or with ``allow_mismatch`` a warning on stderr."""
    spec: Any
    if ckpt_path.is_dir() and not (ckpt_path / "meta.pt").is_file():
        if not has_tokenizer_files(ckpt_path):
            return
        where, spec = f"the tokenizer files of {os.fspath(ckpt_path)!r}", os.fspath(ckpt_path)
    else:
        spec = _recorded_tokenizer_spec(ckpt_path)
        where = f"the tokenizer recorded in {os.fspath(ckpt_path)!r}"
    if spec is None:  # e.g. a synthetic-task model: nothing to compare with
        return
    try:
        ref = load_tokenizer(spec)
    except (ValueError, TypeError, OSError):  # moved or changed since: compare the files
        ref = None
    if ref is not None:
        why = tokenizer_difference(tok, ref)
    elif holds_recorded_files(spec, tok.spec.get("path", "")):
        why = None
    else:
        why = "it cannot be loaded and --tokenizer's files do not have its sha256"
    if why is None:
        return
    message = (
        f"--tokenizer is not {where} ({why}); the model would read other token ids than it was "
        "trained on"
    )
    if not allow_mismatch:
        raise UsageError(f"{message}; pass --allow_tokenizer_mismatch to use it anyway")
    print(f"warning: {message} (--allow_tokenizer_mismatch)", file=sys.stderr)


def resolve_tokenizer(
    tokenizer: str | None,
    ckpt_path: str | os.PathLike,
    model_vocab_size: int,
    byte_fallback: bool = True,
    allow_mismatch: bool = False,
) -> Any:
    """The tokenizer for ``generate`` / ``export`` of the model at ``ckpt_path``.

    In order: ``tokenizer`` (the ``--tokenizer`` value, see :func:`parse_tokenizer_spec`); the
    spec a Lightning checkpoint recorded from its data module
    (:data:`~kimi_linear.tokenizer.TOKENIZER_STATE_KEY`, e.g. a
    :class:`TokenDataModule`'s dataset tokenizer, checked against its sha256); a model folder's
    own tokenizer files (``tokenizer.json`` / ``tokenizer_config.json``); else the byte tokenizer
    (``byte_fallback``, for ``generate``) or ``None`` (``export``: no tokenizer files to write).

    Raises :class:`UsageError` when the tokenizer cannot be loaded or its vocabulary does not
    fit the model's: more ids than ``model_vocab_size`` (ids the model cannot embed), or, for the
    byte tokenizer taken by default, a different size (the model was not trained on bytes); and
    when ``tokenizer`` is not the one the model was trained with, where that is known, unless
    ``allow_mismatch`` (then a warning; see :func:`_check_trained_tokenizer`).
    """
    p = Path(ckpt_path)
    if tokenizer is not None:
        what = "--tokenizer"
        spec: Any = parse_tokenizer_spec(tokenizer)
    elif p.is_dir() and not (p / "meta.pt").is_file() and has_tokenizer_files(p):
        what, spec = f"the tokenizer files of {os.fspath(p)!r}", os.fspath(p)
    else:
        spec = _recorded_tokenizer_spec(p)
        what = f"the tokenizer recorded in {os.fspath(p)!r}"
    if spec is None:
        if not byte_fallback:
            return None
        tok = ByteTokenizer()
        if tok.vocab_size != model_vocab_size:
            raise UsageError(
                f"--ckpt_path: the model's vocabulary has {model_vocab_size} tokens, but no "
                f"tokenizer is recorded with it and the byte tokenizer has {tok.vocab_size}; "
                "give the one it was trained with as --tokenizer (a synthetic-task model has none)"
            )
        return tok
    try:
        tok = load_tokenizer(spec)
    except (ValueError, TypeError, OSError) as e:  # UsageError is a ValueError
        hint = (
            ""
            if tokenizer is not None
            else "; pass the tokenizer the model was trained with as --tokenizer"
        )
        raise UsageError(f"{what}: {str(e).removeprefix('tokenizer: ')}{hint}") from None
    if tok.vocab_size > model_vocab_size:
        raise UsageError(
            f"{what}: the tokenizer has {tok.vocab_size} token ids, more than the model's "
            f"vocabulary ({model_vocab_size}); it is not the tokenizer the model was trained with"
        )
    if tokenizer is not None:
        _check_trained_tokenizer(tok, p, allow_mismatch)
    return tok
