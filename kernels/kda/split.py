"""In-device sequence splitting of the chunk kernels' sequential passes.

The state pass of chunked KDA walks a sequence's chunks one after another: with few (sequence,
head) pairs it runs a handful of programs on a GPU of 132 SMs, and its time is the chain of
``T / 64`` dependent chunk steps times the step latency, whatever the bandwidth. Splitting cuts
that chain. Each sequence is cut into segments of ``segment_chunks`` chunks (64 tokens each; a
sequence's last segment takes the remainder), and the state recurrence is affine in the state:
over a segment ``j`` the state entering it, ``s_j [K, V]``, becomes

    s_{j+1} = M_j s_j + H_j,     M_j = T_last ... T_first,   T_c = diag(exp(G_last)) - kg_c^T W_c

(``kg``, ``W``, ``G`` of :mod:`kimi_linear.kernels.chunk_fwd`), the same algebra as context
parallelism across devices (:mod:`kimi_linear.context_parallel`). The forward then runs:

1. **transitions** (:func:`_chunk_fwd_state_kernel` with ``SEGMENT_PASS``): every segment in
   parallel from a zero state gives ``H_j``, and, in the same launch, programs that start from
   the identity on extra columns and drop the ``U`` term give ``M_j`` (``[K, V + K]`` per
   segment and head, fp32; nothing per chunk is stored);
2. **fold** (:func:`_fold_kernel`): per (sequence, head, value block) ``S_j`` dependent fp32
   steps ``s = M_j s + H_j`` from the sequence's initial state; it stores each segment's entry
   state and the sequence's final state;
3. **states**: the ordinary state pass, every segment in parallel from its entry state, storing
   the chunk-start states and residuals exactly where the unsplit pass stores them (a segment
   starts at a chunk boundary of its sequence, so the global chunk numbering is unchanged).

The backward's reverse pass is affine too, with the transposed transitions: the state gradient
leaving segment ``j`` (its start) is ``d_j = M_j^T d_{j+1} + E_j``. It reuses ``M_j`` from the
forward's recompute, runs the reverse pass per segment from a zero gradient storing only
``E_j`` (``STORE_CHUNKS=False``), folds in reverse (:func:`fold_states` with ``reverse``), then
reruns the reverse pass per segment from its true end gradient.

Cost, against the unsplit pass: the dependent chain goes from ``C`` chunk steps to about
``2 C / S + S`` (``S`` segments per sequence); the transitions pass does ``(V + K) / V`` times
the state pass's products (``M`` takes as many as ``H`` when ``K = V``) and the states pass
repeats the unsplit one, so splitting pays only where the unsplit pass leaves SMs idle.
:func:`auto_segment_chunks` splits when the state pass's grid fills less than the GPU's SMs
(estimated grid: 32-column value blocks) and each segment keeps at least
:data:`MIN_SEGMENT_CHUNKS` chunks; ``python -m benchmarks.kernel_cost --predict`` models the
trade and the GPU suite times it (``python -m benchmarks.gpu_check``).
"""

from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .utils import CHUNK_SIZE, checked_grid, next_pow2

#: Fewest chunks per segment the automatic choice makes (1,024 tokens): shorter segments spend
#: more on the fold and the transitions than the shorter chain saves.
MIN_SEGMENT_CHUNKS = 16

#: Value-block width the automatic choice assumes for the state pass's grid (its first config).
_GRID_BV = 32


class SegmentPlan(NamedTuple):
    """How the sequences of a packed batch are cut into segments (all int32, on the device).

    A segment starts at a 64-token chunk boundary of its sequence, so the chunk tables of the
    segments number the chunks as the sequences' tables do.
    """

    cu_seqlens: torch.Tensor  #: ``[NS + 1]`` token offsets of the segments
    chunk_offsets: torch.Tensor  #: ``[NS + 1]`` global index of each segment's first chunk
    seq_segments: torch.Tensor  #: ``[N + 1]``: segments ``[seq_segments[n], seq_segments[n+1])``
    num_segments: int  #: NS
    segment_chunks: int  #: chunks per segment (a sequence's last one may be shorter)
    max_segments: int  #: the most segments of one sequence (the fold's chain length)


