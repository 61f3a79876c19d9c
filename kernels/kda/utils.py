"""Shared plumbing of the KDA Triton kernels: input checks, sequence/chunk indexing, autotuning.

Every kernel works on a *packed* layout: ``[1, total_tokens, H, D]`` with ``cu_seqlens`` offsets.
A dense batch ``[B, T, H, D]`` is the packed batch with ``cu_seqlens = [0, T, 2T, ..., BT]``
(a free view of a contiguous tensor), so there is one code path for both.

Chunks never straddle sequence boundaries: ``chunk_indices[i] = (sequence n, chunk c within n)``
lists the chunks of all sequences in order, and ``chunk_offsets[n]`` is the index of sequence n's
first chunk, so per-chunk buffers (states ``h``) are indexed by the global chunk number.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import triton

from kimi_linear.ops.checks import check_kda_inputs

#: Chunk length of the chunked kernels and sub-chunk length of their intra-chunk pairwise parts.
CHUNK_SIZE = 64
SUB_CHUNK_SIZE = 16
#: Largest head dims the kernels take (whole heads live in registers).
MAX_HEAD_DIM = 256
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Interpreter numerics. On a GPU, bf16 / fp16 operands of ``tl.dot`` are multiplied exactly with
# fp32 accumulation, ``x.to(tl.bfloat16)`` rounds to nearest even, and fp32 operands with
# ``input_precision="tf32"`` are rounded to TF32 (10-bit mantissa) first. Triton's CPU
# interpreter (3.x) instead multiplies the raw uint16 bit patterns of bf16 operands, truncates
# fp32 -> bf16 casts and ignores ``input_precision``. :func:`patch_interpreter` (applied on
# import and before every CPU launch, only under ``TRITON_INTERPRET=1``) fixes the first two for
# every Triton kernel; :func:`emulate_tf32` is the test switch for the third, so the CPU suite
# sees the rounding error a GPU will have.
# ---------------------------------------------------------------------------------------------

_TF32 = {"on": False}


def _round_mantissa(x, drop_bits: int):
    """fp32 numpy array rounded to nearest even at ``23 - drop_bits`` mantissa bits."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    half = np.uint64((1 << (drop_bits - 1)) - 1)
    bits = bits + half + ((bits >> np.uint64(drop_bits)) & np.uint64(1))
    bits = bits & np.uint64(0xFFFFFFFF ^ ((1 << drop_bits) - 1))
    return bits.astype(np.uint32).view(np.float32)


