"""Lightning training: LightningModule, offline DataModules and the LightningCLI.

* :class:`KimiLinearLitModule` (:mod:`.module`): trains a :class:`~kimi_linear.model.KimiLinearForCausalLM`
  with MuonClip / AdamW, warmup + cosine, MoE router-bias balancing and MLA max-logit logging.
* :class:`SyntheticDataModule`, :class:`TextDataModule` (:mod:`.data`): offline data (MQAR,
  palindrome, stack; byte-level text over a local corpus or CPython's ``pydoc_data.topics``).
* :class:`ByteTokenizer` (:mod:`.tokenizer`).
* :func:`lightning_main` (:mod:`.cli`): the ``kimi-linear fit/validate/test/predict/generate/export``
  command line.

Names are imported lazily, so ``import kimi_linear.lightning.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KimiLinearLitModule": "module",
    "build_config": "module",
    "SyntheticDataModule": "data",
    "TextDataModule": "data",
    "UsageError": "data",
    "ByteTokenizer": "tokenizer",
    "KimiLinearCLI": "cli",
    "lightning_main": "cli",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
