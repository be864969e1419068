"""TaskSampler: temperature mixing of the examples seen (task-pure and mixed rows), determinism, disjoint ranks,
exact resume, infinite epochs."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.data.loader import PackedDataset
from pipeline.data.pack import pack
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
    # The prepared rows mix tasks: a task left out (weight 0) is never seen, so only rows without it are drawn, and a
    # task none of whose rows is free of the others cannot be trained on alone.
    counts = ds.row_task_counts()
    only = TaskSampler.from_dataset(ds, sampling={"weights": {n: float(n == "sentiment") for n in ds.task_names}})
    assert set(np.flatnonzero(counts[take(only, 50)].sum(axis=0))) == {ds.task_names.index("sentiment")}
    assert (counts[:, ds.task_names.index("sort")] < counts.sum(axis=1)).all()
    with pytest.raises(ValueError, match="sort.*pack_per_task: true"):
        TaskSampler.from_dataset(ds, sampling={"weights": {n: float(n == "sort") for n in ds.task_names}})
    seen = counts[take(TaskSampler.from_dataset(ds, seed=0), 20 * len(ds))].sum(axis=0)
    np.testing.assert_allclose(seen / seen.sum(), s.probabilities, atol=0.01)


# The mix is one of EXAMPLES, whatever the packing. Synthetic data packed by prep's packer: task 0 short samples
# (~34 per row when rows hold one task), task 1 long ones (1 per row), task 2 mid-length samples that, with
# mixed-task rows, always join a task-1 row and so are never a row's majority (by tokens, as rows used to be grouped):
# short lengths are even, long and mid ones odd, so only one mid sample fills a long sample's row exactly.
class Mix:
    def __init__(self, per_task: bool, capacity: int = 1024):
        rng = np.random.default_rng(0)
        spec = [(3000, 10, 20, 0), (600, 425, 449, 1), (450, 45, 54, 1)]  # count, 2 * [lo, hi] + parity
        lens = np.concatenate([2 * rng.integers(lo, hi + 1, n) + odd for n, lo, hi, odd in spec])
        task = np.repeat(np.arange(len(spec)), [n for n, *_ in spec])
        rows = pack(lens, capacity, task if per_task else None)
        self.examples = np.array([np.bincount(task[r], minlength=3) for r in rows])
        self.tokens = np.array([np.bincount(task[r], weights=lens[r], minlength=3) for r in rows]).astype(np.int64)


MIXES = {per_task: Mix(per_task) for per_task in (True, False)}


def sampler_for(mix: Mix, **kwargs) -> TaskSampler:
    return TaskSampler(mix.examples, **kwargs)


def seen_shares(mix: Mix, sampler: TaskSampler, draws: int):
    idx = np.asarray(take(sampler, draws))
    ex, tok = mix.examples[idx].sum(axis=0), mix.tokens[idx].sum(axis=0)
    return ex / ex.sum(), tok / tok.sum(), idx


def test_synthetic_mixes_are_what_they_claim():
    pure, mixed = MIXES[True].examples, MIXES[False].examples
    assert ((pure > 0).sum(axis=1) == 1).all()
    assert pure[pure[:, 0] > 0, 0].mean() > 30 and (pure[pure[:, 1] > 0, 1] == 1).all()
    assert ((mixed > 0).sum(axis=1) > 1).mean() > 0.9
    assert not (MIXES[False].tokens.argmax(axis=1) == 2).any()  # task 2 is never a row's majority


@pytest.mark.parametrize("per_task", [True, False], ids=["pack_per_task", "mixed_rows"])
# (Caps that mixed rows can reach: every task-1 sample shares its row with short task-0 samples.)
@pytest.mark.parametrize("temperature, caps", [(1.0, None), (2.0, None), (1.0, {0: 1500}), (2.0, {0: 2000})],
                         ids=["T1", "T2", "T1-cap", "T2-cap"])
def test_share_of_examples_seen_is_the_configured_mix(per_task, temperature, caps):
    mix = MIXES[per_task]
    n = mix.examples.sum(axis=0)
    p = task_probabilities(n, temperature, caps=[(caps or {}).get(t) for t in range(3)])
    s = sampler_for(mix, temperature=temperature, caps=caps, seed=1)
    np.testing.assert_allclose(s.probabilities, p)
    examples, tokens, idx = seen_shares(mix, s, 20 * len(mix.examples))
    np.testing.assert_allclose(examples, p, atol=0.01)  # within 1 percentage point, task 2 included
    np.testing.assert_allclose(s.expected_shares(), p, atol=1e-9)
    # The share of supervised tokens is reported beside it (here every token counts as supervised).
    np.testing.assert_allclose(tokens, s.expected_shares(mix.tokens), atol=0.01)
    if temperature == 1.0 and caps is None:  # T=1: every task the same number of epochs
        epochs = mix.examples[idx].sum(axis=0) / n
        np.testing.assert_allclose(epochs / epochs.mean(), 1, atol=0.02)
    if per_task:  # task-pure rows: the rows of a task share one weight, so they are all used evenly
        for t in range(3):
            q = s.row_probabilities[mix.examples[:, t] > 0]
            np.testing.assert_allclose(q, q[0])


def test_one_epoch_is_already_the_mix():
    mix = MIXES[False]
    s = sampler_for(mix, temperature=2.0, seed=0)
    examples, _, _ = seen_shares(mix, s, len(mix.examples))
    np.testing.assert_allclose(examples, s.probabilities, atol=0.005)


def test_zero_weight_task_is_never_seen():
    for per_task, mix in MIXES.items():
        s = sampler_for(mix, temperature=1.0, weights={2: 0.0}, seed=0)
        examples, _, _ = seen_shares(mix, s, 10 * len(mix.examples))
        assert examples[2] == 0 and s.probabilities[2] == 0
        np.testing.assert_allclose(examples, s.probabilities, atol=0.01)
    # With mixed rows, every task-1 row holds task 0 or 2 samples: task 1 alone cannot be trained on.
    with pytest.raises(ValueError, match="pack_per_task: true"):
        sampler_for(MIXES[False], weights={0: 0.0, 2: 0.0})
    only = sampler_for(MIXES[True], weights={0: 0.0, 2: 0.0})
    assert set(np.flatnonzero(MIXES[True].examples[take(only, 100)].sum(axis=0))) == {1}


def test_unreachable_mix_is_an_error():
    # Task 0 only ever makes up 10 % of a row, so it cannot be half of the examples.
    counts = np.array([[1, 9]] * 100 + [[0, 10]] * 1000)
    with pytest.raises(ValueError, match="no weighting of the rows reaches"):
        TaskSampler(counts, temperature=100.0)
    s = TaskSampler(counts, temperature=1.5, seed=0)  # p_0 ≈ 5 %: reachable, by drawing mixed rows more
    seen = counts[take(s, 20000)].sum(axis=0)
    np.testing.assert_allclose(seen / seen.sum(), s.probabilities, atol=0.005)


@pytest.mark.parametrize("world_after", [1, 3])
def test_mixed_rows_stream_is_deterministic_disjoint_and_resumable(world_after):
    mix = MIXES[False]
    ref = take(sampler_for(mix, temperature=2.0, seed=4, epoch_size=200), 1200)
    assert ref == take(sampler_for(mix, temperature=2.0, seed=4, epoch_size=200), 1200)
    ranks = [sampler_for(mix, temperature=2.0, seed=4, rank=r, world_size=2, epoch_size=200) for r in range(2)]
    first = [take(s, 150) for s in ranks]
    state = ranks[1].state_dict()
    resumed = []
    for r in range(world_after):
        s = sampler_for(mix, temperature=2.0, seed=4, rank=r, world_size=world_after, epoch_size=200)
        s.load_state_dict(state)
        resumed.append(take(s, 900 // world_after))
    stream = [x for step in zip(*first) for x in step] + [x for step in zip(*resumed) for x in step]
    assert stream == ref[:len(stream)]
    with pytest.raises(ValueError, match="another seed, epoch size, mix or rows"):
        sampler_for(mix, temperature=1.0, seed=4, epoch_size=200).load_state_dict(state)
    with pytest.raises(ValueError, match="another sampler version"):
        ranks[0].load_state_dict({k: v for k, v in state.items() if k != "version"})
