"""KDA as ``torch.library`` custom ops, so ``torch.compile`` treats it as one opaque node.

Inside a compiled region, Dynamo cannot trace into a Triton launch wrapped in an
``autograd.Function`` with Python-side checks, nor through the data-dependent checks of the
chunked torch path; either would break the graph in the middle of a decoder layer.  The two
ops here wrap whichever backend :func:`kimi_linear.ops.backend.kda_chunked` resolves:

* ``kimi_linear::kda_chunk`` (:func:`kda_chunk_op`): the forward, ``(o, final_state)``;
* ``kimi_linear::kda_chunk_backward``: its backward, which recomputes the forward with autograd
  on and differentiates it (one extra forward per backward, as activation checkpointing does).

Each has a fake (meta) implementation that gives the output shapes and dtypes from the input
shapes alone, so ``torch.compile`` / ``FakeTensor`` tracing never runs a kernel.  Outside
``torch.compile`` the backends are called directly (:mod:`kimi_linear.ops.backend`).

Shapes: q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]``, state ``[N, H, K, V]``
(``N = B``, or the number of packed sequences with ``cu_seqlens [N + 1]``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor

from kimi_linear.ops.checks import compute_dtype

__all__ = ["grouped_experts_op", "kda_chunk_op"]


@contextlib.contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Record autograd inside a custom op's implementation.

    The dispatcher runs an op's implementation with the autograd dispatch keys excluded (the
    op's own autograd formula is registered separately), so tensors made there never get a
    ``grad_fn``.  The backward op recomputes the forward with autograd on: it re-includes those
    keys for the block, restoring the previous state after it.
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


def _final_state_dtype(v: Tensor, backend: str) -> torch.dtype:
    """The final state's dtype: the torch backend's compute dtype, float32 for the kernels
    (``backend`` is resolved first: ``"auto"`` runs the torch backend off CUDA)."""
    from kimi_linear.ops.backend import resolve_kda_backend

    concrete = resolve_kda_backend(backend, v.device) if backend == "auto" else backend
    return compute_dtype(v.dtype) if concrete == "torch" else torch.float32


def _num_states(q: Tensor, initial_state: Tensor | None, cu_seqlens: Tensor | None) -> int:
    if initial_state is not None:
        return initial_state.shape[0]
    if cu_seqlens is not None:
        return cu_seqlens.shape[0] - 1
    return q.shape[0]


def _run(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    backend: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    from kimi_linear.ops.backend import kda_chunked

    o, state = kda_chunked(
        q,
        k,
        v,
        g,
        beta,
        backend=backend,
        scale=scale,
        initial_state=initial_state,
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        chunk_size=chunk_size,
    )
    assert state is not None
    return o, state


@torch.library.custom_op("kimi_linear::kda_chunk", mutates_args=())
def _kda_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    backend: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        o, state = _run(q, k, v, g, beta, scale, initial_state, cu_seqlens, backend, chunk_size)
    # contiguous outputs, as the fake implementation says
    return o.contiguous(), state.contiguous()


@_kda_chunk.register_fake
def _kda_chunk_fake(q, k, v, g, beta, scale, initial_state, cu_seqlens, backend, chunk_size):
    B, T, H, K = q.shape
    N = _num_states(q, initial_state, cu_seqlens)
    o = v.new_empty(v.shape)
    state = q.new_empty((N, H, K, v.shape[-1]), dtype=_final_state_dtype(v, backend))
    return o, state


@torch.library.custom_op("kimi_linear::kda_chunk_backward", mutates_args=())
def _kda_chunk_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    initial_state: Tensor | None,
    cu_seqlens: Tensor | None,
    backend: str,
    chunk_size: int,
    do: Tensor,
    dstate: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = [t.detach().requires_grad_(True) for t in (q, k, v, g, beta)]
    h0 = None if initial_state is None else initial_state.detach().requires_grad_(True)
    with _autograd_inside_op():
        o, state = _run(*inputs, scale, h0, cu_seqlens, backend, chunk_size)
        wrt = inputs + ([h0] if h0 is not None else [])
        grads = torch.autograd.grad(
            (o, state), wrt, (do, dstate), allow_unused=True, materialize_grads=True
        )
    # contiguous gradients, as the fake implementation says
    dh0 = grads[5].contiguous() if initial_state is not None else q.new_empty(0)
    return (*(d.contiguous() for d in grads[:5]), dh0)


@_kda_chunk_backward.register_fake
def _kda_chunk_backward_fake(
    q, k, v, g, beta, scale, initial_state, cu_seqlens, backend, chunk_size, do, dstate
):
    dh0 = q.new_empty(0) if initial_state is None else initial_state.new_empty(initial_state.shape)
    return (*(t.new_empty(t.shape) for t in (q, k, v, g, beta)), dh0)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, g, beta, scale, initial_state, cu_seqlens, backend, chunk_size = inputs
    ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens)
    ctx.scale, ctx.backend, ctx.chunk_size = scale, backend, chunk_size


def _backward(ctx, do, dstate):
    q, k, v, g, beta, initial_state, cu_seqlens = ctx.saved_tensors
    if dstate is None:
        dstate = torch.zeros(
            (_num_states(q, initial_state, cu_seqlens), q.shape[2], q.shape[3], v.shape[-1]),
            dtype=_final_state_dtype(v, ctx.backend),
            device=q.device,
        )
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, dh0 = _kda_chunk_backward(
        q,
        k,
        v,
        g,
        beta,
        ctx.scale,
        initial_state,
        cu_seqlens,
        ctx.backend,
        ctx.chunk_size,
        do,
        dstate,
    )
    return (
        dq,
        dk,
        dv,
        dg,
        dbeta,
        None,
        (dh0 if initial_state is not None else None),
        None,
        None,
        None,
    )


_kda_chunk.register_autograd(_backward, setup_context=_setup_context)


def kda_chunk_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    backend: str,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """:func:`kimi_linear.ops.backend.kda_chunked` as one ``torch.library`` op (same arguments
    and results; ``backend`` is a concrete or ``"auto"`` name).  Differentiable with respect to
    q, k, v, g, beta and ``initial_state``; used by ``kda_chunked`` inside ``torch.compile``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name (str), got {type(backend).__name__}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # Every tensor crosses the op contiguous and every output is contiguous (real and fake
    # implementations alike), so the layout inductor picks for its buffers never matters.
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o, state = _kda_chunk(
        q, k, v, g, beta, float(scale), initial_state, cu_seqlens, backend, int(chunk_size)
    )
    return o, (state if output_final_state else None)


