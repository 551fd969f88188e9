"""Training checkpoints: written atomically, the last k kept, loaded without pickle.

Layout: ``RUN/checkpoints/step-00000100/`` holding ``model.safetensors`` (our keys, never a compile or DDP
prefix), ``optimizer.safetensors`` + ``optimizer.json``, ``rng.safetensors``, ``state.json`` (step, tokens, time,
data position, ...) and ``config.yaml``. A checkpoint is written into ``step-….tmp``, each file fsynced, then the
folder is renamed: a crash at any moment leaves the previous checkpoints whole.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .model.hf import unwrap

STEP_DIR = re.compile(r"^step-(\d{8})$")
FAULT_SLEEP_ENV = "SCRATCHLM_FAULT_CHECKPOINT_SLEEP"
"""Fault injection for tests, "STEP:SECONDS": pause that long in the middle of writing checkpoint STEP, so a test
can kill the process during a write."""


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (safetensors) and the rest (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for pid, pstate in state["state"].items():
        scalars[str(pid)] = {}
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[str(pid)][k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(s) for pid, s in meta["scalars"].items()}
    for key, t in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py[0], list(py[1]), py[2]]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config_yaml: str, keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    fault_step, _, fault_seconds = os.environ.get(FAULT_SLEEP_ENV, "").partition(":")
    if fault_step and int(fault_step) == step:
        time.sleep(float(fault_seconds))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_meta}, indent=2))
    (tmp / "config.yaml").write_text(config_yaml)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore weights, optimizer and RNG from a checkpoint folder; returns its ``state.json``."""
    path = Path(path)
    unwrap(model).load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    if optimizer is not None:
        opt_meta = json.loads((path / "optimizer.json").read_text())
        # load_state_dict moves each state tensor to its parameter's device (and keeps "step" where AdamW wants it)
        tensors = load_file(str(path / "optimizer.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, opt_meta))
    state = json.loads((path / "state.json").read_text())
    set_rng_state(load_file(str(path / "rng.safetensors")), state.pop("rng"))
    return state


def remove_partial(run_dir: Path) -> int:
    """Delete half-written ``.tmp`` checkpoint folders left by a crash; returns how many."""
    root = Path(run_dir) / "checkpoints"
    partial = [p for p in root.glob("step-*.tmp")] if root.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return len(partial)
