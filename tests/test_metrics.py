"""Throughput, MFU, learning-rate and log-line arithmetic against values computed by hand."""

import math

import pytest

from scratchlm.metrics import Window, mfu, tokens_per_second
from scratchlm.model.config import PRESETS
from scratchlm.train.config import TrainConfig
from scratchlm.train.logs import format_line
from scratchlm.train.optim import lr_at


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
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)  # (0+1)/10 of peak
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(60, cfg, 110) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(500, cfg, None) == pytest.approx(1e-3)  # no decay horizon: constant after warmup


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