# ------------------------------------------------------------------------- MoE experts
# The routed experts' dispatch is data-dependent (tokens per expert decide the slice sizes), so
# Dynamo cannot trace it without a graph break.  Inside torch.compile, GroupedExperts calls
# this op instead: the real implementation runs the module's own eager forward on the given
# weights (through a weight-less meta template, so no module has to be looked up), the fake
# one only states the output's shape, ``[N, D]`` in x's dtype.


@functools.cache
def _experts_template(
    num_experts: int, hidden_size: int, intermediate_size: int, dispatch: str
) -> torch.nn.Module:
    from kimi_linear.layers.moe import GroupedExperts

    with torch.device("meta"):
        module = GroupedExperts(num_experts, hidden_size, intermediate_size)
    module.dispatch = dispatch
    return module


def _experts_eager(x, topk_idx, topk_weight, w1, w2, w3, dispatch: str) -> Tensor:
    E, I, D = w1.shape
    template = _experts_template(E, D, I, dispatch)
    return torch.func.functional_call(
        template, {"w1": w1, "w2": w2, "w3": w3}, (x, topk_idx, topk_weight)
    )


@torch.library.custom_op("kimi_linear::moe_experts", mutates_args=())
def _moe_experts(
    x: Tensor,
    topk_idx: Tensor,
    topk_weight: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    dispatch: str,
) -> Tensor:
    with torch.no_grad():
        return _experts_eager(x, topk_idx, topk_weight, w1, w2, w3, dispatch).contiguous()


@_moe_experts.register_fake
def _moe_experts_fake(x, topk_idx, topk_weight, w1, w2, w3, dispatch):
    return x.new_empty(x.shape)


@torch.library.custom_op("kimi_linear::moe_experts_backward", mutates_args=())
def _moe_experts_backward(
    x: Tensor,
    topk_idx: Tensor,
    topk_weight: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    dispatch: str,
    dout: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = [t.detach().requires_grad_(True) for t in (x, topk_weight, w1, w2, w3)]
    with _autograd_inside_op():
        xi, wi, w1i, w2i, w3i = inputs
        out = _experts_eager(xi, topk_idx, wi, w1i, w2i, w3i, dispatch)
        grads = torch.autograd.grad(out, inputs, dout, allow_unused=True, materialize_grads=True)
    return tuple(g.contiguous() for g in grads)


@_moe_experts_backward.register_fake
def _moe_experts_backward_fake(x, topk_idx, topk_weight, w1, w2, w3, dispatch, dout):
    return tuple(t.new_empty(t.shape) for t in (x, topk_weight, w1, w2, w3))


def _experts_setup_context(ctx, inputs, output) -> None:
    x, topk_idx, topk_weight, w1, w2, w3, dispatch = inputs
    ctx.save_for_backward(x, topk_idx, topk_weight, w1, w2, w3)
    ctx.dispatch = dispatch


def _experts_backward(ctx, dout):
    x, topk_idx, topk_weight, w1, w2, w3 = ctx.saved_tensors
    dx, dw, dw1, dw2, dw3 = _moe_experts_backward(
        x, topk_idx, topk_weight, w1, w2, w3, ctx.dispatch, dout.contiguous()
    )
    return dx, None, dw, dw1, dw2, dw3, None


_moe_experts.register_autograd(_experts_backward, setup_context=_experts_setup_context)


def grouped_experts_op(
    module: torch.nn.Module, x: Tensor, topk_idx: Tensor, topk_weight: Tensor
) -> Tensor:
    """``module(x, topk_idx, topk_weight)`` for a :class:`~kimi_linear.layers.moe.GroupedExperts`
    as one ``torch.library`` op (``[N, D]`` tokens, ``[N, k]`` expert ids and fp32 weights ->
    ``[N, D]``); differentiable in x, topk_weight and the expert weights.  Used by
    ``GroupedExperts.forward`` inside ``torch.compile``."""
    x, topk_idx, topk_weight = (t.contiguous() for t in (x, topk_idx, topk_weight))
    return _moe_experts(
        x, topk_idx, topk_weight, module.w1, module.w2, module.w3, str(module.dispatch)
    )
