"""kimi-linear: build, train and profile Kimi Linear long-context language models."""

from kimi_linear.config import PRESETS, KimiLinearConfig

__version__ = "0.1.0"
__all__ = ["KimiLinearConfig", "PRESETS", "__version__"]
