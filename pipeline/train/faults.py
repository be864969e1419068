"""Test hook, not a feature: make one rank (or all) fail at one precise point of a training run.

    PIPELINE_FAULT=ACTION@RANK:STEP[:PHASE]        e.g. kill@1:2:backward   stall@0:3   term@*:0:load   pause@*:3

ACTION  raise  a RuntimeError (a Python error on that rank)
        kill   SIGKILL to itself (what the OOM killer or a lost node does: no handler, no traceback)
        stall  sleep forever (a hung rank)
        term   SIGTERM to itself (SLURM's preemption signal)
        pause  wait for a SIGTERM from outside, pass it to the trainer's handler, go on (holds a run at a known
               step until a test's real preemption arrives, however fast the steps are)
RANK    a global rank, or * for every rank
STEP    the optimizer step (1-based) the fault fires in
PHASE   step (default)  the start of step STEP, before its first batch
        backward        step STEP, between the first micro-batch's forward and its backward (the peers wait in
                        ZeRO-3's parameter all-gather, on the default group)
        optimizer       step STEP, right before the optimizer update (the peers wait in ZeRO-3's gradient-norm
                        all-reduce, on the data-parallel group DeepSpeed makes for itself)
        checkpoint      the checkpoint written after step STEP, right after this rank wrote its first file of it
        load            after the base model is loaded, before DeepSpeed is initialised (STEP is not checked)

`PIPELINE_FAIL_AT=RANK:STEP` (older spelling) means raise@RANK:STEP. Unset, every hook does nothing.
"""
from __future__ import annotations

import os
import re
import signal
import time
from contextlib import contextmanager
from typing import Iterator, NamedTuple, Optional

import torch

PHASES = ("step", "backward", "optimizer", "checkpoint", "load")
_SPEC = re.compile(r"(raise|kill|stall|term|pause)@(\*|\d+):(\d+)(?::(" + "|".join(PHASES) + r"))?")


class Fault(NamedTuple):
    action: str
    rank: Optional[int]  # None: every rank
    step: int
    phase: str

    def matches(self, phase: str, rank: int, step: int) -> bool:
        return (self.phase == phase and self.rank in (None, rank)
                and (phase == "load" or self.step == step))


def configured() -> Optional[Fault]:
    spec = os.environ.get("PIPELINE_FAULT")
    if not spec:
        old = os.environ.get("PIPELINE_FAIL_AT")
        if not old:
            return None
        spec = f"raise@{old}"
    m = _SPEC.fullmatch(spec.strip())
    if m is None:
        raise ValueError(f"PIPELINE_FAULT={spec!r}: expected ACTION@RANK:STEP[:PHASE], "
                         f"ACTION raise|kill|stall|term|pause, PHASE {'|'.join(PHASES)}")
    action, rank, step, phase = m.groups()
    return Fault(action, None if rank == "*" else int(rank), int(step), phase or "step")


def fire(fault: Fault, rank: int, step: int) -> None:
    where = f"rank {rank} at step {step} ({fault.phase})"
    print(f"[faults] {fault.action} on {where} at t={time.time():.3f}", flush=True)  # the tests time from it
    if fault.action == "raise":
        raise RuntimeError(f"injected failure on {where} (PIPELINE_FAULT)")
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    if fault.action == "stall":
        while True:
            time.sleep(3600)
    if fault.action == "pause":
        _wait_for_sigterm()


def _wait_for_sigterm() -> None:
    got = []
    handler = signal.getsignal(signal.SIGTERM)

    def relay(signum, frame):
        got.append(signum)
        if callable(handler):
            handler(signum, frame)

    signal.signal(signal.SIGTERM, relay)
    try:
        while not got:
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, handler)
    print(f"[faults] pause ended by SIGTERM at t={time.time():.3f}", flush=True)


def point(phase: str, rank: int, step: int) -> None:
    """A fault point: fires the configured fault when phase, rank and step match."""
    fault = configured()
    if fault is not None and fault.matches(phase, rank, step):
        fire(fault, rank, step)


@contextmanager
def during_writes(phase: str, rank: int, step: int) -> Iterator[None]:
    """A fault point inside a block that writes files with torch.save: fires once the first file is written."""
    fault = configured()
    if fault is None or not fault.matches(phase, rank, step):
        yield
        return
    real_save = torch.save

    def save_then_fire(*args, **kwargs):
        real_save(*args, **kwargs)
        torch.save = real_save
        fire(fault, rank, step)

    torch.save = save_then_fire
    try:
        yield
    finally:
        torch.save = real_save
