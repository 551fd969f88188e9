"""Throughput and MFU arithmetic against values computed by hand."""


import pytest

from scratchlm.model.config import PRESETS
from scratchlm.training.metrics import Window, mfu, tokens_per_second


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


