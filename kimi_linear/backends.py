"""KDA backend dispatch: resolves ``auto``, routes every KDA call, wraps it for ``torch.compile``.

One job: dispatching KDA to a backend (the only module of the kit that imports
:mod:`kimi_linear.kernels` or ``fla``), the ``torch.compile`` custom op included, since it wraps
the dispatcher.

Backends (:data:`kimi_linear.ops.options.KDA_BACKENDS`, the values of
``KimiLinearConfig.kda_backend``):

* ``"torch"``: pure PyTorch, :func:`kimi_linear.ops.torch_chunk_kda` (chunked,
  differentiable) and :func:`kimi_linear.ops.naive_kda_step` /
  :func:`kimi_linear.ops.naive_recurrent_kda` (decode).
  Any device, float64 included.
* ``"triton"``: our Triton kernels, :func:`kimi_linear.kernels.chunk_kda` and
  :func:`kimi_linear.kernels.fused_recurrent_kda`. CUDA, or CPU under ``TRITON_INTERPRET=1``
  (slow; tests).
* ``"fla"``: flash-linear-attention's ``fla.ops.kda.chunk_kda`` / ``fused_recurrent_kda``
  (CUDA only; fla is a dependency of the kit).
* ``"auto"``: ``"torch"`` off CUDA. On CUDA, ``"triton"`` only where the GPU architecture is in
  :data:`VALIDATED_TRITON_ARCHS` (our kernels have passed the GPU suite there), ``"fla"``
  everywhere else: a CUDA user is never the first to run unvalidated kernels. ``"triton"``
  selects ours explicitly.

A backend name is validated where it enters (the config, a layer's ``backend`` attribute, or a
name passed to a function here), by :func:`kimi_linear.ops.options.check_kda_backend`, and
resolved to a concrete backend per device by :func:`resolve_kda_backend` (the name) /
:func:`get_kda_backend` (name and operators, imported once). The two entry points take a name or
a resolved :class:`KDABackend` (what the layers pass: no name lookup per call):

* :func:`dispatch_chunk_kda`: training and prefill (any ``T``, differentiable);
* :func:`dispatch_decode_kda`: token by token for decoding (forward-only kernels when no
  gradient is needed; the differentiable path otherwise).

Inside ``torch.compile``, :func:`dispatch_chunk_kda` calls :func:`chunk_kda_custom_op`
(``torch.ops.kimi_linear.chunk_kda``), one opaque node with a fake implementation and a
recomputing backward.

Both accept packed sequences (``cu_seqlens``: ``[N + 1]`` int32 offsets with ``B == 1``) and
an initial / final state ``[N, H, K, V]`` on every backend.

:func:`dispatch_chunk_kda` also takes ``gate_lower_bound``: the caller's promise that every ``g`` is at
least that bound (the safe gate, ``KimiLinearConfig.kda_gate_lower_bound``, in ``[-5, 0)``).
It changes no result, only the path: our Triton kernels and fla's (``safe_gate=True``) then form
the diagonal 16-token sub-chunk factors by tensor-core products instead of pair by pair; the
torch backend is exact for any ``g`` and needs no fast path (it validates the argument and
otherwise ignores it). With ``KIMI_LINEAR_CHECK_GATE=1`` every backend verifies the promise
(:func:`kimi_linear.ops.checks.check_gate_lower_bound`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kimi_linear.errors import import_failure
from kimi_linear.ops.autograd import autograd_inside_op
from kimi_linear.ops.checks import (
    check_gate_lower_bound,
    check_kda_inputs,
    check_log_decay,
    check_scale,
    compute_dtype,
)
from kimi_linear.ops.chunk import torch_chunk_kda
from kimi_linear.ops.isolation import isolate_nonfinite, isolation_enabled
from kimi_linear.ops.naive import naive_kda_step, naive_recurrent_kda
from kimi_linear.ops.options import check_kda_backend, check_safe_gate_bound, gate_check_enabled
from kimi_linear.ops.serving import kda_pool_recurrent

__all__ = [
    "VALIDATED_TRITON_ARCHS",
    "KDABackend",
    "chunk_kda_custom_op",
    "dispatch_chunk_kda",
    "dispatch_decode_kda",
    "get_kda_backend",
    "resolve_kda_backend",
]

#: CUDA compute capabilities ``(major, minor)`` on which ``auto`` picks our Triton kernels.
#: Empty: filled by the change that records a passing GPU suite on that architecture (e.g.
#: ``(9, 0)`` for H100 / H200), together with the suite's results. Until then ``auto`` runs
#: fla's kernels on every GPU.
VALIDATED_TRITON_ARCHS: frozenset[tuple[int, int]] = frozenset()

KDAOp = Callable[..., "tuple[Tensor, Tensor | None]"]


@dataclass(frozen=True)
class KDABackend:
    """A concrete backend: its name and its two operators.

    Attributes:
        name: ``"torch"``, ``"triton"`` or ``"fla"``.
        chunk: the chunked, differentiable operator (``cu_seqlens`` keyword supported).
        recurrent: the token-by-token decode operator; forward-only for ``triton`` / ``fla``.
    """

    name: str
    chunk: KDAOp
    recurrent: KDAOp


@functools.cache
def _torch_backend() -> KDABackend:
    return KDABackend("torch", torch_chunk_kda, naive_recurrent_kda)


@functools.cache
def _triton_backend() -> KDABackend:
    try:
        from kimi_linear.kernels import chunk_kda, fused_recurrent_kda
    except ImportError as e:  # triton missing or broken
        why = import_failure(e, "kimi_linear.kernels", "pip install triton", ("triton",))
        raise ValueError(
            f"kda_backend='triton' needs kimi_linear.kernels (Triton): {why}; use "
            "kda_backend='torch' or 'fla'"
        ) from e
    return KDABackend("triton", chunk_kda, fused_recurrent_kda)


@functools.cache
def _fla_backend() -> KDABackend:
    try:
        from fla.ops.kda import chunk_kda, fused_recurrent_kda
    except ImportError as e:
        why = import_failure(e, "fla.ops.kda", "pip install flash-linear-attention")
        raise ValueError(
            f"kda_backend='fla' (also what 'auto' picks on CUDA) needs fla.ops.kda: {why}; or "
            "set kda_backend='triton' (our kernels) or 'torch'"
        ) from e
    return KDABackend("fla", chunk_kda, fused_recurrent_kda)


@functools.cache
def _cuda_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def resolve_kda_backend(backend: str | KDABackend, device: torch.device | str) -> str:
    """The concrete backend name (``"torch"``, ``"triton"`` or ``"fla"``) for inputs on
    ``device``: ``auto`` becomes ``torch`` off CUDA; on CUDA ``triton`` if the device's compute
    capability is in :data:`VALIDATED_TRITON_ARCHS`, else ``fla``.

    Raises:
        ValueError: an unknown name, or a backend that cannot run on ``device`` (``fla`` off
            CUDA; ``triton`` on CPU without ``TRITON_INTERPRET=1``).
    """
    if isinstance(backend, KDABackend):
        return backend.name
    name = check_kda_backend(backend)
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":
            return "torch"
        return "triton" if _cuda_capability(device.index) in VALIDATED_TRITON_ARCHS else "fla"
    if name == "fla" and device.type != "cuda":
        raise ValueError(
            f"kda_backend='fla' runs fla's Triton kernels and needs CUDA inputs, got device "
            f"{device.type!r}; use kda_backend='torch' (or 'auto') off CUDA"
        )
    if (
        name == "triton"
        and device.type != "cuda"
        and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    ):
        raise ValueError(
            f"kda_backend='triton' needs CUDA inputs (got device {device.type!r}) or CPU inputs "
            "under the Triton interpreter (set TRITON_INTERPRET=1 before importing triton); "
            "use 'torch' off CUDA"
        )
    return name


def get_kda_backend(backend: str | KDABackend, device: torch.device | str) -> KDABackend:
    """The :class:`KDABackend` (name and operators) that :func:`resolve_kda_backend` picks for
    ``device``; a :class:`KDABackend` passes through. Imports happen once (cached).

    Raises:
        ValueError: as :func:`resolve_kda_backend`, or the backend's package is missing.
    """
    if isinstance(backend, KDABackend):
        return backend
    name = resolve_kda_backend(backend, device)
    return {"torch": _torch_backend, "triton": _triton_backend, "fla": _fla_backend}[name]()


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _cpu_offsets(cu_seqlens_cpu: Tensor | Sequence[int] | None) -> Tensor | None:
    """Host offsets as the int64 CPU tensor fla's and our kernels' ``cu_seqlens_cpu`` is."""
    if cu_seqlens_cpu is None or isinstance(cu_seqlens_cpu, Tensor):
        return cu_seqlens_cpu
    return torch.tensor(cu_seqlens_cpu, dtype=torch.int64)


def _fla_inputs(
    q, k, v, g, beta, scale, initial_state, cu_seqlens, gate_lower_bound=None, cu_seqlens_cpu=None
) -> Tensor | None:
    """Our input checks (fla's own differ), and the opt-in gate checks, before fla's kernels;
    returns ``cu_seqlens`` as the int64 tensor fla takes."""
    if isinstance(q, Tensor) and isinstance(v, Tensor) and q.dim() == v.dim() == 4:
        if q.shape[2] != v.shape[2]:
            raise ValueError(
                f"kda_backend='fla' with GVA (num_v_heads HV={v.shape[2]} != num_heads "
                f"H={q.shape[2]}) is not supported through the dispatcher (not validated against "
                "fla); use kda_backend='torch' or 'triton'"
            )
    check_kda_inputs(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu
    )
    if gate_check_enabled():
        check_log_decay(g)
        if gate_lower_bound is not None:
            check_gate_lower_bound(g, gate_lower_bound)
    return None if cu_seqlens is None else cu_seqlens.long()


def dispatch_chunk_kda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    backend: str | KDABackend = "auto",
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    gate_lower_bound: float | None = None,
    return_intermediate_states: bool = False,
    cu_seqlens_cpu: Tensor | Sequence[int] | None = None,
) -> tuple[Tensor, ...]:
    """Kimi Delta Attention over whole blocks of tokens (training, prefill): one entry point for
    every backend; differentiable.

    Args:
        q, k: ``[B, T, H, K]`` L2-normalised queries and keys.
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H, K]`` log decay in ``[-inf, 0]``.
        beta: ``[B, T, H]`` delta-rule step sizes.
        backend: a name of :data:`kimi_linear.ops.options.KDA_BACKENDS` (validated, resolved
            for q's device) or a resolved :class:`KDABackend`.
        scale: factor on q, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` state before the first token (``N = B``, or the number
            of sequences with ``cu_seqlens``).
        output_final_state: also return the ``[N, H, K, V]`` float32 state after the last token
            (float64 for float64 inputs on the torch backend).
        cu_seqlens: ``[N + 1]`` int32 (or int64) offsets of sequences packed along T
            (``B == 1``); each sequence runs as if alone, from its own initial-state row.
        chunk_size: chunk length of the torch backend (the kernels use a fixed 64).
        gate_lower_bound: ``None``, or the promise that every ``g >= gate_lower_bound`` (a
            number in ``[-5, 0)``: the safe gate's bound). Selects the tensor-core fast path of
            the ``triton`` backend (and fla's ``safe_gate``); same results. The torch backend
            needs no fast path and ignores it (after validating it), as does the
            ``torch.compile`` custom op (the exact path). A broken promise is caught only with
            ``KIMI_LINEAR_CHECK_GATE=1`` (else the kernels' result is undefined).
        return_intermediate_states: also return the state at every chunk start (prefix
            caching; fla's flag): ``h [B, NT, H, K, V]``, ``h[:, i]`` the state after
            ``i * chunk_size`` tokens, ``NT = ceil(T / chunk_size)`` (packed: ``[1, NT, ...]``,
            sequence after sequence). No gradient flows through ``h``. The torch backend
            returns them in the compute dtype (fp32; float64 inputs: float64); triton and fla
            in q's dtype and only under ``torch.inference_mode()`` (fla's rule), triton only
            with ``chunk_size=64`` (its kernels' chunk length). Not under ``torch.compile``.
        cu_seqlens_cpu: the offsets of ``cu_seqlens`` on the host (ints, or a CPU tensor as
            fla takes them), when the caller has them: no backend then reads them back from the
            device (the model checks ``cu_seqlens`` once per forward and hands these down,
            :class:`kimi_linear.packing.PackedDocuments`). Must equal ``cu_seqlens``. Ignored
            inside ``torch.compile`` (the custom op reads the device tensor).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state or None)``, and ``h`` third with
        ``return_intermediate_states``.

    Raises:
        ValueError: bad backend (see :func:`resolve_kda_backend`) or inputs (the backend's own
            checks; ``g > 0`` on the torch backend always, on the others with
            ``KIMI_LINEAR_CHECK_GATE=1``), a ``gate_lower_bound`` outside ``[-5, 0)``, or (with
            ``KIMI_LINEAR_CHECK_GATE=1``) a ``g`` below it.

    NaN / inf inputs are never an error: on every backend a poisoned token changes only the
    outputs of its own sequence and head from that token on (:mod:`kimi_linear.ops.isolation`).
    """
    gate_lower_bound = check_safe_gate_bound(gate_lower_bound)
    scale = check_scale(scale)
    if return_intermediate_states:
        return _chunked_with_states(
            q,
            k,
            v,
            g,
            beta,
            backend=backend,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            chunk_size=chunk_size,
            gate_lower_bound=gate_lower_bound,
            cu_seqlens_cpu=cu_seqlens_cpu,
        )
    if torch.compiler.is_compiling():  # one opaque node for torch.compile
        return chunk_kda_custom_op(
            q,
            k,
            v,
            g,
            beta,
            backend=backend.name if isinstance(backend, KDABackend) else backend,
            scale=scale,
            initial_state=initial_state,
            output_final_state=output_final_state,
            cu_seqlens=cu_seqlens,
            chunk_size=chunk_size,
        )
    ops = get_kda_backend(backend, q.device)
    # only the torch backend takes a chunk size (the kernels use a fixed 64); the bound selects
    # the kernels' fast path (the torch path is exact for any g and only checks the promise)
    extra: dict[str, object] = {}
    if cu_seqlens is not None and cu_seqlens_cpu is not None:
        extra["cu_seqlens_cpu"] = (
            cu_seqlens_cpu if ops.name == "torch" else _cpu_offsets(cu_seqlens_cpu)
        )
    if ops.name == "torch":
        extra["chunk_size"] = chunk_size
        if gate_lower_bound is not None and gate_check_enabled():
            check_gate_lower_bound(g, gate_lower_bound)
    elif gate_lower_bound is not None and ops.name == "triton":
        extra["gate_lower_bound"] = gate_lower_bound
    elif gate_lower_bound is not None:  # fla: its own safe-gate path
        extra.update(safe_gate=True, lower_bound=gate_lower_bound)
    if ops.name == "fla":
        cu_seqlens = _fla_inputs(
            q, k, v, g, beta, scale, initial_state, cu_seqlens, gate_lower_bound, cu_seqlens_cpu
        )
        if isolation_enabled():  # fla's chunked kernels leak NaN as ours did; no sync here
            run = functools.partial(
                ops.chunk,
                scale=scale,
                initial_state=initial_state,
                output_final_state=output_final_state,
                cu_seqlens=cu_seqlens,
                **extra,
            )
            return isolate_nonfinite(run, q, k, v, g, beta, cu_seqlens)
    return ops.chunk(
        q,
        k,
        v,
        g,
        beta,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        **extra,
    )


def _chunked_with_states(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    backend: str | KDABackend,
    scale: float | None,
    initial_state: Tensor | None,
    output_final_state: bool,
    cu_seqlens: Tensor | None,
    chunk_size: int,
    gate_lower_bound: float | None,
    cu_seqlens_cpu: Tensor | Sequence[int] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`dispatch_chunk_kda` with ``return_intermediate_states=True``."""
    if torch.compiler.is_compiling():
        raise ValueError(
            "return_intermediate_states is not available under torch.compile (the custom op "
            "returns (o, final_state)); call dispatch_chunk_kda eagerly for prefix caching"
        )
    ops = get_kda_backend(backend, q.device)
    if ops.name != "torch" and not torch.is_inference_mode_enabled():
        raise ValueError(
            f"return_intermediate_states on kda_backend={ops.name!r} needs "
            "torch.inference_mode() (fla's rule); the torch backend has no such restriction"
        )
    if ops.name == "triton" and chunk_size != 64:
        raise ValueError(
            "return_intermediate_states on kda_backend='triton' needs chunk_size=64 (the "
            f"kernels' chunk length: their states lie on 64-token boundaries), got {chunk_size}"
        )
    kwargs = dict(
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens,
        return_intermediate_states=True,
    )
    if ops.name == "torch":
        if gate_lower_bound is not None and gate_check_enabled():
            check_gate_lower_bound(g, gate_lower_bound)
        return ops.chunk(
            q, k, v, g, beta, chunk_size=chunk_size, cu_seqlens_cpu=cu_seqlens_cpu, **kwargs
        )
    if ops.name == "triton":
        if cu_seqlens is not None and cu_seqlens_cpu is not None:
            kwargs["cu_seqlens_cpu"] = _cpu_offsets(cu_seqlens_cpu)
        return ops.chunk(q, k, v, g, beta, gate_lower_bound=gate_lower_bound, **kwargs)
    kwargs["cu_seqlens"] = _fla_inputs(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, gate_lower_bound, cu_seqlens_cpu
    )
    if cu_seqlens is not None and cu_seqlens_cpu is not None:
        kwargs["cu_seqlens_cpu"] = _cpu_offsets(cu_seqlens_cpu)
    if chunk_size != 64:
        kwargs["chunk_size"] = chunk_size  # fla accepts 32 or 64 (its own error otherwise)
    if gate_lower_bound is not None:
        kwargs.update(safe_gate=True, lower_bound=gate_lower_bound)
    return ops.chunk(q, k, v, g, beta, **kwargs)


def dispatch_decode_kda(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    backend: str | KDABackend = "auto",
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: Tensor | None = None,
    inplace_state: bool = False,
    ssm_state_indices: Tensor | None = None,
    num_accepted_tokens: Tensor | None = None,
    inplace_final_state: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Kimi Delta Attention token by token (decoding): one entry point for every backend.

    Layout and arguments as :func:`dispatch_chunk_kda` (typically ``T == 1``, or packed single tokens
    with ``cu_seqlens = [0, 1, ..., N]``; any lengths work). Without gradients the ``triton`` /
    ``fla`` backends run their fused recurrent kernel (forward-only, one launch); when a
    gradient is needed (an input or the state requires grad under grad mode) they run their
    chunked kernel instead, so the call stays differentiable. The torch backend runs
    :func:`kimi_linear.ops.naive_kda_step` (one token per sequence) or
    :func:`kimi_linear.ops.naive_recurrent_kda`.

    Args:
        inplace_state: allow the backend to write the new state over ``initial_state`` (our
            Triton kernel does when it is a contiguous float32 tensor and no gradient is
            needed: no state allocation per step). Use the returned state either way, and do
            not rely on ``initial_state`` keeping its old value.
        ssm_state_indices, num_accepted_tokens, inplace_final_state: serving with a state
            pool (``initial_state [num_slots, H, K, V]``, updated in place; vLLM's convention,
            :mod:`kimi_linear.ops.serving`): each sequence's slot(s), the accepted draft count
            of speculative decoding, and ``False`` to get every token's state back instead of
            writing the pool. The ``triton`` backend runs its kernel, ``torch``
            :func:`kimi_linear.ops.serving.kda_pool_recurrent`; ``fla`` is refused (its public
            ``fused_recurrent_kda`` takes no slots). Forward only.

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state or None)``; with ``ssm_state_indices``,
        ``(o, pool)`` (or ``(o, per-token states)`` with ``inplace_final_state=False``).
    """
    scale = check_scale(scale)
    ops = get_kda_backend(backend, q.device)
    if ssm_state_indices is not None or num_accepted_tokens is not None:
        serving = dict(
            scale=scale,
            initial_state=initial_state,
            cu_seqlens=cu_seqlens,
            ssm_state_indices=ssm_state_indices,
            num_accepted_tokens=num_accepted_tokens,
            inplace_final_state=inplace_final_state,
        )
        if ops.name == "fla":
            raise ValueError(
                "ssm_state_indices / num_accepted_tokens (a state pool) need kda_backend="
                "'triton' or 'torch': fla's public fused_recurrent_kda takes no state slots"
            )
        if _needs_grad(q, k, v, g, beta):
            raise ValueError(
                "decoding with a state pool is forward-only: run it under torch.no_grad()"
            )
        if ops.name == "torch":
            return kda_pool_recurrent(q, k, v, g, beta, **serving)
        return ops.recurrent(q, k, v, g, beta, **serving)
    if inplace_final_state is not None:
        raise ValueError(
            "inplace_final_state applies to a state pool (ssm_state_indices); for a dense state "
            "use inplace_state"
        )
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state)
    if ops.name == "torch":
        one_token_each = (
            q.shape[1] == 1
            if cu_seqlens is None
            else (
                cu_seqlens.device.type != "meta"
                and cu_seqlens.tolist() == list(range(q.shape[1] + 1))
            )
        )
        if one_token_each:
            return naive_kda_step(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kwargs)
        return naive_recurrent_kda(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kwargs)
    if _needs_grad(q, k, v, g, beta, initial_state):
        return dispatch_chunk_kda(q, k, v, g, beta, backend=ops, cu_seqlens=cu_seqlens, **kwargs)
    if ops.name == "fla":
        cu_seqlens = _fla_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if (
        ops.name == "triton"
        and inplace_state
        and initial_state is not None
        and initial_state.dtype == torch.float32
        and initial_state.is_contiguous()
    ):
        return ops.recurrent(q, k, v, g, beta, cu_seqlens=cu_seqlens, inplace_state=True, **kwargs)
    return ops.recurrent(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kwargs)


# ---------------------------------------------------------------- torch.compile custom op
# Inside a compiled region Dynamo cannot trace into a Triton launch wrapped in an
# autograd.Function with Python-side checks, nor through the data-dependent checks of the torch
# path; either would break the graph in the middle of a decoder layer. Shapes: q, k, g
# [B, T, H, K], v [B, T, H, V], beta [B, T, H], state [N, H, K, V].


def _final_state_dtype(v: Tensor, backend: str) -> torch.dtype:
    """The final state's dtype: the torch backend's compute dtype, float32 for the kernels
    (``backend`` is resolved first: ``"auto"`` runs the torch backend off CUDA)."""
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
    o, state = dispatch_chunk_kda(
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


@torch.library.custom_op("kimi_linear::chunk_kda", mutates_args=())
def _chunk_kda(
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


@_chunk_kda.register_fake
def _chunk_kda_fake(q, k, v, g, beta, scale, initial_state, cu_seqlens, backend, chunk_size):
    K, HV = q.shape[3], v.shape[2]  # the state is on the value heads (GVA: HV = G * H)
    N = _num_states(q, initial_state, cu_seqlens)
    o = v.new_empty(v.shape)
    state = q.new_empty((N, HV, K, v.shape[-1]), dtype=_final_state_dtype(v, backend))
    return o, state


@torch.library.custom_op("kimi_linear::chunk_kda_backward", mutates_args=())
def _chunk_kda_backward(
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
    with autograd_inside_op():
        o, state = _run(*inputs, scale, h0, cu_seqlens, backend, chunk_size)
        wrt = inputs + ([h0] if h0 is not None else [])
        grads = torch.autograd.grad(
            (o, state), wrt, (do, dstate), allow_unused=True, materialize_grads=True
        )
    # contiguous gradients, as the fake implementation says
    dh0 = grads[5].contiguous() if initial_state is not None else q.new_empty(0)
    return (*(d.contiguous() for d in grads[:5]), dh0)


@_chunk_kda_backward.register_fake
def _chunk_kda_backward_fake(
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
            (_num_states(q, initial_state, cu_seqlens), v.shape[2], q.shape[3], v.shape[-1]),
            dtype=_final_state_dtype(v, ctx.backend),
            device=q.device,
        )
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dbeta, dh0 = _chunk_kda_backward(
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


_chunk_kda.register_autograd(_backward, setup_context=_setup_context)


def chunk_kda_custom_op(
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
    """:func:`dispatch_chunk_kda` as one ``torch.library`` op, ``torch.ops.kimi_linear.chunk_kda``
    (same arguments and results; ``backend`` is a concrete or ``"auto"`` name).  Differentiable
    with respect to q, k, v, g, beta and ``initial_state`` (its backward,
    ``torch.ops.kimi_linear.chunk_kda_backward``, recomputes the forward with autograd on: one
    extra forward per backward, as activation checkpointing does); each op has a fake (meta)
    implementation, so ``torch.compile`` / ``FakeTensor`` tracing never runs a kernel. Used by
    :func:`dispatch_chunk_kda` inside ``torch.compile``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name (str), got {type(backend).__name__}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # Every tensor crosses the op contiguous and every output is contiguous (real and fake
    # implementations alike), so the layout inductor picks for its buffers never matters.
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    o, state = _chunk_kda(
        q, k, v, g, beta, float(scale), initial_state, cu_seqlens, backend, int(chunk_size)
    )
    return o, (state if output_final_state else None)
