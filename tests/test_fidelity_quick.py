"""bench/fidelity.py --quick: the method-fidelity experiment end to end at a small size (issue 7).

Structural checks on what it writes, plus one claim that can fail: MoRE with a learning selector ends with a lower
held-out distillation loss than MoRE with the selection frozen at its random initial choice (the reference's
behaviour), and than one shared LoRA."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_fidelity", ROOT / "bench" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fidelity_quick(tmp_path):
    fid = _load()
    out = tmp_path / "fidelity.json"
    r = fid.main(["--quick", "--out", str(out)])
    assert out.exists() and out.with_suffix(".md").exists()
    assert json.loads(out.read_text())["losses"] == r["losses"]
    tasks, layers = r["config"]["tasks"], r["config"]["layers"]
    assert len(tasks) == 4 and sorted(r["planted_ranks"].values()) == [1, 2, 4, 8]
    assert len(layers) == 2 * 7
    for v in fid.VARIANTS:
        assert set(r["losses"][v]) == set(tasks)
        assert all(0.0 <= x < float("inf") for x in r["losses"][v].values())
    for v in ("more", "more_frozen"):
        for t in tasks:
            assert set(r["chosen_ranks"][v][t]) == set(layers)
            assert all(1 <= k <= 8 for k in r["chosen_ranks"][v][t].values())
        assert 0.0 <= r["frac_rank_eq_planted"][v]["all"] <= 1.0
    # the frozen variant really kept its initial (random) choice; MoRE's selector moved
    assert r["chosen_ranks"]["more_frozen"] == r["initial_ranks"]["more_frozen"]
    assert r["chosen_ranks"]["more"] != r["initial_ranks"]["more"]
    p = r["params"]
    assert p["per_task_lora"]["total"] == 4 * p["shared_lora"]["total"]
    assert p["more"]["adapter"] == p["shared_lora"]["total"] == p["more_frozen"]["total"]
    # every task's teacher differs from the base, so the losses are not trivially 0
    assert all(b > 0 for b in r["base_loss"].values())
    s = r["summary"]
    assert s["more"]["mean_normalized"] < s["more_frozen"]["mean_normalized"], s
    assert s["more"]["mean_normalized"] < s["shared_lora"]["mean_normalized"], s
