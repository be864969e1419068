"""bench/gemm_peak.py at its smallest: square shapes, a tiny Llama config's linear shapes, and the split run with one
thread in each of two processes."""
import json
import subprocess
import sys
from pathlib import Path

from pipeline.models.tiny import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]


def test_quick_probe_covers_the_model_shapes(tmp_path):
    model = tmp_path / "model"
    tiny_llama_config(100, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96).save_pretrained(model)
    out = tmp_path / "gemm.json"
    cmd = [sys.executable, "bench/gemm_peak.py", "--quick", "--dtype", "fp32", "--model", str(model),
           "--processes", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    shapes = r["shapes"]
    # 256 tokens; k/v project 64 -> 2 KV heads of 16; the input gradient multiplies by the transposed weight
    assert shapes["k/v forward"]["mkn"] == [256, 64, 32] and shapes["k/v input grad"]["mkn"] == [256, 32, 64]
    assert shapes["gate/up forward"]["mkn"] == [256, 64, 96] and shapes["down forward"]["mkn"] == [256, 96, 64]
    assert {"128^3", "256^3"} <= set(shapes) and all(s["gflops"] > 0 for s in shapes.values())
    # the benchmarks' peak is the best of its squares (quick: 128, 256), and no shape can beat the best
    assert r["peak_shapes"] == ["128^3", "256^3"]
    assert r["peak_gflops"] == max(shapes[n]["gflops"] for n in r["peak_shapes"])
    assert r["best_gflops"] == max(s["gflops"] for s in shapes.values()) and r["best_over_peak"] >= 1.0
    assert len(r["per_process_one_thread_gflops"]) == 2 and min(r["per_process_one_thread_gflops"]) > 0
    assert r["command"].startswith("python bench/gemm_peak.py --quick")
