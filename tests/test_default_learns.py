"""The default recipe learns (issue 5): built-in tasks, a base pretrained on the skills corpus, MoRE on its NF4
copy through the real trainer, then evaluate beside the untrained base. A smaller budget than `make demo-tiny` (one
process, fewer steps), so the margins asked here are below the demo's (README table)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# The smallest gain each task must show over the untrained base on held-out test inputs: about half of what this
# test measured here (sentiment 0.85 -> 1.00, reverse +0.25, sort +0.22, arithmetic +0.34, rating +1.29).
MIN_GAIN = {"sentiment": 0.07, "reverse": 0.12, "sort": 0.1, "arithmetic": 0.15, "rating": 0.6}


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
                "optim.micro_batch_size=8", "checkpoint.every=0", "eval.every=0")])
    _run(["launch/evaluate.py", "--adapter", run / "adapter", "--base", base, "--data", data, "--baseline", base,
          "--max-examples", 100, "--out", run / "eval", "--no-progress"])
    runs = json.loads((run / "eval" / "results.json").read_text())["runs"]
    gains = {t: runs["trained"]["tasks"][t]["score"] - runs["baseline"]["tasks"][t]["score"] for t in MIN_GAIN}
    assert all(gains[t] >= MIN_GAIN[t] for t in MIN_GAIN), gains
