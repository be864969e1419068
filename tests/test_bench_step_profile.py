"""bench/step_profile.py at its smallest: the trainer's step on a tiny NF4 Llama with SmolLM2's tokenizer, split
into phases and operator kinds that account for the step."""
import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"


@pytest.mark.slow
@pytest.mark.skipif(not GLUE.is_dir(), reason="needs ../shared/data/glue")
def test_quick_profile_accounts_for_the_step(tiny_chat_model, tmp_path):
    out = tmp_path / "step_profile.json"
    cmd = [sys.executable, "bench/step_profile.py", "--quick", "--model", str(tiny_chat_model), "--steps", "2",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["steps"] == 2 and 2 * 512 < r["real_tokens_per_step"] <= 4 * 512  # vs_trl's 4 rows of 512 per step
    phases = r["phases_s"]
    for phase in ("batch", "forward", "backward", "optimizer"):
        assert phases[phase] > 0, phases
    assert sum(phases.values()) == pytest.approx(r["step_seconds"])
    assert phases["rest"] < 0.5 * r["step_seconds"], phases  # the wrapped phases hold most of the step
    kinds = r["op_kinds_self_s"]
    # the base is NF4: its dequantization is found; every linear multiplies
    assert kinds["nf4_dequantize"] > 0 and kinds["matmul"] > 0, kinds
    assert sum(kinds.values()) <= 1.1 * r["step_seconds"], (kinds, r["step_seconds"])  # main-thread self time
    assert 0 < r["matmul_gflops"] < 1.5 * r["matmul_peak_gflops"]
