"""Base + MoRE adapter evaluation (given task ids and zero-shot routing) on the prepared built-in tasks, which
also exercises generation (exact match) and regression; the adapter path agrees with the merged checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evaluate_fixtures import REPO, one_torch_thread, results, run_cli, tiny_with_tokenizer  # noqa: F401
from pipeline.config.more import MoreConfig
from pipeline.evaluate.models import AdapterModel
from pipeline.export import stream_merge
from pipeline.models import load_base_model
from pipeline.more import inject, save_adapter

N = 8
WANT = {"sentiment": {"accuracy"}, "reverse": {"exact_match"}, "sort": {"exact_match"},
        "arithmetic": {"exact_match"}, "rating": {"pearson", "spearman"}}


@pytest.fixture(scope="module")
def adapter_setup(tmp_path_factory, prepared_builtin_data):
    root = tmp_path_factory.mktemp("adapter_eval")
    data = prepared_builtin_data
    tasks = [n for n, _ in sorted(json.loads((data / "manifest.json").read_text())["tasks"].items(),
                                  key=lambda kv: kv[1]["id"])]
    base = tiny_with_tokenizer(root / "base", data / "tokenizer", seed=0)
    m = inject(load_base_model(str(base), "none", "fp32"), MoreConfig(max_rank=4, gate_init="random"), tasks)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" adapter: non-zero B, so every task changes the model differently
        for layer in m.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
    save_adapter(m.eval(), root / "adapter")
    return root, data, base, tasks


def test_adapter_logits_follow_the_task(adapter_setup):
    """Per-row task ids reach the adapter: a mixed-task batch equals each row run alone with its task."""
    root, data, base, tasks = adapter_setup
    model = AdapterModel(base, root / "adapter", device="cpu")
    ids = torch.randint(3, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = model.logits(ids, mask, [tasks[0], tasks[0]])
        b = model.logits(ids, mask, [tasks[1], tasks[1]])
        mixed = model.logits(ids, mask, [tasks[0], tasks[1]])
        with model.model.disable_adapters():
            plain = model.model(input_ids=ids).logits
    assert (a - b).abs().max() > 1e-3 and (a - plain).abs().max() > 1e-3
    torch.testing.assert_close(mixed[0], a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[1], b[1], rtol=0, atol=1e-5)
    model.close()


def test_adapter_eval_with_baseline_and_merged_agreement(adapter_setup):
    root, data, base, tasks = adapter_setup
    code, err = run_cli("--adapter", root / "adapter", "--base", base, "--data", data, "--baseline", base,
                        "--out", root / "eval", "--max-examples", N)
    assert code == 0, err
    res = results(root / "eval")
    trained = res["runs"]["trained"]
    assert trained["model"]["kind"] == "adapter" and trained["model"]["adapter_tasks"] == tasks
    for task, info in trained["tasks"].items():
        assert set(info["metrics"]) == WANT[task] and info["n"] == N and info["split"] == "test"
        assert len(info["samples"]) == 3
    assert set(res["runs"]["baseline"]["tasks"]) == set(WANT)
    report = (root / "eval" / "report.md").read_text()
    assert "| sentiment | accuracy | 8 |" in report
    # the adapter's rank map as a picture in the report: a row per task; the baseline has none
    assert trained["rank_map_image"] == "rank_map_trained.png" and "![rank map of trained](rank_map_trained.png)" in report
    from PIL import Image

    from pipeline.more.rank_image import CELL_H, LEGEND_H
    assert Image.open(root / "eval" / "rank_map_trained.png").height == len(tasks) * CELL_H + LEGEND_H
    assert "rank_map_image" not in res["runs"]["baseline"]

    # the same tasks through their merged checkpoints give the same answers
    pick = ["sentiment", "arithmetic"]
    for t in pick:
        stream_merge(base, root / "adapter", t, root / "merged" / t, dtype="fp32")
    code, err = run_cli("--model", root / "merged", "--data", data, "--tasks", ",".join(pick),
                        "--out", root / "eval_merged", "--max-examples", N)
    assert code == 0, err
    merged = results(root / "eval_merged")["runs"]["trained"]["tasks"]
    for t in pick:
        assert merged[t]["metrics"] == trained["tasks"][t]["metrics"], t
        assert merged[t]["samples"] == trained["tasks"][t]["samples"], t


def test_adapter_zero_shot_routing(adapter_setup):
    root, data, base, tasks = adapter_setup
    code, err = run_cli("--adapter", root / "adapter", "--base", base, "--data", data, "--routing",
                        "--tasks", "sentiment,rating", "--out", root / "eval_routed", "--max-examples", N)
    assert code == 0, err
    run = results(root / "eval_routed")["runs"]["trained"]
    assert run["model"]["kind"] == "adapter+routing"
    for task in ("sentiment", "rating"):
        r = run["tasks"][task]["routing"]
        assert sum(r["routed_to"].values()) == N and set(r["routed_to"]) <= set(tasks)
        # the accuracy is the share of the task's prompts routed to the task itself (not just any number in [0, 1])
        assert r["task_in_adapter"] and r["accuracy"] == pytest.approx(r["routed_to"].get(task, 0) / N)
    assert "routing acc." in (root / "eval_routed" / "report.md").read_text()


def test_task_not_in_adapter_is_named(adapter_setup, tmp_path):
    root, data, base, tasks = adapter_setup
    code, err = run_cli("--adapter", root / "adapter", "--base", base, "--config",
                        REPO / "configs/prep/glue.yaml", "--tokenizer", data / "tokenizer", "--tasks", "rte",
                        "--out", tmp_path / "e", "--max-examples", 2)
    assert code == 2 and "task 'rte' is not in the adapter" in err and "sentiment" in err


def test_base_with_other_weights_is_refused(adapter_setup, tmp_path):
    """A base of the adapter's shape with other weights: refused before anything loads, unless allowed."""
    root, data, base, tasks = adapter_setup
    other = tiny_with_tokenizer(tmp_path / "other", data / "tokenizer", seed=1)
    code, err = run_cli("--adapter", root / "adapter", "--base", other, "--data", data, "--tasks", "sentiment",
                        "--out", tmp_path / "e", "--max-examples", 2)
    assert code == 2 and "weights are not the ones the adapter was trained on" in err and str(other) in err
    assert not (tmp_path / "e").exists()
    code, err = run_cli("--adapter", root / "adapter", "--base", other, "--data", data, "--tasks", "sentiment",
                        "--out", tmp_path / "e", "--max-examples", 2, "--allow-other-base-weights")
    assert code == 0, err


