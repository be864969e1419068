"""Metric functions agree with the libraries on fixed predictions; regression parsing and fill rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from pipeline.evaluate import metrics as M
from pipeline.evaluate.errors import EvalError
from pipeline.evaluate.runner import fill_numbers
from pipeline.evaluate.scoring import parse_number

REFS = ["1", "0", "1", "1", "0", "0", "1", "0", "1", "1"]
PREDS = ["1", "0", "0", "1", "1", "0", "1", "1", "1", "0"]
Y = [3.8, 0.5, 2.25, 4.0, 1.0, 5.0, 2.6]
X = [3.1, 1.2, 2.0, 4.4, 0.4, 4.1, 3.0]


def test_label_metrics_match_sklearn():
    assert M.accuracy(PREDS, REFS) == pytest.approx(accuracy_score(REFS, PREDS))
    assert M.mcc(PREDS, REFS) == pytest.approx(matthews_corrcoef(REFS, PREDS))
    assert M.f1(PREDS, REFS, labels=["0", "1"]) == pytest.approx(f1_score(REFS, PREDS, pos_label="1"))
    # positive class = the last verbalizer key; with the keys the other way round it is class "0"
    assert M.f1(PREDS, REFS, labels=["1", "0"]) == pytest.approx(f1_score(REFS, PREDS, pos_label="0"))
    three_r, three_p = ["0", "1", "2", "2", "1", "0"], ["0", "2", "2", "1", "1", "0"]
    assert M.f1(three_p, three_r, ["0", "1", "2"]) == pytest.approx(f1_score(three_r, three_p, average="macro"))
    assert M.mcc(["1"] * 4, ["0", "1", "0", "1"]) == 0.0  # sklearn's convention for constant predictions


def test_correlations_match_scipy():
    assert M.pearson(X, Y) == pytest.approx(pearsonr(X, Y)[0])
    assert M.spearman(X, Y) == pytest.approx(spearmanr(X, Y)[0])
    assert M.pearson([2.0] * 7, Y) == 0.0 and M.spearman([2.0] * 7, Y) == 0.0  # constant -> 0, not NaN


def test_text_metrics_match_libraries():
    refs = ["the cat sat on the mat", "1 2 3 4", "hello world", "a b c"]
    preds = ["the cat sat on a mat", "1 2 3 4", " hello world ", "c b a"]
    assert M.exact_match(preds, refs) == pytest.approx(0.5)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)])
    assert M.rouge_l(preds, refs) == pytest.approx(want)
    assert M.bleu(preds, refs) == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score / 100)
    assert M.bleu(refs, refs) == pytest.approx(1.0)


def test_compute_names_and_errors():
    out = M.compute(["accuracy", "f1", "mcc"], PREDS, REFS, ["0", "1"])
    assert set(out) == {"accuracy", "f1", "mcc"} and all(math.isfinite(v) for v in out.values())
    with pytest.raises(EvalError, match="unknown metric 'bogus'"):
        M.compute(["bogus"], PREDS, REFS, task="t")
    with pytest.raises(EvalError, match="3 predictions for 10 references"):
        M.compute(["accuracy"], PREDS[:3], REFS, task="t")


def test_parse_number_and_fill():
    assert parse_number("3.8 out of 5") == 3.8
    assert parse_number(" -2") == -2.0
    assert parse_number("about .5") == 0.5
    assert parse_number("1,234 points") == 1234.0 and parse_number("1,5") == 1.0
    assert parse_number("\u22122") == -2.0 and parse_number("2.5e3") == 2500.0 and parse_number("3.8.") == 3.8
    assert parse_number("no idea") is None
    values, bad, fill = fill_numbers(["1", "x", "3.0", ""])
    assert values == [1.0, 2.0, 3.0, 2.0] and bad == 2 and fill == 2.0  # unparseable -> mean of parsed
    assert fill_numbers(["x", "y"]) == ([0.0, 0.0], 2, 0.0)  # none parsed -> 0.0


def test_regression_reference_is_the_column_the_answer_writes():
    """SICK-style rows hold a class `label` beside the score the answer template writes: the reference is the
    score (at full precision), not the label; stsb-style `{label:.1f}` keeps the label's full value."""
    from pipeline.config.tasks import TaskConfig
    from pipeline.evaluate.tasks import _regression_ref

    src = {"type": "jsonl", "path": "unused.jsonl"}
    sick = TaskConfig(name="sick", source=src, kind="regression", metrics=["pearson"],
                      template={"prompt": "{text}\nScore:", "response": " {score:.1f}"})
    assert _regression_ref(sick, {"text": "a", "label": 1, "score": 4.25}, " 4.2") == 4.25
    stsb = TaskConfig(name="stsb", source=src, kind="regression", metrics=["pearson"],
                      template={"prompt": "{text}\nScore:", "response": "{label:.1f}"})
    assert _regression_ref(stsb, {"text": "a", "label": 3.75}, "3.8") == 3.75
