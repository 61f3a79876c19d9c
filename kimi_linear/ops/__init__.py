"""KDA operators: the pure-PyTorch reference ops and the backend dispatch.

* :func:`kda_recurrent`: token by token, the readable specification (float64-capable).
* :func:`kda_decode_step`: one token per sequence, the cheap decode update.
* :func:`kda_chunk`: the chunked WY / UT-transform form, batched over chunks; the CPU training
  path (same signature plus ``chunk_size``).
* :func:`kda_chunked` / :func:`kda_decode`: the two entry points of every backend
  (``torch``, ``triton``, ``fla``, ``auto``; see :mod:`kimi_linear.ops.backend`).

Names are loaded on first access, so that :mod:`kimi_linear.ops.backend` (the backend names,
imported by the configuration) stays importable without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_LAZY = {
    "KDA_BACKENDS": "kimi_linear.ops.backend",
    "KDABackend": "kimi_linear.ops.backend",
    "check_kda_backend": "kimi_linear.ops.backend",
    "get_kda_backend": "kimi_linear.ops.backend",
    "kda_chunked": "kimi_linear.ops.backend",
    "kda_decode": "kimi_linear.ops.backend",
    "resolve_kda_backend": "kimi_linear.ops.backend",
    "check_kda_inputs": "kimi_linear.ops.checks",
    "check_log_decay": "kimi_linear.ops.checks",
    "kda_chunk": "kimi_linear.ops.chunk",
    "kda_decode_step": "kimi_linear.ops.naive",
    "kda_recurrent": "kimi_linear.ops.naive",
}

__all__ = [
    "KDA_BACKENDS",
    "KDABackend",
    "check_kda_backend",
    "check_kda_inputs",
    "check_log_decay",
    "get_kda_backend",
    "kda_chunk",
    "kda_chunked",
    "kda_decode",
    "kda_decode_step",
    "kda_recurrent",
    "resolve_kda_backend",
]
assert sorted(__all__) == sorted(_LAZY)

if TYPE_CHECKING:
    from kimi_linear.ops.backend import (
        KDA_BACKENDS,
        KDABackend,
        check_kda_backend,
        get_kda_backend,
        kda_chunked,
        kda_decode,
        resolve_kda_backend,
    )
    from kimi_linear.ops.checks import check_kda_inputs, check_log_decay
    from kimi_linear.ops.chunk import kda_chunk
    from kimi_linear.ops.naive import kda_decode_step, kda_recurrent


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kimi_linear.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
