"""KDA reference operators in pure PyTorch, and the rules every KDA implementation shares.

* :func:`naive_recurrent_kda`: token by token, the readable specification (float64-capable).
* :func:`naive_kda_step`: one token per sequence, the cheap decode update.
* :func:`torch_chunk_kda`: the chunked WY / UT-transform form, batched over chunks; the
  ``"torch"`` backend's training path (same signature plus ``chunk_size``).
* :func:`kda_gate`: the decay gate (release and safe forms).
* :mod:`kimi_linear.ops.options` (torch-free): the backend names, the safe gate's range, the
  gate-check switch; :mod:`kimi_linear.ops.checks`: the input contract (shapes, ``cu_seqlens``,
  ``g``).

The backend dispatcher (``dispatch_chunk_kda`` / ``dispatch_decode_kda``, formerly
``kimi_linear.ops.kda_chunked`` / ``kda_decode``) lives in :mod:`kimi_linear.backends`, above
this package. Names are loaded on first access, so that importing this package imports no torch.
The old names ``kda_chunk``, ``kda_recurrent`` and ``kda_decode_step`` still work and warn
(``DeprecationWarning``).
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_LAZY = {
    "KDA_BACKENDS": "kimi_linear.ops.options",
    "SAFE_GATE_LOWER_BOUND_RANGE": "kimi_linear.ops.options",
    "check_kda_backend": "kimi_linear.ops.options",
    "check_safe_gate_bound": "kimi_linear.ops.options",
    "check_kda_inputs": "kimi_linear.ops.checks",
    "check_log_decay": "kimi_linear.ops.checks",
    "kda_gate": "kimi_linear.ops.gate",
    "naive_kda_step": "kimi_linear.ops.naive",
    "naive_recurrent_kda": "kimi_linear.ops.naive",
    "torch_chunk_kda": "kimi_linear.ops.chunk",
}

# deprecated name -> its new name (issue 22); the README lists them
_DEPRECATED = {
    "kda_chunk": "torch_chunk_kda",
    "kda_decode_step": "naive_kda_step",
    "kda_recurrent": "naive_recurrent_kda",
}

__all__ = [
    "KDA_BACKENDS",
    "SAFE_GATE_LOWER_BOUND_RANGE",
    "check_kda_backend",
    "check_kda_inputs",
    "check_log_decay",
    "check_safe_gate_bound",
    "kda_gate",
    "naive_kda_step",
    "naive_recurrent_kda",
    "torch_chunk_kda",
]
assert sorted(__all__) == sorted(_LAZY)

if TYPE_CHECKING:
    from kimi_linear.ops.checks import check_kda_inputs, check_log_decay
    from kimi_linear.ops.chunk import torch_chunk_kda
    from kimi_linear.ops.gate import kda_gate
    from kimi_linear.ops.naive import naive_kda_step, naive_recurrent_kda
    from kimi_linear.ops.options import (
        KDA_BACKENDS,
        SAFE_GATE_LOWER_BOUND_RANGE,
        check_kda_backend,
        check_safe_gate_bound,
    )


def __getattr__(name: str) -> Any:
    new = _DEPRECATED.get(name)
    if new is not None:
        warnings.warn(
            f"kimi_linear.ops.{name} is deprecated; use kimi_linear.ops.{new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return __getattr__(new)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kimi_linear.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