def check_segment_chunks(segment_chunks: int | None) -> int | None:
    """``segment_chunks`` as given, after checking it: None (automatic), 0 (never split) or a
    positive int (segments of that many 64-token chunks).

    Raises:
        ValueError: a bool, a non-int or a negative number.
    """
    if segment_chunks is None:
        return None
    if isinstance(segment_chunks, bool) or not isinstance(segment_chunks, int):
        raise ValueError(
            "segment_chunks must be None (automatic), 0 (no sequence splitting) or a positive "
            f"number of 64-token chunks per segment, got {segment_chunks!r}"
        )
    if segment_chunks < 0:
        raise ValueError(
            f"segment_chunks must be None, 0 or a positive number of chunks, got {segment_chunks}"
        )
    return segment_chunks


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def auto_segment_chunks(
    num_seq_heads: int, max_chunks: int, V: int, device: torch.device | str
) -> int:
    """The automatic choice of ``segment_chunks``: 0 (no split) unless it can pay.

    Splits only on a CUDA device whose SMs the state pass leaves mostly idle: with ``P =
    num_seq_heads * cdiv(V, 32)`` programs on ``SM`` SMs and ``2 P <= SM`` (the split adds
    about 2.8x the pass's work at ``K = V``, which a half-filled GPU absorbs; the cost model,
    ``python -m benchmarks.kernel_cost --predict``, finds no gain at B=1 H=32 T=1M, ``P =
    128``, below 1.3 us per chunk step), it takes ``S =
    min(ceil(2 SM / P), floor(sqrt(2 C)))`` segments for the longest sequence (``C`` =
    ``max_chunks``; two programs per SM, and ``sqrt(2 C)`` minimises the chain ``2 C / S +
    S``), each of at least :data:`MIN_SEGMENT_CHUNKS` chunks; 0 unless that at least halves
    the chain (``2 ceil(C / S) + S <= C / 2``: ``S >= 4``, ``C >= 64``). On the CPU
    (the interpreter) it never splits; pass ``segment_chunks`` to force it.
    """
    device = torch.device(device)
    if device.type != "cuda" or max_chunks < 2 * MIN_SEGMENT_CHUNKS:
        return 0
    sms = _sm_count(device)
    programs = num_seq_heads * triton.cdiv(V, _GRID_BV)
    if 2 * programs > sms:
        return 0
    segments = min(-(-2 * sms // programs), math.isqrt(2 * max_chunks))
    segments = min(segments, max_chunks // MIN_SEGMENT_CHUNKS)
    if segments < 2:
        return 0
    seg = -(-max_chunks // segments)
    if 2 * seg + segments > max_chunks // 2:  # the chain must at least halve
        return 0
    return seg


@functools.lru_cache(maxsize=64)
def segment_plan(
    offsets: tuple[int, ...], segment_chunks: int, device: torch.device
) -> SegmentPlan | None:
    """The :class:`SegmentPlan` of a packed batch with sequence ``offsets`` (host ints), or None
    when no sequence has more than ``segment_chunks`` chunks (nothing to split) or
    ``segment_chunks`` is 0. An empty sequence keeps one empty segment (its final state is its
    initial state). Cached: repeated shapes cost no host-to-device copy."""
    if segment_chunks <= 0:
        return None
    seg_len = segment_chunks * CHUNK_SIZE
    bounds, chunk_offsets, seq_segments = [0], [0], [0]
    split = False
    most = 1
    for bos, eos in zip(offsets[:-1], offsets[1:]):
        cuts = list(range(bos, eos, seg_len))[1:] if eos > bos else []
        split |= bool(cuts)
        most = max(most, len(cuts) + 1)
        for a, b in zip([bos, *cuts], [*cuts, eos]):
            bounds.append(b)
            chunk_offsets.append(chunk_offsets[-1] + triton.cdiv(b - a, CHUNK_SIZE))
        seq_segments.append(seq_segments[-1] + len(cuts) + 1)
    if not split:
        return None
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    return SegmentPlan(
        as_tensor(bounds),
        as_tensor(chunk_offsets),
        as_tensor(seq_segments),
        len(bounds) - 1,
        segment_chunks,
        most,
    )


#: Environment variable with the default of ``segment_chunks`` for calls that leave it None
#: (the model's layers do): unset or ``auto`` (the automatic choice), ``0`` (never split) or a
#: positive number of chunks per segment.
SEGMENT_CHUNKS_ENV = "KIMI_LINEAR_SEGMENT_CHUNKS"


def env_segment_chunks() -> int | None:
    """``KIMI_LINEAR_SEGMENT_CHUNKS`` as a ``segment_chunks`` value (None: automatic).

    Raises:
        ValueError: a value other than ``auto``, ``0`` or a positive integer.
    """
    raw = os.environ.get(SEGMENT_CHUNKS_ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return None
    if not raw.isdigit():
        raise ValueError(
            f"{SEGMENT_CHUNKS_ENV} must be 'auto', 0 (never split) or a positive number of "
            f"64-token chunks per segment, got {raw!r}"
        )
    return int(raw)


def plan_for(
    offsets: tuple[int, ...],
    num_heads: int,
    V: int,
    device: torch.device,
    segment_chunks: int | None,
) -> SegmentPlan | None:
    """The segment plan of a call: ``segment_chunks`` as given, else
    ``KIMI_LINEAR_SEGMENT_CHUNKS`` (:func:`env_segment_chunks`), else the automatic choice
    (:func:`auto_segment_chunks`); None when nothing is split.

    The automatic choice counts the (sequence, head) pairs whose chains bound the pass: the
    sequences at least half as long as the longest (a packed batch of many short sequences and
    one long one is as serial as the long one alone)."""
    if segment_chunks is None:
        segment_chunks = env_segment_chunks()
    if segment_chunks is None:
        if device.type != "cuda":  # the automatic choice never splits off a GPU
            return None
        chunks = [triton.cdiv(b - a, CHUNK_SIZE) for a, b in zip(offsets[:-1], offsets[1:])]
        longest = max(chunks, default=0)
        bounding = sum(1 for c in chunks if 2 * c >= longest)
        segment_chunks = auto_segment_chunks(bounding * num_heads, longest, V, device)
    return segment_plan(tuple(offsets), segment_chunks, device)


@triton.jit
def _fold_kernel(
    M,
    A,
    s0,
    entry,
    final,
    seq_segments,
    H,
    m_stride,
    a_stride,
    K: tl.constexpr,
    V: tl.constexpr,
    LDM: tl.constexpr,
    LDA: tl.constexpr,
    BK: tl.constexpr,
    BKS: tl.constexpr,
    BV: tl.constexpr,
    USE_S0: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    REVERSE: tl.constexpr,
):
    """Fold the segments of one sequence and head for a block of ``BV`` value columns.

    Grid ``(cdiv(V, BV) * N * H,)``. Per segment ``j`` (in order, or last to first with
    ``REVERSE``) it stores the running state ``s`` as ``entry[j]`` (``[NS, H, K, V]`` fp32),
    then ``s = M_j s + A_j`` (``REVERSE``: ``s = M_j^T s + A_j``), in exact fp32 products;
    ``final[n]`` receives the state after the last segment. ``M_j`` is ``[K, K]`` with row
    stride ``LDM`` at ``M + (j * H + h) * m_stride``; ``A_j`` is ``[K, V]`` with row stride
    ``LDA`` at ``A + (j * H + h) * a_stride``. The running state lives in ``entry`` between
    steps (a barrier orders the store and the reload), so registers hold one ``[BK, BKS]``
    slice of ``M`` and one ``[BKS, BV]`` slice of ``s`` at a time.
    """
    NV: tl.constexpr = (V + BV - 1) // BV
    i_v, i_nh = tl.program_id(0) % NV, tl.program_id(0) // NV
    i_n, i_h = i_nh // H, i_nh % H
    lo = tl.load(seq_segments + i_n)
    hi = tl.load(seq_segments + i_n + 1)
    rows = tl.arange(0, BK)
    cols = i_v * BV + tl.arange(0, BV)
    m_kv = (rows < K)[:, None] & (cols < V)[None, :]
    off_kv = rows[:, None] * V + cols[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_S0:
        b_s += tl.load(s0 + (i_n * H + i_h).to(tl.int64) * K * V + off_kv, mask=m_kv, other=0.0)
    for i in range(0, hi - lo):
        if REVERSE:
            j = hi - 1 - i
        else:
            j = lo + i
        p_e = entry + (j * H + i_h).to(tl.int64) * K * V + off_kv
        tl.store(p_e, b_s, mask=m_kv)
        tl.debug_barrier()
        m_base = M + (j * H + i_h).to(tl.int64) * m_stride
        b_new = tl.load(
            A + (j * H + i_h).to(tl.int64) * a_stride + rows[:, None] * LDA + cols[None, :],
            mask=m_kv,
            other=0.0,
        )
        for i_k in range(0, tl.cdiv(K, BKS)):
            sub = i_k * BKS + tl.arange(0, BKS)
            m_sub = sub < K
            b_part = tl.load(
                entry + (j * H + i_h).to(tl.int64) * K * V + sub[:, None] * V + cols[None, :],
                mask=m_sub[:, None] & (cols < V)[None, :],
                other=0.0,
            )
            if REVERSE:  # (M^T)[:, sub] = M[sub, :]^T
                b_m = tl.trans(
                    tl.load(
                        m_base + sub[:, None] * LDM + rows[None, :],
                        mask=m_sub[:, None] & (rows < K)[None, :],
                        other=0.0,
                    )
                )
            else:
                b_m = tl.load(
                    m_base + rows[:, None] * LDM + sub[None, :],
                    mask=(rows < K)[:, None] & m_sub[None, :],
                    other=0.0,
                )
            b_new += tl.dot(b_m, b_part, input_precision="ieee")
        b_s = b_new
        tl.debug_barrier()
    if STORE_FINAL:
        tl.store(final + (i_n * H + i_h).to(tl.int64) * K * V + off_kv, b_s, mask=m_kv)


def fold_constexprs(K: int, V: int, reverse: bool) -> dict[str, int | bool]:
    """The constexprs of :func:`_fold_kernel` as :func:`fold_states` launches it (``M`` a view
    of the transitions pass's ``[.., K, V + K]`` output; ``A`` the same output's ``H`` forward,
    a dense ``[.., K, V]`` tensor in reverse); ``USE_S0`` / ``STORE_FINAL`` as the common case."""
    BK = next_pow2(K)
    return dict(
        K=K,
        V=V,
        LDM=V + K,
        LDA=V if reverse else V + K,
        BK=BK,
        BKS=min(BK, 32),
        BV=min(next_pow2(V), 32),
        USE_S0=True,
        STORE_FINAL=True,
        REVERSE=reverse,
    )


def fold_states(
    M: torch.Tensor,
    A: torch.Tensor,
    s0: torch.Tensor | None,
    plan: SegmentPlan,
    num_seqs: int,
    store_final: bool,
    reverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run :func:`_fold_kernel`: each segment's entry state and each sequence's final state.

    Args:
        M: ``[NS, H, K, K]`` transitions (a strided view is fine: the last dim contiguous).
        A: ``[NS, H, K, V]`` offsets (strided view as ``M``).
        s0: ``[N, H, K, V]`` fp32 state before each sequence's first segment (after its last
            with ``reverse``), or None for zeros.
        plan: the batch's segments.
        num_seqs: N.
        store_final: also return the ``[N, H, K, V]`` fp32 state after the fold.
        reverse: fold from the last segment to the first with ``M^T`` (the backward's
            state gradients: ``entry[j]`` is then the gradient at segment ``j``'s end).

    Returns:
        ``(entry [NS, H, K, V] fp32, final or None)``.
    """
    NS, H, K, V = A.shape
    for name, x in (("M", M), ("A", A)):
        if x.stride(-1) != 1 or x.stride(0) != H * x.stride(1):
            raise ValueError(f"fold_states: {name} needs a unit last stride and dense heads")
    f32 = dict(dtype=torch.float32, device=A.device)
    entry = torch.empty(NS, H, K, V, **f32)
    final = torch.empty(num_seqs, H, K, V, **f32) if store_final else None
    meta = fold_constexprs(K, V, reverse)
    meta.update(LDM=M.stride(2), LDA=A.stride(2), USE_S0=s0 is not None, STORE_FINAL=store_final)
    _fold_kernel[checked_grid(triton.cdiv(V, meta["BV"]) * num_seqs * H)](
        M,
        A,
        s0 if s0 is not None else entry,
        entry,
        final if final is not None else entry,
        plan.seq_segments,
        H,
        M.stride(1),
        A.stride(1),
        **meta,
        num_warps=4,
    )
    return entry, final
