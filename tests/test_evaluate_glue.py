"""Evaluate on the real GLUE validation data (subsampled) with a tiny random Llama, by config alone: all five
metrics, valid results.json / report.md, the baseline row, the per-task merged layout and clear errors."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from evaluate_fixtures import REPO, one_torch_thread, results, run_cli, tiny_with_tokenizer  # noqa: F401
from pipeline.evaluate import EvalError, evaluate

GLUE = REPO.parent / "shared" / "data" / "glue"
CONFIG = REPO / "configs" / "prep" / "glue.yaml"
WANT = {"cola": {"mcc"}, "mrpc": {"accuracy", "f1"}, "rte": {"accuracy"}, "stsb": {"pearson", "spearman"},
        "mnli": {"accuracy"}}
N = 16

pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason="needs ../shared/data/glue")


@pytest.fixture(scope="module")
def glue_run(tmp_path_factory, prepared_builtin_data):
    """One CLI run over all GLUE tasks: trained = tiny Llama seed 0, baseline = seed 1."""
    root = tmp_path_factory.mktemp("glue_eval")
    tok = prepared_builtin_data / "tokenizer"
    model, base = tiny_with_tokenizer(root / "m", tok, 0), tiny_with_tokenizer(root / "b", tok, 1)
    code, err = run_cli("--model", model, "--baseline", base, "--config", CONFIG, "--tokenizer", tok,
                        "--out", root / "eval", "--max-examples", N, "--batch-size", 32)
    assert code == 0, err
    return root, tok, results(root / "eval")


def test_glue_all_five_metrics(glue_run, monkeypatch):
    root, _, res = glue_run
    assert list(res["runs"]) == ["baseline", "trained"]
    seen = set()
    for label, run in res["runs"].items():
        assert list(run["tasks"]) == list(WANT)
        for task, info in run["tasks"].items():
            assert set(info["metrics"]) == WANT[task], task
            assert info["n"] == N and info["wall_s"] >= 0
            assert info["split"] == ("validation_mismatched" if task == "mnli" else "validation")
            assert all(v is not None and math.isfinite(v) for v in info["metrics"].values())
            seen |= set(info["metrics"])
        assert run["model"]["kind"] == "hf" and math.isfinite(run["average"])
    assert seen == {"mcc", "accuracy", "f1", "pearson", "spearman"}
    stsb = res["runs"]["trained"]["tasks"]["stsb"]
    assert 0 <= stsb["unparseable"] <= N and "fill_value" in stsb
    assert res["runs"]["trained"]["tasks"]["cola"]["split_size"] == 1043
    report = (root / "eval" / "report.md").read_text()
    assert "| task | metric | n | baseline | trained | Δ |" in report
    for task, metrics in WANT.items():
        for m in metrics:
            assert f"| {task} | {m} | {N} |" in report
    assert "**average**" in report
    assert sorted(p.name for p in (root / "eval").iterdir()) == ["report.md", "results.json"]  # no temp files


def _forced_label_copy(src, dst, tok, task_name: str, label: str):
    """`src` rewritten to answer `label` on `task_name`: the hidden state is made input-independent (embedding
    column 0 dominates the residual stream) and the head puts all its mass on the label's tokens. Two random tiny
    models both answer every example with the label of fewest tokens (summed log-probs of near-uniform
    distributions), so copies of random models could not tell the tasks' folders apart."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.evaluate.tasks import encode, eval_rows, from_config

    ts = from_config(CONFIG)
    task = ts.select([task_name])[0]
    enc = encode(task, eval_rows(task, 1, 0)[0], load_tokenizer(tok), ts.add_bos, ts.add_eos)
    cands = {task.template.verbalizer[k]: c for k, c in zip(enc.labels, enc.candidates[0])}
    boosted = set(cands[label])
    assert all(set(c) - boosted for text, c in cands.items() if text != label), cands  # only `label` fits
    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1000.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[sorted(boosted), 0] = 10.0
    model.save_pretrained(dst)
    return dst


