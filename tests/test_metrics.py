"""Throughput, MFU, learning-rate and log-line arithmetic against values computed by hand."""

import math

import pytest

from scratchlm.model.config import PRESETS
from scratchlm.train.config import TrainConfig
from scratchlm.train.logs import format_line
from scratchlm.train.metrics import Window, mfu, tokens_per_second
from scratchlm.train.optim import decay_branch, schedule_for


def test_tokens_per_second_is_tokens_over_window_duration():
    assert tokens_per_second(4 * 2048, 0.5) == 16384.0
    assert tokens_per_second(100, 0.0) == 0.0


def test_flops_per_token_and_mfu_by_hand():
    phi2 = PRESETS["phi-2"]
    # 6 * 2,779,683,840 + 12 * 32 * 2560 * 2048
    assert phi2.flops_per_token(2048) == 16_678_103_040 + 2_013_265_920 == 18_691_368_960
    # 22.4k tok/s on one H200 (989 TFLOP/s): 18,691,368,960 * 22,400 / 989e12 = 418,686,664,704,000 / 989e12 =
    # 0.42334...
    assert mfu(phi2.flops_per_token(2048), 22_400, 989e12) == pytest.approx(0.423343, rel=1e-5)
    assert mfu(phi2.flops_per_token(2048), 4 * 22_400, 989e12, n_devices=4) == pytest.approx(0.423343,
                                                                                             rel=1e-5)


def test_window_accumulates_between_log_lines():
    w = Window()
    w.add(tokens=1000, seconds=0.5, data_seconds=0.01)
    w.add(tokens=1000, seconds=1.5, data_seconds=0.03)
    assert w.tokens_per_s == 1000.0
    assert w.data_wait_share == pytest.approx(0.02)
    w.reset()
    assert w.tokens == 0 and w.tokens_per_s == 0.0


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


REC = {"step": 11, "iter": 10, "epoch": 1, "epoch_start": True, "loss": 8.751073, "loss_smooth": 9.0,
       "lr": 3e-5,
       "grad_norm": 1.5, "tokens": 22528, "tokens_per_s": 1234.0, "data_wait": 0.004, "mem_gib": 1.5,
       "step_time_s": 2.43298, "max_steps": 100, "mfu": None, "peak": None}


def test_seed_log_format():
    assert format_line("seed", REC) == "Epoch: 0001 Step count:  11 loss = 8.751073"
    assert format_line("seed", {**REC, "epoch_start": False}) == "\t\t Step count:  11 loss = 8.751073"


def test_litgpt_log_format():
    assert format_line("litgpt", REC) == ("iter 10 step 11: loss 8.7511, LR: 0.000030, iter time: 2432.98ms "
                                          "(optimizer.step)")


def test_default_log_format_has_every_field():
    line = format_line("default", {**REC, "mfu": 0.42, "peak": "H100"})
    for part in ("step 11/100", "epoch 1", "loss 8.7511", "smoothed 9.0000", "lr 3.00e-05", "grad norm 1.500",
                 "tokens 22,528", "1,234 tok/s", "MFU 42.0% of H100", "data wait 0.4%", "mem 1.50 GiB"):
        assert part in line, part
