"""Learning-rate schedules: their shape, and that a schedule resumed from its state continues exactly."""

from __future__ import annotations

import math

import pytest
import torch

from compatembed.training import one_cycle, warmup_cosine


def _lrs(factory, steps: int, **kwargs) -> list[float]:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    scheduler = factory(optimizer, steps_per_epoch=steps // 4, epochs=4, **kwargs)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_cosine_rises_then_decays_to_the_floor() -> None:
    lrs = _lrs(warmup_cosine, 40, warmup_epochs=1)
    peak = lrs.index(max(lrs))
    assert peak == 10 and math.isclose(max(lrs), 1e-3)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] < 1e-5


def test_one_cycle_peaks_at_the_configured_lr_after_pct_start_and_cycles_beta1() -> None:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=2e-3)
    scheduler = one_cycle(optimizer, steps_per_epoch=25, epochs=4, pct_start=0.3)
    lrs, betas = [], []
    for _ in range(100):  # exactly the steps the trainer takes; one more would be refused by torch
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"][0])
        optimizer.step()
        scheduler.step()
    assert math.isclose(lrs[0], 2e-3 / 25)
    assert math.isclose(max(lrs), 2e-3, rel_tol=1e-6) and 28 <= lrs.index(max(lrs)) <= 30
    assert lrs[-1] < 2e-3 / 25 / 100  # annealed far below the start
    assert math.isclose(betas[0], 0.95) and math.isclose(min(betas), 0.85, rel_tol=1e-6)
    assert betas.index(min(betas)) == lrs.index(max(lrs))  # β₁ moves against the lr


@pytest.mark.parametrize("factory", [warmup_cosine, one_cycle])
def test_a_schedule_resumed_from_its_state_continues_exactly(factory) -> None:
    full = _lrs(factory, 40)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    scheduler = factory(optimizer, steps_per_epoch=10, epochs=4)
    for _ in range(17):
        optimizer.step()
        scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    resumed_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    resumed = factory(resumed_opt, steps_per_epoch=10, epochs=4)
    resumed_opt.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    rest = []
    for _ in range(23):
        rest.append(resumed_opt.param_groups[0]["lr"])
        resumed_opt.step()
        resumed.step()
    assert rest == pytest.approx(full[17:], rel=1e-12)


def test_one_cycle_refuses_a_rise_outside_the_run() -> None:
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ValueError, match="pct_start"):
        one_cycle(optimizer, steps_per_epoch=10, epochs=2, pct_start=1.5)
