"""Chunked KDA with Triton forward and backward: the training and prefill kernel.

Design (see :mod:`kimi_linear.kernels.chunk_fwd` and :mod:`kimi_linear.kernels.chunk_bwd`):
chunks of 64 tokens; the gate is cumulated within each chunk and every decay factor is formed
from a difference of cumulated gates split at a reference row, so nothing overflows however
strong the decay; the intra-chunk triangular system ``(I + Akk)`` is inverted by forward
substitution (16 x 16 diagonal blocks, then block substitution) into the UT/WY form
``W, U`` in the same kernel that forms ``Akk`` (which never leaves its registers); with
``gate_lower_bound`` (the safe gate) the diagonal sub-chunks also run as tensor-core products,
forward and backward; one sequential kernel per (sequence, head, value block) carries the
fp32 state across chunks and stores the chunk-start states, from which a parallel kernel forms
the outputs. When
gradients are needed the forward keeps the cumulative gate ``G`` (fp32) and the ``Aqk`` and
inverse ``N`` tiles (input dtype), and the backward recomputes only the decayed ``qg``, ``kg``,
``W``, ``U``, the chunk-start states and residuals (no state history
is kept between forward and backward; under ``torch.no_grad`` nothing beyond the output),
walks the chunks in reverse for the state gradient, then computes the per-chunk and pairwise
gradient terms. 16-bit inputs feed 16-bit operands to the tensor-core products (fp32
accumulation; see :mod:`kimi_linear.kernels.chunk_fwd`). Packed variable-length batches
(``cu_seqlens``) index chunks per sequence, so no chunk straddles two sequences.
"""

from __future__ import annotations

import functools

import torch

from kimi_linear.ops.checks import (
    check_gate_lower_bound,
    check_kda_heads,
    check_log_decay,
    scale_or_default,
)
from kimi_linear.ops.isolation import isolate_nonfinite, isolation_enabled, poison_chunk_starts
from kimi_linear.ops.options import (
    SAFE_GATE_LOWER_BOUND_RANGE,
    check_safe_gate_bound,
    gate_check_enabled,
)

from .chunk_bwd import chunk_kda_bwd
from .chunk_fwd import GATE_LOWER_BOUND, GATE_SOFTPLUS, InKernelGate, chunk_kda_fwd
from .fused_recurrent import _check_gate_args
from .prologue import beta_sigmoid_bwd, beta_sigmoid_fwd, l2norm_bwd, l2norm_fwd
from .split import SegmentPlan, check_segment_chunks, plan_for
from .utils import (
    CHUNK_SIZE,
    ChunkTables,
    check_kernel_inputs,
    pack,
    packed_offsets,
    resolve_state_v_first,
)

#: The chunk sizes fla's ``chunk_kda`` accepts (``chunk_size``); our kernels always run 64.
FLA_CHUNK_SIZES = (32, 64)


