"""Deprecated alias of :mod:`kimi_linear.tokenizer` (moved there in issue 22: it never needed
Lightning).  Import from ``kimi_linear.tokenizer``; this module will be removed."""

from __future__ import annotations

import warnings

from kimi_linear.tokenizer import *  # noqa: F403
from kimi_linear.tokenizer import __all__  # noqa: F401

warnings.warn(
    "kimi_linear.lightning.tokenizer moved to kimi_linear.tokenizer; import it from there "
    "(this alias will be removed)",
    DeprecationWarning,
    stacklevel=2,
)
