"""What a person watching a run sees: tqdm on rank 0, TensorBoard scalars/histograms, and a metrics.jsonl.

Every method is a no-op on ranks other than 0, so the loop can call them unconditionally. A run that starts at
step S (a resume, or 0) first drops what metrics.jsonl holds after step S, as TensorBoard's `purge_step` does for
its events: steps a crashed run logged after its last checkpoint are run again, and each step is logged once. A run
that evaluates step S again (`redo_start`: an eval the checkpoint owes, the step-0 eval, the final one) drops step S
too, and logs that step's train values again first.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from pipeline.atomic import atomic_write


class Monitor:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int, is_main: bool, redo_start: bool = False):
        self.is_main = is_main
        self.writer = None
        self.bar: Optional[tqdm] = None
        self.metrics_file = None
        if not is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        keep_to = start_step - 1 if redo_start else start_step
        self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=keep_to + 1)
        _drop_after(output_dir / "metrics.jsonl", keep_to)
        self.metrics_file = open(output_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._t0 = time.time()

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.is_main:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}{k}", v, step)
        self.metrics_file.write(json.dumps({"step": step, **{f"{prefix}{k}": v for k, v in values.items()}}) + "\n")
        self.metrics_file.flush()

    def rank_map(self, step: int, ranks: dict[str, dict[str, int]], max_rank: int) -> None:
        """Each task's chosen rank per layer: the tasks x layers picture, its mean per task as a scalar and the
        distribution as a histogram."""
        if not self.is_main:
            return
        from pipeline.more.rank_image import rank_image

        self.writer.add_image("rank_map", rank_image(ranks, max_rank), step, dataformats="HWC")
        for task, per_layer in ranks.items():
            values = torch.tensor(list(per_layer.values()), dtype=torch.float32)
            self.writer.add_scalar(f"rank/{task}/mean", values.mean().item(), step)
            self.writer.add_histogram(f"rank/{task}", values, step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    def close(self) -> None:
        if self.is_main:
            self.bar.close()
            self.writer.close()
            self.metrics_file.close()


def _drop_after(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (atomically: a crash leaves the old file or the new one)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if kept == lines:
        return
    atomic_write(path, "".join(kept))


def _step_of(line: str):
    """The record's step; None for a line a killed run left half written."""
    try:
        return json.loads(line).get("step", 0) if line.endswith("\n") else None
    except ValueError:
        return None
