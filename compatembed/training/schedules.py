"""Per-step learning-rate schedules, built as ``LambdaLR`` from Hydra ``_partial_`` configs.

The trainer calls ``factory(optimizer, steps_per_epoch=..., epochs=...)``; a schedule is a plain
function of the step, so it resumes exactly from a checkpointed scheduler state.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: Optimizer, *, steps_per_epoch: int, epochs: int, warmup_epochs: float = 1.0, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up for ``warmup_epochs`` then cosine decay to ``min_lr_ratio`` × the base lr."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(total - 1, int(round(warmup_epochs * steps_per_epoch)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def constant(optimizer: Optimizer, *, steps_per_epoch: int, epochs: int) -> LambdaLR:
    """No schedule (for debugging and tests)."""
    del steps_per_epoch, epochs
    return LambdaLR(optimizer, lambda step: 1.0)
