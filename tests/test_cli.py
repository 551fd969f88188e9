import shutil
import subprocess
import sys

from transformers import PhiForCausalLM


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True)


def test_model_info_phi2():
    r = run_cli("model-info", "phi-2")
    assert r.returncode == 0, r.stderr
    assert "2,779,683,840" in r.stdout
    assert "6·N + 12·L·d·T" in r.stdout


def test_model_info_lists_presets():
    out = run_cli("model-info", "--list").stdout
    for name in ("phi-2", "phi-1.5", "phi-100m", "phi-tiny"):
        assert name in out


def test_model_info_counts_the_ladder_both_ways():
    """The ladder's presets, N counted with and without the vocabulary's matrices, and FLOPs per token."""
    out = run_cli("model-info", "--list").stdout
    row = next(line.split() for line in out.splitlines() if line.startswith("phi-tiny "))
    assert row[-3:] == ["13,950,720", "792,320", "86,850,048"]
    for name in ("phi-d48", "phi-d64", "phi-d96"):
        assert name in out


def test_every_command_prints_its_help(capsys):
    """`scratchlm COMMAND --help` for every command, through the same parser the console script runs (a "30%"
    in one setting's help once made argparse fail on `serve --help`)."""
    from scratchlm.cli import COMMANDS, main

    for command in COMMANDS:
        try:
            main([command, "--help"])
        except SystemExit as done:
            assert done.code == 0, command
        assert "usage: scratchlm " + command in capsys.readouterr().out


def test_unknown_model_is_one_clear_line():
    r = run_cli("model-info", "phi-9")
    assert r.returncode == 2
    assert "unknown model 'phi-9'" in r.stderr and "Traceback" not in r.stderr


def test_init_writes_a_folder_transformers_loads_strictly(tmp_path):
    out = tmp_path / "d"
    r = run_cli("init", "--model", "phi-tiny", "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    model, info = PhiForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert sum(p.numel() for p in model.parameters()) == 13_950_720
    assert (out / "tokenizer.json").exists()


def test_every_flag_of_a_command_is_a_keyword_of_its_python_function():
    import importlib
    import inspect

    import scratchlm
    from scratchlm.cli import COMMANDS
    from scratchlm.config import ConfigError

    for function, command in scratchlm.API.items():
        spec = COMMANDS[command]
        cls = getattr(importlib.import_module(spec.module), spec.config)
        fn = getattr(scratchlm, function)
        params = inspect.signature(fn).parameters
        assert any(p.kind is p.VAR_KEYWORD for p in params.values()), function  # every setting is accepted
        named = [n for n, p in params.items() if p.kind is not p.VAR_KEYWORD]
        assert set(named) <= set(cls.model_fields), (function, named)  # positional ones are settings too
        args = ["x"] * len(named)
        try:
            fn(*args, no_such_setting=1)
        except ConfigError as err:  # refused by the command's own config, by name, before anything runs
            assert "no_such_setting" in str(err), function
        else:
            raise AssertionError(f"{function} accepted an unknown setting")


def test_export_writes_any_checkpoint_as_a_folder_transformers_loads(small_corpus, tmp_path):
    import torch
    from safetensors.torch import load_file

    from scratchlm.model.config import PRESETS
    from scratchlm.model.hf import phi_from_weights
    from scratchlm.training import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(model="phi-tiny", data=str(small_corpus), out=str(run), max_steps=2, block_size=32,
                      micro_batch_size=2, eval_batches=1, eval_fraction=0.05, checkpoint_interval=1,
                      device="cpu"))
    checkpoint = run / "checkpoints" / "step-00000001"  # not the final weights: a preempted run's
    r = run_cli("export", str(checkpoint), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    theirs = PhiForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = phi_from_weights(PRESETS["phi-tiny"], load_file(str(checkpoint / "model.safetensors"))).eval()
    idx = torch.randint(0, 50000, (1, 24))
    with torch.no_grad():
        assert torch.allclose(theirs(idx).logits, ours(idx), atol=1e-5)
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    r = run_cli("export", str(tmp_path), "--out", str(tmp_path / "none"))
    assert r.returncode == 2 and "neither a checkpoint" in r.stderr

    # Into a folder that holds an older export (sharded: its index is what a loader prefers): refused, then
    # replaced with --overwrite, stale files gone, and the folder loads the new model.
    used = tmp_path / "used"
    theirs.save_pretrained(used, max_shard_size="10MB")
    assert (used / "model.safetensors.index.json").exists()
    r = run_cli("export", str(run / "checkpoints" / "step-00000002"), "--out", str(used))
    assert r.returncode == 2 and "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", str(run / "checkpoints" / "step-00000002"), "--out", str(used), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in used.glob("model*")) == ["model.safetensors"]
    newer = phi_from_weights(PRESETS["phi-tiny"], load_file(str(run / "checkpoints" / "step-00000002" /
                                                                 "model.safetensors"))).eval()
    with torch.no_grad():
        assert torch.allclose(PhiForCausalLM.from_pretrained(used).eval()(idx).logits, newer(idx), atol=1e-5)
    # Every filesystem failure is one line naming the path.
    (tmp_path / "a-file").write_text("x")
    for out, phrase in ((tmp_path / "a-file", "is a file"), (tmp_path / "a-file" / "below", "a-file")):
        r = run_cli("export", str(checkpoint), "--out", str(out))
        assert r.returncode == 2 and phrase in r.stderr and "Traceback" not in r.stderr, r.stderr
    cut = tmp_path / "cut"
    shutil.copytree(checkpoint, cut)
    (cut / "manifest.json").unlink(missing_ok=True)  # a checkpoint from before manifests
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    r = run_cli("export", str(cut), "--out", str(tmp_path / "from-cut"))
    assert r.returncode == 2 and "model.safetensors" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_every_commands_help_opens_with_one_line_saying_what_it_does():
    from scratchlm.cli import COMMANDS

    for name in COMMANDS:
        r = run_cli(name, "--help")
        assert r.returncode == 0, (name, r.stderr)
        first = r.stdout.split("\n\n")[1]  # after the usage: the opening paragraph
        assert "\n" not in first.strip() and first.strip().endswith("."), (name, first)
        assert first[0].isupper(), (name, first)
