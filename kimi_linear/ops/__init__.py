"""Pure-PyTorch KDA operators: the float64-capable recurrent reference and the chunked form.

* :func:`kda_recurrent`: token by token, the readable specification.
* :func:`kda_chunk`: the chunked WY / UT-transform form, batched over chunks; the CPU training
  path (same signature plus ``chunk_size``).
"""

from kimi_linear.ops.checks import check_kda_inputs
from kimi_linear.ops.chunk import kda_chunk
from kimi_linear.ops.naive import kda_recurrent

__all__ = ["check_kda_inputs", "kda_chunk", "kda_recurrent"]
