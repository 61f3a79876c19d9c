"""The suite's parts, its pass rule, the shapes of a GPU run and of a dry run, and each item's
cost estimate."""

from __future__ import annotations

import dataclasses

import torch

from kimi_linear.testing import KDA_RTOL

PARTS = ("correctness", "speed", "model", "extra")
#: The parts a run does by default (``extra``: prefill, training, packed-batch speed, on request).
DEFAULT_PARTS = ("correctness", "speed", "model")
#: The autotune space of our kernels per part (``kimi_linear.kernels.utils.AUTOTUNE_SPACES``):
#: correctness needs no tuning (the first config, one binary per kernel); the timed parts tune
#: over the small pre-chosen ``suite`` set. fla's autotuning is left alone.
PART_SPACE = {"correctness": "first", "speed": "suite", "model": "suite", "extra": "suite"}

#: Norm-relative tolerance of our kernels against the float64 reference, by input dtype
#: (:data:`kimi_linear.testing.KDA_RTOL`). An item also passes when our error is at most
#: ``FLA_SLACK`` times fla's own error against the same reference (bf16 gradients such as ``dg``
#: carry rounding no bf16 kernel avoids).
TOLERANCE = {dtype: KDA_RTOL[dtype] for dtype in (torch.float32, torch.bfloat16)}
FLA_SLACK = 1.25


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes and repetition counts of one run (:func:`gpu_sizes` or :func:`dry_run_sizes`).

    Shapes are ``(B, T, H, K, V)``; the ``*_s`` fields are rough costs (seconds) used only to
    skip an item that would not finish inside the budget.
    """

    chunk_shapes: tuple[tuple[int, int, int, int, int], ...]
    odd_shape: tuple[int, int, int, int, int]
    reference_check_shape: tuple[int, int, int, int, int]
    varlen_lengths: tuple[int, ...]
    varlen_heads: tuple[int, int, int]  # H, K, V
    recurrent_shapes: tuple[tuple[int, int, int, int, int], ...]
    model_preset: str
    model_batch: tuple[int, int]  # B, T
    model_steps: int
    speed_shapes: tuple[tuple[int, int, int, int, int], ...]
    speed_varlen: tuple[int, int, int, int]  # sequences, min len, max len, H (K = V = 128)
    speed_decode_batches: tuple[int, ...]
    speed_decode_heads: tuple[int, int, int]
    speed_rounds: int
    bench_preset: str
    bench_experts: int | None
    decode_contexts: tuple[int, ...]
    decode_steps: int
    decode_reps: int
    max_batch: int
    prefill_lengths: tuple[int, ...]
    prefill_chunk: int
    train_preset: str
    train_batch: tuple[int, int]
    train_steps: int
    train_backends: tuple[str, ...]
    costs: dict[str, Cost]
    compile_s: dict[str, float]
    grid_chunks: int = 8  # the grid item: chunks of its long sequence
    safe_gate_bound: float = -5.0
    #: forced ``segment_chunks`` of the split paths the correctness items check beside the
    #: unsplit one (dense chunk items, varlen items): several segments per sequence
    split_chunks: tuple[int, int] = (2, 1)
    #: fixed ``segment_chunks`` timed beside unsplit and automatic at the long speed anchor
    split_speed_chunks: tuple[int, ...] = (32,)
    #: the step-latency item: B=1 H=1 at these lengths, (K, V)
    step_latency_lengths: tuple[int, int] = (16384, 65536)
    step_latency_dims: tuple[int, int] = (128, 128)


@dataclasses.dataclass(frozen=True)
class Cost:
    """Estimated cost of one item on an H100 / H200 from a cold Triton cache: ``run_s`` seconds
    of work, plus the compile of every kernel set in ``compiles`` (:data:`COMPILE_S`) that no
    earlier item of the run compiled."""

    run_s: float
    compiles: tuple[str, ...] = ()


#: Cold-cache compile seconds of each kernel set the suite builds, charged to the first item that
#: uses it. ``ours ...``: the sum over the kernels of the set of ``compile_s`` in
#: ``python -m kimi_linear.kernels.compile_check --arch 90 --space first|suite`` (Triton's sm_90
#: compiler on this repository's 2-core CI-class CPU, shared: an upper bound for a GPU host),
#: rounded up; the sets are per dtype and head dims (the head count and size buckets are not
#: specialised, ``utils.NO_SPECIALIZE``). ``fla ...``: estimates, not measured (fla's kernels
#: were not compiled here): its autotune lists hold about 80 configs for ``chunk_kda`` forward +
#: backward, at ~1 s each, and its head count ``H`` is a compile-time constant, so each new H
#: compiles the set again.
COMPILE_S: dict[str, float] = {
    # benchmarks/results/cpu/kernels.compile_sm90_bf16_k128_suite_split.md (CPU seconds, the
    # kernels of issue 21 part 2), summed over the set's binaries and rounded up; the forward
    # state kernel counted twice (the backward's recompute runs it without the final state)
    "ours chunk bf16 K=V=128": 14.0,  # 13.2
    "ours safe gate bf16 K=V=128": 5.0,  # 3.66 + 0.84
    "ours suite configs bf16 K=V=128": 5.0,
    "ours recurrent bf16": 1.0,
    "ours decode variants bf16": 1.0,
    # kernels.compile_sm90_fp32_k128_first_split.md (compile_check --dtype fp32, first space)
    "ours chunk fp32 K=V=128": 29.0,  # 28.8
    "ours safe gate fp32 K=V=128": 8.0,  # 6.31 + 1.06
    "ours recurrent fp32": 1.0,
    # the two state kernels again, without initial / final state (the model's layers)
    "ours state variants fp32": 9.0,  # 4.16 + 4.57
    # kernels.compile_sm90_bf16_k64v128_first_split.md (--head-dim 64 --value-dim 128)
    "ours chunk bf16 K=64 V=128": 9.0,  # 8.6
    # in-device sequence splitting (kimi_linear.kernels.split), first config, from the two
    # *_split reports: _chunk_fwd_state_kernel[SEGMENT_PASS], _chunk_bwd_state_kernel[no chunk stores],
    # the backward's second reverse pass (its plain kernel without dh0: one more binary, timed
    # as the plain one) and, bf16 only (fp32 pointers in both dtypes: one binary each), the
    # fold forward with and without the final state and in reverse (_fold_kernel[REVERSE])
    "ours split bf16 K=V=128": 4.0,  # 0.76 + 0.65 + 0.74 + 2 x 0.63 + 0.59
    "ours split fp32 K=V=128": 13.0,  # 4.02 + 3.45 + 4.57
    # the split kernels' second suite config (kernels.compile_sm90_bf16_k128_suite)
    "ours split suite configs bf16 K=V=128": 2.0,  # 0.65 + 0.54 + 0.75
    # estimates (see above)
    "fla chunk bf16 H=64 (full autotune)": 80.0,
    "fla chunk bf16 H=16 (full autotune)": 80.0,
    "fla recurrent bf16": 3.0,
}

#: Default wall-clock budget of a run (``--budget``), minutes.
DEFAULT_BUDGET_MIN = 8.0
#: Seconds before the first item: imports (torch, triton, fla), the CUDA context, the result
#: folder (the budget's clock starts after them; the plan counts them against it anyway).
STARTUP_S = 15.0


def gpu_sizes() -> Sizes:
    """The sizes of a real run on one H100 / H200 (80-141 GB)."""
    return Sizes(
        # correctness: small batches (the float64 reference runs on the GPU too), the long
        # sequence at full depth, every chunk item at one head count
        chunk_shapes=((2, 2048, 8, 128, 128), (1, 32768, 8, 128, 128)),
        odd_shape=(2, 1000, 8, 64, 128),
        reference_check_shape=(1, 512, 4, 64, 64),
        varlen_lengths=(1, 17, 63, 64, 65, 1000, 3000, 4096, 200),
        varlen_heads=(8, 128, 128),
        recurrent_shapes=((64, 1, 32, 128, 128), (4, 512, 32, 128, 128)),
        model_preset="small",
        model_batch=(2, 1024),
        model_steps=3,
        # speed: the anchor shapes, 1M token-heads each (issue 21)
        speed_shapes=((2, 8192, 64, 128, 128), (1, 65536, 16, 128, 128)),
        speed_varlen=(256, 16, 512, 32),
        speed_decode_batches=(1, 64),
        speed_decode_heads=(32, 128, 128),
        speed_rounds=3,
        bench_preset="kimi-linear-48b-a3b",
        bench_experts=16,
        decode_contexts=(1 << 20, 128 << 10),
        decode_steps=8,
        decode_reps=3,
        max_batch=256,
        prefill_lengths=(8 << 10, 32 << 10, 128 << 10),
        prefill_chunk=16 << 10,
        train_preset="small",
        train_batch=(8, 2048),
        train_steps=5,
        train_backends=("triton", "fla"),
        grid_chunks=70_000,  # 4.48M tokens: past CUDA's 65,535 blocks on a grid's axes 1 and 2
        costs={
            "reference": Cost(3),  # T=512: the token-by-token recurrence's loop dominates
            # + 0.5 s: the split path beside the unsplit one, on the same reference
            "chunk bf16": Cost(6.5, ("ours chunk bf16 K=V=128", "ours split bf16 K=V=128")),
            "chunk fp32": Cost(5.5, ("ours chunk fp32 K=V=128", "ours split fp32 K=V=128")),
            "safe gate bf16": Cost(5, ("ours safe gate bf16 K=V=128",)),
            "safe gate fp32": Cost(5, ("ours safe gate fp32 K=V=128",)),
            "varlen bf16": Cost(6.5),
            "varlen fp32": Cost(5.5),
            "odd bf16": Cost(4, ("ours chunk bf16 K=64 V=128",)),
            "long bf16": Cost(10.5),  # automatic split and unsplit
            "grid bf16": Cost(8),
            "recurrent bf16": Cost(3, ("ours recurrent bf16",)),
            "recurrent fp32": Cost(3, ("ours recurrent fp32",)),
            "recurrent varlen bf16": Cost(3),
            "recurrent varlen fp32": Cost(3),
            "model_check": Cost(15, ("ours state variants fp32",)),
            "speed B=2 T=8K H=64": Cost(  # ours, without NaN isolation, safe gate; fla
                24, ("ours suite configs bf16 K=V=128", "fla chunk bf16 H=64 (full autotune)")
            ),
            "speed B=1 T=64K H=16": Cost(  # + unsplit and a fixed split, their tuning
                23.5,
                ("fla chunk bf16 H=16 (full autotune)", "ours split suite configs bf16 K=V=128"),
            ),
            "speed_decode": Cost(6, ("fla recurrent bf16",)),
            "step latency": Cost(2),  # B=1 H=1, compiled first configs, no tuning
            "decode_model": Cost(25, ("ours decode variants bf16",)),
            # not in the default parts (--parts extra)
            "speed_varlen": Cost(60),
            "prefill_model": Cost(30),
            "train": Cost(30),
        },
        compile_s=COMPILE_S,
    )


def dry_run_sizes() -> Sizes:
    """Toy sizes that run every item on a CPU under the Triton interpreter in seconds."""
    return Sizes(
        chunk_shapes=((2, 70, 2, 16, 16), (1, 150, 2, 16, 16)),
        odd_shape=(1, 37, 2, 16, 32),
        reference_check_shape=(1, 40, 2, 8, 8),
        varlen_lengths=(1, 17, 40, 130),  # 130: three chunks, split into three segments
        varlen_heads=(2, 16, 16),
        recurrent_shapes=((3, 1, 2, 16, 16), (1, 20, 2, 16, 32)),
        model_preset="tiny",
        model_batch=(1, 32),
        model_steps=2,
        speed_shapes=((1, 64, 1, 16, 16), (1, 128, 1, 16, 16)),
        speed_varlen=(3, 4, 16, 1),
        speed_decode_batches=(1, 4),
        speed_decode_heads=(2, 16, 16),
        speed_rounds=1,
        bench_preset="tiny",
        bench_experts=None,
        decode_contexts=(1024, 256),
        decode_steps=1,
        decode_reps=1,
        max_batch=3,
        prefill_lengths=(64, 192),
        prefill_chunk=64,
        train_preset="tiny",
        train_batch=(1, 32),
        train_steps=1,
        train_backends=("triton", "torch"),
        grid_chunks=8,
        costs={},
        compile_s={},
        split_chunks=(1, 1),
        split_speed_chunks=(1,),
        step_latency_lengths=(64, 192),
        step_latency_dims=(16, 16),
    )
