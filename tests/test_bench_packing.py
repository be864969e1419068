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
    # the same work in both layouts: the same samples and supervised tokens, and the same LM loss sum on the first
    # packed step's samples (recomputed here from the two sums, not read from the bench's own verdict)
    assert packed["real_tokens"] == padded["real_tokens"] > 0
    assert packed["supervised_tokens"] == padded["supervised_tokens"] > 0
    lc = r["loss_check"]
    assert lc["samples"] > 1 and lc["lm_loss_sum_packed"] > 0
    assert abs(lc["lm_loss_sum_packed"] - lc["lm_loss_sum_padded"]) <= 1e-4 * lc["lm_loss_sum_padded"]
    # packing processes fewer slots (padded positions) for those tokens, and the efficiencies are what they say
    assert packed["slots"] < padded["slots"]
    for v in (packed, padded):
        assert v["efficiency"] == round(v["real_tokens"] / v["slots"], 4)
    assert packed["efficiency"] >= 0.98 and r["prep_packing_efficiency"] >= 0.98
    # the rates are the token counts over the measured median time (not asserted faster: one busy thread)
    for v in (packed, padded):
        assert len(v["seconds"]) == r["settings"]["repeats"] and v["median_seconds"] > 0
        assert v["tokens_per_s"] == pytest.approx(v["real_tokens"] / v["median_seconds"], rel=1e-2)
        assert v["supervised_tokens_per_s"] == pytest.approx(v["supervised_tokens"] / v["median_seconds"],
                                                             rel=1e-2)
    assert r["ratio_packed_over_padded"] == pytest.approx(packed["tokens_per_s"] / padded["tokens_per_s"], rel=1e-2)
    assert r["command"].startswith("python bench/packing.py")
