"""Our scores agree with lm-evaluation-harness on the same task, exported by launch/export_lm_eval.py.

The slow test scores the first rows of GLUE CoLA with the real SmolLM2-135M-Instruct both ways: ours
(`evaluate`'s encoding and scorer) and lm-eval 0.4.13 (`multiple_choice`, `hf` model, the exported YAML over the
local arrow files). Where the token ids of prompt and choices are identical, every per-example choice must be too.
"""
from __future__ import annotations

import os
from pathlib import Path

import jinja2
import pytest
import yaml
from transformers import AutoTokenizer

from pipeline.config.base import load_config
from pipeline.config.prep import PrepConfig
from pipeline.data.render import render
from pipeline.evaluate import EvalError
from pipeline.evaluate.lm_eval_export import lm_eval_task, write_lm_eval_tasks
from pipeline.evaluate.tasks import encode, eval_rows

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared/data/glue"
pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason="shared GLUE data not present")
N_ROWS = 80


def glue_task(name: str, tokenizer_path):
    cfg = load_config(PrepConfig, ROOT / "configs/prep/glue.yaml",
                      [f"tokenizer.path={tokenizer_path}", "tokenizer.train_sentencepiece=null"])
    task = next(t for t in cfg.tasks if t.name == name)
    src = task.source.model_copy(update={"path": str(GLUE / name)})
    return task.model_copy(update={"source": src})


def test_exported_prompt_choices_and_target_render_as_ours(prepared_builtin_data, tmp_path):
    tok = AutoTokenizer.from_pretrained(prepared_builtin_data / "tokenizer")  # adds BOS
    task = glue_task("mnli", prepared_builtin_data / "tokenizer")
    task = task.model_copy(update={"template": task.template.model_copy(
        update={"prompt": "{premise} {{literal}} 100%\n{hypothesis}?\nAnswer:"})})
    cfg = lm_eval_task(task, tok)
    assert cfg["output_type"] == "multiple_choice" and cfg["metadata"]["model_args"] == "add_bos_token=True"
    assert cfg["doc_to_choice"] == [w + tok.eos_token for w in ("entailment", "neutral", "contradiction")]
    env = jinja2.Environment()
    for row in eval_rows(task, 20)[0]:
        assert env.from_string(cfg["doc_to_text"]).render(**row) == render(task, row)[0]
        assert int(env.from_string(cfg["doc_to_target"]).render(**row)) == row["label"]
    strict = jinja2.Environment(undefined=jinja2.StrictUndefined)  # as lm-eval renders: a missing key raises
    for label in (2, 2.0, "2"):  # a float label column's 2.0 is key "2", as prep and evaluate read it
        assert strict.from_string(cfg["doc_to_target"]).render(label=label) == "2"
    assert lm_eval_task(task, tok, add_bos=False, add_eos=False)["doc_to_choice"][0] == "entailment"


def test_unsupported_tasks_are_named_and_nothing_is_written(prepared_builtin_data, tmp_path):
    tok = AutoTokenizer.from_pretrained(prepared_builtin_data / "tokenizer")
    tasks = [glue_task("rte", prepared_builtin_data / "tokenizer"), glue_task("stsb", prepared_builtin_data / "tokenizer")]
    with pytest.raises(EvalError, match="task 'stsb': only template classification tasks"):
        write_lm_eval_tasks(tasks, tok, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    written = write_lm_eval_tasks(tasks[:1], tok, tmp_path / "out")
    assert [p.name for p in written] == ["rte.yaml"] and yaml.safe_load(written[0].read_text())["task"] == "rte"
    no_eval = tasks[0].model_copy(update={"eval_split": None})  # evaluate refuses it too: never the train split
    with pytest.raises(EvalError, match="task 'rte' has no eval_split in its config"):
        lm_eval_task(no_eval, tok)


@pytest.mark.slow
def test_scores_agree_with_lm_eval_harness_on_a_real_model(smollm2_import, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.evaluate.models import HFModel
    from pipeline.evaluate.scoring import label_logprobs

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = smollm2_import.folder
    tok = load_tokenizer(folder)
    task = glue_task("cola", folder)
    rows = eval_rows(task, None)[0][:N_ROWS]  # lm-eval's `limit` takes the first rows too
    enc = encode(task, rows, tok)  # the defaults: the tokenizer's BOS convention (none for SmolLM2), EOS appended
    assert all(p[0] != tok.bos_token_id for p in enc.prompts)
    scores = label_logprobs(HFModel(folder, device="cpu", dtype="fp32"), enc.prompts, enc.candidates,
                            [task.name] * len(rows), pad_id=tok.pad_token_id or 0)
    ours = scores.argmax(1).tolist()
    gold = [enc.labels.index(r) for r in enc.refs]

    write_lm_eval_tasks([task], tok, tmp_path / "tasks")
    lm = HFLM(pretrained=str(folder), add_bos_token=False, batch_size=16, device="cpu", dtype="float32")
    res = lm_eval.simple_evaluate(model=lm, tasks=[task.name], limit=N_ROWS, log_samples=True,
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    samples = sorted(res["samples"][task.name], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows)
    theirs = [max(range(len(s["filtered_resps"])), key=lambda k: s["filtered_resps"][k][0]) for s in samples]

    identical = [i for i, s in enumerate(samples)
                 if [tuple(map(list, lm._encode_pair(*a))) for a in s["arguments"]]
                 == [(list(enc.prompts[i]), list(c)) for c in enc.candidates[i]]]
    assert len(identical) >= 0.9 * len(rows), f"only {len(identical)} of {len(rows)} rows tokenize alike"
    assert [theirs[i] for i in identical] == [ours[i] for i in identical]
    acc_ours = sum(o == g for o, g in zip(ours, gold)) / len(gold)
    assert abs(res["results"][task.name]["acc,none"] - acc_ours) <= 0.005, (res["results"][task.name], acc_ours)
