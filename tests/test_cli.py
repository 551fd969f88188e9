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
