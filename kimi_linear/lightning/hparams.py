"""The model a run's hyper-parameters describe: its config and its meta-built model.

Lightning-free.  :class:`~kimi_linear.lightning.module.KimiLinearLitModule` builds its config
here (``model.preset`` / ``model.config`` / ``model.overrides`` / ``model.init_from``), and the
checkpoint readers (:mod:`.checkpoints`, :mod:`.finetune`) rebuild a trained model from the
``hyper_parameters`` a checkpoint recorded, data only (nothing named in the file is imported or
called):

* :func:`build_config` -- a preset or a full config dict, then overrides;
* :func:`init_from_config` -- the config of an ``init_from`` checkpoint folder, then overrides;
* :func:`config_from_hparams` -- either of the above, from a checkpoint's hyper-parameters;
* :func:`meta_model` / :func:`assign_weights` / :func:`model_from_weights` -- the model built on
  the meta device and given full weights by assignment (no copy).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kimi_linear import hf
from kimi_linear.config import PRESETS, KimiLinearConfig
from kimi_linear.errors import UsageError, did_you_mean
from kimi_linear.model import KimiLinearForCausalLM

__all__ = [
    "assign_weights",
    "build_config",
    "config_from_hparams",
    "init_from_config",
    "meta_model",
    "model_from_weights",
]


def build_config(
    preset: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    vocab_size: int | None = None,
) -> KimiLinearConfig:
    """The model config from a ``preset`` name or a full ``config`` dict, then ``overrides``.

    ``config`` may use :class:`KimiLinearConfig` field names or be a released-style HF
    ``config.json`` dict (recognised by its ``linear_attn_config`` / ``model_type`` keys).
    With neither, the ``tiny`` preset.  ``vocab_size`` (the data's vocabulary) replaces the
    preset's.  Unknown field names and invalid values raise :class:`UsageError` naming them
    (the field names of ``overrides`` are checked by :class:`KimiLinearConfig` itself).
    """
    if preset is not None and config is not None:
        raise UsageError("model: give either model.preset or model.config, not both")
    overrides = dict(overrides or {})
    if vocab_size is not None:
        if "vocab_size" in overrides and overrides["vocab_size"] != vocab_size:
            raise UsageError(
                f"model.overrides.vocab_size={overrides['vocab_size']} conflicts with the data's "
                f"vocabulary ({vocab_size}); drop the override, the data sets it"
            )
        overrides["vocab_size"] = vocab_size
    try:
        if config is not None:
            config = dict(config)
            if "linear_attn_config" in config or "model_type" in config:
                base = hf.config_from_hf(config)
            else:
                fields = [f.name for f in dataclasses.fields(KimiLinearConfig)]
                unknown = [k for k in config if k not in fields]
                if unknown:
                    raise UsageError(
                        f"model.config: unknown KimiLinearConfig field {unknown[0]!r}"
                        f"{did_you_mean(unknown[0], fields)}"
                    )
                base = KimiLinearConfig(**config)
            # an unknown override name is KimiLinearConfig's error (a TypeError naming it)
            return base.replace(**overrides) if overrides else base
        name = preset or "tiny"
        if name not in PRESETS:
            raise UsageError(
                f"model.preset must be one of {sorted(PRESETS)}, got {name!r}{did_you_mean(name, PRESETS)}"
            )
        return KimiLinearConfig.from_preset(name, **overrides)
    except UsageError:
        raise
    except (ValueError, TypeError) as e:
        raise UsageError(f"model: {e}") from e


def init_from_config(
    path: str,
    preset: str | None,
    config: Mapping[str, Any] | None,
    overrides: Mapping[str, Any] | None,
    vocab_size: int | None,
) -> KimiLinearConfig:
    """The config of the checkpoint folder ``path`` (``model.init_from``), then ``overrides``."""
    if preset is not None or config is not None:
        raise UsageError(
            "model.init_from takes the config from the checkpoint; drop model.preset / "
            "model.config (on the command line: --model.preset null)"
        )
    try:
        base = hf.config_from_hf(hf.read_config_json(path))
    except ValueError as e:
        raise UsageError(f"model.init_from: {e}") from e
    if vocab_size is not None and vocab_size != base.vocab_size:
        raise UsageError(
            f"model.init_from: the checkpoint's vocab_size={base.vocab_size} differs from the "
            f"data's vocabulary ({vocab_size}); use the checkpoint's tokenizer"
        )
    return build_config(None, overrides, base.to_dict(), None)


def config_from_hparams(hp: Mapping[str, Any], path: str | os.PathLike) -> KimiLinearConfig:
    """The model config a checkpoint's hyper-parameters ``hp`` describe (a preset with
    overrides, a full config, or an ``init_from`` folder's config.json); data only, no code.
    Raises :class:`UsageError` naming the checkpoint ``path``."""
    try:
        if hp.get("init_from") is not None and hp.get("config") is None:
            return init_from_config(
                hp["init_from"], hp.get("preset"), None, hp.get("overrides"), hp.get("vocab_size")
            )
        return build_config(
            hp.get("preset"), hp.get("overrides"), hp.get("config"), hp.get("vocab_size")
        )
    except (UsageError, TypeError, AttributeError) as e:
        raise UsageError(f"{os.fspath(path)!r}: cannot rebuild the model config ({e})") from e


def meta_model(config: KimiLinearConfig) -> KimiLinearForCausalLM:
    """``KimiLinearForCausalLM(config)`` on the meta device (no memory; weights assigned later)."""
    with torch.device("meta"):
        return KimiLinearForCausalLM(config)


def assign_weights(
    model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike
) -> nn.Module:
    """Assign ``state`` (full tensors) to the meta-built ``model``; every weight must be there
    (the LM head of a tied model excepted).  Raises :class:`UsageError` naming ``path``."""
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
    hparams: Mapping[str, Any], weights: dict[str, torch.Tensor], path: str | os.PathLike
) -> nn.Module:
    """The :class:`~kimi_linear.model.KimiLinearForCausalLM` of a checkpoint's
    ``hyper_parameters`` and full ``weights`` (names without the ``model.`` prefix), built on
    the meta device and assigned (no copy).  Unlike Lightning's ``load_from_checkpoint``, nothing
    named in the file is imported or called.  Raises :class:`UsageError` naming ``path``."""
    p = Path(path)
    model = meta_model(config_from_hparams(hparams, p))
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if unexpected:
        raise UsageError(f"{os.fspath(p)!r}: unexpected weights for this config: {unexpected[:5]}")
    return assign_weights(model, dict(weights), p)
