"""KDA backend dispatch: the one place that names the backends, resolves ``auto`` and routes calls.

Backends (:data:`KDA_BACKENDS`, the values of ``KimiLinearConfig.kda_backend``):

* ``"torch"``: pure PyTorch, :func:`kimi_linear.ops.kda_chunk` (chunked, differentiable) and
  :func:`kimi_linear.ops.kda_decode_step` / :func:`kimi_linear.ops.kda_recurrent` (decode).
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

A backend name is validated once when the config (or a layer's ``backend`` attribute) is set,
and resolved to a concrete backend per device by :func:`resolve_kda_backend` (the name) /
:func:`get_kda_backend` (name and operators, imported once). The two entry points take a name or
a :class:`KDABackend`:

* :func:`kda_chunked`: training and prefill (any ``T``, differentiable);
* :func:`kda_decode`: token by token for decoding (forward-only kernels when no gradient is
  needed; the differentiable path otherwise).

Both accept packed sequences (``cu_seqlens``: ``[N + 1]`` int32 offsets with ``B == 1``) and
an initial / final state ``[N, H, K, V]`` on every backend.

:func:`kda_chunked` also takes ``gate_lower_bound``: the caller's promise that every ``g`` is at
least that bound (the safe gate, ``KimiLinearConfig.kda_gate_lower_bound``, in ``[-5, 0)``).
It changes no result, only the path: our Triton kernels and fla's (``safe_gate=True``) then form
the diagonal 16-token sub-chunk factors by tensor-core products instead of pair by pair; the
torch backend is exact for any ``g`` and needs no fast path (it validates the argument and
otherwise ignores it). With ``KIMI_LINEAR_CHECK_GATE=1`` every backend verifies the promise
(:func:`check_gate_lower_bound`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kimi_linear.errors import did_you_mean, import_failure

# This module is imported by kimi_linear.config, which must stay importable without torch (the
# command line loads it first): torch and the operators are imported where they are used.
if TYPE_CHECKING:
    import torch

__all__ = [
    "KDA_BACKENDS",
    "VALIDATED_TRITON_ARCHS",
    "KDABackend",
    "check_gate_lower_bound",
    "check_kda_backend",
    "check_safe_gate_argument",
    "gate_check_enabled",
    "get_kda_backend",
    "kda_chunked",
    "kda_decode",
    "resolve_kda_backend",
]

#: Every accepted ``kda_backend`` name (``"auto"`` first, then the concrete backends).
KDA_BACKENDS = ("auto", "torch", "triton", "fla")

#: CUDA compute capabilities ``(major, minor)`` on which ``auto`` picks our Triton kernels.
#: Empty: filled by the change that records a passing GPU suite on that architecture (e.g.
#: ``(9, 0)`` for H100 / H200), together with the suite's results. Until then ``auto`` runs
#: fla's kernels on every GPU.
VALIDATED_TRITON_ARCHS: frozenset[tuple[int, int]] = frozenset()

#: Environment variable that turns on the (device-syncing) ``g <= 0`` check in the Triton and
#: fla paths; the torch ops always check.
GATE_CHECK_ENV = "KIMI_LINEAR_CHECK_GATE"

KDAOp = Callable[..., "tuple[torch.Tensor, torch.Tensor | None]"]


def gate_check_enabled() -> bool:
    """True when ``KIMI_LINEAR_CHECK_GATE=1``: the GPU paths then refuse ``g > 0``
    with ``ValueError``, at the cost of one reduction and a device synchronisation per call."""
    return os.environ.get(GATE_CHECK_ENV, "0") == "1"


def check_safe_gate_argument(
    lower_bound: object, argument: str = "gate_lower_bound"
) -> float | None:
    """``None``, or ``lower_bound`` as a float when it lies in the safe gate's range
    ``[-5, 0)`` (:data:`kimi_linear.config.SAFE_GATE_LOWER_BOUND_RANGE`); else ``ValueError``
    naming ``argument``. The range is what the kernels' fast path needs: 15 steps of at least
    -5 keep the split factors of a 16-token sub-chunk within ``e^75`` (finite in fp32 / bf16)."""
    from kimi_linear.config import SAFE_GATE_LOWER_BOUND_RANGE  # (config imports this module)

    if lower_bound is None:
        return None
    lo, hi = SAFE_GATE_LOWER_BOUND_RANGE
    if (
        isinstance(lower_bound, bool)
        or not isinstance(lower_bound, (int, float))
        or not (lo <= lower_bound < hi)
    ):
        raise ValueError(
            f"{argument} must be None or a number in [{lo}, {hi}) (the safe gate's lower bound "
            f"on g), got {lower_bound!r}"
        )
    return float(lower_bound)


def check_gate_lower_bound(g: torch.Tensor, lower_bound: float, name: str = "g") -> None:
    """Raise ``ValueError`` unless every value of ``g`` is at least ``lower_bound`` (NaN passes:
    the ops isolate it as a poisoned token),
    up to the rounding of ``g``'s dtype (a bound of ``lower_bound * (1 + eps)``: a safe-gate
    value rounded to bf16 may land half an ulp below a bound that bf16 cannot represent).

    The check behind ``KIMI_LINEAR_CHECK_GATE=1`` for ``gate_lower_bound``: one reduction (a
    device sync on CUDA); skipped for tensors without data (meta) and under ``torch.compile``.
    """
    import torch

    if g.device.type == "meta" or g.numel() == 0 or torch.compiler.is_compiling():
        return
    eps = torch.finfo(g.dtype).eps if g.dtype.is_floating_point else 0.0
    bound = lower_bound * (1.0 + eps)
    if not bool(g.min() >= bound):  # min propagates NaN: then look closer
        bad = g[g < bound]  # NaN is a poisoned token, isolated by the ops (not a broken promise)
        if bad.numel():
            raise ValueError(
                f"{name} must be >= gate_lower_bound={lower_bound} everywhere (the safe gate's "
                f"promise, which selects the kernels' fast path); found {bad.numel()} value(s) "
                f"below it, e.g. {bad.flatten()[0].item()!r}. Pass gate_lower_bound=None for an "
                "unbounded gate"
            )


def check_kda_backend(name: object, argument: str = "kda_backend") -> str:
    """Return ``name`` if it is one of :data:`KDA_BACKENDS`; else raise ``ValueError`` naming
    ``argument``, the accepted names and the closest match."""
    if isinstance(name, str) and name in KDA_BACKENDS:
        return name
    hint = did_you_mean(name, KDA_BACKENDS)
    raise ValueError(f"{argument} must be one of {KDA_BACKENDS}, got {name!r}{hint}")


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
    from kimi_linear.ops.chunk import kda_chunk
    from kimi_linear.ops.naive import kda_recurrent

    return KDABackend("torch", kda_chunk, kda_recurrent)


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
    import torch

    return torch.cuda.get_device_capability(index)


def resolve_kda_backend(backend: str | KDABackend, device: torch.device | str) -> str:
    """The concrete backend name (``"torch"``, ``"triton"`` or ``"fla"``) for inputs on
    ``device``: ``auto`` becomes ``torch`` off CUDA; on CUDA ``triton`` if the device's compute
    capability is in :data:`VALIDATED_TRITON_ARCHS`, else ``fla``.

    Raises:
        ValueError: an unknown name, or a backend that cannot run on ``device`` (``fla`` off
            CUDA; ``triton`` on CPU without ``TRITON_INTERPRET=1``).
    """
    import torch

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


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    import torch

    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _fla_inputs(
    q, k, v, g, beta, scale, initial_state, cu_seqlens, gate_lower_bound=None
) -> torch.Tensor | None:
    """Our input checks (fla's own differ), and the opt-in gate checks, before fla's kernels;
    returns ``cu_seqlens`` as the int64 tensor fla takes."""
    from kimi_linear.ops.checks import check_kda_inputs, check_log_decay

    check_kda_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    if gate_check_enabled():
        check_log_decay(g)
        if gate_lower_bound is not None:
            check_gate_lower_bound(g, gate_lower_bound)
    return None if cu_seqlens is None else cu_seqlens.long()


def kda_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    backend: str | KDABackend = "auto",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
    gate_lower_bound: float | None = None,
    return_intermediate_states: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Kimi Delta Attention over whole blocks of tokens (training, prefill): one entry point for
    every backend; differentiable.

    Args:
        q, k: ``[B, T, H, K]`` L2-normalised queries and keys.
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H, K]`` log decay in ``[-inf, 0]``.
        beta: ``[B, T, H]`` delta-rule step sizes.
        backend: a name of :data:`KDA_BACKENDS` (resolved for q's device) or a
            :class:`KDABackend`.
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
            returns them in the compute dtype (fp32; float64 inputs: float64), fla in its own
            dtype and only under ``torch.inference_mode()`` (fla's rule); the triton backend
            does not return them yet (``ValueError``), nor does ``torch.compile``.

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
    import torch

    from kimi_linear.ops.checks import check_scale

    gate_lower_bound = check_safe_gate_argument(gate_lower_bound)
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
        )
    if torch.compiler.is_compiling():  # one opaque node for torch.compile (ops/custom_op.py)
        from kimi_linear.ops.custom_op import kda_chunk_op

        return kda_chunk_op(
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
    if ops.name == "torch":
        extra["chunk_size"] = chunk_size
        if gate_lower_bound is not None and gate_check_enabled():
            check_gate_lower_bound(g, gate_lower_bound)
    elif gate_lower_bound is not None and ops.name == "triton":
        extra["gate_lower_bound"] = gate_lower_bound
    elif gate_lower_bound is not None:  # fla: its own safe-gate path
        extra.update(safe_gate=True, lower_bound=gate_lower_bound)
    if ops.name == "fla":
        from kimi_linear.ops.isolation import isolate_nonfinite, isolation_enabled

        cu_seqlens = _fla_inputs(
            q, k, v, g, beta, scale, initial_state, cu_seqlens, gate_lower_bound
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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    backend: str | KDABackend,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
    gate_lower_bound: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """:func:`kda_chunked` with ``return_intermediate_states=True``."""
    import torch

    if torch.compiler.is_compiling():
        raise ValueError(
            "return_intermediate_states is not available under torch.compile (the custom op "
            "returns (o, final_state)); call kda_chunked eagerly for prefix caching"
        )
    ops = get_kda_backend(backend, q.device)
    if ops.name == "triton":
        raise ValueError(
            "return_intermediate_states needs kda_backend='torch' or 'fla': our Triton chunk "
            "kernels do not return their chunk-start states yet"
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
        return ops.chunk(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)
    kwargs["cu_seqlens"] = _fla_inputs(
        q, k, v, g, beta, scale, initial_state, cu_seqlens, gate_lower_bound
    )
    if chunk_size != 64:
        kwargs["chunk_size"] = chunk_size  # fla accepts 32 or 64 (its own error otherwise)
    if gate_lower_bound is not None:
        kwargs.update(safe_gate=True, lower_bound=gate_lower_bound)
    if not torch.is_inference_mode_enabled():
        raise ValueError(
            "return_intermediate_states on kda_backend='fla' needs torch.inference_mode() "
            "(fla's rule); the torch backend has no such restriction"
        )
    return ops.chunk(q, k, v, g, beta, **kwargs)


def kda_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    backend: str | KDABackend = "auto",
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    inplace_state: bool = False,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    inplace_final_state: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention token by token (decoding): one entry point for every backend.

    Layout and arguments as :func:`kda_chunked` (typically ``T == 1``, or packed single tokens
    with ``cu_seqlens = [0, 1, ..., N]``; any lengths work). Without gradients the ``triton`` /
    ``fla`` backends run their fused recurrent kernel (forward-only, one launch); when a
    gradient is needed (an input or the state requires grad under grad mode) they run their
    chunked kernel instead, so the call stays differentiable. The torch backend runs
    :func:`kimi_linear.ops.kda_decode_step` (one token per sequence) or
    :func:`kimi_linear.ops.kda_recurrent`.

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
    import torch

    from kimi_linear.ops.checks import check_scale
    from kimi_linear.ops.naive import kda_decode_step, kda_recurrent

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
            from kimi_linear.ops.serving import kda_pool_recurrent

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
            return kda_decode_step(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kwargs)
        return kda_recurrent(q, k, v, g, beta, cu_seqlens=cu_seqlens, **kwargs)
    if _needs_grad(q, k, v, g, beta, initial_state):
        return kda_chunked(q, k, v, g, beta, backend=ops, cu_seqlens=cu_seqlens, **kwargs)
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
