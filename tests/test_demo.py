"""`make demo-tiny` end to end at a smaller size: prep -> base -> train (2 ranks, ZeRO-3, NF4) -> merge -> evaluate.

The same Makefile targets the README names, with the sizes turned down through the Makefile's variables.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import force_bnb_cpu_path
from pipeline.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_make_demo_small_end_to_end(tmp_path, monkeypatch):
    """On bitsandbytes' AVX512-BF16 CPU branch whatever the host (the plain branch is what the other tests and an
    AVX2-only CPU take): its in-place repack once crashed the demo at the first checkpoint after an eval."""
    force_bnb_cpu_path(monkeypatch, avx512bf16=True)
    tasks = yaml.safe_load((ROOT / "configs/prep/default.yaml").read_text())["tasks"]
    builtin = tmp_path / "builtin"
    prep_args = [f"--set builtin.dir={builtin}", "--set builtin.scale=0.05", "--set max_seq_len=128",
                 "--set tokenizer.train_sentencepiece.vocab_size=320"]
    for i, task in enumerate(tasks):
        path = task["source"]["path"].replace("data/built/builtin", str(builtin))
        prep_args.append(f"--set tasks.{i}.source.path={path}")
    data, run = tmp_path / "data", tmp_path / "run"
    port = free_port()
    make = ["make", "demo-tiny", f"PYTHON={sys.executable}", f"DATA_DIR={data}", f"RUN_DIR={run}", f"MASTER_PORT={port}",
            "PREP_ARGS=" + " ".join(prep_args),
            "BASE_ARGS=--set hidden_size=64 --set intermediate_size=128 --set pretrain_steps=20 "
            "--set skill_examples_per_task=50",
            "TRAIN_ARGS=--set optim.max_steps=4 --set checkpoint.every=2 --set eval.every=2 --set eval.max_batches=2",
            "EVAL_ARGS=--max-examples 6"]
    proc = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]

    manifest = json.loads((data / "manifest.json").read_text())
    names = sorted(manifest["tasks"])
    assert names == sorted(t["name"] for t in tasks)
    assert (data / "train").is_dir() and (data / "eval").is_dir() and (data / "tokenizer").is_dir()
    assert (run / "base" / "config.json").is_file() and (run / "base" / "tokenizer.json").is_file()

    summary = json.loads((run / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["world_size"] == 2
    assert (run / "train" / "checkpoints" / "step_4").is_dir()
    for f in ("adapter_model.safetensors", "more_config.json", "rank_map.json"):
        assert (run / "train" / "adapter" / f).is_file()

    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert sorted(report["tasks"]) == names
    for name in names:
        assert (run / "merged" / name / "config.json").is_file()
        check = report["tasks"][name]["check"]
        assert check["passed"] and check["max_abs_err"] <= check["tolerance"]

    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["runs"]) == {"baseline", "trained"}
    assert set(results["runs"]["trained"]["tasks"]) == set(names)
    table = (run / "eval" / "report.md").read_text()
    assert "| task |" in table and table in proc.stdout  # `make demo-tiny` prints the report
    # the merged run's rank map (from merge_report.json) as a picture in the report
    assert results["runs"]["trained"]["rank_map_image"] == "rank_map_trained.png"
    assert (run / "eval" / "rank_map_trained.png").is_file() and "![rank map of trained]" in table


@pytest.mark.slow
def test_make_demo_real_llm_small(smollm2_import, tmp_path):
    """`make demo` (the README's first command) at a smaller size: the real SmolLM2 (imported once per session),
    the built-in tasks through its chat template, 3 steps on 2 ranks under ZeRO-3, merge, evaluate beside the model
    zero-shot."""
    tasks = yaml.safe_load((ROOT / "configs/prep/default.yaml").read_text())["tasks"]
    builtin = tmp_path / "builtin"
    prep_args = [f"--set builtin.dir={builtin}", "--set builtin.scale=0.05"]
    for i, task in enumerate(tasks):
        path = task["source"]["path"].replace("data/built/builtin", str(builtin))
        prep_args.append(f"--set tasks.{i}.source.path={path}")
    data, run = tmp_path / "data", tmp_path / "run"
    make = ["make", "demo", f"PYTHON={sys.executable}", f"MODEL_DIR={smollm2_import.folder}",
            f"LLM_DATA_DIR={data}", f"LLM_RUN_DIR={run}", f"MASTER_PORT={free_port()}",
            "PREP_ARGS=" + " ".join(prep_args),
            "TRAIN_ARGS=--set optim.max_steps=3 --set checkpoint.every=0 --set eval.every=0 --set eval.max_batches=2",
            "EVAL_ARGS=--max-examples 4"]
    proc = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert "model: cached:" in proc.stdout + proc.stderr  # the session's import, not a second one

    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["tokenizer"]["add_bos"] is False  # SmolLM2's tokenizer adds none
    assert all(info["config"]["chat_template"] for info in manifest["tasks"].values())
    summary = json.loads((run / "train" / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2
    report = json.loads((run / "merged" / "merge_report.json").read_text())
    assert all(report["tasks"][t]["check"]["passed"] for t in manifest["tasks"])
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["runs"]["baseline"]["model"]["path"] == str(smollm2_import.folder)
    assert set(results["runs"]["trained"]["tasks"]) == set(manifest["tasks"])
    table = (run / "eval" / "report.md").read_text()
    assert "| task |" in table and table in proc.stdout
