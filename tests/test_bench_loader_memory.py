"""bench/loader_memory.py at its smallest: the trainer's data start-up holds O(rows) host memory, not a task id
per token (what it held before: 8 bytes per token, about 16 GB per rank at 1B tokens)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_startup_memory_is_per_row_not_per_token(tmp_path):
    out = tmp_path / "loader_memory.json"
    proc = subprocess.run([sys.executable, "bench/loader_memory.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    small, large = json.loads(out.read_text())["sizes"]
    assert large["tokens"] >= 4 * small["tokens"] - 512 and large["rows_in_sampler"] == large["rows"]
    # one int64 per token: 61 MiB at the larger size, +46 MiB from the smaller; the start-up stays far below both
    assert large["peak_anon_growth_bytes"] < large["int64_task_id_per_token_bytes"] / 4, large
    grown = large["peak_anon_growth_bytes"] - small["peak_anon_growth_bytes"]
    assert grown < (large["int64_task_id_per_token_bytes"] - small["int64_task_id_per_token_bytes"]) / 8, (small, large)
