import subprocess
import sys
from pathlib import Path

import pytest

from scratchlm.config import ConfigError, load
from scratchlm.training import TrainConfig

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


def command_configs():
    """(command, config class) for every command of the CLI."""
    import importlib

    from scratchlm.cli import COMMANDS

    return [(name, getattr(importlib.import_module(c.module), c.config)) for name, c in COMMANDS.items()]


def _required(cls) -> dict:
    """Values for a config's required fields (a path, a name, a list of one)."""
    return {(f.alias or k): (["x"] if "list" in str(f.annotation) else "x")
            for k, f in cls.model_fields.items() if f.is_required()}


def _is_numeric(annotation) -> bool:
    import typing

    args = typing.get_args(annotation)
    return annotation in (int, float) or any(_is_numeric(a) for a in args if a is not type(None))


UNBOUNDED = {"seed"}
"""Numeric settings with no range: any integer seeds a generator."""


@pytest.mark.parametrize("command,cls", command_configs(), ids=[n for n, _ in command_configs()])
def test_every_numeric_setting_is_checked_at_the_door(command, cls):
    from scratchlm.config import bounds, range_text, validate

    for key, field in cls.model_fields.items():
        if not _is_numeric(field.annotation) or key in UNBOUNDED or key in cls.positional:
            continue
        found = bounds(field.annotation, field.metadata)
        assert found, f"scratchlm {command} --{key}: a numeric setting with no range"
        bad = (found["ge"] - 1 if "ge" in found else found["gt"] if "gt" in found
               else found["le"] + 1 if "le" in found else found["lt"])
        with pytest.raises(ConfigError) as err:
            validate(cls, {**_required(cls), key: bad})
        message = str(err.value)
        assert f"key '{field.alias or key}'" in message and range_text(found) in message, message


def test_an_out_of_range_flag_is_one_line_naming_the_setting_and_its_range(small_corpus):
    r = subprocess.run([sys.executable, "-m", "scratchlm", "serve", "--corpus", str(small_corpus),
                        "--teacher-ratio", "-0.5"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "key 'teacher_ratio'" in r.stderr and "allowed: [0, 1]" in r.stderr and "-0.5" in r.stderr


def _list_flags():
    import typing

    from scratchlm.config import _strip_optional

    for command, cls in command_configs():
        for key, field in cls.model_fields.items():
            if typing.get_origin(_strip_optional(field.annotation)) is list and key not in cls.positional:
                item = typing.get_args(_strip_optional(field.annotation))[0]
                choices = [str(c) for c in typing.get_args(item)] if typing.get_origin(item) else []
                yield command, cls, key, (choices or ["openai:http://a:1", "openai:http://b:2",
                                                      "local:c"])[:3]


@pytest.mark.parametrize("command,cls,key,values", list(_list_flags()),
                         ids=[f"{c}--{k}" for c, _, k, _ in _list_flags()])
def test_repeated_list_flags_add_up_and_take_comma_lists(command, cls, key, values):
    # The command line as main() parses it: the command's own parser, then the config it builds.
    from scratchlm.cli import build_parser
    from scratchlm.config import load, overrides_from_args

    flag = "--" + key.replace("_", "-")
    required = [a for k, v in _required(cls).items() for a in ("--" + k.replace("_", "-"), v[0]
                                                               if isinstance(v, list) else v)]
    argv = [command, *required, flag, values[0], flag, f"{values[1]},{values[2]}"]
    cfg = load(cls, None, overrides_from_args(build_parser(command).parse_args(argv), cls))
    assert getattr(cfg, key) == values


def test_serve_with_two_teachers_on_the_command_line_has_both(small_corpus):
    # The README's two-teacher line, typed as a user types it (the teachers are addresses nobody answers on).
    from servers import spawn

    from scratchlm.serving import free_port

    port = free_port()
    server = spawn(small_corpus, port, "--teacher", "openai:http://127.0.0.1:9/", "--teacher",
                   "openai:http://127.0.0.1:7/", "--teacher-ratio", "0.3", "--teacher-mode", "best-effort")
    try:
        import httpx

        names = [t["name"] for t in httpx.get(f"http://127.0.0.1:{port}/health").json()["teachers"]]
    finally:
        server.kill()
        server.wait()
    assert names == ["openai:http://127.0.0.1:9", "openai:http://127.0.0.1:7"]
