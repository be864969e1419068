"""Process-group setup that works the same under the deepspeed launcher, torchrun, srun and one plain process.

Backend is the only CPU/GPU difference: gloo on CPU, nccl on CUDA. Every collective has a timeout, so a dead
peer ends the job with an error instead of a hang: the default group's and every group made later (DeepSpeed's
data-parallel group, which ZeRO's gradient collectives use), all `dist_timeout_s`. A rank that fails says so in the
rendezvous store (`abort_job`) and every rank watches for that (`_PeerWatch`), so a rank hung outside any
collective ends too, also when the launcher does not stop the others (srun without --kill-on-bad-exit).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

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

    timeout = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False, verbose=False)
    _new_groups_default_to(timeout)
    info = DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)
    if info.world_size > 1:
        if device.type == "cpu":  # DeepSpeed's shm all-reduce is its CPU path; GPUs have no such file
            dist.barrier()  # past it, every rank has mapped its peers' shm buffers
            deepspeed_shm_buffer(info.rank).unlink(missing_ok=True)
        _PeerWatch.start(info.rank)
    return info


def share_cpu_cores(info: DistInfo) -> Optional[int]:
    """On CPU, each rank's torch threads become its share of the cores it shares with other ranks of this host;
    returns that count (None: left as it was, on a GPU or where OMP_NUM_THREADS chose).

    torch starts one thread per core in every process, so 2 ranks on a 2-core host ran 4 threads that spun waiting
    for each other's cores. One thread per rank trained 1.09-1.10x faster there (SmolLM2, NF4, ZeRO-3, 2-core Zen 5
    EPYC, bench/NOTES.md). torchrun sets OMP_NUM_THREADS=1 for the same reason; srun and the deepspeed launcher
    (without --bind_cores_to_rank) do not. Ranks bound to cores of their own (srun's CPU binding, numactl) share
    nothing and keep them all."""
    if info.device.type != "cpu":
        return None
    me = (socket.gethostname(), sorted(os.sched_getaffinity(0)))
    everyone = [me]
    if info.world_size > 1:  # every CPU rank takes part, whatever its environment says
        everyone = [None] * info.world_size
        dist.all_gather_object(everyone, me)
    if "OMP_NUM_THREADS" in os.environ:
        return None
    threads = max(1, torch.get_num_threads() // ranks_sharing_cores(me, everyone))
    torch.set_num_threads(threads)
    return threads


def ranks_sharing_cores(me: tuple[str, list[int]], everyone: list[tuple[str, list[int]]]) -> int:
    """How many of `everyone` (host, CPUs it may run on), `me` included, run on some of my CPUs."""
    return sum(host == me[0] and bool(set(cpus) & set(me[1])) for host, cpus in everyone)


def deepspeed_shm_buffer(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce maps for `rank` (~69 MB; made in `deepspeed.init_distributed` when
    every rank is on this host, named by the rendezvous address and port) and never removes: each 2-rank run on a new
    port left 138 MB of RAM behind, 13 GB on this project's machine after some days of tests and benchmarks, until a
    training run was OOM-killed. Once every rank has mapped every peer's file, unlinking it keeps the mappings and
    frees the memory when the processes end, however they end."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def _new_groups_default_to(timeout: timedelta) -> None:
    """torch gives a group made without a timeout its backend's default (30 min gloo, 10 min nccl), not the default
    group's; DeepSpeed makes its data-parallel group that way (ZeRO's reduce-scatters, gradient norms)."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    if isinstance(getattr(distributed_c10d, "default_pg_nccl_timeout", None), timedelta):
        distributed_c10d.default_pg_nccl_timeout = timeout


# --- a failed rank ends every rank ----------------------------------------------------------------------------------


EXIT_REQUEUE = 75  # EX_TEMPFAIL: preempted (after a checkpoint, or before training began); the SLURM script requeues


def _abort_key() -> str:
    # torchrun restarts a failed job with the same store: each attempt has its own key
    return f"pipeline/abort/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _store_client(timeout_s: float):
    """A client of the rendezvous store (rank 0's, or the launcher agent's), separate from the process group's."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class _PeerWatch:
    """A daemon thread that ends this rank when another rank has failed (exit 1) or was preempted before training
    began (exit EXIT_REQUEUE, as that rank): it reads `abort_job`'s key in the rendezvous store every `interval_s`,
    and takes a store that stops answering (its host, rank 0, has died) as a failure too. `shutdown` stops it first,
    so a rank that finished normally never trips it."""

    current: Optional["_PeerWatch"] = None
    interval_s = 1.0
    lost_after = 3  # polls in a row without an answer

    def __init__(self, rank: int):
        self.rank = rank
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pipeline-peer-watch", daemon=True)

    @classmethod
    def start(cls, rank: int) -> None:
        cls.stop()
        cls.current = cls(rank)
        cls.current.thread.start()

    @classmethod
    def stop(cls) -> None:
        if cls.current is not None:
            cls.current.stopped.set()
            cls.current = None

    def _run(self) -> None:
        store, misses, key = None, 0, _abort_key()
        while not self.stopped.wait(self.interval_s):
            try:
                if store is None:
                    store = _store_client(5.0)
                if not store.check([key]):
                    misses = 0
                    continue
                value = store.get(key).decode(errors="replace")
                code, _, why = value.partition(" ")
                code, why = (int(code), why) if code.isdigit() else (1, value)
            except Exception as e:  # noqa: BLE001 - any failure to reach the store
                store, misses = None, misses + 1
                if misses < self.lost_after:
                    continue
                code, why = 1, (f"the rendezvous store {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                                f"is gone ({type(e).__name__}): its host (rank 0 or the launcher) has ended")
            if self.stopped.is_set():
                return
            what = "was preempted" if code == EXIT_REQUEUE else "failed"
            print(f"rank {self.rank}: stopping (exit {code}), another rank {what}: {why}", file=sys.stderr, flush=True)
            os._exit(code)


def abort_job(reason: str, exit_code: int = 1) -> None:
    """Called by a failing (or, with EXIT_REQUEUE, preempted) rank before it exits: tells every other rank to stop
    with `exit_code` (see `_PeerWatch`). Best effort."""
    watch = _PeerWatch.current
    if watch is None:
        return
    _PeerWatch.stop()
    try:
        _store_client(5.0).set(_abort_key(), f"{exit_code} rank {watch.rank}: {reason}"[:2000])
        time.sleep(2 * _PeerWatch.interval_s)  # rank 0 hosts the store: keep it up until the others have read it
    except Exception:  # noqa: BLE001 - the store may be gone with a dead rank 0; the others see that themselves
        pass


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says True (a collective: every rank must call it)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (a collective; any picklable object)."""
    if world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def all_gather(obj) -> list:
    """Every rank's `obj`, in rank order (a collective; any picklable object)."""
    if world_size() > 1:
        out = [None] * world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def shutdown(engine=None) -> None:
    """A clean end: every rank leaves together and the process group is destroyed. (An abort at interpreter exit,
    'terminate called without an active exception', still struck rarely after it; launch/train.py skips teardown.)"""
    _PeerWatch.stop()  # before the barrier: past it, rank 0 (the store's host) may exit at any time
    if dist.is_initialized():
        dist.barrier()
    if engine is not None:
        engine.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
