"""CPU ranks on one host split its cores between them instead of each starting a thread per core."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.train.distributed import free_port, ranks_sharing_cores

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, torch
from pipeline.train.distributed import init_distributed, share_cpu_cores, shutdown
before = torch.get_num_threads()
info = init_distributed(60)
got = share_cpu_cores(info)
print(json.dumps({"before": before, "returned": got, "after": torch.get_num_threads()}))
shutdown(None)
"""


def _two_ranks(omp: str | None) -> list[dict]:
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   PYTHONPATH=str(ROOT))
        if omp is not None:
            env["OMP_NUM_THREADS"] = omp
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-3000:] for _, err in outs]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
def test_two_ranks_on_one_host_take_half_the_threads_each_unless_omp_num_threads_says():
    for r in _two_ranks(None):
        assert r["returned"] == r["after"] == max(1, r["before"] // 2), r
    for r in _two_ranks("1"):
        assert r["returned"] is None and r["after"] == r["before"] == 1, r


def test_ranks_sharing_cores_counts_ranks_on_my_cpus_only():
    me = ("a", [0, 1, 2, 3])
    assert ranks_sharing_cores(me, [me, ("a", [0, 1, 2, 3])]) == 2
    assert ranks_sharing_cores(me, [me, ("a", [4, 5, 6, 7])]) == 1  # bound to other cores (srun, numactl)
    assert ranks_sharing_cores(me, [me, ("b", [0, 1, 2, 3])]) == 1  # another host
    assert ranks_sharing_cores(me, [me, ("a", [3, 4]), ("a", [0]), ("b", [1])]) == 3
