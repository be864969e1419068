"""bench/packed_attention_kernels.py at its smallest on CPU: the fused and per-sample kernels checked against the
dense mask and timed beside it (the varlen kernel joins on a GPU); the GLUE-like rows look like prep's."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from packed_attention_kernels import glue_like_rows  # noqa: E402


def test_rows_are_packed_like_prep():
    rows = glue_like_rows(4, 512)
    assert len(rows) == 4 and all(sum(r) <= 512 for r in rows)
    assert sum(map(sum, rows)) == 4 * 512  # the fullest rows of prep's packing: full
    assert all(r == sorted(r, reverse=True) for r in rows)  # longest first: runs of equal lengths share a call
    assert 15 <= sum(map(len, rows)) <= 40  # ~70 tokens per sample


def test_quick_run_checks_and_times_each_kernel(tmp_path):
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, "bench/packed_attention_kernels.py", "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    kernels = r["shapes"]["smollm2-135m"]["kernels"]
    assert set(kernels) == {"fused_cpu", "per_sample", "dense_mask"}  # no varlen kernel on CPU
    assert kernels["dense_mask"]["max_abs_diff_vs_dense"] == 0
    assert kernels["per_sample"]["max_abs_diff_vs_dense"] < 1e-4 and kernels["fused_cpu"]["max_abs_diff_vs_dense"] < 1e-4
    assert all(k["ms"] > 0 for k in kernels.values()) and kernels["per_sample"]["speedup_vs_per_sample"] == 1.0
    assert r["real_tokens"] == sum(map(sum, glue_like_rows(2, 256))) and r["command"].endswith(f"--out {out}")
