"""The process group, when ``torchrun`` started us, and the few collectives the trainer needs.

Launch: ``torchrun --nproc_per_node N -m scratchlm train ...`` (add ``--nnodes``/``--rdzv-endpoint`` for
several machines). NCCL on GPUs, gloo on CPUs. Without torchrun's environment everything here is a no-op for
one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def local_rank() -> int:
    """This process's rank on its machine (0 without torchrun): which GPU it takes."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str) -> DistEnv:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    env = DistEnv(int(os.environ["RANK"]), world, local_rank())
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    global _patient_group
    if _patient_group is None:  # made by every rank at once, now: making a group is itself a collective
        _patient_group = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    return env


# Waits that last as long as the work does (rank 0 tokenizing a large corpus into the shared cache took 44
# minutes for 5 GB on 2 cores here): on their own gloo group, since the process group's collectives give up
# after 10 minutes under NCCL and 30 under gloo.
PATIENT_TIMEOUT = timedelta(hours=24)
_patient_group: dist.ProcessGroup | None = None


def wait_for_all(env: DistEnv) -> None:
    """A barrier that waits as long as the slowest rank's work takes, up to ``PATIENT_TIMEOUT``."""
    if env.enabled:
        dist.barrier(group=_patient_group)


def mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The elementwise mean of a tensor over ranks (gloo has no AVG: SUM / world)."""
    if env.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank if it is true on any: decisions (stop, skip) must be taken together or ranks
    hang."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not env.enabled:
        return [obj]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    global _patient_group
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _patient_group = None
