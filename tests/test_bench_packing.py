"""bench/packing.py --quick: training tokens/s of packed vs padded batches on the GLUE mix, end to end at a small
size (prepares data/built/glue from ../shared/data/glue if missing)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (ROOT.parent / "shared/data/glue").is_dir()
                                and not (ROOT / "data/built/glue/manifest.json").is_file(),
                                reason="no GLUE data (../shared/data/glue) and no prepared data/built/glue")


def test_packing_quick(tmp_path):
    out = tmp_path / "packing.json"
    # one thread: the numbers are not checked, and a test must not slow down on a busy machine
    subprocess.run([sys.executable, str(ROOT / "bench/packing.py"), "--quick", "--threads", "1", "--out", str(out)],
                   cwd=tmp_path, check=True)
    r = json.loads(out.read_text())
    packed, padded = r["layouts"]["packed"], r["layouts"]["padded"]
    assert packed["real_tokens"] == padded["real_tokens"] > 0  # the same samples in both layouts
    assert packed["tokens_per_s"] > 0 and padded["tokens_per_s"] > 0
    assert packed["supervised_tokens_per_s"] > 0 and padded["supervised_tokens_per_s"] > 0
    assert packed["efficiency"] > padded["efficiency"]
    assert packed["efficiency"] >= 0.98 and r["prep_packing_efficiency"] >= 0.98
    assert r["loss_check"]["rel_diff"] < 1e-4
    assert r["command"].startswith("python bench/packing.py")
