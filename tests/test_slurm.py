"""The SLURM scripts on a real SLURM: a one-machine cluster (two slurmd as nodes n1, n2) started by the fixture.

Workloads are stand-ins (tests/slurm_probe.py: gloo all_reduce; tests/slurm_fake_python.sh: records commands).
`test_real_trainer_under_slurm` runs the real trainer (tiny NF4 Llama + MoRE, ZeRO-3, 2 CPU ranks) through
launch/slurm/train.sbatch, preempts it with SIGTERM, and checks the requeued job resumes and finishes.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import LocalSlurm, ensure_installed  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SBATCH = str(ROOT / "launch" / "slurm" / "train.sbatch")


def real_train_cmd(config: Path, out: Path, steps: int) -> str:
    """The real trainer on the small test setup, as train.sbatch's TRAIN_CMD (one task per CPU rank)."""
    return (f"{PY} launch/train.py --config {config} --deepspeed ds_configs/zero3.json --set output_dir={out} "
            f"--set optim.max_steps={steps} --set checkpoint.every=2")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception as e:  # noqa: BLE001
        cluster.stop()
        pytest.skip(f"could not start a local SLURM: {e}")
    yield cluster
    cluster.stop()


def submit_train(slurm, out: Path, nodes: int, per_node: int, cmd: str, wait: bool, env: dict | None = None):
    out.mkdir(parents=True, exist_ok=True)
    args = ["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--gpus-per-node=0",
            "--cpus-per-task=1", f"--output={out}/sbatch-%j.out", f"--chdir={ROOT}"] + (["--wait"] * wait)
    e = {"TRAIN_CMD": cmd, "LOG_DIR": str(out / "logs"), **(env or {})}
    r = slurm.run(args + [SBATCH, "--cpu"], env=e, check=False, timeout=600)
    return r, r.stdout.strip().split(";")[0]


def sbatch_log(out: Path) -> str:
    return "\n".join(p.read_text() for p in out.glob("sbatch-*.out"))


def preempt_and_release(slurm, job: str, out: Path, timeout: float) -> None:
    """TERM to the batch shell (what --signal=B:TERM@120 does), wait for the requeue, and skip SLURM's ~2 min hold
    of a requeued job (Reason=BeginTime)."""
    slurm.run(["scancel", "--batch", "--signal=TERM", job])
    deadline = time.time() + timeout
    while slurm.job_field(job, "Restarts") != "1":
        assert time.time() < deadline, sbatch_log(out)
        time.sleep(0.3)
    # Restarts counts the requeue before SLURM sets the hold: the job can read PENDING with Reason=None first (seen
    # on a busy host); a release then comes before the hold, and the job waits the hold out.
    while (state := slurm.job_field(job, "JobState")) not in ("RUNNING", "COMPLETED", "FAILED", "CANCELLED"):
        assert time.time() < deadline, sbatch_log(out)
        if state == "PENDING" and slurm.job_field(job, "Reason") == "BeginTime":
            # slurmd refuses a credential created in the same second as its job's revocation ("Job credential
            # revoked": the check compares whole seconds), so a release right after the requeue can kill the job.
            time.sleep(2)
            slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        time.sleep(0.3)


def ranks(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def test_one_node_two_ranks(slurm, tmp_path):
    r, job = submit_train(slurm, tmp_path, 1, 2, f"{PY} tests/slurm_probe.py {tmp_path}", wait=True)
    assert r.returncode == 0, sbatch_log(tmp_path) + r.stderr
    got = ranks(tmp_path)
    assert [g["env"]["RANK"] for g in got] == ["0", "1"]
    for g in got:
        e = g["env"]
        assert e["WORLD_SIZE"] == "2" and e["LOCAL_RANK"] == e["RANK"] and e["NODE_RANK"] == "0"
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["MASTER_PORT"] == str(20000 + int(job) % 20000)
        assert e["DIST_BACKEND"] == "gloo" and e["LOCAL_WORLD_SIZE"] == "2"
        assert g["all_reduce"] == 3.0  # 1 + 2
    assert len(list((tmp_path / "logs").glob("*/rank-*.log"))) == 2  # per-job, per-rank logs


def test_two_nodes(slurm, tmp_path):
    _, job = submit_train(slurm, tmp_path, 2, 1, f"{PY} tests/slurm_probe.py {tmp_path}", wait=False)
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 180) == "COMPLETED", sbatch_log(tmp_path)
    got = ranks(tmp_path)
    assert [(g["env"]["RANK"], g["env"]["SLURM_NODEID"], g["env"]["LOCAL_RANK"]) for g in got] == \
        [("0", "0", "0"), ("1", "1", "0")]
    assert all(g["all_reduce"] == 3.0 and g["env"]["LOCAL_WORLD_SIZE"] == "1" for g in got)


