"""results.json and report.md, each written atomically (`pipeline.atomic.atomic_write`: temp file in the same
folder, then rename), so a reader never sees a half-written file and a crash leaves the previous one in place."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from pipeline.atomic import atomic_write


def _clean(x):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def write_results(results: dict, out_dir) -> Path:
    return atomic_write(Path(out_dir) / "results.json", json.dumps(_clean(results), indent=2) + "\n")


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def _delta(a: Optional[float], b: Optional[float]) -> str:
    return "–" if a is None or b is None else f"{b - a:+.4f}"


def render_report(results: dict) -> str:
    """One table: a row per task metric and the average, a column per run (baseline first), then Δ of the last
    run over the first; below it the details (examples, load and scoring time, unparseable answers, routing accuracy)."""
    runs = results["runs"]
    labels = list(runs)
    s = results["settings"]
    lines = ["# Evaluation", "",
             f"Tasks from `{s['task_source']}`; up to {s['max_examples'] or 'all'} examples per task "
             f"(seed {s['seed']}). Scores on a 0–1 scale (MCC, Pearson, Spearman: −1–1); BLEU / 100.", ""]
    head = ["task", "metric", "n"] + labels + (["Δ"] if len(labels) > 1 else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    first = runs[labels[0]]["tasks"]
    for task, info in first.items():
        for metric in info["metrics"]:
            vals = [runs[l]["tasks"].get(task, {}).get("metrics", {}).get(metric) for l in labels]
            row = [task, metric, str(info["n"])] + [_fmt(v) for v in vals]
            if len(labels) > 1:
                row.append(_delta(vals[0], vals[-1]))
            lines.append("| " + " | ".join(row) + " |")
    avgs = [runs[l]["average"] for l in labels]
    row = ["**average**", "mean of task means", ""] + [f"**{_fmt(v)}**" for v in avgs]
    if len(labels) > 1:
        row.append(_delta(avgs[0], avgs[-1]))
    lines += ["| " + " | ".join(row) + " |", "", "## Details", ""]
    for l in labels:
        run = runs[l]
        ident = ", ".join(f"{k}={v}" for k, v in run["model"].items() if not isinstance(v, (list, dict)))
        lines += [f"**{l}**: {ident}; {run['wall_s']:.1f} s", "",
                  "| task | split | n | load s | wall s | unparseable | routing acc. |", "|---|---|---|---|---|---|---|"]
        for task, info in run["tasks"].items():
            routing = info.get("routing")
            racc = _fmt(routing["accuracy"]) if routing else "–"
            unp = str(info["unparseable"]) if "unparseable" in info else "–"
            lines.append(f"| {task} | {info['split']} | {info['n']} | {info.get('load_s', 0.0):.1f} | "
                         f"{info['wall_s']:.1f} | {unp} | {racc} |")
        lines.append("")
        if run.get("rank_map_image"):
            lines += [f"Rank map of **{l}** (a row per task, a column per adapted layer in model order; the colour is "
                      f"the rank the task uses there, legend below):", "",
                      f"![rank map of {l}]({run['rank_map_image']})", ""]
    return "\n".join(lines)


def write_report(results: dict, out_dir) -> Path:
    return atomic_write(Path(out_dir) / "report.md", render_report(results))