class ChunkKDAFunction(torch.autograd.Function):
    """Autograd wrapper over the packed kernels; inputs are packed ``[TT, H, D]`` tensors.

    With fla's flags, q and k are L2-normalised (``l2norm``), beta goes through
    ``beta_scale * sigmoid`` (``beta_scale`` not None) and ``g`` is the raw gate (``gate_kind``)
    inside the kernels; the backward chains the gradients through all three.
    """

    @staticmethod
    def forward(
        ctx,
        q,
        k,
        v,
        g,
        beta,
        A_log,
        dt_bias,
        scale,
        initial_state,
        output_final_state,
        tables: ChunkTables,
        keep: bool,
        safe_gate: bool = False,
        gate_kind: int | None = None,
        lower_bound: float = 0.0,
        l2norm: bool = False,
        beta_scale: float | None = None,
        states: dict | None = None,
        segments: SegmentPlan | None = None,
    ):
        q_rstd = k_rstd = None
        if l2norm:
            q, q_rstd = l2norm_fwd(q)
            k, k_rstd = l2norm_fwd(k)
        beta_raw = beta
        if beta_scale is not None:
            beta = beta_sigmoid_fwd(beta_raw, beta_scale)
        gate = None
        if gate_kind is not None:
            gate = InKernelGate(
                gate_kind,
                None if A_log is None else A_log.detach().reshape(-1).contiguous(),
                None if dt_bias is None else dt_bias.detach().reshape(-1).contiguous(),
                lower_bound,
            )
        # With gradients to come (``keep``, decided by the caller: grad mode is off in here),
        # keep the intermediates the backward would otherwise recompute with the most work
        # (G, Aqk, N); under no_grad / inference nothing beyond the output.
        fwd = chunk_kda_fwd(
            q,
            k,
            v,
            g,
            beta,
            scale,
            initial_state,
            output_final_state,
            *tables,
            keep=keep,
            safe_gate=safe_gate,
            gate=gate,
            return_states=states is not None,
            segments=segments,
        )
        if states is not None:  # return_intermediate_states: the chunk-start states
            states["h"] = fwd.h
        saved = (fwd.G, fwd.Aqk, fwd.Ainv) if keep else ()
        extra = (q_rstd, k_rstd, beta_raw if beta_scale is not None else None)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, *extra, *saved)
        ctx.scale, ctx.tables, ctx.safe_gate = scale, tables, safe_gate
        ctx.gate, ctx.beta_scale, ctx.segments = gate, beta_scale, segments
        ctx.param_meta = tuple(None if x is None else (x.shape, x.dtype) for x in (A_log, dt_bias))
        return fwd.o, fwd.final_state

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, q_rstd, k_rstd, beta_raw, *saved = ctx.saved_tensors
        dq, dk, dv, dg, dbeta, dh0, dA, dbias = chunk_kda_bwd(
            q,
            k,
            v,
            g,
            beta,
            ctx.scale,
            initial_state,
            do.contiguous(),
            None if dht is None else dht.contiguous(),
            *ctx.tables,
            saved=tuple(saved) or None,
            safe_gate=ctx.safe_gate,
            gate=ctx.gate,
            fp32_dqk=q_rstd is not None,  # the L2 norm's backward follows
            segments=ctx.segments,
        )
        if q_rstd is not None:
            dq = l2norm_bwd(q, q_rstd, dq)
            dk = l2norm_bwd(k, k_rstd, dk)
        if beta_raw is not None:
            dbeta = beta_sigmoid_bwd(beta_raw, dbeta, ctx.beta_scale)
        grads = []
        for d, meta in zip((dA, dbias), ctx.param_meta):
            grads.append(None if meta is None or d is None else d.reshape(meta[0]).to(meta[1]))
        return (dq, dk, dv, dg, dbeta, *grads, None, dh0, *([None] * 10))


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    safe_gate: bool = False,
    lower_bound: float | None = None,
    disable_recompute: bool = False,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_cpu: torch.Tensor | None = None,
    cp_context: object | None = None,
    use_graph: bool = False,
    max_num_seqs: int | None = None,
    *,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    chunk_size: int = 64,
    gate_lower_bound: float | None = None,
    transpose_state_layout: bool | None = None,
    segment_chunks: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Kimi Delta Attention, chunked, with Triton kernels for forward and backward.

    The signature of ``fla.ops.kda.chunk_kda`` (fla 0.6: same keyword names, positions and
    defaults; fla's ``**kwargs`` ``A_log``, ``dt_bias``, ``chunk_size`` are keyword-only
    here), so a call written for fla runs unchanged, plus the kit's ``gate_lower_bound``.
    Same meaning as :func:`kimi_linear.ops.naive_recurrent_kda`: per head, with fp32 state
    ``S [K, V]``, ``S = diag(exp(g_t)) S; S += beta_t k_t (v_t - S^T k_t)^T;
    o_t = S^T (scale q_t)``.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (L2-normalise them, or pass
            ``use_qk_l2norm_in_kernel=True``: the chunked form relies on ``||k|| <= 1``),
            fp16 / bf16 / fp32, one dtype for q, k, v.
        v: ``[B, T, HV, V]`` values; ``V`` may differ from ``K``; both at most 256. GVA:
            ``HV`` a multiple of ``H``, value head ``i`` reads key head ``i // (HV // H)`` in
            place (q and k are never repeated in memory; dq, dk summed over each group).
        g: ``[B, T, HV, K]`` log decay in ``[-inf, 0]`` (any of the three dtypes; used in fp32);
            ``-inf`` (complete forgetting) and values far below -1000 are exact (clamped per
            step where ``exp`` underflows to 0). ``g > 0`` is not checked unless
            ``KIMI_LINEAR_CHECK_GATE=1`` (a device sync) and may overflow to inf / NaN. With
            ``use_gate_in_kernel``: the raw gate projection.
        beta: ``[B, T, HV]`` delta-rule step sizes (their logits with
            ``use_beta_sigmoid_in_kernel``).
        scale: factor on q, default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` state before the first token (cast to fp32), ``N = B``,
            or the number of sequences with ``cu_seqlens`` (``[N, H, V, K]`` with
            ``state_v_first``).
        output_final_state: also return the ``[N, HV, K, V]`` fp32 state after the last token.
        use_qk_l2norm_in_kernel: L2-normalise q and k (``x / sqrt(||x||^2 + 1e-6)``, fp32) in
            a Triton kernel before the pipeline; its backward kernel chains dq, dk.
        use_gate_in_kernel: ``g`` is the raw gate projection; the cumulative-sum kernel forms
            the log decay ``-exp(A_log) * softplus(g + dt_bias)`` or, with ``lower_bound``,
            ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`` (``lower_bound *
            sigmoid(g + dt_bias)`` without ``A_log``), and the backward's last kernel chains
            the gradient into g, ``A_log`` and ``dt_bias``.
        use_beta_sigmoid_in_kernel: ``beta`` holds logits; a kernel applies the sigmoid.
        allow_neg_eigval: with ``use_beta_sigmoid_in_kernel``, take ``2 * sigmoid(beta)``.
        safe_gate: the bounded-gate fast path (same results, tensor-core diagonal blocks):
            with ``use_gate_in_kernel`` it needs ``lower_bound`` in ``[-5, 0)``; without, it is
            the caller's promise that ``g >= lower_bound`` (``-5`` when None).
        lower_bound: with ``use_gate_in_kernel``, the safe gate's bound (a finite number < 0;
            in ``[-5, 0)`` it also selects the fast path); without, the promised bound of
            ``g`` (as ``gate_lower_bound``).
        disable_recompute: accepted for fla's signature; our kernels always keep the same
            intermediates (``G``, ``Aqk``, ``N``) for the backward.
        return_intermediate_states: also return ``h``, the state at every 64-token chunk
            start (prefix caching: ``h[:, i]`` is the state after the first ``64 * i`` tokens
            of its sequence, from which a later call resumes as a full recompute would). The
            states the forward kernel stores for its output kernel anyway (no extra kernel).
            fla's rules: only under ``torch.inference_mode()`` and with
            ``disable_recompute=False``; ours also needs ``chunk_size=64`` (``ValueError``
            otherwise).
        cp_context, use_graph: fla's context-parallel / graph modes; not available here
            (``ValueError`` when set; see :mod:`kimi_linear.context_parallel`).
            ``max_num_seqs`` goes with ``use_graph``.
        state_v_first: initial and final states are ``[..., V, K]`` (transposed copies of the
            small state tensors; the kernels keep ``[K, V]``).
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of packed sequences (needs ``B == 1``);
            each sequence starts from its own initial-state row, as if run alone.
        cu_seqlens_cpu: the same offsets on the host, if the caller has them (saves the
            device-to-host copy that builds the chunk tables).
        A_log: ``HV`` values (any shape), with ``use_gate_in_kernel`` (optional with
            ``lower_bound``); receives a gradient.
        dt_bias: ``HV * K`` values, with ``use_gate_in_kernel``, optional; receives a gradient.
        chunk_size: fla's chunk length, 32 or 64 (anything else is fla's ``ValueError``); our
            kernels always run 64-token chunks (the results do not depend on it).
        gate_lower_bound: the kit's name for the promise ``g >= gate_lower_bound``, a number in
            ``[-5, 0)`` (``KimiLinearConfig.kda_gate_lower_bound``): selects the fast path of
            :mod:`kimi_linear.kernels.chunk_fwd`; same results. A ``g`` below the bound is not
            checked unless ``KIMI_LINEAR_CHECK_GATE=1`` and may give inf / NaN.
        transpose_state_layout: fla's deprecated name of ``state_v_first`` (fla's
            ``DeprecationWarning``; passing both is fla's ``ValueError``).
        segment_chunks: in-device sequence splitting of the sequential state passes, forward
            and backward (:mod:`kimi_linear.kernels.split`): each sequence is cut into segments
            of this many 64-token chunks that run in parallel, joined by a short fp32 fold of
            their affine transitions (same results to rounding). None (default): automatic,
            only on a GPU whose SMs the unsplit pass leaves idle (few sequences x heads, long
            sequences; ``split.auto_segment_chunks``); 0: never; ``n >= 1``: always, ``n``
            chunks per segment.

    Returns:
        ``(o, final_state)``: o ``[B, T, HV, V]`` in v's dtype; final_state fp32 or ``None``.
        Gradients flow to q, k, v, g, beta, initial_state, A_log, dt_bias (and from a gradient
        on final_state). With ``return_intermediate_states``, ``(o, final_state, h)`` (fla's
        layout and dtype): ``h [B, NT, HV, K, V]`` in q's dtype, ``NT = ceil(T / 64)``,
        ``h[:, 0]`` the initial state (zeros without one); packed (``cu_seqlens``):
        ``[1, NT, HV, K, V]`` with each sequence's ``ceil(length / 64)`` states in sequence
        order; ``[..., V, K]`` with ``state_v_first``. fp16 inputs: the kernels store the
        states in bf16 (a state may exceed fp16's range), so ``h`` has bf16 precision, cast
        to fp16 (inf beyond 65504, as fla's fp16 ``h``).

    Raises:
        ValueError: bad shapes, dtypes, devices, head dims over 256, bad ``cu_seqlens``, CPU
            tensors without ``TRITON_INTERPRET=1`` (use the torch backend there), a bad
            ``chunk_size`` (fla's message), bad gate / beta flags (fla's rules), a
            ``gate_lower_bound`` outside ``[-5, 0)``, an unsupported fla mode,
            ``return_intermediate_states`` outside inference mode, with
            ``disable_recompute=True`` or ``chunk_size=32``, or (with
            ``KIMI_LINEAR_CHECK_GATE=1``) a ``g`` value above 0 or below the promised bound.

    Non-finite inputs (NaN / inf in q, k, v, beta; NaN in g) are isolated as the recurrence
    isolates them: outputs of the poisoned sequence and head are NaN from the poisoned token on,
    nothing else changes (:mod:`kimi_linear.ops.isolation`: every call runs the kernels on
    cleaned inputs and masks the poisoned outputs, device ops only, no sync and CUDA-graph
    capturable; ``KIMI_LINEAR_ISOLATE_NONFINITE=0`` turns it off).

    Inputs with other strides are made contiguous (a copy); inputs are never modified.
    """
    del max_num_seqs  # accepted for fla's signature (see Args)
    segment_chunks = check_segment_chunks(segment_chunks)
    state_v_first = resolve_state_v_first(state_v_first, transpose_state_layout)
    if chunk_size not in FLA_CHUNK_SIZES:
        raise ValueError(f"`chunk_size` must be either 32 or 64 for KDA, got {chunk_size}.")
    if return_intermediate_states:
        _check_states_mode(chunk_size, disable_recompute)
    for name, on in (
        ("use_graph", use_graph),
        ("cp_context", cp_context is not None),
    ):
        if on:
            raise ValueError(
                f"{name} is an fla mode kimi_linear.kernels.chunk_kda does not implement: use "
                "kimi_linear.context_parallel (context parallelism), or leave it at its default"
            )
    state_arg = initial_state
    if state_v_first and initial_state is not None:
        state_arg = initial_state.transpose(-1, -2)
    H, HV = check_kda_heads(q, k, v, g, beta)
    B, T, _, K = q.shape
    # q and k as zero-stride stand-ins with HV heads: the shared checks then see the value heads
    q_hv = q.new_empty((1, 1, 1, 1)).expand(B, T, HV, K)
    k_hv = k.new_empty((1, 1, 1, 1)).expand(B, T, HV, K)
    _, _, _, _, V, N = check_kernel_inputs(
        q_hv, k_hv, v, g, beta, scale, state_arg, cu_seqlens, cu_seqlens_cpu
    )
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("`allow_neg_eigval=True` requires `use_beta_sigmoid_in_kernel=True`.")
    gate_kind, fast = None, False
    if use_gate_in_kernel:
        if gate_lower_bound is not None:
            raise ValueError(
                "gate_lower_bound promises a bound on the log decay g; with "
                "use_gate_in_kernel=True g is the raw gate: pass lower_bound (the safe gate)"
            )
        if safe_gate:
            if lower_bound is None:
                raise ValueError(
                    "`lower_bound` must be specified when `safe_gate=True` and "
                    "`use_gate_in_kernel=True`."
                )
            check_safe_gate_bound(lower_bound, "lower_bound")
        bound = _check_gate_args(True, A_log, dt_bias, lower_bound, HV, K, q.device)
        gate_kind = GATE_SOFTPLUS if bound is None else GATE_LOWER_BOUND
        # the bounded gate keeps every g in (bound, 0): the fast path's condition
        fast = bound is not None and bound >= SAFE_GATE_LOWER_BOUND_RANGE[0]
        lower_bound = bound
    else:
        _check_gate_args(False, A_log, dt_bias, None, HV, K, q.device)
        promise = check_safe_gate_bound(gate_lower_bound)
        if lower_bound is not None:
            if promise is not None and float(lower_bound) != promise:
                raise ValueError(
                    f"lower_bound={lower_bound!r} and gate_lower_bound={gate_lower_bound!r} "
                    "are the same promise on g: pass one"
                )
            promise = check_safe_gate_bound(lower_bound, "lower_bound")
        if safe_gate and promise is None:
            promise = SAFE_GATE_LOWER_BOUND_RANGE[0]
        fast = promise is not None
        if gate_check_enabled():  # opt-in: a reduction or two and a device sync
            check_log_decay(g)
            if promise is not None:
                check_gate_lower_bound(g, promise)
        lower_bound = 0.0
    scale = scale_or_default(scale, K)
    if state_v_first and initial_state is not None:
        initial_state = initial_state.transpose(-1, -2)
    run = functools.partial(
        _chunk_kda_packed,
        A_log=A_log if use_gate_in_kernel else None,
        dt_bias=dt_bias if use_gate_in_kernel else None,
        scale=scale,
        initial_state=initial_state,
        output_final_state=output_final_state,
        cu_seqlens=cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu,
        safe_gate=fast,
        gate_kind=gate_kind,
        lower_bound=lower_bound,
        l2norm=bool(use_qk_l2norm_in_kernel),
        beta_scale=(2.0 if allow_neg_eigval else 1.0) if use_beta_sigmoid_in_kernel else None,
        segment_chunks=segment_chunks,
    )
    box: dict | None = {} if return_intermediate_states else None
    if box is not None:
        run = functools.partial(run, states_out=box)
    isolate = isolation_enabled()
    if isolate:  # device ops on every call, no sync (isolation.py)
        o, final_state = isolate_nonfinite(run, q, k, v, g, beta, cu_seqlens)
    else:
        o, final_state = run(q, k, v, g, beta)
    if state_v_first and final_state is not None:
        final_state = final_state.transpose(-1, -2).contiguous()
    if box is None:
        return o, final_state
    h = _unpack_states(box["h"], B, T, q.dtype, cu_seqlens, cu_seqlens_cpu, state_v_first)
    if isolate:  # the states after a poisoning token are NaN, as the recurrence has them
        offsets = None if cu_seqlens is None else tuple(_host(cu_seqlens, cu_seqlens_cpu))
        h = poison_chunk_starts(h, (q, k, v, g, beta), cu_seqlens, offsets, CHUNK_SIZE)
    return o, final_state, h


def _check_states_mode(chunk_size: int, disable_recompute: bool) -> None:
    """fla's rules for ``return_intermediate_states`` (inference only, with recomputation),
    and our chunk length: the states exist at 64-token boundaries only."""
    if not torch.is_inference_mode_enabled():
        raise ValueError(
            "return_intermediate_states=True is inference-only (fla's rule: the states bypass "
            "autograd): call chunk_kda under torch.inference_mode()"
        )
    if disable_recompute:
        raise ValueError("return_intermediate_states must be used with disable_recompute=False")
    if chunk_size != CHUNK_SIZE:
        raise ValueError(
            f"return_intermediate_states needs chunk_size={CHUNK_SIZE}: our kernels run "
            f"{CHUNK_SIZE}-token chunks, so there are no states at {chunk_size}-token "
            "boundaries"
        )


def _host(cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor | None) -> list[int]:
    """The offsets of ``cu_seqlens`` as host ints (from ``cu_seqlens_cpu`` when given)."""
    return [int(x) for x in (cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu).tolist()]


def _unpack_states(
    h: torch.Tensor,
    B: int,
    T: int,
    dtype: torch.dtype,
    cu_seqlens: torch.Tensor | None,
    cu_seqlens_cpu: torch.Tensor | None,
    state_v_first: bool,
) -> torch.Tensor:
    """The kernels' packed chunk-start states ``[NT, HV, K, V]`` in fla's layout and dtype:
    ``[B, ceil(T / 64), HV, K, V]`` (packed: ``[1, NT, HV, K, V]``, sequence after sequence),
    ``[..., V, K]`` with ``state_v_first``, in the inputs' dtype (the kernels keep them in
    ``utils.state_dtype``: bf16 for fp16 inputs, cast here)."""
    if cu_seqlens is None:
        h = h.view(B, -(-T // CHUNK_SIZE), *h.shape[1:])
    else:
        h = h.unsqueeze(0)
    if state_v_first:
        h = h.transpose(-1, -2)
    return h.to(dtype).contiguous()


def _chunk_kda_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    safe_gate: bool,
    gate_kind: int | None,
    lower_bound: float,
    l2norm: bool,
    beta_scale: float | None,
    segment_chunks: int | None = None,
    states_out: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`chunk_kda` on checked inputs: pack, run the kernels, unpack the output
    (``states_out``: a dict that receives ``"h"``, the packed chunk-start states
    ``[NT, HV, K, V]``)."""
    B, T, HV, V = v.shape
    offsets = packed_offsets(B, T, cu_seqlens)
    (pq, pk, pv, pg, pb), tables = pack(q, k, v, g, beta, cu_seqlens, offsets)
    segments = plan_for(offsets, HV, V, q.device, segment_chunks)
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    keep = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state, A_log, dt_bias)
    )
    o, final_state = ChunkKDAFunction.apply(
        pq,
        pk,
        pv,
        pg,
        pb,
        A_log,
        dt_bias,
        scale,
        h0,
        output_final_state,
        tables,
        keep,
        safe_gate,
        gate_kind,
        lower_bound,
        l2norm,
        beta_scale,
        states_out,
        segments,
    )
    return o.view(B, T, HV, V), final_state
