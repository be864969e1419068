"""Faults are tested, not assumed: real SIGKILL, a hung rank, SIGTERM in a checkpoint write and in the model load.

2-rank ZeRO-3 CPU runs (gloo) of the tiny NF4 setup with a short collective timeout, under the `deepspeed`
launcher and with one process per rank as srun starts them. Faults are injected at precise points with
`PIPELINE_FAULT=ACTION@RANK:STEP[:PHASE]` (pipeline/train/faults.py).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.train.distributed import free_port
from pipeline.train.faults import Fault, configured, point
from test_train import ROOT, TRAIN, ZERO3, _env, _logs, spawn_ranks, term_when_all_paused, wait_all

ZERO2 = ZERO3.parent / "zero2.json"

TIMEOUT_S = 20  # dist_timeout_s of these runs
MARGIN_S = 45  # on top of it: the launcher's poll, gloo's teardown, rank 0 telling the others, a loaded CI host


def _args(setup, run: Path, *sets: str) -> list[str]:
    args = ["--config", str(setup["config"]), "--set", f"output_dir={run}", "--set", f"dist_timeout_s={TIMEOUT_S}",
            "--set", "optim.max_steps=3", "--set", "checkpoint.every=1"]
    for s in sets:
        args += ["--set", s]
    return args


def _srun_style(args, logs: Path) -> tuple[list[int], float]:
    """One process per rank, as srun starts them; returns their exit codes and when the last one ended."""
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    procs = spawn_ranks(2, args, logs)
    try:
        codes = wait_all(procs, timeout=TIMEOUT_S + MARGIN_S + 60)  # the model load comes on top of the limit
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank was still running after {time.time() - t0:.0f} s:\n{_logs(logs)}")
    return codes, time.time()


def _deepspeed_launcher(args, logs: Path, ds_config: Path = ZERO3) -> tuple[subprocess.CompletedProcess, list[int], float]:
    """As the Makefile starts it; returns the launcher's result, the pids of the ranks it started, when it ended."""
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(TRAIN), "--deepspeed", str(ds_config), *args]
    t0 = time.time()
    # Its own session, so that a hung run's ranks (the launcher's grandchildren) can all be killed.
    launcher = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=TIMEOUT_S + MARGIN_S + 60)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        stdout, stderr = launcher.communicate()
        pytest.fail(f"the deepspeed launcher was still running after {time.time() - t0:.0f} s:\n"
                    f"{stdout[-4000:]}\n{stderr[-4000:]}")
    end = time.time()
    proc = subprocess.CompletedProcess(cmd, launcher.returncode, stdout, stderr)
    (logs / "launcher.log").write_text(proc.stdout + proc.stderr)
    pids = [int(p) for p in re.findall(r"process (\d+) spawned with command", proc.stdout + proc.stderr)]
    assert len(pids) == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, pids, end


def _fault_time(log: str) -> float:
    """When the injected fault fired (faults.fire prints it)."""
    m = re.search(r"\[faults\] .* at t=([0-9.]+)", log)
    assert m, log[-3000:]
    return float(m.group(1))


