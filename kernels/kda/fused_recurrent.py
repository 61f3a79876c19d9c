"""Token-by-token KDA in one Triton launch: the decode kernel (forward only).

One program per (value block, sequence, value head) keeps its ``[K, BV]`` slice of the fp32
state in registers and walks the tokens of its sequence: decay the key rows, delta-rule update
with the fp32 residual ``v - S^T k``, read out ``S^T q``. All heads and sequences (packed with
``cu_seqlens``, or a dense batch) go in a single launch.

Fused in the kernel, with fla's flags (:func:`fused_recurrent_kda` takes fla's keyword names
and defaults, so a call written for ``fla.ops.kda.fused_recurrent_kda`` runs unchanged):

* ``use_qk_l2norm_in_kernel``: ``q / sqrt(||q||^2 + 1e-6)``, the same for ``k``, in fp32;
* ``use_gate_in_kernel``: ``g`` is the raw gate projection; the kernel forms the log decay,
  ``-exp(A_log) * softplus(g + dt_bias)`` (the release gate) or, with ``lower_bound``,
  ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))`` (the safe gate; without ``A_log``:
  ``lower_bound * sigmoid(g + dt_bias)``);
* ``use_beta_sigmoid_in_kernel``: ``beta`` holds logits, the kernel takes ``sigmoid(beta)``
  (``2 * sigmoid(beta)`` with ``allow_neg_eigval``, eigenvalues of the transition in (-1, 1]);
* GVA: q, k with ``H`` heads, v, g, beta and the state with ``HV = G * H`` heads; value head
  ``i`` reads key head ``i // G`` in place (q and k are never repeated in memory);
* ``state_v_first``: states stored ``[..., V, K]`` instead of ``[..., K, V]``.

Serving (vLLM's calling convention for its KDA / GDN decode): ``initial_state`` may be a pool
of states ``[num_slots, HV, K, V]`` addressed by ``ssm_state_indices`` and updated in place:
``[N]`` gives each sequence its slot (read before its first token, written after its last);
``[N, S]`` gives a slot per token position (read from column ``num_accepted_tokens[n] - 1``,
or 0; the state after token ``j`` written to column ``j``): speculative decoding verifies
``S`` draft tokens in one call and keeps every intermediate state, and the next call continues
from the state after the last accepted one. A negative slot is padding: a sequence whose read
slot is negative is skipped (its outputs are 0, no state is read or written), a negative write
slot stores nothing.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kimi_linear.ops.checks import check_kda_heads, check_log_decay, scale_or_default
from kimi_linear.ops.options import gate_check_enabled
from kimi_linear.ops.serving import check_state_pool, check_state_slots, slot_checks_enabled

from .utils import check_kernel_inputs, checked_grid, next_pow2, pack, resolve_state_v_first

__all__ = ["fused_recurrent_kda"]

#: Integer launch arguments of the kernel (``tl.int32``; never specialised: one binary serves
#: every head count, pool size and stride). :mod:`compile_check` types them from this tuple.
INT_ARGS = ("H", "HV", "slot_stride", "num_cols", "num_slots", "h0_stride", "ht_stride")
#: Float launch arguments besides ``scale`` (``tl.float32``).
FLOAT_ARGS = ("lower_bound",)

# How the kernel reads the state before a sequence's first token (READ) and where it writes
# states (WRITE); see _fused_recurrent_kernel.
_READ_NONE, _READ_DENSE, _READ_SLOT = 0, 1, 2
_WRITE_NONE, _WRITE_DENSE_FINAL, _WRITE_SLOT_FINAL, _WRITE_SLOT_TOKENS, _WRITE_DENSE_TOKENS = (
    0,
    1,
    2,
    3,
    4,
)
# The log-decay gate formed in the kernel (GATE).
_GATE_NONE, _GATE_SOFTPLUS, _GATE_LOWER_BOUND = 0, 1, 2


@triton.jit
def _softplus(x):
    """``log(1 + exp(x))`` without overflow and with ``log1p``'s accuracy for small
    ``exp(-|x|)`` (Kahan: ``log(w) * u / (w - 1)`` with ``w = 1 + u``)."""
    u = tl.exp(-tl.abs(x))
    w = 1.0 + u
    log1p_u = tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))
    return tl.maximum(x, 0.0) + log1p_u


@triton.jit(do_not_specialize=INT_ARGS)
def _fused_recurrent_kernel(
    q,
    k,
    v,
    g,
    beta,
    o,
    A_log,
    dt_bias,
    h0,
    ht,
    cu_seqlens,
    slots,
    accepted,
    scale,
    lower_bound,
    H,
    HV,
    slot_stride,
    num_cols,
    num_slots,
    h0_stride,
    ht_stride,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    READ: tl.constexpr,
    WRITE: tl.constexpr,
    SPEC: tl.constexpr,
    STATE_V_FIRST: tl.constexpr,
    L2NORM: tl.constexpr,
    GATE: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BETA_SIGMOID: tl.constexpr,
    NEG_EIGVAL: tl.constexpr,
):
    """Grid ``(cdiv(V, BV) * N * HV,)``, value blocks fastest (``utils.checked_grid``: no
    65,535 limit on sequences x heads). Inputs packed: q, k ``[TT, H, K]``; v ``[TT, HV, V]``;
    g ``[TT, HV, K]``; beta ``[TT, HV]``; o ``[TT, HV, V]``. A state is ``[HV, K, V]``
    (``[HV, V, K]`` with ``STATE_V_FIRST``) with inner dims contiguous; consecutive states are
    ``h0_stride`` / ``ht_stride`` elements apart.

    READ: 0 zeros; 1 ``h0[n]``; 2 ``h0[slot]``, ``slot = slots[n * slot_stride + c]`` with
    ``c = accepted[n] - 1`` (``SPEC``) or 0; a slot outside ``[0, num_slots)`` (or ``c``
    outside ``[0, num_cols)``) skips the sequence. WRITE: 0 nothing; 1 ``ht[n]`` after the
    last token; 2 ``ht[slot]`` (the read slot) after the last token; 3 after token ``j`` of
    the sequence, ``ht[slots[n * slot_stride + j]]`` for ``j < num_cols`` and a slot in range;
    4 after every token ``t`` (packed index), ``ht[t]``.
    """
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_v, i_nh = pid % NV, pid // NV
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    cols_k = tl.arange(0, BK)
    m_k = cols_k < K
    cols_v = i_v * BV + tl.arange(0, BV)
    m_v = cols_v < V
    if STATE_V_FIRST:
        s_idx = i_hv.to(tl.int64) * K * V + cols_v[None, :] * K + cols_k[:, None]
    else:
        s_idx = i_hv.to(tl.int64) * K * V + cols_k[:, None] * V + cols_v[None, :]
    m_s = m_k[:, None] & m_v[None, :]
    slot_row = slots + i_n.to(tl.int64) * slot_stride
    slot = i_n.to(tl.int64)
    if READ == 2:
        col = 0
        if SPEC:
            col = tl.load(accepted + i_n).to(tl.int32) - 1
        bad_col = (col < 0) | (col >= num_cols)
        slot = tl.load(slot_row + tl.minimum(tl.maximum(col, 0), num_cols - 1)).to(tl.int64)
        if bad_col | (slot < 0) | (slot >= num_slots):
            return  # padding: no state read or written, the outputs keep their zeros
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if READ > 0:
        b_s += tl.load(h0 + slot * h0_stride + s_idx, mask=m_s, other=0.0).to(tl.float32)
    if GATE > 0:
        b_A = 1.0
        if HAS_A:
            b_A = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
        b_bias = tl.zeros([BK], dtype=tl.float32)
        if HAS_BIAS:
            b_bias = tl.load(dt_bias + i_hv * K + cols_k, mask=m_k, other=0.0).to(tl.float32)
    for t in range(bos, eos):
        off_k = (t * H + i_h) * K + cols_k
        b_q = tl.load(q + off_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + off_k, mask=m_k, other=0.0).to(tl.float32)
        if L2NORM:
            b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
            b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
        b_q = b_q * scale
        b_g = tl.load(g + (t * HV + i_hv) * K + cols_k, mask=m_k, other=0.0).to(tl.float32)
        if GATE == 1:
            b_g = -b_A * _softplus(b_g + b_bias)
        elif GATE == 2:
            b_g = lower_bound * tl.sigmoid(b_A * (b_g + b_bias))
        b_v = tl.load(v + (t * HV + i_hv) * V + cols_v, mask=m_v, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + t * HV + i_hv).to(tl.float32)
        if BETA_SIGMOID:
            b_beta = tl.sigmoid(b_beta)
            if NEG_EIGVAL:
                b_beta = 2.0 * b_beta
        b_s = b_s * tl.exp(b_g)[:, None]
        b_r = b_v - tl.sum(b_s * b_k[:, None], axis=0)
        b_s += b_k[:, None] * (b_beta * b_r)[None, :]
        b_o = tl.sum(b_s * b_q[:, None], axis=0)
        tl.store(o + (t * HV + i_hv) * V + cols_v, b_o.to(o.dtype.element_ty), mask=m_v)
        if WRITE == 3:
            j = t - bos
            if j < num_cols:
                w_slot = tl.load(slot_row + j).to(tl.int64)
                if (w_slot >= 0) & (w_slot < num_slots):
                    p = ht + w_slot * ht_stride + s_idx
                    tl.store(p, b_s.to(ht.dtype.element_ty), mask=m_s)
        if WRITE == 4:
            tl.store(ht + t * ht_stride + s_idx, b_s.to(ht.dtype.element_ty), mask=m_s)
    if WRITE == 1 or WRITE == 2:
        tl.store(ht + slot * ht_stride + s_idx, b_s.to(ht.dtype.element_ty), mask=m_s)


def launch_constexprs(K: int, V: int, **flags: int | bool) -> tuple[dict, int]:
    """The kernel's constexprs for head dims ``K``, ``V`` (block sizes as :func:`_launch`
    picks them; the flags default to the plain decode step: a dense initial state read, the
    final state written) and its ``num_warps``. Used by the launcher and :mod:`compile_check`."""
    BK = next_pow2(K)
    BV = min(next_pow2(V), 32 if BK >= 128 else 64)
    constexprs = dict(
        K=K,
        V=V,
        BK=BK,
        BV=BV,
        READ=_READ_DENSE,
        WRITE=_WRITE_DENSE_FINAL,
        SPEC=False,
        STATE_V_FIRST=False,
        L2NORM=False,
        GATE=_GATE_NONE,
        HAS_A=False,
        HAS_BIAS=False,
        BETA_SIGMOID=False,
        NEG_EIGVAL=False,
    )
    unknown = set(flags) - set(constexprs)
    if unknown:
        raise ValueError(f"unknown kernel flags {sorted(unknown)}")
    constexprs.update(flags)
    return constexprs, (1 if BK * BV <= 1024 else 4)


class _ForwardOnly(torch.autograd.Function):
    """Runs the kernel under autograd and raises if a gradient ever comes back through ``o``."""

    @staticmethod
    def forward(ctx, run, *tensors):
        return run()

    @staticmethod
    def backward(ctx, do):
        raise RuntimeError(
            "fused_recurrent_kda is forward-only (decode); use kimi_linear.kernels.chunk_kda "
            "for gradients"
        )


def _check_gate_args(
    use_gate_in_kernel: bool,
    A_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    lower_bound: float | None,
    HV: int,
    K: int,
    device: torch.device,
) -> float | None:
    """Validate the in-kernel gate's arguments; returns ``lower_bound`` as a float."""
    if not use_gate_in_kernel:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias), ("lower_bound", lower_bound)):
            if x is not None:
                raise ValueError(
                    f"{name} is used only with use_gate_in_kernel=True (g is then the raw gate "
                    "projection); pass use_gate_in_kernel=True, or leave it None when g is "
                    "already the log decay"
                )
        return None
    if A_log is None and lower_bound is None:
        raise ValueError(
            "A_log must be provided when use_gate_in_kernel=True and lower_bound is not set"
        )
    for name, x, size, what in (
        ("A_log", A_log, HV, "HV"),
        ("dt_bias", dt_bias, HV * K, "HV * K"),
    ):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor or None")
        if x.numel() != size:
            raise ValueError(
                f"{name} must hold {what}={size} values (one per value head"
                f"{' and key channel' if name == 'dt_bias' else ''}), got shape {tuple(x.shape)}"
            )
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but q is on {device}")
    if lower_bound is None:
        return None
    if (
        isinstance(lower_bound, bool)
        or not isinstance(lower_bound, (int, float))
        or not math.isfinite(lower_bound)
        or lower_bound >= 0
    ):
        raise ValueError(
            f"lower_bound must be None or a finite number < 0 (the safe gate's bound on the log "
            f"decay), got {lower_bound!r}"
        )
    return float(lower_bound)


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: float | None = None,
    state_v_first: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    inplace_state: bool = False,
    ssm_state_indices: torch.Tensor | None = None,
    num_accepted_tokens: torch.Tensor | None = None,
    inplace_final_state: bool | None = None,
    transpose_state_layout: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kimi Delta Attention token by token, one kernel launch for all heads and sequences.

    The signature of ``fla.ops.kda.fused_recurrent_kda`` (fla 0.6: same keyword names, order
    and defaults), plus :func:`kimi_linear.kernels` extras after the ``*``. Per value head, with
    fp32 state ``S [K, V]``: ``S = diag(exp(g_t)) S; S += beta_t k_t (v_t - S^T k_t)^T;
    o_t = S^T (scale q_t)``.

    **Forward only**: meant for decoding. Under autograd the call works, but back-propagating
    through its output raises ``RuntimeError`` (use :func:`kimi_linear.kernels.chunk_kda`); the
    returned state never carries gradients, and a differentiable initial_state is refused.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (fp16 / bf16 / fp32, one dtype with v).
        v: ``[B, T, HV, V]`` values; ``HV`` a multiple of ``H`` (GVA: value head ``i`` uses key
            head ``i // (HV // H)``; q and k are not repeated in memory).
        g: ``[B, T, HV, K]``: the log decay in ``[-inf, 0]``, or with ``use_gate_in_kernel``
            the raw gate projection.
        beta: ``[B, T, HV]``: delta-rule step sizes, or with ``use_beta_sigmoid_in_kernel``
            their logits.
        A_log: ``HV`` values (any shape, e.g. the release's ``[1, 1, HV, 1]``), with
            ``use_gate_in_kernel`` only; may be None with ``lower_bound``.
        dt_bias: ``HV * K`` values added to ``g`` before the gate, with ``use_gate_in_kernel``
            only; optional.
        scale: factor on q, default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` state before the first token (``N = B``, or the number
            of sequences with ``cu_seqlens``); with ``ssm_state_indices``, the state pool
            ``[num_slots, HV, K, V]`` (fp32 / bf16 / fp16; inner dims contiguous, any stride
            between slots), updated in place.
        output_final_state: return the ``[N, HV, K, V]`` fp32 final state.
        use_qk_l2norm_in_kernel: L2-normalise q and k in the kernel
            (``x / sqrt(||x||^2 + 1e-6)``, fp32).
        use_gate_in_kernel: form the log decay from ``g`` in the kernel:
            ``-exp(A_log) * softplus(g + dt_bias)``, or with ``lower_bound`` the safe gate
            ``lower_bound * sigmoid(exp(A_log) * (g + dt_bias))``
            (``lower_bound * sigmoid(g + dt_bias)`` without ``A_log``).
        use_beta_sigmoid_in_kernel: ``beta`` holds logits; the kernel applies the sigmoid.
        allow_neg_eigval: with ``use_beta_sigmoid_in_kernel``, take ``2 * sigmoid(beta)``.
        lower_bound: the safe gate's bound (a finite number < 0), with ``use_gate_in_kernel``.
        state_v_first: states (initial, final, pool) are ``[..., V, K]`` instead of
            ``[..., K, V]``.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (``B == 1``).
        inplace_state: write the final state over ``initial_state`` (which must then be a
            contiguous fp32 tensor not requiring grad) and return that tensor as the final state
            (whatever ``output_final_state``): no state allocation per decode step.
        ssm_state_indices: int ``[N]`` (a slot per sequence: read, then written after the last
            token) or ``[N, S]`` (a slot per token position: read from column
            ``num_accepted_tokens[n] - 1`` or 0, the state after token ``j`` written to column
            ``j``; needs ``S >=`` the sequence's tokens) into the pool ``initial_state``. A
            negative read slot skips the sequence (outputs 0, nothing read or written); a
            negative write slot stores nothing. Sequences must not share slots.
        num_accepted_tokens: int ``[N]`` in ``[1, S]``, with ``[N, S]`` indices: how many tokens
            of the previous verification step each sequence accepted.
        inplace_final_state: with ``ssm_state_indices`` only (vLLM's flag). ``None`` / ``True``:
            the states go into the pool; ``False``: the pool is only read, and the state after
            every token is returned in a new ``[B * T, HV, K, V]`` fp32 tensor (packed token
            order) instead.
        transpose_state_layout: fla's deprecated name of ``state_v_first`` (fla's
            ``DeprecationWarning``; passing both is fla's ``ValueError``).

    Returns:
        ``(o [B, T, HV, V] in v's dtype, state)``: ``state`` is the fp32 final state (or None)
        without ``ssm_state_indices``; with it, the pool (updated in place) or, with
        ``inplace_final_state=False``, the per-token states.

    Slot values are checked (``ValueError``) when they are on the CPU, and on a GPU only with
    ``KIMI_LINEAR_CHECK_GATE=1`` (a device sync); unchecked, a slot outside the pool is treated
    as padding. ``g = -inf`` forgets exactly (``exp(-inf) = 0``); ``g > 0`` (without the
    in-kernel gate) is not checked unless ``KIMI_LINEAR_CHECK_GATE=1`` and grows the state
    without bound.

    Raises:
        ValueError: the checks of :func:`chunk_kda` (on the value heads), a head count ``HV``
            that is not a multiple of ``H``, bad gate / beta flags (``allow_neg_eigval``
            without ``use_beta_sigmoid_in_kernel``; ``A_log`` / ``dt_bias`` / ``lower_bound``
            without ``use_gate_in_kernel``; ``use_gate_in_kernel`` without ``A_log`` or
            ``lower_bound``), ``inplace_state`` without a suitable ``initial_state``, or bad
            serving arguments.
    """
    state_v_first = resolve_state_v_first(state_v_first, transpose_state_layout)
    H, HV = check_kda_heads(q, k, v, g, beta)
    B, T, _, K = q.shape
    # q and k as zero-stride views with HV heads: the shared checks then see the value heads
    q_hv = q.new_empty((1, 1, 1, 1)).expand(B, T, HV, K)
    k_hv = k.new_empty((1, 1, 1, 1)).expand(B, T, HV, K)
    pooled = ssm_state_indices is not None
    state_arg = None if pooled else initial_state
    if state_v_first and state_arg is not None:
        state_arg = state_arg.transpose(-1, -2)  # shape check only
    _, _, _, _, V, N = check_kernel_inputs(q_hv, k_hv, v, g, beta, scale, state_arg, cu_seqlens)
    if allow_neg_eigval and not use_beta_sigmoid_in_kernel:
        raise ValueError("allow_neg_eigval=True requires use_beta_sigmoid_in_kernel=True")
    lower_bound = _check_gate_args(use_gate_in_kernel, A_log, dt_bias, lower_bound, HV, K, q.device)
    if not use_gate_in_kernel and gate_check_enabled():  # opt-in: a reduction and a sync
        check_log_decay(g)
    scale = scale_or_default(scale, K)
    if not pooled and (num_accepted_tokens is not None or inplace_final_state is not None):
        raise ValueError(
            "num_accepted_tokens and inplace_final_state apply to a state pool: pass "
            "ssm_state_indices (for a dense state updated in place use inplace_state=True)"
        )
    if pooled and inplace_state:
        raise ValueError(
            "inplace_state is for a dense initial_state; a state pool is updated in place "
            "already (inplace_final_state)"
        )
    if initial_state is not None and initial_state.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "initial_state requires grad, but fused_recurrent_kda is forward-only: use chunk_kda "
            "for gradients, or pass initial_state.detach()"
        )
    if inplace_state:
        if initial_state is None:
            raise ValueError("inplace_state=True needs an initial_state tensor to update")
        if initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
            raise ValueError(
                "inplace_state=True needs initial_state to be a contiguous float32 tensor, got "
                f"dtype {initial_state.dtype}, contiguous={initial_state.is_contiguous()}"
            )
    (pq, pk, pv, pg, pb), tables = pack(q, k, v, g, beta, cu_seqlens)
    cu = tables.cu_seqlens
    TT = pq.shape[0]
    flags: dict[str, int | bool] = dict(
        SPEC=num_accepted_tokens is not None,
        STATE_V_FIRST=bool(state_v_first),
        L2NORM=bool(use_qk_l2norm_in_kernel),
        GATE=(
            _GATE_NONE
            if not use_gate_in_kernel
            else (_GATE_SOFTPLUS if lower_bound is None else _GATE_LOWER_BOUND)
        ),
        HAS_A=A_log is not None,
        HAS_BIAS=dt_bias is not None,
        BETA_SIGMOID=bool(use_beta_sigmoid_in_kernel),
        NEG_EIGVAL=bool(allow_neg_eigval),
    )
    dummy = cu  # a valid pointer for arguments a variant never reads
    slots, accepted, slot_stride, num_cols, num_slots = dummy, dummy, 0, 1, 0
    state_shape = (HV, V, K) if state_v_first else (HV, K, V)
    if pooled:
        check_state_pool(
            initial_state,
            ssm_state_indices,
            num_accepted_tokens,
            N,
            HV,
            K,
            V,
            q.device,
            state_v_first,
        )
        in_place = inplace_final_state is None or bool(inplace_final_state)
        num_slots = initial_state.shape[0]
        if slot_checks_enabled(ssm_state_indices):
            offsets = cu.tolist()
            check_state_slots(ssm_state_indices, num_accepted_tokens, offsets, num_slots, in_place)
        slots = ssm_state_indices
        if slots.stride(-1) != 1:
            slots = slots.contiguous()
        slot_stride = slots.stride(0) if slots.dim() == 2 else 1
        num_cols = slots.shape[1] if slots.dim() == 2 else 1
        if num_accepted_tokens is not None:
            accepted = num_accepted_tokens
        h0 = initial_state
        h0_stride = initial_state.stride(0) if num_slots > 0 else 0
        if in_place:
            ht, ht_stride = initial_state, h0_stride
            write = _WRITE_SLOT_TOKENS if slots.dim() == 2 else _WRITE_SLOT_FINAL
        else:
            ht = pq.new_zeros(TT, *state_shape, dtype=torch.float32)
            ht_stride, write = HV * K * V, _WRITE_DENSE_TOKENS
        flags.update(READ=_READ_SLOT, WRITE=write)
        o = torch.zeros_like(pv)  # skipped (padding) sequences keep zeros
        returned = ht
    else:
        if inplace_state:
            h0 = ht = initial_state
        else:
            h0 = None if initial_state is None else initial_state.contiguous()
            ht = pq.new_empty(N, *state_shape, dtype=torch.float32) if output_final_state else None
        flags.update(
            READ=_READ_NONE if h0 is None else _READ_DENSE,
            WRITE=_WRITE_NONE if ht is None else _WRITE_DENSE_FINAL,
        )
        h0_stride = ht_stride = HV * K * V
        o = torch.empty_like(pv)
        returned = ht
    constexprs, num_warps = launch_constexprs(K, V, **flags)
    A = dummy if A_log is None else A_log.detach().reshape(-1)
    bias = dummy if dt_bias is None else dt_bias.detach().reshape(-1)

    def run() -> torch.Tensor:
        _fused_recurrent_kernel[checked_grid(triton.cdiv(V, constexprs["BV"]) * N * HV)](
            pq,
            pk,
            pv,
            pg,
            pb,
            o,
            A,
            bias,
            dummy if h0 is None else h0,
            dummy if ht is None else ht,
            cu,
            slots,
            accepted,
            scale,
            0.0 if lower_bound is None else lower_bound,
            H,
            HV,
            slot_stride,
            num_cols,
            num_slots,
            h0_stride,
            ht_stride,
            **constexprs,
            num_warps=num_warps,
        )
        return o

    inputs = [x for x in (q, k, v, g, beta, A_log, dt_bias) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        out = _ForwardOnly.apply(run, *inputs)
    else:
        out = run()
    return out.view(B, T, HV, V), returned
