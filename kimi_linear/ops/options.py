"""The KDA ops' torch-free options: backend names, the safe gate's range, the gate-check switch.

One place for each rule, importable without torch (the configuration and the command line load
it first):

* :data:`KDA_BACKENDS` and :func:`check_kda_backend`: the accepted ``kda_backend`` names. A
  name is validated where it enters: ``KimiLinearConfig.kda_backend``, a layer's ``backend``
  attribute, or a public function that takes a name (:mod:`kimi_linear.backends`); never again
  on the hot path.
* :data:`SAFE_GATE_LOWER_BOUND_RANGE` and :func:`check_safe_gate_bound`: the safe gate's lower
  bound on ``g`` (``KimiLinearConfig.kda_gate_lower_bound``, the ``gate_lower_bound`` of the
  chunked ops, the ``lower_bound`` of :func:`kimi_linear.ops.gate.kda_gate`).
* :data:`GATE_CHECK_ENV` and :func:`gate_check_enabled`: the opt-in, device-syncing check of
  ``g`` in the Triton and fla paths.
"""

from __future__ import annotations

import math
import os

from kimi_linear.errors import did_you_mean

__all__ = [
    "GATE_CHECK_ENV",
    "KDA_BACKENDS",
    "SAFE_GATE_LOWER_BOUND_RANGE",
    "check_kda_backend",
    "check_safe_gate_bound",
    "gate_check_enabled",
]

#: Every accepted ``kda_backend`` name (``"auto"`` first, then the concrete backends).
KDA_BACKENDS = ("auto", "torch", "triton", "fla")

#: The allowed lower bound of the safe gate, ``[-5, 0)`` (fla recommends -5): 15 steps of at
#: least -5 keep the split factors of a 16-token sub-chunk within ``e^75`` (finite in fp32 /
#: bf16), which is what the kernels' fast path needs.
SAFE_GATE_LOWER_BOUND_RANGE = (-5.0, 0.0)

#: Environment variable that turns on the (device-syncing) ``g <= 0`` / ``g >= gate_lower_bound``
#: checks in the Triton and fla paths; the torch ops always check ``g <= 0``.
GATE_CHECK_ENV = "KIMI_LINEAR_CHECK_GATE"


def gate_check_enabled() -> bool:
    """True when ``KIMI_LINEAR_CHECK_GATE=1``: the GPU paths then refuse ``g > 0`` (and ``g``
    below a promised ``gate_lower_bound``) with ``ValueError``, at the cost of one reduction and
    a device synchronisation per call."""
    return os.environ.get(GATE_CHECK_ENV, "0") == "1"


def check_kda_backend(name: object, argument: str = "kda_backend") -> str:
    """Return ``name`` if it is one of :data:`KDA_BACKENDS`; else raise ``ValueError`` naming
    ``argument``, the accepted names and the closest match."""
    if isinstance(name, str) and name in KDA_BACKENDS:
        return name
    hint = did_you_mean(name, KDA_BACKENDS)
    raise ValueError(f"{argument} must be one of {KDA_BACKENDS}, got {name!r}{hint}")


def check_safe_gate_bound(value: object, argument: str = "gate_lower_bound") -> float | None:
    """``None``, or ``value`` as a float when it is a finite number in
    :data:`SAFE_GATE_LOWER_BOUND_RANGE` (``[-5, 0)``); else ``ValueError`` naming ``argument``.

    ``None`` is the release gate (unbounded below); a number is the safe gate's bound on ``g``.
    """
    if value is None:
        return None
    lo, hi = SAFE_GATE_LOWER_BOUND_RANGE
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not lo <= value < hi
    ):
        raise ValueError(
            f"{argument} must be None or a number in [{lo:g}, {hi:g}) (None: the release softplus "
            f"gate; a number: the safe gate's lower bound on g), got {value!r}"
        )
    return float(value)
