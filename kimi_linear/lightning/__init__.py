"""Lightning training: LightningModule, offline DataModules and the LightningCLI.

* :class:`KimiLinearLitModule` (:mod:`.module`): trains a :class:`~kimi_linear.model.KimiLinearForCausalLM`
  with MuonClip / AdamW, warmup + cosine, MoE router-bias balancing and MLA max-logit logging.
* :class:`SyntheticDataModule`, :class:`TextDataModule`, :class:`TokenDataModule` (:mod:`.data`):
  offline data (MQAR, palindrome, stack; byte-level text over a local corpus or CPython's
  ``pydoc_data.topics``; token datasets written by ``kimi-linear prepare``).
* :class:`ByteTokenizer`, :func:`load_tokenizer` (from :mod:`kimi_linear.tokenizer`, which
  is Lightning-free).
* :func:`lightning_main` (:mod:`.cli`): the ``kimi-linear fit/validate/test/predict`` runner;
  ``generate`` (:mod:`.generate`) and ``export`` (:mod:`.export`) load a trained model and its
  tokenizer through :mod:`.load`; :mod:`kimi_linear.cli` dispatches every subcommand.
* :mod:`.callbacks`: final-step and atomic checkpoints, resume overrides, throughput / MFU.
* :class:`FSDP2Strategy` (:mod:`.parallel`): FSDP2 / HSDP sharding per decoder layer through
  Lightning's ``ModelParallelStrategy`` (``--trainer.strategy fsdp2``).
* :mod:`.checkpoints`: checkpoint file checks, sharded-folder verification and consolidation,
  atomic folder saves; :mod:`.hparams`: the model config and meta-built model of a run's
  hyper-parameters.

Names are imported lazily, so ``import kimi_linear.lightning.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KimiLinearLitModule": ".module",
    "build_config": ".hparams",
    "SyntheticDataModule": ".data",
    "TextDataModule": ".data",
    "TokenDataModule": ".data",
    "UsageError": ".data",
    "ByteTokenizer": "kimi_linear.tokenizer",
    "load_tokenizer": "kimi_linear.tokenizer",
    "KimiLinearCLI": ".cli",
    "lightning_main": ".cli",
    "FSDP2Strategy": ".parallel",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
