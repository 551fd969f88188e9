"""The console line's formats (default, the seed's, litgpt's) against lines written by hand."""

from __future__ import annotations

from scratchlm.training.logs import format_line

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