def patch_interpreter() -> None:
    """Make the Triton interpreter's ``tl.dot`` and fp32 -> bf16 casts match a GPU (see above).

    Idempotent; a no-op unless ``TRITON_INTERPRET=1``. Affects every kernel run under the
    interpreter in this process (also other libraries'): it only corrects results.
    """
    if not interpret_mode():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_kimi_linear_patched", False):
        return
    create_dot, cast_impl = builder.create_dot, builder.cast_impl
    tf32 = getattr(interpreter._ir.INPUT_PRECISION, "TF32", None)

    def as_fp32(h):
        if h.dtype.scalar == tl.bfloat16:  # stored as uint16 bit patterns
            data = (h.data.astype(np.uint32) << np.uint32(16)).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)
        if _TF32["on"] and h.dtype.scalar == tl.float32:
            return interpreter.TensorHandle(_round_mantissa(h.data, 13), tl.float32)
        return h

    def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if (
            a.dtype.scalar == tl.bfloat16
            or b.dtype.scalar == tl.bfloat16
            or (_TF32["on"] and input_precision == tf32)
        ):
            a, b = as_fp32(a), as_fp32(b)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = _round_mantissa(src.data, 16).view(np.uint32) >> np.uint32(16)
            return interpreter.TensorHandle(data.astype(np.uint16), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    builder.create_dot, builder.cast_impl = dot, cast
    for name in ("create_fp_ext", "create_fp_trunc"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
    builder._kimi_linear_patched = True


@contextlib.contextmanager
def emulate_tf32(enabled: bool = True) -> Iterator[None]:
    """Test switch: under the interpreter, round fp32 ``tl.dot`` operands of products with
    ``input_precision="tf32"`` to TF32 (10-bit mantissa, nearest even), as a GPU does.

    Without it the interpreter computes those products exactly, hiding the TF32 error."""
    patch_interpreter()
    previous = _TF32["on"]
    _TF32["on"] = enabled
    try:
        yield
    finally:
        _TF32["on"] = previous


#: Names of the two size-bucket arguments every autotuned chunk kernel takes (after ``H``) and
#: lists in its autotune ``key`` (see :func:`autotune` and :func:`tune_buckets`).
TUNE_KEYS = ("T_BUCKET", "NH_BUCKET")


def tune_bucket(n: int) -> int:
    """Coarse autotune-key bucket of a size ``n``: the largest power of 4 not above it (1 for
    ``n <= 1``), so 1, 4, 16, ..., 4096 (``n`` in [4096, 16384)), 16384, ...

    Raises:
        TypeError: ``n`` is not an int.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    bucket = 1
    while bucket * 4 <= n:
        bucket *= 4
    return bucket


def tune_buckets(total_tokens: int, num_seqs_heads: int) -> dict[str, int]:
    """The size-bucket launch arguments of an autotuned chunk kernel:
    ``{"T_BUCKET": tune_bucket(total_tokens), "NH_BUCKET": tune_bucket(N * H)}``.

    ``total_tokens`` is the packed length ``TT`` (``B * T`` for a dense batch),
    ``num_seqs_heads`` the number of (sequence, head) pairs ``N * H``. Pass them as keyword
    arguments at the launch: ``kernel[grid](..., H, **tune_buckets(TT, N * H), K=K, ...)``; the
    kernel declares ``T_BUCKET, NH_BUCKET`` (plain ints it does not read) and names them in its
    autotune ``key``, e.g. ``key=["K", "V", *TUNE_KEYS]``.
    """
    return {"T_BUCKET": tune_bucket(total_tokens), "NH_BUCKET": tune_bucket(num_seqs_heads)}


#: CUDA's launch-grid limits per axis: ``2**31 - 1`` blocks on axis 0, 65,535 on axes 1 and 2.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def checked_grid(*axes: int) -> tuple[int, ...]:
    """``axes`` as a launch grid, after checking CUDA's per-axis limits (:data:`GRID_LIMITS`).

    The launchers put every dimension that grows with the batch (chunks, sequences x heads,
    times the value or key blocks) on axis 0, flattened, and only the head count on axis 1: a
    grid with the chunk count on axis 1 would fail to launch past 65,535 chunks (~4.19M packed
    tokens).

    Raises:
        ValueError: more than three axes, or an axis past its limit (named in the message).
    """
    if not 1 <= len(axes) <= 3:
        raise ValueError(f"a launch grid has 1 to 3 axes, got {len(axes)}")
    for i, (n, limit) in enumerate(zip(axes, GRID_LIMITS)):
        if n > limit:
            raise ValueError(f"launch grid axis {i} has {n} blocks, more than CUDA's {limit}")
    return tuple(axes)


#: Integer launch arguments the kernels never specialise on (``triton.jit(do_not_specialize=...)``):
#: the head count ``H`` and the size buckets. Triton otherwise compiles a separate binary for a
#: value of 1 and for values divisible by 16 (bucket values 1, 4, 16, ... would give three
#: binaries per kernel); unspecialised, one binary serves every value, and it is the binary
#: ``compile_check`` reports (it compiles these arguments as plain ``i32``).
NO_SPECIALIZE = ("H", "HQ", *TUNE_KEYS)

#: Autotune spaces (:func:`set_autotune_space`, env ``KIMI_LINEAR_AUTOTUNE``): ``"full"`` (the
#: default: every config of the kernel), ``"suite"`` (a small set per kernel chosen from the sm_90
#: compile report, spill-free at >= 2 CTAs/SM; what the GPU suite tunes over, so that a cold-cache
#: run compiles a few binaries per kernel instead of ~110 configs per dtype and head dim) and
#: ``"first"`` (the first config alone: nothing is benchmarked, one binary per kernel).
AUTOTUNE_SPACES = ("full", "suite", "first")
AUTOTUNE_ENV = "KIMI_LINEAR_AUTOTUNE"


class TunedKernel(NamedTuple):
    """An autotuned kernel and its config spaces (the registry :func:`autotuned_kernels` lists)."""

    kernel: object  #: the ``triton.autotune`` object (``_FixedConfig`` under the interpreter)
    name: str
    full: tuple[triton.Config, ...]
    suite: tuple[triton.Config, ...]
    restore_value: tuple[str, ...]


_TUNED: list[TunedKernel] = []
_SPACE = {"name": None}


def config_id(c: triton.Config) -> tuple:
    """A hashable identity of a config: (sorted meta-parameters, num_warps, num_stages)."""
    return (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)


def config_str(c: triton.Config) -> str:
    """``"BV=32 w4 s2"``: a config as the reports print it."""
    meta = " ".join(f"{k}={v}" for k, v in sorted(c.kwargs.items()))
    return (meta + " " if meta else "") + f"w{c.num_warps} s{c.num_stages}"


def autotune_space() -> str:
    """The autotune space in effect: set by :func:`set_autotune_space`, else the environment
    variable ``KIMI_LINEAR_AUTOTUNE``, else ``"full"``.

    Raises:
        ValueError: ``KIMI_LINEAR_AUTOTUNE`` is not one of :data:`AUTOTUNE_SPACES`.
    """
    if _SPACE["name"] is not None:
        return _SPACE["name"]
    name = os.environ.get(AUTOTUNE_ENV, "full") or "full"
    if name not in AUTOTUNE_SPACES:
        raise ValueError(
            f"{AUTOTUNE_ENV} must be one of {', '.join(AUTOTUNE_SPACES)}, got {name!r}"
        )
    return name


def space_configs(entry: TunedKernel, space: str) -> tuple[triton.Config, ...]:
    """The configs of ``entry`` in ``space`` (:data:`AUTOTUNE_SPACES`)."""
    if space not in AUTOTUNE_SPACES:
        raise ValueError(f"space must be one of {', '.join(AUTOTUNE_SPACES)}, got {space!r}")
    return {"full": entry.full, "suite": entry.suite, "first": entry.full[:1]}[space]


def set_autotune_space(space: str | None) -> None:
    """Switch every autotuned KDA kernel to the configs of ``space`` (``None``: back to the
    environment's choice). Tuned results of the previous space are dropped (the next launch of
    each size bucket tunes again, over the new space); compiled binaries are kept.

    Raises:
        ValueError: ``space`` is not one of :data:`AUTOTUNE_SPACES`.
    """
    if space is not None and space not in AUTOTUNE_SPACES:
        raise ValueError(f"space must be one of {', '.join(AUTOTUNE_SPACES)}, got {space!r}")
    _SPACE["name"] = space
    _apply_space()


def _apply_space() -> None:
    space = autotune_space()
    for entry in _TUNED:
        configs = getattr(entry.kernel, "configs", None)
        if configs is None:  # the interpreter's fixed config: always the first
            continue
        entry.kernel.configs = list(space_configs(entry, space))
        entry.kernel.cache.clear()


def autotuned_kernels() -> tuple[TunedKernel, ...]:
    """Every kernel decorated with :func:`autotune`, in definition order."""
    return tuple(_TUNED)


def autotune(
    configs: Sequence[triton.Config],
    key: list[str],
    restore_value: Sequence[str] = (),
    suite: Sequence[int] = (0,),
) -> Callable:
    """``triton.autotune`` on GPU; a fixed first config under the interpreter (no driver there).

    Keys: the head dims (``K``, ``V``) and two coarse size buckets, ``T_BUCKET`` (packed
    tokens ``TT``) and ``NH_BUCKET`` (sequences x heads ``N * H``), powers of 4 from
    :func:`tune_buckets` passed as launch arguments (:data:`TUNE_KEYS`). A short prefill and a
    long training batch, or few heads and many packed sequences, are tuned apart (the best tile
    and warp count depend on how many programs fill the GPU), while the exact sequence length
    never is: varlen batches of new lengths in a bucket reuse its tuned config. Triton's
    autotuner also keys on the dtypes of the tensor arguments. Under the interpreter the keys
    are ignored (the first config always runs).

    ``suite``: indices into ``configs`` of the GPU suite's small set (:data:`AUTOTUNE_SPACES`),
    starting with 0. ``restore_value``: arguments the kernel updates in place (Triton clones
    them before every benchmarked call): only small ones, since a clone of a ``[TT, H, V]``
    fp32 buffer is gigabytes at long context.
    """
    configs = tuple(configs)
    if not suite or suite[0] != 0 or len(set(suite)) != len(suite):
        raise ValueError(f"suite must list distinct config indices starting with 0, got {suite}")
    if max(suite) >= len(configs):
        raise ValueError(f"suite index {max(suite)} is out of range for {len(configs)} configs")

    def decorate(fn):
        if interpret_mode():
            tuned = _FixedConfig(fn, configs[0])
        else:
            tuned = triton.autotune(
                configs=list(configs), key=key, restore_value=list(restore_value)
            )(fn)
        entry = TunedKernel(
            tuned,
            getattr(fn, "__name__", str(fn)),
            configs,
            tuple(configs[i] for i in suite),
            tuple(restore_value),
        )
        _TUNED.append(entry)
        if not interpret_mode():
            tuned.configs = list(space_configs(entry, autotune_space()))
        return tuned

    return decorate


class _FixedConfig:
    """Launches a jitted kernel with the meta-parameters of one config (interpreter mode)."""

    def __init__(self, fn, config: triton.Config):
        self.fn = fn
        self.kwargs = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self.fn[grid](*args, **self.kwargs, **kwargs)

        return launch


def config_space(first: triton.Config, **space: Sequence[int]) -> list[triton.Config]:
    """``first``, then every other combination of ``space`` (meta-parameters, ``num_warps``,
    ``num_stages``).

    The first config is the one the interpreter runs and the one :mod:`compile_check` reports:
    the one chosen (without a GPU) from the compiler's resource report, spill-free at
    ``K = V = 128`` on sm_90. The autotuner still times them all on a GPU (configs that exceed
    the device's shared memory are skipped by Triton).
    """
    names = list(space)
    configs = [first]
    for values in itertools.product(*(space[n] for n in names)):
        params = dict(zip(names, values))
        warps, stages = (
            params.pop("num_warps", first.num_warps),
            params.pop("num_stages", first.num_stages),
        )
        if params == first.kwargs and warps == first.num_warps and stages == first.num_stages:
            continue
        configs.append(triton.Config(params, num_warps=warps, num_stages=stages))
    return configs


def next_pow2(n: int, minimum: int = 16) -> int:
    """Power-of-two block size covering ``n`` (at least ``minimum``: ``tl.dot`` needs 16)."""
    return max(minimum, triton.next_power_of_2(n))


def resolve_state_v_first(state_v_first: bool, transpose_state_layout: bool | None) -> bool:
    """fla's deprecated alias of ``state_v_first``, ``transpose_state_layout``: honoured with
    fla's ``DeprecationWarning``; both at once is fla's ``ValueError``."""
    if transpose_state_layout is None:
        return state_v_first
    if state_v_first:
        raise ValueError(
            "Cannot pass both `state_v_first` and the deprecated `transpose_state_layout`."
        )
    warnings.warn(
        "`transpose_state_layout` is deprecated and renamed to `state_v_first`.",
        DeprecationWarning,
        stacklevel=3,
    )
    return bool(transpose_state_layout)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the stored chunk states ``h`` and state gradients ``dh`` for inputs of ``dtype``,
    and of the operands of every product with a state or state gradient: the input dtype, but
    bf16 for fp16 inputs (a state or its gradient can exceed fp16's range, 65504; bf16 has
    fp32's). They are carried in fp32 registers either way."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' products: exact fp32 ("ieee") for fp32 inputs.

    For 16-bit inputs every product takes 16-bit operands (``input_precision`` does not apply)
    except the solve's 16 x 16 block products, which are fixed to "ieee"; "tf32" is returned
    so that a new fp32-operand product would at least not run at the CUDA-core rate, and
    ``compile_check --targets`` reports any TF32 instruction as a miss."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_kernel_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    cu_seqlens_cpu: torch.Tensor | None = None,
) -> tuple[int, int, int, int, int, int]:
    """All checks of the Triton entry points, before any launch; returns ``(B, T, H, K, V, N)``.

    On top of :func:`kimi_linear.ops.checks.check_kda_inputs` (shapes, devices, cu_seqlens):
    dtypes limited to fp16/bf16/fp32 with q, k, v sharing one; head dims up to
    ``MAX_HEAD_DIM``; a CUDA device, or CPU tensors only under ``TRITON_INTERPRET=1``.
    """
    B, T, H, K, V, N = check_kda_inputs(
        q,
        k,
        v,
        g,
        beta,
        scale,
        initial_state,
        cu_seqlens,
        allowed_dtypes=KERNEL_DTYPES,
        cu_seqlens_cpu=cu_seqlens_cpu,  # the host offsets, if the caller has them: no read
    )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
    if K > MAX_HEAD_DIM:
        raise ValueError(f"q/k head dim K={K} exceeds the kernels' maximum {MAX_HEAD_DIM}")
    if V > MAX_HEAD_DIM:
        raise ValueError(f"v head dim V={V} exceeds the kernels' maximum {MAX_HEAD_DIM}")
    if q.device.type == "cpu":
        patch_interpreter()
        if not interpret_mode():
            raise ValueError(
                "q is on the CPU: the Triton KDA kernels need a CUDA device (or TRITON_INTERPRET=1, "
                "slow); use the torch backend kimi_linear.ops.naive_recurrent_kda / torch_chunk_kda on CPU"
            )
    elif q.device.type != "cuda":
        raise ValueError(f"q is on {q.device}: the Triton KDA kernels need a CUDA device")
    return B, T, H, K, V, N


class ChunkTables(NamedTuple):
    """Index tables of a packed batch (all int32, on the kernels' device)."""

    cu_seqlens: torch.Tensor  #: ``[N + 1]`` sequence offsets
    chunk_indices: torch.Tensor  #: ``[NT, 2]``: (sequence, chunk within the sequence) per chunk
    chunk_offsets: torch.Tensor  #: ``[N + 1]``: global index of each sequence's first chunk
    num_chunks: int  #: NT


@functools.lru_cache(maxsize=128)
def chunk_tables(
    offsets: tuple[int, ...], device: torch.device, chunk_size: int = CHUNK_SIZE
) -> ChunkTables:
    """Chunk tables for sequence ``offsets`` (cached: repeated shapes cost no host-device copy)."""
    indices, chunk_offsets = [], [0]
    for n, (bos, eos) in enumerate(zip(offsets[:-1], offsets[1:])):
        num = triton.cdiv(eos - bos, chunk_size)
        indices.extend([n, c] for c in range(num))
        chunk_offsets.append(chunk_offsets[-1] + num)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
    return ChunkTables(
        as_tensor(list(offsets)),
        as_tensor(indices).reshape(-1, 2),
        as_tensor(chunk_offsets),
        len(indices),
    )


def pack(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    offsets: tuple[int, ...] | None = None,
) -> tuple[tuple[torch.Tensor, ...], ChunkTables]:
    """Contiguous packed views ``[B*T, H, D]`` of the inputs and the batch's :class:`ChunkTables`.

    Non-contiguous inputs are copied to contiguous memory (the kernels take dense row-major heads).
    ``offsets``: the batch's :func:`packed_offsets`, if the caller has them already.
    """
    B, T = q.shape[:2]
    packed = tuple(x.contiguous().flatten(0, 1) for x in (q, k, v, g, beta))
    if offsets is None:
        offsets = packed_offsets(B, T, cu_seqlens)
    return packed, chunk_tables(offsets, q.device)


def packed_offsets(B: int, T: int, cu_seqlens: torch.Tensor | None) -> tuple[int, ...]:
    """Host sequence offsets of a batch: ``cu_seqlens`` as ints (a device-to-host read when it
    is on the device), or ``[0, T, ..., B*T]`` for a dense batch without touching the device."""
    if cu_seqlens is None:
        return tuple(b * T for b in range(B + 1))
    return tuple(int(x) for x in cu_seqlens.tolist())


patch_interpreter()
