"""Multi-task temperature sampling over packed rows: the mix of EXAMPLES seen is the configured one, for task-pure
rows (`pack_per_task: true`) and mixed-task rows alike; deterministic, sharded over ranks, exactly resumable.

p_t ∝ weight_t · min(n_t, cap_t)^(1/T) is the share of the examples seen that belong to task t (n_t: the task's
training examples): T=1 gives every task the same number of epochs, large T tends to a uniform mix, caps stop one
huge task from dominating (T5-style), weight 0 leaves a task out.

Why rows are weighted and not tasks drawn: the sampler hands out packed rows, and a row holds 1 long sample or 30
short ones, so drawing a task with p_t and then one of its rows would oversample short-sample tasks by their
packing factor; with mixed rows a row is not even one task. Instead every row r gets a draw probability q_r, chosen
so that the expected number of examples of each task per draw, sum_r q_r C_rt (C_rt: samples of task t in row r),
is ∝ p_t. Among the many q that do this we take the one that spreads exposure most evenly over the samples:
minimise sum over samples of q_row(sample)^2. Its optimality conditions give q_r = max(0, π_r·γ), π_r the row's
task fractions C_r / |C_r| and γ one number per task, i.e. a row's weight is the mean of a per-task rate over its
samples; γ minimises the convex K-dimensional dual ½ Σ_r |C_r| max(0, π_r·γ)² − γ·b (b ∝ p) and is found by a few
Newton steps over the distinct row compositions. Consequences:
- task-pure rows: every row of task t gets the same weight γ_t ∝ p_t / n_t (the closed form, no search): its rows
  are used evenly and the shares are exact whatever the examples per row;
- mixed rows at T=1 without caps: uniform weights (every row, every sample, the same rate);
- mixed rows otherwise: rows with more of an under-represented task are drawn more, and rows made mostly of a task
  that must be seen much less than its size can get weight 0 (never drawn; `row_probabilities == 0`): the further
  p is from the rows' natural mix, the fewer rows carry it;
- rows holding any sample of a task with p_t = 0 (weight 0, `data.tasks` leaving it out) get weight 0: those
  samples are never trained on. A mix no weighting of the rows reaches (a task's samples only share rows with
  tasks that must be seen less, e.g. a subset of tasks on mixed rows) is a ValueError naming the task, never a
  silently different mix: prepare the data with `pack_per_task: true`.
Row composition comes from `PackedDataset.row_task_counts()` (O(samples) at start-up).

Each epoch is a fixed sequence of `epoch_size` draws computed from (seed, epoch) alone: rows (those with q_r > 0)
grouped by composition, in a fresh random order within each group, systematic sampling of `epoch_size` positions
(one random offset) over their cumulated q, then shuffled. Every row, and every group of rows of one composition,
is drawn floor or ceil of its expected number of times, so even one epoch has almost exactly the mix. The
infinite stream is the concatenation of epochs; rank r of W reads global positions start + r, start + r + W, ... so
ranks never share a position, and the state is a single global position: resuming (even with another world size)
continues exactly. q is computed in float64 by the same code on every rank; a last-bit difference between hosts
could only move a draw that falls within ~1e-13 of a row boundary.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

import numpy as np
import torch

STREAM_VERSION = 2  # 1: tasks drawn with p_t, rows from the task's majority group (before example-weighted rows)


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


def row_weights(counts: np.ndarray, p: np.ndarray, names: Optional[Sequence[str]] = None,
                return_classes: bool = False):
    """Draw probability of every row so that the expected examples per draw of each task are ∝ p, with the most even
    exposure of samples (module docstring). counts: (rows, tasks) examples per row per task, p: (tasks,) target.
    With `return_classes`, also the composition class of every row (-1 for rows that are never drawn)."""
    counts = np.asarray(counts, dtype=np.float64)
    R, K = counts.shape
    names = list(names) if names is not None else [f"task {t}" for t in range(K)]
    keep = (counts[:, p <= 0] == 0).all(axis=1) & (counts.sum(axis=1) > 0)
    tasks = np.flatnonzero(p > 0)
    avail = counts[keep][:, tasks].sum(axis=0)
    if (avail == 0).any():
        lost = [names[tasks[i]] for i in np.flatnonzero(avail == 0)]
        raise ValueError(f"sampling: every row holding {lost} also holds a task with sampling weight 0, so no row "
                         "can be drawn for it; with mixed-task rows a subset of tasks cannot be trained on alone: "
                         "prepare the data with pack_per_task: true")
    comps, inverse, mult = _unique_rows(counts[keep][:, tasks])
    size = comps.sum(axis=1)
    b = p[tasks] / p[tasks].sum() * (size @ mult)  # target examples per task (uniform rows give b when p is natural)
    gamma = _solve_rates(comps, mult.astype(np.float64), size, b)
    w_comp = np.maximum(0.0, comps @ gamma / size)
    got = (mult * w_comp) @ comps
    if np.abs(got / got.sum() - b / b.sum()).max() > 1e-9:  # the dual has no minimum: b is outside the rows' cone
        want, most = b / b.sum(), (comps / size[:, None]).max(axis=0)
        short = [f"{names[t]} should be {w:.1%} of the examples but is at most {m:.1%} of any row"
                 for t, w, m in zip(tasks, want, most) if w > m]
        raise ValueError(
            "sampling: with these mixed-task rows no weighting of the rows reaches the configured mix ("
            + ("; ".join(short) or "its tasks are always packed together in other proportions")
            + "); lower the temperature, change the caps or weights, or prepare the data with pack_per_task: true")
    q, classes = np.zeros(R), np.full(R, -1, dtype=np.int64)
    q[keep], classes[keep] = w_comp[inverse], inverse
    classes[q == 0] = -1
    return (q / q.sum(), classes) if return_classes else q / q.sum()


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique(x, axis=0, return_inverse=True, return_counts=True), by one lexsort (np.unique's axis=0 path is
    ~20x slower on a million rows)."""
    order = np.lexsort(x.T[::-1])
    xs = x[order]
    new = np.concatenate([[True], (xs[1:] != xs[:-1]).any(axis=1)])
    inverse = np.empty(len(x), dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return xs[new], inverse, np.bincount(inverse)


def _solve_rates(comps: np.ndarray, mult: np.ndarray, size: np.ndarray, b: np.ndarray) -> np.ndarray:
    """γ minimising g(γ) = ½ Σ_c m_c |C_c| max(0, C_c·γ/|C_c|)² − γ·b (damped semi-smooth Newton, exact in one step
    for task-pure rows); its gradient Σ_c m_c C_c max(0, z_c) − b is the mismatch of the per-task example counts."""
    n = mult @ comps
    gamma = b / n  # the solution when every row holds one task
    scale = np.abs(b).sum()

    def g(x):
        z = np.maximum(0.0, comps @ x / size)
        return 0.5 * (mult * size) @ (z * z) - x @ b, z

    value, z = g(gamma)
    for _ in range(200):
        grad = (mult * z) @ comps - b
        if np.abs(grad).sum() <= 1e-13 * scale:
            break
        active = z > 0
        H = (comps[active] * (mult[active] / size[active])[:, None]).T @ comps[active]
        step = -np.linalg.lstsq(H + 1e-12 * np.trace(H) * np.eye(len(b)), grad, rcond=None)[0]
        t = 1.0
        while t > 1e-12:
            new_value, new_z = g(gamma + t * step)
            if new_value <= value + 1e-4 * t * grad @ step:
                break
            t *= 0.5
        else:
            break  # no descent: unbounded (an unreachable mix) or converged to rounding; the caller checks
        gamma, value, z = gamma + t * step, new_value, new_z
    return gamma


class TaskSampler(torch.utils.data.Sampler[int]):
    """Infinite sampler of row indices whose examples follow the temperature mix over tasks.

    Args:
        row_tasks: per row, either its task id (1-D: every row holds one task, as with `pack_per_task`) or its number
            of examples of each task (2-D, rows x tasks: any packing; `PackedDataset.row_task_counts()`).
        task_sizes: n_t per task id (examples), the base of the temperature formula. Required with 1-D `row_tasks`
            (only a task's total matters for task-pure rows); with 2-D, defaults to the column sums and must equal them.
        temperature, caps, weights: see `task_probabilities`; caps/weights map task id -> value.
        seed: the stream is a function of the seed (and the data) alone.
        rank, world_size: data-parallel position; ranks read disjoint positions of the same stream.
        epoch_size: draws per epoch (default: number of rows).

    `probabilities` is p (the configured share of examples per task), `row_probabilities` the draw probability of
    each row, `expected_shares(values)` the per-task share of any per-row quantity (e.g. supervised tokens).
    """

    def __init__(self, row_tasks: Sequence, task_sizes: Optional[Sequence[float]] = None, temperature: float = 1.0,
                 caps: Optional[Mapping[int, int]] = None, weights: Optional[Mapping[int, float]] = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, epoch_size: Optional[int] = None,
                 task_names: Optional[Sequence[str]] = None):
        rows = np.asarray(row_tasks)
        if len(rows) == 0:
            raise ValueError("TaskSampler: no rows")
        if rows.ndim == 1:
            if task_sizes is None:
                raise ValueError("TaskSampler: task ids per row need task_sizes (examples per task)")
            sizes = np.asarray(task_sizes, dtype=np.float64)
            rows = rows.astype(np.int64)
            if rows.min() < 0 or rows.max() >= len(sizes):
                raise ValueError(f"TaskSampler: row task ids must be in [0, {len(sizes)})")
            per_task = np.bincount(rows, minlength=len(sizes))
            counts = np.zeros((len(rows), len(sizes)))
            # task-pure rows: only a task's total matters (its rows share one weight), so spread n_t evenly
            counts[np.arange(len(rows)), rows] = (sizes / np.maximum(per_task, 1))[rows]
            sizes = np.where(per_task > 0, sizes, 0.0)  # tasks with no rows cannot be drawn
        elif rows.ndim == 2:
            counts = rows.astype(np.float64)
            sizes = counts.sum(axis=0)
            if task_sizes is not None and not np.allclose(task_sizes, sizes):
                raise ValueError(f"TaskSampler: task_sizes {list(task_sizes)} differ from the rows' examples "
                                 f"{sizes.astype(int).tolist()}")
        else:
            raise ValueError("TaskSampler: row_tasks must be task ids (1-D) or examples per row and task (2-D)")
        n_tasks = counts.shape[1]
        if not 0 <= rank < world_size:
            raise ValueError(f"TaskSampler: rank {rank} not in [0, {world_size})")
        for name, m in (("caps", caps), ("weights", weights)):
            bad = [k for k in (m or {}) if not 0 <= k < n_tasks]
            if bad:
                raise ValueError(f"TaskSampler: {name} name unknown task ids {bad}")
        self.counts = counts
        self.probabilities = task_probabilities(
            sizes, temperature, caps=[(caps or {}).get(t) for t in range(n_tasks)],
            weights=[(weights or {}).get(t, 1.0) for t in range(n_tasks)])
        self.row_probabilities, classes = row_weights(counts, self.probabilities, task_names, return_classes=True)
        self._drawn = np.flatnonzero(classes >= 0)
        self._classes = classes[self._drawn]
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch_size = int(epoch_size or len(counts))
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
        return cls(dataset.row_task_counts(), sizes, temperature=spec.get("temperature", 1.0),
                   caps={ids[k]: v for k, v in (spec.get("caps") or {}).items()},
                   weights={ids[k]: v for k, v in (spec.get("weights") or {}).items()}, task_names=names, **kwargs)

    def expected_shares(self, values: Optional[np.ndarray] = None) -> np.ndarray:
        """Per-task share, over a long run, of a per-row per-task quantity (rows x tasks; default: examples, which
        is `probabilities`), e.g. `dataset.row_task_counts("supervised_tokens")`."""
        v = self.row_probabilities @ (self.counts if values is None else np.asarray(values, dtype=np.float64))
        return v / v.sum()

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The global draw sequence of one epoch (all ranks), a pure function of (seed, epoch) and the row weights."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self._drawn))
        order = order[np.argsort(self._classes[order], kind="stable")]  # rows of one composition together
        cum = np.cumsum(self.row_probabilities[self._drawn][order])
        cum *= self.epoch_size / cum[-1]
        cum[-1] = self.epoch_size  # every point below lands on a row
        points = rng.random() + np.arange(self.epoch_size)
        picked = self._drawn[order[np.searchsorted(cum, points, side="right")]]
        out = rng.permutation(picked)
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

    def _fingerprint(self) -> list[float]:
        """Expected examples of each task per draw: changes with the mix, the rows or the weighting."""
        return [float(x) for x in self.row_probabilities @ self.counts]

    def state_dict(self, consumed: Optional[int] = None) -> dict:
        """Resume state. `consumed`: samples this rank has really used since the start (pass it when a DataLoader
        prefetches ahead of the training step); default: what this sampler has handed out."""
        position = self.position if consumed is None else consumed * self.world_size
        return {"version": STREAM_VERSION, "seed": self.seed, "epoch_size": self.epoch_size, "position": int(position),
                "probabilities": [float(p) for p in self.probabilities], "examples_per_draw": self._fingerprint()}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("version") != STREAM_VERSION:
            raise ValueError("TaskSampler.load_state_dict: the state was saved by another sampler version (rows "
                             "were drawn differently); resuming it would not continue the same stream")
        if state["seed"] != self.seed or state["epoch_size"] != self.epoch_size or not np.allclose(
                state["probabilities"], self.probabilities) or not np.allclose(
                state["examples_per_draw"], self._fingerprint(), rtol=1e-9, atol=0):
            raise ValueError("TaskSampler.load_state_dict: the saved sampler had another seed, epoch size, mix or "
                             "rows; resuming it would not continue the same stream")
        self.position = int(state["position"])
