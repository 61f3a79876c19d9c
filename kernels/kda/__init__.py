"""Triton kernels for Kimi Delta Attention, importable as ``kimi_linear.kernels``.

- :func:`chunk_kda`: chunked forward and backward (training, prefill), varlen via ``cu_seqlens``;
  fla's signature and flags (L2 norm, gate, beta sigmoid in Triton kernels with their
  gradients), GVA.
- :func:`fused_recurrent_kda`: token-by-token forward (decode), optionally updating the state
  in place; fla's signature and flags (L2 norm, gate, beta sigmoid fused in the kernel), GVA,
  and the serving state pool (``ssm_state_indices``, ``num_accepted_tokens``).

Both take the layout of :func:`kimi_linear.ops.naive_recurrent_kda` and run on CUDA devices, or on the
CPU under ``TRITON_INTERPRET=1`` (slow; for tests). Modules: ``chunk`` (autograd function and
entry point), ``chunk_fwd`` / ``chunk_bwd`` (kernels and their launchers), ``fused_recurrent``,
``prologue`` (the L2-norm and beta-sigmoid kernels of ``chunk_kda``), ``split`` (in-device
sequence splitting of the sequential passes: plan, automatic choice, fold kernel), ``utils``
(checks, chunk tables, autotuning) and ``compile_check`` (compile every kernel for a GPU
architecture without a GPU: ``python -m kimi_linear.kernels.compile_check``).
"""

from .chunk import chunk_kda
from .fused_recurrent import fused_recurrent_kda

__all__ = ["chunk_kda", "fused_recurrent_kda"]
