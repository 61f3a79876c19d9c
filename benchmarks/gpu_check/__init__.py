"""One command that validates the Triton KDA kernels on a GPU and produces every GPU figure.

Run on one H100 / H200 (a few minutes), from the repository root::

    python -m benchmarks.gpu_check                    # budget 8 minutes, all three parts
    python -m benchmarks.gpu_check --budget 4 --parts correctness
    python -m benchmarks.gpu_check --dry-run          # CPU, toy sizes, Triton interpreter (CI)

Three parts, in order of value; each item's result is written as soon as it finishes, so a run
cut off by its budget (or killed) keeps everything measured before:

1. ``correctness``: :func:`kimi_linear.kernels.chunk_kda` forward and backward (output, final
   state and the gradients of q, k, v, g, beta and the initial state; equal-length and packed
   varlen batches) and :func:`kimi_linear.kernels.fused_recurrent_kda` against a float64
   reference and fla's kernels, in bf16 and fp32, at shapes up to B=4, H=32, T=8K, K=V=128 and
   B=1, H=16, T=64K; then the model's ``triton`` backend against its ``torch`` backend over a
   few fp32 training steps of the ``small`` preset. Errors are norm-relative,
   ``||x - ref|| / ||ref||`` per tensor (:mod:`kimi_linear.testing`), with the tolerances in
   :data:`benchmarks.gpu_check.sizes.TOLERANCE`.
2. ``speed``: our kernels against fla's on the same inputs in the same run, interleaved rounds
   of ``triton.testing.do_bench`` (min / median / max): forward and forward + backward at
   B=4, H=32, T=8K and B=1, H=16, T=64K (K=V=128, bf16), a packed batch of many short
   sequences, and one decode step per layer at batch 1 and 64 against its state-bytes floor.
3. ``model``: decode time per token and throughput of the Kimi-Linear-48B-A3B layout (all 27
   layers at full width, 16 routed experts so it fits one GPU) and its all-MLA twin at 128K,
   512K and 1M tokens, batch 1 and the largest batch that fits, each against its bytes floor;
   chunked-prefill tokens/s of both; a few bf16 (autocast) training steps of ``small``
   (tokens/s, peak memory) with the ``triton`` and ``fla`` backends.

Every item checks the time left before it starts (a rough cost estimate per item, printed with
the reason when an item is skipped), and a timer stops the item in flight when the budget runs
out. Outputs, under ``benchmarks/results/<gpu-name>/`` (``--dry-run``: ``.../cpu/quick/``) or
``--out-dir``: ``gpu_check_<part>.json`` / ``.md`` per part and ``gpu_check.json`` / ``.md``,
a summary of every part file in that folder (so parts run by separate commands add up), with
the verdict: the kernels are validated on this GPU architecture when every correctness item
ran and passed.

One module per job: :mod:`~benchmarks.gpu_check.sizes` (parts, pass rule, shapes, cost
estimates), :mod:`~benchmarks.gpu_check.run` (budget, items, the part loop),
:mod:`~benchmarks.gpu_check.plan` (the items of each part and the budget table),
:mod:`~benchmarks.gpu_check.kda` (KDA inputs and runs, fla's kernels),
:mod:`~benchmarks.gpu_check.correctness`, :mod:`~benchmarks.gpu_check.speed`,
:mod:`~benchmarks.gpu_check.model` (the parts), :mod:`~benchmarks.gpu_check.splitting` (the
in-device sequence split: paths, the automatic choice, the per-step latency),
:mod:`~benchmarks.gpu_check.records` (compiles,
fla's dispatch), :mod:`~benchmarks.gpu_check.results` (JSON, Markdown, the verdict) and
:mod:`~benchmarks.gpu_check.cli` (``python -m benchmarks.gpu_check``). The benchmark helpers
are the sibling modules ``benchmarks.common``, ``kernel_speed``, ``decode``, ``prefill``, ...
"""
