"""Learning-rate schedules against values computed by hand."""

from __future__ import annotations

import math

import pytest

from scratchlm.training.config import TrainConfig
from scratchlm.training.optim import decay_branch, schedule_for


def test_lr_schedule_by_hand():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    cosine = schedule_for(cfg, 110)
    assert cosine.at(0) == pytest.approx(1e-4)  # (0+1)/10 of peak
    assert cosine.at(9) == pytest.approx(1e-3)
    assert cosine.at(60) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert cosine.at(110) == pytest.approx(1e-4)
    assert schedule_for(cfg, None).at(500) == pytest.approx(1e-3)  # no length known: constant after warmup



def test_wsd_and_constant_schedules_by_hand():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, lr_schedule="wsd", decay_fraction=0.2)
    wsd = schedule_for(cfg, 100)  # constant until step 80, then 1 - sqrt(progress) down to min_lr at 100
    assert wsd.at(5) == pytest.approx(6e-4)
    assert wsd.at(79) == wsd.at(80) == pytest.approx(1e-3)
    assert wsd.at(85) == pytest.approx(1e-4 + (1 - math.sqrt(5 / 20)) * 9e-4)
    assert wsd.at(100) == wsd.at(1000) == pytest.approx(1e-4)
    # every wsd run follows the same rates until its own decay: curves of different lengths compare
    assert (schedule_for(cfg, 400).rates(80) == wsd.rates(80)).all()
    assert schedule_for(cfg.model_copy(update={"decay_steps": 5}), 100).decay_start == 95
    flat = schedule_for(cfg.model_copy(update={"lr_schedule": "constant"}), 100)
    assert flat.at(99) == flat.at(10_000) == pytest.approx(1e-3)
    branch = decay_branch(cfg, 50, 8e-4, 10)  # off a run whose rate was 8e-4 at step 50
    assert branch.at(49) == pytest.approx(1e-3) and branch.at(50) == pytest.approx(8e-4)
    assert branch.at(51) < 8e-4
    assert branch.at(60) == pytest.approx(1e-4)
