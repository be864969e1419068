"""bench/glue_variants.py at its smallest: a tiny Llama with SmolLM2's tokenizer and chat template, two GLUE tasks
from ../shared, every stage through the project's commands; the JSON it writes and the section bench/report.py
renders from it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"


def _bench(model, tmp_path, *args):
    cmd = [sys.executable, "bench/glue_variants.py", "--quick", "--model", str(model), "--tasks", "rte,mrpc",
           "--tokens", "2000", "--max-examples", "4", "--routing-examples", "3", "--work", str(tmp_path / "work"),
           "--out", str(tmp_path / "glue.json"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "glue.json").read_text())


@pytest.mark.slow
@pytest.mark.skipif(not GLUE.is_dir(), reason="needs ../shared/data/glue")
def test_quick_bench_writes_every_variant_and_adds_later_ones(tiny_chat_model, tmp_path):
    r = _bench(tiny_chat_model, tmp_path, "--variants", "more,per_task_lora")
    tasks = r["tasks"]
    assert sorted(tasks) == ["mrpc", "rte"] and set(r["baseline"]) == set(tasks)
    more, per_task = r["variants"]["more"]["0"], r["variants"]["per_task_lora"]["0"]
    assert not r["variants"]["shared_lora"]
    for rec in (more, per_task):
        assert set(rec["scores"]) == set(tasks) and all(s["n"] == 4 for s in rec["scores"].values())
        # the same real-token budget, up to a packed row per run
        assert abs(rec["tokens"] - 2000) <= 512 * len(tasks), rec["tokens"]
    assert per_task["params"]["lora"] == 2 * more["params"]["lora"]  # one LoRA per task
    assert sum(r["settings"]["per_task_steps"].values()) in range(r["settings"]["steps"] - 1, r["settings"]["steps"] + 2)
    ranks, stats = more["rank_map"], more["rank_stats"]
    assert set(ranks) == set(tasks) and len(ranks["rte"]) == 2 * 7  # 2 layers x all 7 linears
    assert stats["mean_rank"]["rte"] == pytest.approx(sum(ranks["rte"].values()) / 14)
    same = sum(ranks["rte"][n] == ranks["mrpc"][n] for n in ranks["rte"]) / 14
    assert stats["same_rank"] == {f"{tasks[0]}/{tasks[1]}": pytest.approx(same)}  # pairs in task-id order
    assert set(more["routing_accuracy"]) == set(tasks)
    assert (tmp_path / "glue_more_seed0.png").is_file()

    # a later call with the same settings adds a variant and keeps what the first one measured
    r2 = _bench(tiny_chat_model, tmp_path, "--variants", "shared_lora")
    assert r2["variants"]["more"] == r["variants"]["more"] and r2["baseline"] == r["baseline"]
    assert set(r2["variants"]["shared_lora"]["0"]["scores"]) == set(tasks)

    sys.path.insert(0, str(ROOT / "bench"))
    import report

    md = "\n".join(report.glue_variants(r2))
    assert "| rte | accuracy |" in md and "| shared_lora | 0 |" in md and "routing accuracy" in md