def test_bad_adapter_base_or_options_are_clear_errors(adapter_setup, tmp_path):
    """Each refused before any model loads, exit 2, naming what is wrong: a base of another shape, an adapter folder
    missing a file, --set without --config (it used to be ignored)."""
    import shutil

    root, data, base, tasks = adapter_setup
    common = ["--data", data, "--tasks", "sentiment", "--out", tmp_path / "e", "--max-examples", 2]
    deeper = tiny_with_tokenizer(tmp_path / "deeper", data / "tokenizer", seed=0)
    cfg = json.loads((deeper / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (deeper / "config.json").write_text(json.dumps(cfg))
    code, err = run_cli("--adapter", root / "adapter", "--base", deeper, *common)
    assert code == 2 and "trained on a base of another shape" in err and "'num_hidden_layers': (" in err, err
    for lacking in ("rank_map.json", "adapter_model.safetensors"):
        partial = Path(shutil.copytree(root / "adapter", tmp_path / f"no_{lacking}"))
        (partial / lacking).unlink()
        code, err = run_cli("--adapter", partial, "--base", base, *common)
        assert code == 2 and f"is not a MoRE adapter folder (no {lacking})" in err, err
    code, err = run_cli("--model", base, "--set", "no_such_key=1", *common)
    assert code == 2 and "--set overrides values of --config" in err, err
    assert not (tmp_path / "e").exists()


def test_nf4_adapter(adapter_setup, tmp_path):
    """An adapter trained on an NF4 base is evaluated on the base loaded as NF4 again (per more_config.json) and
    reproduces the trained model's logits."""
    root, data, base, tasks = adapter_setup
    m = inject(load_base_model(str(base), "nf4", "bf16"), MoreConfig(max_rank=4, gate_init="random"), tasks)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)
    save_adapter(m.eval(), tmp_path / "nf4_adapter")
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    model = AdapterModel(base, tmp_path / "nf4_adapter", device="cpu")
    with torch.no_grad():
        want = m(input_ids=ids, task_ids=2).logits
        got = model.logits(ids, torch.ones_like(ids), [tasks[2]])
    assert model.identity()["quantization"] == "nf4" and model.identity()["dtype"] == "bf16"
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-3)
    model.close()
    code, err = run_cli("--adapter", tmp_path / "nf4_adapter", "--base", base, "--data", data, "--tasks", "sentiment",
                        "--out", tmp_path / "e", "--max-examples", 4)
    assert code == 0, err
    assert results(tmp_path / "e")["runs"]["trained"]["model"]["quantization"] == "nf4"
