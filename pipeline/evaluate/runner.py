"""Evaluate runs (e.g. {"base": untrained, "trained": merged}) on tasks and write results.json + report.md.

Every run scores the same examples: each task's eval split is loaded, subsampled (seeded) and encoded once.
Runs are evaluated one after another and closed in between, so one model is in memory at a time.
"""
from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from pipeline.config.tasks import TaskConfig
from pipeline.data.tokenize import resolve_add_bos
from pipeline.evaluate import metrics as M
from pipeline.evaluate.errors import EvalError
from pipeline.evaluate.models import EvalModel
from pipeline.evaluate.report import write_report, write_results
from pipeline.evaluate.scoring import greedy_generate, label_logprobs, parse_number
from pipeline.evaluate.tasks import Encoded, TaskSet, encode, eval_rows, stop_token_ids

FORMAT_VERSION = 1
N_SAMPLES = 3  # examples (prompt answer vs reference) kept per task in results.json


def check_metrics(task: TaskConfig) -> None:
    """Fail before loading any model if a metric cannot apply to the task's kind."""
    bad = [m for m in task.metrics if m in M.LABEL_METRICS and task.kind != "classification"]
    if bad:
        raise EvalError(f"task {task.name!r}: metric(s) {bad} need kind classification (kind is {task.kind!r})")
    numeric = [m for m in task.metrics if m in M.NUMERIC_METRICS]
    if numeric and task.kind == "classification":
        try:
            [float(k) for k in task.template.verbalizer]
        except ValueError:
            raise EvalError(f"task {task.name!r}: metric(s) {numeric} on a classification task need numeric "
                            f"verbalizer keys, got {list(task.template.verbalizer)}") from None


def fill_numbers(texts: Sequence[str]) -> tuple[list[float], int, float]:
    """Parse the first number of each answer; unparseable answers are counted and scored as the mean of the
    parsed ones (0.0 if none parsed): neutral, and it never looks at the references."""
    parsed = [parse_number(t) for t in texts]
    ok = [p for p in parsed if p is not None]
    fill = float(np.mean(ok)) if ok else 0.0
    return [fill if p is None else p for p in parsed], len(parsed) - len(ok), fill


def _task_metrics(task: TaskConfig, enc: Encoded, preds: list, texts: list[str], info: dict) -> dict[str, float]:
    out = {}
    numbers = None
    for name in task.metrics:
        if name in M.LABEL_METRICS:
            out.update(M.compute([name], preds, enc.refs, enc.labels, task.name))
        elif name in M.TEXT_METRICS:
            out.update(M.compute([name], texts, enc.ref_texts, task=task.name))
        else:  # pearson / spearman
            if task.kind == "classification":
                p, r = [float(x) for x in preds], [float(x) for x in enc.refs]
            else:
                if numbers is None:
                    numbers, info["unparseable"], info["fill_value"] = fill_numbers(texts)
                p = numbers
                r = enc.refs if task.kind == "regression" else fill_numbers(enc.ref_texts)[0]
            out.update(M.compute([name], p, r, task=task.name))
    return out


def score_task(model: EvalModel, task: TaskConfig, enc: Encoded, tokenizer, batch_size: int = 16,
               label: str = "", progress: bool = True) -> dict:
    """Score one task with one model: predictions, metric values, timings (and routing, for routed models).
    `load_s` is the time to make the task's model ready (a merged folder's load), `wall_s` the scoring after it."""
    t0 = time.perf_counter()
    ident = model.use_task(task.name)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n = len(enc.prompts)
    assigned = model.assign(task.name, enc.prompts, batch_size, pad_id)
    info: dict = dict(kind=task.kind, model=ident)
    if model.routes:
        known = task.name in getattr(model, "task_names", [])
        info["routing"] = dict(
            accuracy=float(np.mean([a == task.name for a in assigned])) if known and n else None,
            routed_to={t: assigned.count(t) for t in sorted(set(assigned))},
            task_in_adapter=known)
    total = n * len(enc.labels) if task.kind == "classification" else n
    with tqdm(total=total, desc=f"{label} {task.name}".strip(), unit="seq", disable=not progress,
              file=sys.stderr, leave=False) as bar:
        if task.kind == "classification":
            scores = label_logprobs(model, enc.prompts, enc.candidates, assigned, batch_size, pad_id, bar)
            preds = [enc.labels[j] for j in scores.argmax(-1).tolist()]
            texts = [task.template.verbalizer[p] for p in preds]
        else:
            new = greedy_generate(model, enc.prompts, assigned, task.max_new_tokens, batch_size, pad_id,
                                  stop_token_ids(task, tokenizer), bar)
            texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new]
            preds = texts
    info["metrics"] = _task_metrics(task, enc, preds, texts, info)
    info["score"] = float(np.mean(list(info["metrics"].values()))) if info["metrics"] else None
    info["samples"] = [dict(prediction=texts[i], reference=enc.ref_texts[i]) for i in range(min(N_SAMPLES, n))]
    info["wall_s"] = round(time.perf_counter() - t0, 3)
    info["load_s"] = round(load_s, 3)
    return info


def run_evaluation(runs: Mapping[str, EvalModel], tasks: Sequence[TaskConfig], taskset: TaskSet, tokenizer,
                   out_dir, max_examples: Optional[int] = None, seed: int = 0, batch_size: int = 16,
                   splits: Optional[Mapping[str, str]] = None, progress: bool = True) -> dict:
    """Score every run on every task; write `out_dir/results.json` and `out_dir/report.md`; return the results.

    The first run is the reference row of the report (put the untrained base first); Δ is last minus first.
    """
    if not runs:
        raise EvalError("nothing to evaluate: no model given")
    for task in tasks:
        check_metrics(task)
    splits = dict(splits or {})
    unknown = sorted(set(splits) - {t.name for t in tasks})
    if unknown:
        raise EvalError(f"--eval-split names task(s) {unknown} that are not being evaluated")
    data = {}
    for task in tasks:
        rows, split, size = eval_rows(task, max_examples, seed, splits.get(task.name))
        data[task.name] = (encode(task, rows, tokenizer, taskset.add_bos, taskset.add_eos), split, size)
    results = dict(format_version=FORMAT_VERSION, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   settings=dict(task_source=taskset.source, tasks=[t.name for t in tasks], max_examples=max_examples,
                                 seed=seed, batch_size=batch_size,
                                 add_bos=resolve_add_bos(tokenizer, taskset.add_bos),
                                 add_eos=taskset.add_eos),
                   runs={})
    for label, model in runs.items():
        t0 = time.perf_counter()
        per_task = {}
        try:
            for task in tasks:
                enc, split, size = data[task.name]
                info = score_task(model, task, enc, tokenizer, batch_size, label, progress)
                per_task[task.name] = dict(split=split, n=len(enc.prompts), split_size=size, **info)
        finally:
            model.close()
        scores = [t["score"] for t in per_task.values() if t["score"] is not None]
        results["runs"][label] = dict(model=model.identity(), tasks=per_task,
                                      average=float(np.mean(scores)) if scores else None,
                                      wall_s=round(time.perf_counter() - t0, 3))
        ranks = model.rank_map()
        if ranks is not None:
            from pipeline.more.rank_image import save_rank_image

            image = save_rank_image(ranks[0], ranks[1], Path(out_dir) / f"rank_map_{label}.png")
            results["runs"][label]["rank_map_image"] = image.name
    write_results(results, out_dir)
    write_report(results, out_dir)
    return results
