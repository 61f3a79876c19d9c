"""The learning-rate schedule of a run: linear warmup, then cosine decay (a ``LambdaLR`` factor)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["WarmupCosine"]


class WarmupCosine:
    """Learning-rate factor: linear warmup over ``warmup_steps``, then cosine decay from 1 to
    ``min_ratio`` at ``total_steps`` (constant after).  A picklable ``LambdaLR`` function.

    ``total_steps=None`` is a schedule whose length is not known yet (it is the trainer's
    estimate, which needs the training data): the factor is 1 after the warmup until
    :meth:`resolved` fields are set, which :class:`KimiLinearLitModule` does when training
    starts."""

    def __init__(self, warmup_steps: int, total_steps: int | None, min_ratio: float) -> None:
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    @staticmethod
    def resolved(fields: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
        """``fields`` (a ``WarmupCosine.__dict__``) with the length ``total_steps`` and the
        warmup shortened to at most ``total_steps - 1`` (a warmup as long as the run would never
        reach the peak learning rate)."""
        out = dict(fields)
        out["total_steps"] = int(total_steps)
        out["warmup_steps"] = min(int(fields["warmup_steps"]), max(int(total_steps) - 1, 0))
        return out

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps is None:  # length not resolved yet: only before training starts
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
