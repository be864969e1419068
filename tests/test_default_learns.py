"""The default recipe learns (issue 5): built-in tasks, a base pretrained on the skills corpus, MoRE on its NF4
copy through the real trainer, then evaluate beside the untrained base. A smaller budget than `make demo-tiny` (one
process, fewer steps), so the margins asked here are below the demo's (README table).

What a tiny base learns in 250 steps depends on its float trajectory, and that differs between CPUs (other matmul
kernels): on an AMX Xeon, three bases (800, 1500, 3000 pretraining steps) gave reverse 0.00-0.28 and arithmetic
0.07-0.47 exact match (with 250 or 400 adapter steps), where an AVX-512 EPYC measured 0.30 and 0.32-0.41 on
three seeds. So every task must show it learned by its held-out answer loss (a continuous measure); a score must
rise by a margin only where every measured run did, and by no more than half of what the base left to gain (a base
at 0.95 cannot gain 0.07)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Smallest score gain over the untrained base on held-out test inputs, about half the least measured: sentiment
# 0.78/0.85 -> 1.00 (base 0.95 on one CPU), sort +0.62..0.89, rating Pearson +0.98..1.29. Reverse and arithmetic
# must not fall below the base; their exact match varies too much between CPUs for a floor (docstring).
MIN_GAIN = {"sentiment": 0.07, "reverse": 0.0, "sort": 0.3, "arithmetic": 0.0, "rating": 0.6}
CEILING = 1.0  # every score here: accuracy, exact match, Pearson
MEAN_GAIN = 0.25  # over the five tasks; measured 0.41-0.58
LOSS_RATIO = 0.4  # final held-out answer loss / the base's (step 0), every task; at most 0.25 measured (reverse)


def required_gain(task: str, baseline: float) -> float:
    return min(MIN_GAIN[task], 0.5 * (CEILING - baseline))


def _run(args: list, cwd: Path = ROOT) -> None:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_default_recipe_learns_every_builtin_task(tmp_path):
    builtin, data, base, run = tmp_path / "builtin", tmp_path / "data", tmp_path / "base", tmp_path / "run"
    tasks = yaml.safe_load((ROOT / "configs/prep/default.yaml").read_text())["tasks"]
    paths = [f"tasks.{i}.source.path={t['source']['path'].replace('data/built/builtin', str(builtin))}"
             for i, t in enumerate(tasks)]
    sets = lambda *kv: [a for s in kv for a in ("--set", s)]  # noqa: E731
    _run(["-m", "data_prep", "--config", "configs/prep/default.yaml",
          *sets(f"output_dir={data}", f"builtin.dir={builtin}", *paths)])
    _run(["launch/base.py", "--config", "configs/base/default.yaml",
          *sets(f"data_dir={data}", f"output_dir={base}", "pretrain_steps=800")])
    _run(["launch/train.py", "--config", "configs/train/default.yaml",
          *sets(f"data.dir={data}", f"model.path={base}", f"output_dir={run}", "optim.max_steps=250",
                "optim.micro_batch_size=8", "checkpoint.every=0", "eval.every=0", "eval.at_start=true")])
    _run(["launch/evaluate.py", "--adapter", run / "adapter", "--base", base, "--data", data, "--baseline", base,
          "--max-examples", 100, "--out", run / "eval", "--no-progress"])
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]
    start, end = evals[0], evals[-1]
    assert start["step"] == 0 and end["step"] == 250, [e["step"] for e in evals]
    ratios = {t: end[f"eval/loss/{t}"] / start[f"eval/loss/{t}"] for t in MIN_GAIN}
    runs = json.loads((run / "eval" / "results.json").read_text())["runs"]
    base_score = {t: runs["baseline"]["tasks"][t]["score"] for t in MIN_GAIN}
    gains = {t: runs["trained"]["tasks"][t]["score"] - base_score[t] for t in MIN_GAIN}
    report = f"loss ratios {ratios}, baseline scores {base_score}, gains {gains}"
    assert all(r <= LOSS_RATIO for r in ratios.values()), report
    assert all(gains[t] >= required_gain(t, base_score[t]) for t in MIN_GAIN), report
    assert sum(gains.values()) / len(gains) >= MEAN_GAIN, report


def test_required_gain_leaves_room_below_the_ceiling():
    assert required_gain("sentiment", 0.5) == 0.07
    assert abs(required_gain("sentiment", 0.95) - 0.025) < 1e-12
    assert required_gain("rating", -0.5) == 0.6
