"""bench/lm_head.py --quick: both LM-head paths run on the same packed GLUE rows and agree (the script exits
non-zero when their loss sums differ), and the result names what was measured."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared/data/glue"


@pytest.mark.skipif(not GLUE.is_dir(), reason="shared GLUE data not present")
def test_lm_head_bench_quick(tmp_path):
    out = tmp_path / "lm_head.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/lm_head.py"), "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["seconds_per_pass"]) == {"full_logits", "supervised_only"}
    assert 0 < r["supervised_tokens_per_pass"] < r["real_tokens_per_pass"]
    assert r["speedup_supervised_vs_full"] == pytest.approx(
        r["seconds_per_pass"]["full_logits"] / r["seconds_per_pass"]["supervised_only"])
