"""Process-group setup that works the same under the deepspeed launcher, torchrun, srun and one plain process.

Backend is the only CPU/GPU difference: gloo on CPU, nccl on CUDA. Every collective has a timeout, so a dead
peer ends the job with an error instead of a hang.
"""
from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


# DeepSpeed 0.19 still calls the old torch.distributed names; the warning repeats every step and says nothing to users.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_from_slurm() -> None:
    """srun starts one task per GPU and sets SLURM_*; translate them to torch.distributed's variables."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def init_distributed(timeout_s: int = 600, local_rank_arg: int | None = None) -> DistInfo:
    _env_from_slurm()
    if "WORLD_SIZE" not in os.environ:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if local_rank_arg is not None and local_rank_arg >= 0:
        os.environ.setdefault("LOCAL_RANK", str(local_rank_arg))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                               auto_mpi_discovery=False, verbose=False)
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True (a collective: every rank must call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def shutdown(engine=None) -> None:
    """A clean end avoids the rare 'terminate called without an active exception' at interpreter exit."""
    if dist.is_initialized():
        dist.barrier()
    if engine is not None:
        engine.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
