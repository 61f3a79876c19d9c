"""Pure-PyTorch KDA operators: the float64-capable recurrent reference and the chunked form."""

from kimi_linear.ops.checks import check_kda_inputs
from kimi_linear.ops.naive import kda_recurrent

__all__ = ["check_kda_inputs", "kda_recurrent"]
