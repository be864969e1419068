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
    od = r["onednn"]  # one unprofiled step's matmuls by oneDNN's clock: bf16 runs there, fp32 in MKL (no records)
    if r["dtype"] == "bf16":
        assert od["records"] > 0 and 0 < od["gemm_share_of_step"] <= 1, od
        assert od["by_kind"]["base"]["seconds"] > 0 and od["by_kind"]["adapter"]["seconds"] > 0, od["by_kind"]
        assert sum(a["seconds"] for a in od["by_kind"].values()) == pytest.approx(od["gemm_seconds"])
    else:
        assert od["records"] == 0 and od["by_kind"] == {}, od


# real lines of torch 2.13's oneDNN (SmolLM2 in training): a base forward, an adapter gradient, the LM head, a reorder
ONEDNN_LINES = [
    "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,src:bf16::blocked:ab::f0 "
    "wei:bf16::blocked:ba::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,2048x576:576x1536,0.437012\n",
    "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,src:bf16::blocked:ba::f0 "
    "wei:bf16::blocked:ab::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,8x2048:2048x576,0.125\n",
    "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,src:bf16::blocked:ab::f0 "
    "wei:bf16::blocked:ab::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,102x49152:49152x576,10.5\n",
    "onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32::blocked:ab::f0 dst:bf16::blocked:ab::f0,"
    ",,64x64,0.01\n",
]


def test_onednn_lines_are_parsed_and_classified():
    sys.path.insert(0, str(ROOT / "bench"))
    import onednn_matmuls as om

    base = om.parse(ONEDNN_LINES[0])
    assert base == {"M": 2048, "K": 576, "N": 1536, "batch": 1, "layouts": "src:ab wei:ba dst:ab", "ms": 0.437012}
    assert om.parse(ONEDNN_LINES[3]) is None  # a reorder is no matmul
    s = om.summarise(2.0, ONEDNN_LINES, rank=8, vocab=49152, peak=1000.0)
    assert s["records"] == 3 and set(s["by_kind"]) == {"base", "adapter", "head"}
    assert s["by_kind"]["base"]["gflops"] == pytest.approx(2 * 2048 * 576 * 1536 / 0.437012e-3 / 1e9)
    assert s["by_kind"]["base"]["share_of_peak"] == pytest.approx(s["by_kind"]["base"]["gflops"] / 1000.0)
    assert s["gemm_seconds"] == pytest.approx((0.437012 + 0.125 + 10.5) / 1e3)
    assert s["gemm_share_of_step"] == pytest.approx(s["gemm_seconds"] / 2.0)
    assert [t["kind"] for t in s["top_shapes"]] == ["head", "base", "adapter"]  # costliest first
    assert om.summarise(1.0, [], rank=8, vocab=49152, peak=1000.0)["by_kind"] == {}
