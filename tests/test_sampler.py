"""TaskSampler: temperature mixing, determinism, disjoint ranks, exact resume, infinite epochs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.data.loader import PackedDataset
from pipeline.data.sampler import TaskSampler, task_probabilities


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


# Pure rows (as with pack_per_task): 3 tasks with 600, 300, 100 rows; n_t = rows * 4 examples.
ROW_TASKS = np.repeat([0, 1, 2], [600, 300, 100])
SIZES = [2400, 1200, 400]


def test_probabilities_formula():
    np.testing.assert_allclose(task_probabilities(SIZES, 1.0), [0.6, 0.3, 0.1])
    p2 = task_probabilities(SIZES, 2.0)
    np.testing.assert_allclose(p2, np.sqrt(SIZES) / np.sqrt(SIZES).sum())
    np.testing.assert_allclose(task_probabilities(SIZES, 1e6), [1 / 3] * 3, atol=1e-4)
    np.testing.assert_allclose(task_probabilities(SIZES, 1.0, caps=[1200, None, None]), [3 / 7, 3 / 7, 1 / 7])
    np.testing.assert_allclose(task_probabilities(SIZES, 1.0, weights=[0, 1, 1]), [0, 0.75, 0.25])
    with pytest.raises(ValueError):
        task_probabilities([0, 0], 1.0)


def test_empirical_mix_matches_temperature():
    s = TaskSampler(ROW_TASKS, SIZES, temperature=2.0, seed=3, epoch_size=20000)
    freq = np.bincount(ROW_TASKS[take(s, 20000)], minlength=3) / 20000
    np.testing.assert_allclose(freq, s.probabilities, atol=0.015)
    # Rows of a task are drawn from permutations: the 100 rows of task 2 are all used, evenly.
    counts = np.bincount(take(TaskSampler(ROW_TASKS, SIZES, 2.0, seed=3, epoch_size=20000), 20000), minlength=1000)
    for lo, hi in ((0, 600), (600, 900), (900, 1000)):
        assert counts[lo:hi].min() >= counts[lo:hi].max() - 1


def test_deterministic_given_seed():
    a = take(TaskSampler(ROW_TASKS, SIZES, 2.0, seed=7), 500)
    b = take(TaskSampler(ROW_TASKS, SIZES, 2.0, seed=7), 500)
    c = take(TaskSampler(ROW_TASKS, SIZES, 2.0, seed=8), 500)
    assert a == b and a != c


def test_ranks_are_disjoint_and_cover_the_stream():
    single = take(TaskSampler(ROW_TASKS, SIZES, 2.0, seed=1, epoch_size=300), 900)  # crosses 2 epoch boundaries
    ranks = [take(TaskSampler(ROW_TASKS, SIZES, 2.0, seed=1, rank=r, world_size=3, epoch_size=300), 300)
             for r in range(3)]
    assert [x for step in zip(*ranks) for x in step] == single
    s = TaskSampler(ROW_TASKS, SIZES, 2.0, seed=1, rank=1, world_size=3, epoch_size=300)
    assert len(s) == 100


def test_infinite_over_epochs_with_fresh_order():
    s = TaskSampler(ROW_TASKS, SIZES, 1.0, seed=0, epoch_size=1000)
    out = take(s, 2500)
    assert s.epoch == 2
    assert out[:1000] != out[1000:2000]


@pytest.mark.parametrize("world_after", [2, 4])
def test_exact_resume(world_after):
    ref = take(TaskSampler(ROW_TASKS, SIZES, 2.0, seed=5, epoch_size=250), 1000)
    ranks = [TaskSampler(ROW_TASKS, SIZES, 2.0, seed=5, rank=r, world_size=2, epoch_size=250) for r in range(2)]
    first = [take(s, 137) for s in ranks]
    state = ranks[0].state_dict()
    assert state["position"] == 274
    resumed = []
    for r in range(world_after):
        s = TaskSampler(ROW_TASKS, SIZES, 2.0, seed=5, rank=r, world_size=world_after, epoch_size=250)
        s.load_state_dict(state)
        resumed.append(take(s, (1000 - 274) // world_after))
    stream = [x for step in zip(*first) for x in step] + [x for step in zip(*resumed) for x in step]
    assert stream == ref[:len(stream)]
    # A DataLoader that prefetched: the trainer passes what it really consumed.
    assert ranks[0].state_dict(consumed=100)["position"] == 200
    other = TaskSampler(ROW_TASKS, SIZES, 2.0, seed=6, epoch_size=250)
    with pytest.raises(ValueError, match="another seed"):
        other.load_state_dict(state)


def test_from_dataset_uses_manifest_and_rejects_unknown_tasks(prepared_builtin_data):
    ds = PackedDataset(prepared_builtin_data)
    s = TaskSampler.from_dataset(ds, seed=0)
    probs = ds.manifest["sampling"]["probabilities"]
    np.testing.assert_allclose(s.probabilities, [probs[n] for n in ds.task_names], atol=1e-5)
    assert all(0 <= i < len(ds) for i in take(s, 200))
    with pytest.raises(ValueError, match="unknown task.*nope"):
        TaskSampler.from_dataset(ds, sampling={"temperature": 1.0, "weights": {"nope": 2.0}})
    only = TaskSampler.from_dataset(ds, sampling={"weights": {n: float(n == "sort") for n in ds.task_names}})
    assert set(ds.row_tasks()[take(only, 50)].tolist()) == {ds.task_names.index("sort")}
