"""Training checkpoints: written atomically, the last k kept, loaded without pickle.

Layout: ``RUN/checkpoints/step-00000100/`` holding ``model.safetensors`` (our keys, never a compile, DDP or
FSDP prefix), ``optimizer.safetensors`` + ``optimizer.json`` (keyed by parameter name), ``rng.safetensors``,
``state.json`` (step, tokens, time, data positions, ...), ``data.safetensors`` when a data position holds
arrays (a feed loader's shuffle buffer), ``config.yaml`` and ``manifest.json`` (each file's size and CRC-32,
checked before a checkpoint is trusted). A checkpoint is written into
``step-….tmp``, each file fsynced, then the folder is renamed (``files.atomic_dir``): a crash at any moment
leaves the previous checkpoints whole.

Checkpoints are consolidated: ``torch.distributed.checkpoint.state_dict`` gathers the full model and optimizer
state (from DDP replicas or FSDP shards) and rank 0 writes it, so a run can be inspected, exported or resumed
(with the same world size, for the data streams) from one folder.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .. import faults
from ..errors import UserError
from ..files import atomic_dir

STEP_DIR = re.compile(r"^step-(\d{8})$")


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU under our own keys, from a plain, compiled, DDP or FSDP model
    (collective under FSDP; complete on rank 0)."""
    return get_model_state_dict(model, options=FULL)


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint could not be written (disk full, file too large, permissions); the previous ones are
    intact."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where a run's checkpoint of ``step`` is (or goes)."""
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


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
    """Split an optimizer state_dict (keyed by parameter name) into tensors (safetensors) and the rest
    (JSON)."""
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
    state: dict[str, dict] = {pid: dict(s) for pid, s in meta["scalars"].items()}
    for key, t in tensors.items():
        pid, name = key.rsplit(".", 1)  # parameter names have dots; AdamW's state names do not
        state.setdefault(pid, {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, config_yaml: str, keep: int, is_main: bool = True) -> Path:
    """Write checkpoint ``step`` atomically, then delete all but the newest ``keep``.

    Collective under DDP/FSDP: every rank calls it (to gather the state); rank 0 (``is_main``) writes.
    """
    weights = full_weights(model)
    optim = get_optimizer_state_dict(model, optimizer, options=FULL)
    root = Path(run_dir) / "checkpoints"
    final = checkpoint_dir(run_dir, step)
    if not is_main:
        return final
    try:
        return _write(root, final, step, weights, optim, state, config_yaml, run_dir, keep)
    except (OSError, SafetensorError) as err:  # safetensors reports a full disk as its own error type
        previous = latest_checkpoint(run_dir)
        raise CheckpointWriteError(
            f"could not write checkpoint step {step} to {root}: {getattr(err, 'strerror', None) or err}. "
            + (f"The previous checkpoint ({previous.name}) is intact; free space, then --resume auto."
               if previous else "No earlier checkpoint exists.")) from None


def _write(root: Path, final: Path, step: int, weights: dict, optim: dict, state: dict, config_yaml: str,
           run_dir: Path, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:  # an existing folder of the same step is replaced
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  str(tmp / "model.safetensors"))
        faults.pause("checkpoint", step)
        opt_tensors, opt_meta = _flatten_optimizer(optim)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        positions, arrays = split_arrays(state.get("data_positions", []))
        if arrays:
            save_numpy(arrays, str(tmp / DATA_ARRAYS))
        (tmp / "state.json").write_text(json.dumps({**state, "data_positions": positions, "rng": rng_meta},
                                                   indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        manifest = {name: _fingerprint(tmp / name) for name in REQUIRED + ((DATA_ARRAYS,) if arrays else ())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


MANIFEST = "manifest.json"
REQUIRED = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json",
            "config.yaml")
DATA_ARRAYS = "data.safetensors"
"""The numpy arrays of the data positions (``split_arrays``), when there are any."""


def split_arrays(positions: list[dict]) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Data positions for JSON: each numpy array (a value of a position) replaced by ``{"array": KEY}``; and
    the arrays by key (``rank{r}/{name}``)."""
    out, arrays = [], {}
    for rank, position in enumerate(positions):
        plain = {}
        for name, value in position.items():
            if isinstance(value, np.ndarray):
                arrays[f"rank{rank}/{name}"] = np.ascontiguousarray(value)
                value = {"array": f"rank{rank}/{name}"}
            plain[name] = value
        out.append(plain)
    return out, arrays


def join_arrays(positions: list[dict], arrays: dict[str, np.ndarray]) -> list[dict]:
    """``split_arrays`` undone."""
    return [{name: arrays[v["array"]] if isinstance(v, dict) and set(v) == {"array"} else v
             for name, v in position.items()} for position in positions]


def _fingerprint(path: Path) -> dict:
    """A file's size and CRC-32 (corruption, not tampering, is what a checkpoint is checked for)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            crc = zlib.crc32(block, crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


def verify(path: Path) -> str | None:
    """Why a checkpoint folder cannot be trusted, or None when it can: every file there, of the size and
    checksum written with it (checkpoints from before manifests: present, and their JSON readable)."""
    path = Path(path)
    missing = [name for name in REQUIRED if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        expected = json.loads((path / MANIFEST).read_text()) if (path / MANIFEST).exists() else None
    except (ValueError, OSError):
        return f"unreadable {MANIFEST}"
    for name in REQUIRED + tuple(n for n in expected or {} if n not in REQUIRED):
        if not (path / name).is_file():
            return f"missing {name}"
        if expected is not None and _fingerprint(path / name) != expected.get(name):
            return f"{name} differs from its manifest (size or checksum): damaged"
    for name in ("state.json", "optimizer.json"):
        try:
            if not isinstance(json.loads((path / name).read_text()), dict):
                return f"{name} does not hold a JSON object"
        except (ValueError, OSError, UnicodeDecodeError):
            return f"{name} is not readable JSON"
    return None


def latest_verified(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones skipped with why."""
    skipped = []
    for path in reversed(checkpoint_dirs(run_dir)):
        reason = verify(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Restore weights, optimizer and RNG from a checkpoint folder; returns its ``state.json``.

    Works for a plain, compiled, DDP or FSDP model alike (every rank reads the consolidated files).
    """
    path = Path(path)
    set_model_state_dict(model, load_file(str(path / "model.safetensors")), options=StateDictOptions(
        full_state_dict=True, strict=True))
    if optimizer is not None:
        opt_meta = json.loads((path / "optimizer.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
        set_optimizer_state_dict(model, optimizer, _unflatten_optimizer(tensors, opt_meta),
                                 options=StateDictOptions(full_state_dict=True))
    state = json.loads((path / "state.json").read_text())
    set_rng_state(load_file(str(path / "rng.safetensors")), state.pop("rng"))
    if (path / DATA_ARRAYS).exists():
        state["data_positions"] = join_arrays(state["data_positions"], load_numpy(str(path / DATA_ARRAYS)))
    return state


def remove_partial(run_dir: Path) -> int:
    """Delete half-written ``.tmp`` checkpoint folders left by a crash; returns how many."""
    root = Path(run_dir) / "checkpoints"
    partial = [p for p in root.glob("step-*.tmp")] if root.is_dir() else []
    for p in partial:
        shutil.rmtree(p, ignore_errors=True)
    return len(partial)
