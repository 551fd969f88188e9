import subprocess
import sys
from pathlib import Path

import pytest

from scratchlm.config import ConfigError, load
from scratchlm.train import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert {p.name for p in CONFIGS} >= {"phi-2-seed.yaml", "cpu-tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from scratchlm.model.config import get_preset

    cfg = load(TrainConfig, path)
    get_preset(cfg.model)  # the preset it names exists


def test_seed_preset_matches_the_seed_run():
    cfg = load(TrainConfig, next(p for p in CONFIGS if p.name == "phi-2-seed.yaml"))
    assert (cfg.model, cfg.lr, cfg.micro_batch_size, cfg.beta1, cfg.beta2, cfg.weight_decay) == \
        ("phi-2", 0.006, 8, 0.9, 0.95, 0.1)
    assert (cfg.warmup_steps, cfg.min_lr, cfg.grad_clip, cfg.block_size) == (2000, 6e-6, 1.0, 2048)


def test_unknown_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("model: phi-tiny\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load(TrainConfig, tmp_path / "c.yaml")


def test_wrong_type_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: lots\n")
    with pytest.raises(ConfigError, match="key 'max_steps'"):
        load(TrainConfig, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="key 'target_loss'"):
        load(TrainConfig, None, {"target_loss": "soon"})


def test_flags_override_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("max_steps: 5\nlr: 0.1\n")
    cfg = load(TrainConfig, tmp_path / "c.yaml", {"max_steps": "7", "target_loss": "auto"})
    assert (cfg.max_steps, cfg.lr, cfg.target_loss) == (7, 0.1, "auto")
    assert load(TrainConfig, None, {"target_loss": "9.5"}).target_loss == 9.5


def test_help_shows_field_docstrings():
    out = subprocess.run([sys.executable, "-m", "scratchlm", "train", "--help"], capture_output=True,
                         text=True,
                         check=True).stdout
    assert "--max-steps" in out and "Stop after this many optimizer steps" in out
    assert "initial evaluation loss minus 1" in out


def test_bad_flag_value_is_one_clear_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scratchlm", "train", "--max-steps", "x", "--out",
                        str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "key 'max_steps'" in r.stderr and "Traceback" not in r.stderr
