"""kimi-linear: build, train and profile Kimi Linear long-context language models.

The main entry points are importable from the package root::

    from kimi_linear import KimiLinearConfig, KimiLinearForCausalLM

    model = KimiLinearForCausalLM(KimiLinearConfig.from_preset("tiny"))

Model classes are loaded lazily (on first attribute access), so ``import kimi_linear`` stays
cheap for the CLI and for tools that only need the configuration.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from kimi_linear.config import PRESETS, KimiLinearConfig

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "KimiLinearForCausalLM": "kimi_linear.model",
    "KimiLinearModel": "kimi_linear.model",
    "KimiDecoderLayer": "kimi_linear.model",
    "CausalLMOutput": "kimi_linear.model",
    "HybridCache": "kimi_linear.cache",
    "KDALayerCache": "kimi_linear.cache",
    "LatentKVCache": "kimi_linear.cache",
    "KimiDeltaAttention": "kimi_linear.layers.kda",
    "MLAttention": "kimi_linear.layers.mla",
    "KimiMoE": "kimi_linear.layers.moe",
    "KimiMLP": "kimi_linear.layers.moe",
    "RMSNorm": "kimi_linear.layers.norm",
    "naive_recurrent_kda": "kimi_linear.ops",
    "torch_chunk_kda": "kimi_linear.ops",
    "count_parameters": "kimi_linear.info",
    "info_report": "kimi_linear.info",
}

__all__ = [
    "PRESETS",
    "CausalLMOutput",
    "HybridCache",
    "KDALayerCache",
    "KimiDecoderLayer",
    "KimiDeltaAttention",
    "KimiLinearConfig",
    "KimiLinearForCausalLM",
    "KimiLinearModel",
    "KimiMLP",
    "KimiMoE",
    "LatentKVCache",
    "MLAttention",
    "RMSNorm",
    "__version__",
    "count_parameters",
    "info_report",
    "naive_recurrent_kda",
    "torch_chunk_kda",
]

# deprecated name -> its new name (issue 22); the README lists them
_DEPRECATED = {"kda_chunk": "torch_chunk_kda", "kda_recurrent": "naive_recurrent_kda"}

if TYPE_CHECKING:
    from kimi_linear.cache import HybridCache, KDALayerCache, LatentKVCache
    from kimi_linear.info import count_parameters, info_report
    from kimi_linear.layers.kda import KimiDeltaAttention
    from kimi_linear.layers.mla import MLAttention
    from kimi_linear.layers.moe import KimiMLP, KimiMoE
    from kimi_linear.layers.norm import RMSNorm
    from kimi_linear.model import (
        CausalLMOutput,
        KimiDecoderLayer,
        KimiLinearForCausalLM,
        KimiLinearModel,
    )
    from kimi_linear.ops import naive_recurrent_kda, torch_chunk_kda


def __getattr__(name: str) -> Any:
    new = _DEPRECATED.get(name)
    if new is not None:
        warnings.warn(
            f"kimi_linear.{name} is deprecated; use kimi_linear.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return __getattr__(new)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kimi_linear' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
