"""Autograd inside a ``torch.library`` custom op: the helper every recomputing backward uses.

The custom ops of the kit (:func:`kimi_linear.backends.chunk_kda_custom_op`, the grouped
experts' op) register a backward that recomputes the forward with autograd on and
differentiates it, as activation checkpointing does. The dispatcher runs an op's
implementation with the autograd dispatch keys excluded, so :func:`autograd_inside_op`
re-includes them for one block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["autograd_inside_op"]


@contextlib.contextmanager
def autograd_inside_op() -> Iterator[None]:
    """Record autograd inside a custom op's implementation (grad mode on, the autograd dispatch
    keys re-included), restoring the previous state after the block.

    The dispatcher runs an op's implementation with the autograd keys excluded (the op's own
    autograd formula is registered separately), so tensors made there never get a ``grad_fn``
    without this.
    """
    keys = (
        torch._C.DispatchKey.AutogradFunctionality,
        torch._C.DispatchKey.AutogradOther,
        torch._C.DispatchKey.ADInplaceOrView,
    )
    before = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in keys]
    for k in keys:
        torch._C._dispatch_tls_set_dispatch_key_excluded(k, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for k, excluded in zip(keys, before):
            torch._C._dispatch_tls_set_dispatch_key_excluded(k, excluded)
