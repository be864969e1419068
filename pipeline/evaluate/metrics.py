"""Metric functions over predictions and references, each a thin call into the reference library.

No metric math is written here beyond exact match: scikit-learn (accuracy, F1, MCC), scipy (Pearson, Spearman),
`rouge-score` (ROUGE-L) and `sacrebleu` (BLEU) compute everything, so numbers match what others report.
All values are on a 0..1 scale (MCC and correlations -1..1); BLEU is sacrebleu's score / 100 so it averages with
the rest. A correlation of a constant prediction vector is undefined; it is reported as 0.0, the convention
scikit-learn's MCC already follows, so an untrained baseline that always answers the same gets a number, not NaN.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from pipeline.evaluate.errors import EvalError


def accuracy(preds: Sequence, refs: Sequence) -> float:
    from sklearn.metrics import accuracy_score
    return float(accuracy_score(refs, preds))


def f1(preds: Sequence, refs: Sequence, labels: Sequence | None = None) -> float:
    """Binary F1 of the positive class (the LAST of `labels`, e.g. GLUE's 1 = equivalent) for two labels,
    macro F1 for more. `labels` (the verbalizer's keys, in order) default to the sorted values seen."""
    from sklearn.metrics import f1_score
    labels = list(labels) if labels is not None else sorted(set(refs) | set(preds))
    if len(labels) <= 2:
        return float(f1_score(refs, preds, pos_label=labels[-1], labels=labels, average="binary", zero_division=0))
    return float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0))


def mcc(preds: Sequence, refs: Sequence) -> float:
    from sklearn.metrics import matthews_corrcoef
    return float(matthews_corrcoef(refs, preds))


def _correlation(fn, preds: Sequence[float], refs: Sequence[float]) -> float:
    p, r = np.asarray(preds, dtype=float), np.asarray(refs, dtype=float)
    if len(p) < 2 or np.all(p == p[0]) or np.all(r == r[0]):
        return 0.0  # undefined for constant input (see module docstring)
    value = float(fn(p, r)[0])
    return 0.0 if math.isnan(value) else value


def pearson(preds: Sequence[float], refs: Sequence[float]) -> float:
    from scipy.stats import pearsonr
    return _correlation(pearsonr, preds, refs)


def spearman(preds: Sequence[float], refs: Sequence[float]) -> float:
    from scipy.stats import spearmanr
    return _correlation(spearmanr, preds, refs)


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Fraction of predictions equal to the reference after stripping surrounding whitespace."""
    if not refs:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(refs)


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score's default tokenizer: lowercase alphanumeric words, no stemming, so no
    nltk data is needed)."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not refs:
        return 0.0
    return float(np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]))


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, one reference per prediction) / 100."""
    import sacrebleu
    return float(sacrebleu.corpus_bleu(list(preds), [list(refs)]).score) / 100.0


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "f1": f1, "mcc": mcc, "pearson": pearson, "spearman": spearman,
    "exact_match": exact_match, "rouge_l": rouge_l, "bleu": bleu,
}
LABEL_METRICS = {"accuracy", "f1", "mcc"}
NUMERIC_METRICS = {"pearson", "spearman"}
TEXT_METRICS = {"exact_match", "rouge_l", "bleu"}


def compute(names: Sequence[str], preds: Sequence, refs: Sequence, labels: Sequence | None = None,
            task: str = "?") -> dict[str, float]:
    """{metric: value} for the task's metric names. `labels` (classification) fixes F1's positive class."""
    if len(preds) != len(refs):
        raise EvalError(f"task {task!r}: {len(preds)} predictions for {len(refs)} references")
    out = {}
    for name in names:
        if name not in METRICS:
            raise EvalError(f"task {task!r}: unknown metric {name!r}; known: {sorted(METRICS)}")
        out[name] = METRICS[name](preds, refs, labels) if name == "f1" else METRICS[name](preds, refs)
    return out
