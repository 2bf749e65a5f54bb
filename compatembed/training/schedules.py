"""Per-step learning-rate schedules, built from Hydra ``_partial_`` configs.

The trainer calls ``factory(optimizer, steps_per_epoch=..., epochs=...)`` and steps the result once per
optimiser step; every schedule here is a torch scheduler, so it resumes exactly from its checkpointed state.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR


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


def one_cycle(
    optimizer: Optimizer,
    *,
    steps_per_epoch: int,
    epochs: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1.0e4,
    cycle_momentum: bool = True,
) -> OneCycleLR:
    """torch's one-cycle policy peaking at the optimiser's configured lr (the methods notes' reference loop).

    The lr rises from lr/``div_factor`` to lr over the first ``pct_start`` of the steps, then anneals
    (cosine) to lr/(``div_factor``·``final_div_factor``); with ``cycle_momentum`` Adam's β₁ moves the
    other way between 0.95 and 0.85, as torch does it.
    """
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"one_cycle: pct_start must be in (0, 1), got {pct_start}")
    max_lr = [group["lr"] for group in optimizer.param_groups]
    return OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=max(2, steps_per_epoch * epochs),
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=cycle_momentum,
    )
