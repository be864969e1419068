"""Stand-in trainer for the SLURM tests: initialise torch.distributed (gloo) from the environment train.sbatch
sets, all_reduce, and write what each rank saw to OUT_DIR/rank<R>.json.

With PROBE_PREEMPT=1 it behaves like the trainer under preemption: on the first run it waits for SIGTERM, then
"checkpoints" (OUT_DIR/checkpoint) and exits 75; a run that finds the checkpoint finishes normally.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

EX_TEMPFAIL = 75


def main(out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_WORLD_SIZE",
            "DIST_BACKEND", "SLURM_JOB_ID", "SLURM_NODEID", "SLURM_PROCID", "SLURM_RESTART_COUNT", "OMP_NUM_THREADS"]
    env = {k: os.environ.get(k) for k in keys}
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    record = {"env": env, "all_reduce": t.item(), "host": socket.gethostname(), "pid": os.getpid()}

    if os.environ.get("PROBE_PREEMPT") == "1" and not (out / "checkpoint").exists():
        term = {"got": False}
        signal.signal(signal.SIGTERM, lambda *_: term.update(got=True))
        (out / f"started-rank{rank}").write_text(str(os.getpid()))
        deadline = time.time() + 120
        while not term["got"] and time.time() < deadline:
            time.sleep(0.1)
        if not term["got"]:
            return 1
        dist.barrier()  # every rank got TERM: "checkpoint" together, like the trainer
        if rank == 0:
            (out / "checkpoint").write_text(json.dumps({"restart": env["SLURM_RESTART_COUNT"]}))
        dist.barrier()
        dist.destroy_process_group()
        return EX_TEMPFAIL
    record["resumed_from_checkpoint"] = (out / "checkpoint").exists()
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