def _checkpoint_complete(tag_dir: Path, world: int = 2) -> list[str]:
    """What is missing or unreadable in a ZeRO checkpoint of `world` ranks (empty when complete): every rank's
    optimizer partition and RNG state, the model states (ZeRO-3: one file per rank; ZeRO-2: one), each readable."""
    problems = []
    zero3 = bool(list(tag_dir.glob("zero_pp_rank_*_model_states.pt")))
    for r in range(world):
        for pattern in (f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" if zero3 else "mp_rank_00_model_states.pt",
                        f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt", f"rng_rank{r}.pt"):
            if not list(tag_dir.glob(pattern)):
                problems.append(f"{tag_dir.name}/{pattern} missing")
    for f in sorted(tag_dir.rglob("*.pt")):
        try:
            torch.load(f, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated file
            problems.append(f"{f.relative_to(tag_dir.parent)} unreadable: {e}")
    return problems


def assert_nothing_half_written(run: Path) -> None:
    assert not (run / "adapter").exists(), "an adapter from a failed run"
    assert not (run / "train_summary.json").exists(), "a train summary from a failed run"
    ckpt = run / "checkpoints"
    if (ckpt / "latest").is_file():
        tag = (ckpt / "latest").read_text().strip()
        assert (ckpt / tag).is_dir(), f"latest names {tag}, which is not there"
        assert _checkpoint_complete(ckpt / tag) == [], f"latest names an incomplete checkpoint {tag}"


def _resume_finishes(setup, run: Path, logs: Path, expect_from: int | None) -> None:
    codes, _ = _srun_style(_args(setup, run), logs)
    assert codes == [0, 0], _logs(logs)
    rank0 = (logs / "rank0.log").read_text()
    if expect_from:
        assert f"at step {expect_from}" in rank0 and "resumed from" in rank0, rank0[-3000:]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 3


# --------------------------------------------------------------------------------------------- the hook itself


def test_pause_waits_for_an_outside_sigterm_and_hands_it_to_the_trainer(monkeypatch):
    monkeypatch.setenv("PIPELINE_FAULT", "pause@0:3")
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    trainer_handler = signal.getsignal(signal.SIGTERM)
    try:
        point("step", 0, 2)  # not its step: returns at once
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        t0 = time.time()
        timer.start()
        point("step", 0, 3)
        assert time.time() - t0 >= 0.25 and seen == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is trainer_handler  # restored
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_fault_spec_parsing(monkeypatch):
    monkeypatch.delenv("PIPELINE_FAIL_AT", raising=False)
    monkeypatch.delenv("PIPELINE_FAULT", raising=False)
    assert configured() is None
    monkeypatch.setenv("PIPELINE_FAULT", "kill@1:2:backward")
    f = configured()
    assert f == Fault("kill", 1, 2, "backward") and f.matches("backward", 1, 2)
    assert not f.matches("backward", 0, 2) and not f.matches("step", 1, 2) and not f.matches("backward", 1, 3)
    monkeypatch.setenv("PIPELINE_FAULT", "term@*:0:load")
    assert configured().matches("load", 0, 0) and configured().matches("load", 1, 0)
    monkeypatch.setenv("PIPELINE_FAULT", "stall@0:3")
    assert configured() == Fault("stall", 0, 3, "step")
    monkeypatch.delenv("PIPELINE_FAULT")
    monkeypatch.setenv("PIPELINE_FAIL_AT", "1:2")  # the older spelling
    assert configured() == Fault("raise", 1, 2, "step")
    monkeypatch.setenv("PIPELINE_FAULT", "explode@1:2")
    with pytest.raises(ValueError, match="ACTION@RANK:STEP"):
        configured()


# --------------------------------------------------------------------------------------------- SIGKILL mid-step


@pytest.mark.slow
@pytest.mark.parametrize("launcher, victim", [("deepspeed", 1), ("srun", 0)])
def test_sigkill_mid_step_ends_every_rank_and_leaves_nothing_half_written(tiny_train_setup, tmp_path, monkeypatch,
                                                                          launcher, victim):
    """A real kill -9 of one rank inside ZeRO-3's backward of step 2 (after a checkpoint at step 1)."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    monkeypatch.setenv("PIPELINE_FAULT", f"kill@{victim}:2:backward")
    if launcher == "deepspeed":
        proc, pids, end = _deepspeed_launcher(_args(tiny_train_setup, run), logs)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, out[-3000:]
        assert "exits with return code = -9" in out, out[-3000:]  # the launcher names the killed rank's signal
        time.sleep(1)
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        survivor_log = out
    else:
        codes, end = _srun_style(_args(tiny_train_setup, run), logs)
        assert codes[victim] == -9, (codes, _logs(logs))
        assert all(c not in (0, 75) for c in codes), (codes, _logs(logs))
        survivor_log = (logs / f"rank{1 - victim}.log").read_text()
    assert f"[faults] kill on rank {victim} at step 2 (backward)" in _logs(logs) + survivor_log
    assert "Traceback" in survivor_log or "stopping" in survivor_log, survivor_log[-3000:]
    ended_after = end - _fault_time(_logs(logs) + survivor_log)
    assert ended_after < TIMEOUT_S + MARGIN_S, f"ended {ended_after:.0f} s after the fault"
    assert_nothing_half_written(run)
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_1"


# --------------------------------------------------------------------------------------------- a hung rank


@pytest.mark.slow
@pytest.mark.parametrize("launcher, ds_config", [("srun", ZERO3), ("deepspeed", ZERO2)], ids=["srun-zero3",
                                                                                              "deepspeed-zero2"])
def test_stalled_rank_fails_the_job_within_the_collective_timeout(tiny_train_setup, tmp_path, monkeypatch, launcher,
                                                                   ds_config):
    """Rank 1 sleeps forever right before the optimizer update of step 2: rank 0 fails on the collective timeout,
    and the hung rank is ended too, also when nobody kills it (srun without --kill-on-bad-exit). ZeRO-3 waits on
    the default group there; ZeRO-2 on the data-parallel group DeepSpeed makes for itself (its gradient norm and
    parameter all-gather), which must have the same timeout."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    monkeypatch.setenv("PIPELINE_FAULT", "stall@1:2:optimizer")
    if launcher == "deepspeed":
        proc, pids, end = _deepspeed_launcher(_args(tiny_train_setup, run), logs, ds_config)
        rank0_log = proc.stdout + proc.stderr
        assert proc.returncode != 0, rank0_log[-3000:]
        time.sleep(1)
        assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    else:
        codes, end = _srun_style(["--deepspeed", str(ds_config), *_args(tiny_train_setup, run)], logs)
        assert all(c not in (0, 75) for c in codes), (codes, _logs(logs))
        rank0_log = (logs / "rank0.log").read_text()
    assert "[faults] stall on rank 1 at step 2 (optimizer)" in _logs(logs) + rank0_log
    assert re.search(r"[Tt]imed out|timeout", rank0_log), rank0_log[-3000:]
    ended_after = end - _fault_time(_logs(logs) + rank0_log)
    assert TIMEOUT_S - 2 < ended_after < TIMEOUT_S + MARGIN_S, f"ended {ended_after:.0f} s after the fault"
    assert_nothing_half_written(run)


# --------------------------------------------------------------------------------------------- faults in checkpoint writes


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_never_leaves_latest_on_a_partial_checkpoint(tiny_train_setup, tmp_path,
                                                                                     monkeypatch):
    """Rank 1 is killed right after it wrote its first file of step 2's checkpoint; rank 0 writes all of its own."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    monkeypatch.setenv("PIPELINE_FAULT", "kill@1:2:checkpoint")
    codes, _ = _srun_style(_args(tiny_train_setup, run), logs)
    assert codes[1] == -9 and codes[0] not in (0, 75), (codes, _logs(logs))
    assert list((run / "checkpoints" / "step_2").glob("*.pt")), "the fault did not fire inside the checkpoint write"
    assert_nothing_half_written(run)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    monkeypatch.delenv("PIPELINE_FAULT")
    _resume_finishes(tiny_train_setup, run, tmp_path / "logs_resume", expect_from=int(latest.split("_")[1]))


@pytest.mark.slow
def test_sigterm_during_checkpoint_write_and_during_model_load_then_resume(tiny_train_setup, tmp_path, monkeypatch):
    """SLURM's preemption signal to every rank (1) while they write step 2's checkpoint: the write completes, the run
    exits 75 with `latest` on a complete checkpoint; (2) in the requeued run, while the model loads: exit 75 (requeue
    me) with the checkpoints untouched; (3) the next run resumes and finishes."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    args = _args(tiny_train_setup, run, "checkpoint.every=2", "optim.max_steps=4")
    monkeypatch.setenv("PIPELINE_FAULT", "term@*:2:checkpoint")
    codes, _ = _srun_style(args, logs / "1")
    assert codes == [75, 75], _logs(logs / "1")
    assert_nothing_half_written(run)
    ckpt = run / "checkpoints"
    latest = (ckpt / "latest").read_text().strip()
    assert int(latest.split("_")[1]) >= 2
    before = {p.relative_to(ckpt): p.stat().st_mtime_ns for p in ckpt.rglob("*")}

    # Every rank waits after its load for the signal: a rank's own `term` could fire before the other rank got
    # there, which then stops as told by it ("another rank was preempted"), never inside its own load.
    monkeypatch.setenv("PIPELINE_FAULT", "pause@*:0:load")
    (logs / "2").mkdir(parents=True)
    procs = spawn_ranks(2, args, logs / "2")
    term_when_all_paused(procs, logs / "2", timeout=TIMEOUT_S + MARGIN_S + 60)
    codes = wait_all(procs, timeout=TIMEOUT_S + MARGIN_S)
    for r in (0, 1):
        assert "SIGTERM before training started" in (logs / "2" / f"rank{r}.log").read_text(), _logs(logs / "2")
    assert codes == [75, 75], _logs(logs / "2")
    assert {p.relative_to(ckpt): p.stat().st_mtime_ns for p in ckpt.rglob("*")} == before
    assert_nothing_half_written(run)

    monkeypatch.delenv("PIPELINE_FAULT")
    codes, _ = _srun_style(args, logs / "3")
    assert codes == [0, 0], _logs(logs / "3")
    assert f"at step {latest.split('_')[1]}" in (logs / "3" / "rank0.log").read_text()
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_sigterm_on_one_rank_during_model_load_requeues_every_rank(tiny_train_setup, tmp_path, monkeypatch):
    """The signal reaches one rank while the model loads: that rank exits 75 and tells the others, which exit 75
    too at once (requeue), instead of failing (exit 1) at the collective timeout."""
    run, logs = tmp_path / "run", tmp_path / "logs"
    monkeypatch.setenv("PIPELINE_FAULT", "term@1:0:load")
    codes, _ = _srun_style(_args(tiny_train_setup, run), logs)
    assert codes == [75, 75], _logs(logs)  # rank 0 used to time out in its collective: exit 1
    assert "another rank was preempted" in (logs / "rank0.log").read_text()
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
