"""Multi-task temperature sampling over packed rows, deterministic, sharded over ranks, exactly resumable.

p_t ∝ weight_t · min(n_t, cap_t)^(1/T): T=1 mixes in proportion to task size, large T tends to uniform, caps stop
one huge task from dominating (T5-style). Each epoch is a fixed sequence of `epoch_size` draws computed from
(seed, epoch) alone: the task of each draw is sampled with p, and the row is taken from a fresh permutation of
that task's rows (cycled when a task is drawn more often than it has rows). The infinite stream is the
concatenation of epochs; rank r of W reads global positions start + r, start + r + W, ... so ranks never share a
position, and the state is a single global position: resuming (even with another world size) continues exactly.

Rows are grouped by their majority task; with `pack_per_task` every row holds one task and the mix is exact.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch


def task_probabilities(sizes: Sequence[float], temperature: float = 1.0, caps: Optional[Sequence] = None,
                       weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """p_t ∝ weight_t · min(n_t, cap_t)^(1/T); tasks with no examples get 0."""
    n = np.asarray(sizes, dtype=np.float64)
    if caps is not None:
        n = np.minimum(n, [np.inf if c is None else c for c in caps])
    if temperature <= 0:
        raise ValueError(f"sampling temperature must be > 0, got {temperature}")
    w = np.ones_like(n) if weights is None else np.asarray(weights, dtype=np.float64)
    p = np.where(n > 0, w * np.power(np.maximum(n, 0), 1.0 / temperature), 0.0)
    if p.sum() <= 0:
        raise ValueError("sampling: every task has zero examples or weight")
    return p / p.sum()


class TaskSampler(torch.utils.data.Sampler[int]):
    """Infinite sampler of row indices with temperature mixing over tasks.

    Args:
        row_tasks: task id of every row (its majority task).
        task_sizes: n_t per task id (examples), the base of the temperature formula.
        temperature, caps, weights: see `task_probabilities`; caps/weights map task id -> value.
        seed: the stream is a function of the seed alone.
        rank, world_size: data-parallel position; ranks read disjoint positions of the same stream.
        epoch_size: draws per epoch (default: number of rows).
    """

    def __init__(self, row_tasks: Sequence[int], task_sizes: Sequence[float], temperature: float = 1.0,
                 caps: Optional[Mapping[int, int]] = None, weights: Optional[Mapping[int, float]] = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, epoch_size: Optional[int] = None):
        self.row_tasks = np.asarray(row_tasks, dtype=np.int64)
        n_tasks = len(task_sizes)
        if len(self.row_tasks) == 0:
            raise ValueError("TaskSampler: no rows")
        if not 0 <= rank < world_size:
            raise ValueError(f"TaskSampler: rank {rank} not in [0, {world_size})")
        for name, m in (("caps", caps), ("weights", weights)):
            bad = [k for k in (m or {}) if not 0 <= k < n_tasks]
            if bad:
                raise ValueError(f"TaskSampler: {name} name unknown task ids {bad}")
        self.groups = [np.flatnonzero(self.row_tasks == t) for t in range(n_tasks)]
        sizes = [s if len(g) else 0 for s, g in zip(task_sizes, self.groups)]  # tasks with no rows cannot be drawn
        self.probabilities = task_probabilities(
            sizes, temperature, caps=[(caps or {}).get(t) for t in range(n_tasks)],
            weights=[(weights or {}).get(t, 1.0) for t in range(n_tasks)])
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch_size = int(epoch_size or len(self.row_tasks))
        self.position = 0  # global position of the next draw for rank 0 of the stream (all ranks advance together)
        self._cache: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_dataset(cls, dataset, sampling: Optional[Mapping] = None, **kwargs) -> "TaskSampler":
        """Sampler for a `PackedDataset`, with the manifest's `sampling` section unless `sampling` is given
        ({temperature, caps, weights} by task name; unknown names are an error)."""
        names = dataset.task_names
        spec = dict(dataset.manifest.get("sampling", {}) if sampling is None else sampling)
        ids = {n: i for i, n in enumerate(names)}
        for field in ("caps", "weights"):
            unknown = [k for k in spec.get(field) or {} if k not in ids]
            if unknown:
                raise ValueError(f"sampling.{field} names unknown task(s) {unknown}; tasks are: {', '.join(names)}")
        sizes = [dataset.manifest["tasks"][n]["examples"] for n in names]
        return cls(dataset.row_tasks(), sizes, temperature=spec.get("temperature", 1.0),
                   caps={ids[k]: v for k, v in (spec.get("caps") or {}).items()},
                   weights={ids[k]: v for k, v in (spec.get("weights") or {}).items()}, **kwargs)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The global draw sequence of one epoch (all ranks), a pure function of (seed, epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        draws = rng.choice(len(self.groups), size=self.epoch_size, p=self.probabilities)
        out = np.empty(self.epoch_size, dtype=np.int64)
        for t, rows in enumerate(self.groups):
            slots = np.flatnonzero(draws == t)
            if len(slots) == 0:
                continue
            reps = -(-len(slots) // len(rows))
            out[slots] = np.concatenate([rng.permutation(rows) for _ in range(reps)])[:len(slots)]
        self._cache = (epoch, out)
        return out

    def __iter__(self) -> Iterator[int]:
        while True:
            g = self.position + self.rank
            epoch, offset = divmod(g, self.epoch_size)
            idx = int(self.epoch_indices(epoch)[offset])
            self.position += self.world_size
            yield idx

    def __len__(self) -> int:
        """Draws per rank in one epoch (the stream itself is infinite)."""
        return self.epoch_size // self.world_size

    @property
    def epoch(self) -> int:
        return self.position // self.epoch_size

    def state_dict(self, consumed: Optional[int] = None) -> dict:
        """Resume state. `consumed`: samples this rank has really used since the start (pass it when a DataLoader
        prefetches ahead of the training step); default: what this sampler has handed out."""
        position = self.position if consumed is None else consumed * self.world_size
        return {"seed": self.seed, "epoch_size": self.epoch_size, "position": int(position),
                "probabilities": [float(p) for p in self.probabilities]}

    def load_state_dict(self, state: Mapping) -> None:
        if state["seed"] != self.seed or state["epoch_size"] != self.epoch_size or not np.allclose(
                state["probabilities"], self.probabilities):
            raise ValueError("TaskSampler.load_state_dict: the saved sampler had another seed, epoch size or mix; "
                             "resuming it would not continue the same stream")
        self.position = int(state["position"])
