"""The cpt_cosine schedule equals the formula of thesis 3.3, through fairseq's scheduler interface."""

from __future__ import annotations

import math

import pytest
import torch
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from omegaconf import OmegaConf

from culturemert.lr_scheduler import CptCosineConfig, CptCosineSchedule


def formula(t: int, eta_max: float, eta_min: float, warmup: int, end: int) -> float:
    if t <= warmup:
        return eta_max * t / warmup
    return eta_min + (eta_max - eta_min) / 2 * (1 + math.cos(math.pi * (t - warmup) / (end - warmup)))


@pytest.mark.parametrize(
    "eta_max, eta_min, ratio, end",
    [(5e-4, 5e-5, 0.1, 2250), (5e-5, 5e-6, 0.01, 14625), (5e-4, 5e-5, 0.1, 450)],
    ids=["multi-stage1", "multi-stage2", "lyra-stage1"],
)
def test_schedule_matches_the_formula_at_every_step(eta_max, eta_min, ratio, end):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = FairseqAdam(OmegaConf.structured(FairseqAdamConfig(lr=[eta_max], tpu=False)), [parameter])
    schedule = CptCosineSchedule(
        CptCosineConfig(warmup_ratio=ratio, min_lr=eta_min, lr=[eta_max], max_update=end), optimizer
    )
    warmup = round(ratio * end)
    assert schedule.optimizer.get_lr() == 0.0  # training starts at zero and warms up
    for t in range(1, end + 1):
        assert schedule.step_update(t) == pytest.approx(formula(t, eta_max, eta_min, warmup, end), rel=1e-12)
    assert schedule.optimizer.get_lr() == pytest.approx(eta_min)
    assert schedule.step_update(warmup) == pytest.approx(eta_max)