def test_preemption_requeues_and_resumes(slurm, tmp_path):
    """TERM to the batch shell (what --signal=B:TERM@120 does) -> ranks exit 75 -> requeue -> finish."""
    _, job = submit_train(slurm, tmp_path, 1, 2, f"{PY} tests/slurm_probe.py {tmp_path}", wait=False,
                          env={"PROBE_PREEMPT": "1"})
    deadline = time.time() + 120
    while not all((tmp_path / f"started-rank{r}").exists() for r in (0, 1)):
        assert time.time() < deadline, sbatch_log(tmp_path)
        time.sleep(0.3)
    preempt_and_release(slurm, job, tmp_path, timeout=60)
    assert slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 180) == "COMPLETED", sbatch_log(tmp_path)
    log = sbatch_log(tmp_path)
    assert "ranks finished with exit code 75" in log and "requeueing job" in log
    got = ranks(tmp_path)
    assert len(got) == 2 and all(g["resumed_from_checkpoint"] and g["env"]["SLURM_RESTART_COUNT"] == "1" for g in got)


def test_prep_array_and_pipeline_chain(slurm, tmp_path):
    """prep.sbatch as an array + dependent merge, and pipeline.sh's prep -> train -> merge -> eval chain."""
    fake = str(ROOT / "tests" / "slurm_fake_python.sh")
    calls = tmp_path / "calls.txt"
    env = {"PYTHON": fake, "FAKE_PY_LOG": str(calls), "PREP_CONFIG": "configs/prep/x.yaml",
           "CONFIG": "configs/train/x.yaml", "PREP_EXTRA_ARGS": "--set seed=3", "EXTRA_ARGS": "--set optim.lr=0.001"}
    r = slurm.run(["bash", str(ROOT / "launch/slurm/pipeline.sh"), str(tmp_path / "run"), "--shards", "3",
                   "--nodes", "1", "--gpus-per-node", "2", "--cpu"], env=env, cwd=ROOT)
    ids = dict(kv.split("=") for kv in r.stdout.split())
    assert slurm.wait_state(ids["eval"], {"COMPLETED", "FAILED", "CANCELLED"}, 240) == "COMPLETED", \
        "\n".join(p.read_text() for p in (tmp_path / "run/logs").glob("*.out"))
    lines = calls.read_text().splitlines()
    shards = sorted(l.split("args=")[1] for l in lines if "--shard" in l)
    assert shards == [f"-m data_prep --config configs/prep/x.yaml --shard {i}/3 --set seed=3" for i in range(3)]
    kinds = [("--shard", "shard"), ("--merge-shards", "prep-merge"), ("launch/train.py", "train"),
             ("launch/merge.py", "merge"), ("launch/evaluate.py", "eval")]
    order = [next(k for pat, k in kinds if pat in l) for l in lines]
    assert order == ["shard"] * 3 + ["prep-merge", "train", "train", "merge", "eval"]  # afterok kept the order
    train = [l for l in lines if "launch/train.py" in l]
    assert sorted(l.split("rank=")[1].split()[0] for l in train) == ["0", "1"]
    assert "--config configs/train/x.yaml --deepspeed ds_configs/zero3.json --set optim.lr=0.001" in train[0]
    assert all("seed=3" not in l for l in train) and "optim.lr" not in "".join(l for l in lines if "data_prep" in l)
    assert f"launch/merge.py --adapter {tmp_path}/run/adapter --out {tmp_path}/run/merged" in lines[-2]
    # the evaluation's tasks: the prep config (evaluate needs --config or --data)
    assert (f"launch/evaluate.py --model {tmp_path}/run/merged --config configs/prep/x.yaml --set seed=3 --out "
            f"{tmp_path}/run/eval") in lines[-1]


def test_real_trainer_under_slurm(slurm, tiny_train_setup, tmp_path):
    """The real trainer through train.sbatch: 2 CPU ranks, preempted by TERM, requeued, resumed, finished.

    The ranks wait at the start of step 3 for the TERM (PIPELINE_FAULT=pause): the tiny model trains 6 steps in
    under a second, faster than the signal travels, so without the pause the TERM may land after training ended."""
    run, steps = tmp_path / "run", 6
    _, job = submit_train(slurm, tmp_path, 1, 2, real_train_cmd(tiny_train_setup["config"], run, steps), wait=False,
                          env={"PIPELINE_FAULT": "pause@*:3"})

    def logs() -> str:
        return sbatch_log(tmp_path) + "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("logs/*/*")))

    deadline = time.time() + 300
    while logs().count("[faults] pause on rank") < 2:
        assert time.time() < deadline and slurm.job_field(job, "JobState") in ("PENDING", "RUNNING"), logs()
        time.sleep(0.5)
    preempt_and_release(slurm, job, tmp_path, timeout=300)
    state = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 600)
    assert state == "COMPLETED", logs()
    assert "ranks finished with exit code 75" in logs() and "requeueing job" in logs(), logs()
    assert "SIGTERM: checkpoint saved at step 3" in logs(), logs()  # the step it was preempted in, then resumed
    metrics = run / "metrics.jsonl"
    recorded = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train/loss" in line]
    assert recorded == list(range(1, steps + 1)), recorded  # resumed where it stopped: no step twice, none lost
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == steps and summary["world_size"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()