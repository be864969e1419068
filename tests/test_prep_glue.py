"""The GLUE tasks in ../shared/data/glue prepare through configs/prep/glue.yaml alone (subsampled for speed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pipeline.config.base import load_config
from pipeline.config.prep import PrepConfig
from pipeline.data.loader import PackedDataset
from pipeline.data.prep import run_prep

ROOT = Path(__file__).parents[1]
GLUE = ROOT.parent / "shared/data/glue"
N = 30

pytestmark = pytest.mark.skipif(not GLUE.is_dir(), reason="shared GLUE data not present")


def glue_cfg(out: Path, *extra: str) -> PrepConfig:
    base = load_config(PrepConfig, ROOT / "configs/prep/glue.yaml")
    # A tokenizer trained on 30 examples per task splits words finely: allow longer rows than the full config.
    ov = [f"output_dir={out}", "tokenizer.train_sentencepiece.vocab_size=400", "max_seq_len=1024", "num_proc=1", *extra]
    ov += [f"tasks.{i}.max_examples={N}" for i in range(len(base.tasks))]
    cfg = load_config(PrepConfig, ROOT / "configs/prep/glue.yaml", overrides=ov)
    # The config's relative paths are written for the repository root; resolve them for any working directory.
    for t in cfg.tasks:
        t.source = t.source.model_copy(update={"path": str((ROOT / t.source.path).resolve())})
    return cfg


def test_glue_prepares_from_config(tmp_path):
    out = run_prep(glue_cfg(tmp_path / "glue"))
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["tasks"]) == {"cola", "mrpc", "rte", "stsb", "mnli"}
    for name, t in m["tasks"].items():
        assert t["read"] == N and t["examples"] + t["eval_examples"] + t["dropped"] == N, name
        assert t["config"]["name"] == name
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    ds = PackedDataset(out)
    answers = {n: set() for n in ds.task_names}
    for i in range(len(ds)):
        r = ds[i]
        start = 0
        for n in r["seq_lens"].tolist():
            lab = [x for x in r["labels"][start:start + n].tolist() if x != -100]
            answers[ds.task_names[int(r["task_ids"][start])]].add(tok.decode(lab, skip_special_tokens=True).strip())
            start += n
    assert answers["cola"] <= {"acceptable", "unacceptable"} and len(answers["cola"]) == 2
    assert answers["mnli"] <= {"entailment", "neutral", "contradiction"}
    assert answers["rte"] <= {"entailment", "not_entailment"}
    assert all(0.0 <= float(a) <= 5.0 and len(a.split(".")[1]) == 1 for a in answers["stsb"])


def test_num_proc_does_not_change_the_output(tmp_path):
    one = run_prep(glue_cfg(tmp_path / "one", "tasks.0.max_examples=200"))
    two = run_prep(glue_cfg(tmp_path / "two", "tasks.0.max_examples=200", "num_proc=2", "batch_size=50"))
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)


def test_mnli_eval_from_its_mismatched_split(tmp_path):
    cfg = glue_cfg(tmp_path / "mnli", "eval.fraction=0", "eval.from_task_eval_split=true", "eval.max_examples=10")
    cfg.tasks = [t for t in cfg.tasks if t.name == "mnli"]
    m = json.loads((run_prep(cfg) / "manifest.json").read_text())
    assert m["tasks"]["mnli"]["examples"] == N and m["tasks"]["mnli"]["eval_examples"] == 10
    assert m["splits"]["eval"]["num_samples"] == 10