def test_merged_layout_scores_each_task_with_its_own_folder(glue_run):
    """RUN/merged/<task>/ folders hold different models (mnli: one forced to answer "contradiction", stsb: the
    glue_run model): each task gives exactly what its own model gives alone, and the two models' answers differ."""
    root, tok, res = glue_run
    forced = _forced_label_copy(root / "m", root / "m_forced", tok, "mnli", "contradiction")
    code, err = run_cli("--model", forced, "--config", CONFIG, "--tasks", "stsb,mnli", "--out", root / "eval_forced",
                        "--max-examples", N, "--batch-size", 32)
    assert code == 0, err
    alone = {"m": res["runs"]["trained"]["tasks"],
             "m_forced": results(root / "eval_forced")["runs"]["trained"]["tasks"]}
    assert {s["prediction"] for s in alone["m_forced"]["mnli"]["samples"]} == {"contradiction"}
    for task in ("mnli", "stsb"):  # the two models answer differently on both tasks
        assert alone["m"][task]["samples"] != alone["m_forced"][task]["samples"], task
    merged = root / "merged"
    own = {"mnli": "m_forced", "stsb": "m"}
    for task, folder in own.items():
        shutil.copytree(root / folder, merged / task)
    code, err = run_cli("--model", merged, "--config", CONFIG, "--tasks", "stsb,mnli", "--out", root / "eval2",
                        "--max-examples", N, "--batch-size", 32)  # tokenizer from the merged folders
    assert code == 0, err
    got = results(root / "eval2")["runs"]["trained"]
    assert list(got["tasks"]) == ["stsb", "mnli"]
    for task, folder in own.items():
        want = alone[folder][task]
        assert got["tasks"][task]["model"]["path"] == str(merged / task)
        assert got["tasks"][task]["metrics"] == want["metrics"], task
        assert got["tasks"][task]["samples"] == want["samples"], task
    # a task without its merged folder is named, with what is there
    code, err = run_cli("--model", merged, "--config", CONFIG, "--tasks", "mnli,rte", "--out", root / "eval3",
                        "--max-examples", 2)
    assert code == 2 and "task 'rte'" in err and str(merged / "rte") in err and "mnli, stsb" in err
    assert not (root / "eval3" / "results.json").exists()


def test_clear_errors(glue_run, tmp_path):
    root, tok, _ = glue_run
    base = ["--config", CONFIG, "--tokenizer", tok, "--out", tmp_path / "e"]
    code, err = run_cli("--model", root / "m", "--tasks", "cola,qqp", *base)
    assert code == 2 and "['qqp']" in err and "cola, mrpc, rte, stsb, mnli" in err
    code, err = run_cli("--model", tmp_path / "nope", *base)
    assert code == 2 and "folder not found" in err and "nope" in err
    code, err = run_cli("--model", tmp_path / "nope", "--config", CONFIG, "--out", tmp_path / "e")  # no --tokenizer
    assert code == 2 and "--model: folder not found" in err and "nope" in err, err
    code, err = run_cli("--model", root / "m", "--tasks", "cola", "--eval-split", "cola=test", *base)
    assert code == 2 and "not 'test'" in err and "validation" in err
    code, err = run_cli("--adapter", root / "m", *base)
    assert code == 2 and "--adapter needs --base" in err
    code, err = run_cli("--model", root / "m", "--config", tmp_path / "missing.yaml", "--out", tmp_path / "e")
    assert code == 2 and "missing.yaml" in err
    with pytest.raises(EvalError, match="--device 'nope' is not a device"):
        evaluate(tmp_path / "e", model=root / "m", config=CONFIG, tokenizer=tok, device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(EvalError, match="--device cuda: no CUDA GPU on this machine"):
            evaluate(tmp_path / "e", model=root / "m", config=CONFIG, tokenizer=tok, device="cuda")
    with pytest.raises(EvalError, match="exactly one of a model folder"):
        evaluate(tmp_path / "e", config=CONFIG)
    with pytest.raises(EvalError, match="exactly one of a prep config"):
        evaluate(tmp_path / "e", model=root / "m")
    assert not (tmp_path / "e").exists()


def test_eval_split_override(glue_run, tmp_path):
    """MNLI trains on validation_matched in glue.yaml, so it is scored on validation_mismatched unless asked."""
    root, tok, _ = glue_run
    code, err = run_cli("--model", root / "m", "--config", CONFIG, "--tokenizer", tok, "--tasks", "mnli",
                        "--eval-split", "mnli=validation_matched", "--out", tmp_path / "e", "--max-examples", 4)
    assert code == 0, err
    info = results(tmp_path / "e")["runs"]["trained"]["tasks"]["mnli"]
    assert info["split"] == "validation_matched" and info["split_size"] == 9815 and info["n"] == 4
