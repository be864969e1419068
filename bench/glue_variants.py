"""The four fidelity variants on real data (issue 7): GLUE (cola, mrpc, rte, stsb, mnli) from ../shared/data/glue,
on the best base this project can train itself on CPU, every stage through the project's own commands.

    1. more           MoRE, max rank 8, learning selector (library defaults)
    2. shared_lora    one rank-8 LoRA for every task (`more.expert_ranks=[8]`: a single expert; no contrastive
                      loss, so the task id is unused: plain LoRA)
    3. per_task_lora  one rank-8 LoRA per task (`data.tasks=[t]`, no contrastive loss), T x the adapter
                      parameters; task t gets round(steps x p_t) steps, p_t its share of the joint runs' temperature
                      sampling, so every variant sees (up to rounding) the same number of steps and the same data
    4. more_frozen    MoRE with each task's ranks fixed at the random initial gate (`more.selector_frozen`,
                      `more.gate_init=random`): what the reference code does

Base: a tiny Llama pretrained by the `base` stage on the prepared GLUE training text (`corpus: unpaired`:
prompts and responses as separate texts). No pretrained weights can be downloaded here, so this base knows only
GLUE's own ~2M tokens of English; expect near-chance scores. Paper-scale numbers need pretrained 7B weights (see
bench/RESULTS.md for the command). Evaluation: `launch/evaluate.py --adapter` on up to --max-examples validation
examples per task (mnli: validation_mismatched), beside the base alone.

    .venv/bin/python bench/glue_variants.py            # ~30 min on 2 CPU cores -> results/glue_variants.json
    .venv/bin/python bench/glue_variants.py --quick    # smaller base, 40 steps (make bench) -> ..._quick.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
VARIANTS = {
    "more": [],
    "shared_lora": ["more.expert_ranks=[8]", "more.contrastive.weight=0"],
    "per_task_lora": ["more.expert_ranks=[8]", "more.contrastive.weight=0"],
    "more_frozen": ["more.selector_frozen=true", "more.gate_init=random"],
}


def run(cmd: list, log: Path) -> None:
    """Run a stage command; its output goes to `log`, and a failure stops the benchmark with the log's tail."""
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")


def task_steps(data: Path, steps: int, temperature: float) -> dict[str, int]:
    """Each task's share of `steps` under the joint runs' temperature sampling."""
    from pipeline.data.sampler import task_probabilities

    tasks = json.loads((data / "manifest.json").read_text())["tasks"]
    names = sorted(tasks, key=lambda n: tasks[n]["id"])
    p = task_probabilities([tasks[n]["examples"] for n in names], temperature)
    return {n: max(1, round(steps * float(pt))) for n, pt in zip(names, p)}


def train(out: Path, base: Path, data: Path, steps: int, extra: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    sets = [f"output_dir={out}", f"model.path={base}", f"data.dir={data}", f"optim.max_steps={steps}",
            f"optim.warmup_steps={max(1, steps // 20)}", f"checkpoint.every={steps}", "checkpoint.keep=1",
            f"eval.every={steps}", "eval.max_batches=4", *extra]
    run([PY, "launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--config", "configs/train/default.yaml",
         "--no-resume", *[a for s in sets for a in ("--set", s)]], log)
    return time.perf_counter() - t0


def evaluate(adapter: Path, base: Path, data: Path, out: Path, tasks: list[str], max_examples: int, log: Path,
             baseline: bool = False) -> dict:
    cmd = [PY, "launch/evaluate.py", "--adapter", adapter, "--base", base, "--data", data, "--out", out,
           "--tasks", ",".join(tasks), "--max-examples", max_examples, "--no-progress"]
    run(cmd + (["--baseline", base] if baseline else []), log)
    return json.loads((out / "results.json").read_text())["runs"]


def adapter_numel(adapter: Path) -> dict[str, int]:
    """Saved trainable parameters: the LoRA pairs alone, and everything (+ gates, task embeddings, contrastive
    head, which the LoRA variants carry but do not use)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    return {"lora": sum(v for k, v in sizes.items() if "lora_" in k), "all": sum(sizes.values())}


def scores(run_result: dict) -> dict:
    return {t: {"metrics": r["metrics"], "score": r["score"], "n": r["n"]} for t, r in run_result["tasks"].items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small base and few steps (the size `make bench` runs)")
    ap.add_argument("--work", default="runs/bench-glue", help="working folder (data, base, runs)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per variant (default 400; quick 40)")
    ap.add_argument("--max-examples", type=int, default=None, help="validation examples per task (300; quick 60)")
    ap.add_argument("--out", default=None, help="default bench/results/glue_variants[_quick].json")
    a = ap.parse_args()
    steps = a.steps or (40 if a.quick else 400)
    max_examples = a.max_examples or (60 if a.quick else 300)
    shape = ({"hidden_size": 128, "num_layers": 2, "intermediate_size": 256, "pretrain_steps": 100} if a.quick else
             {"hidden_size": 256, "num_layers": 2, "intermediate_size": 512, "pretrain_steps": 400})
    out_path = Path(a.out or ROOT / "bench" / "results" / f"glue_variants{'_quick' if a.quick else ''}.json")
    work = ROOT / a.work / ("quick" if a.quick else "full")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data, base = work / "data", work / "base"
    t_start = time.perf_counter()

    print(f"[glue] prep -> {data}", flush=True)
    run([PY, "-m", "data_prep", "--config", "configs/prep/glue.yaml", "--set", f"output_dir={data}"], logs / "prep.log")
    print(f"[glue] base ({shape}) -> {base}", flush=True)
    t0 = time.perf_counter()
    run([PY, "launch/base.py", "--config", "configs/base/default.yaml", "--set", f"data_dir={data}",
         "--set", f"output_dir={base}", "--set", "corpus=unpaired", "--set", "batch_size=16",
         *[a for k, v in shape.items() for a in ("--set", f"{k}={v}")]], logs / "base.log")
    base_s = time.perf_counter() - t0
    names = sorted(json.loads((data / "manifest.json").read_text())["tasks"])
    per_task = task_steps(data, steps, temperature=2.0)

    results, params, times, baseline = {}, {}, {}, None
    for variant, extra in VARIANTS.items():
        jobs = ([(t, per_task[t], extra + [f"data.tasks=[{t}]"]) for t in names] if variant == "per_task_lora"
                else [(None, steps, extra)])
        results[variant], times[variant] = {}, 0.0
        for task, n, sets in jobs:
            tag = variant + (f"-{task}" if task else "")
            print(f"[glue] train {tag}: {n} steps", flush=True)
            run_dir = work / "runs" / tag
            times[variant] += train(run_dir, base, data, n, sets, logs / f"train-{tag}.log")
            runs = evaluate(run_dir / "adapter", base, data, work / "eval" / tag, [task] if task else names,
                            max_examples, logs / f"eval-{tag}.log", baseline=baseline is None)
            if baseline is None:
                baseline = scores(runs["baseline"])
            results[variant].update(scores(runs["trained"]))
            n = adapter_numel(run_dir / "adapter")
            params[variant] = {k: params.get(variant, {}).get(k, 0) + v for k, v in n.items()}
    out = {
        "command": "python bench/glue_variants.py" + (" --quick" if a.quick else ""),
        "settings": {"steps": steps, "per_task_steps": per_task, "max_examples": max_examples,
                     "base": {**shape, "corpus": "unpaired", "pretrain_seconds": round(base_s, 1)},
                     "train_config": "configs/train/default.yaml (NF4 base, fp32, 1 process, ZeRO-3)"},
        "tasks": names,
        "baseline": baseline,
        "variants": results,
        "trainable_params": params,
        "train_seconds": {k: round(v, 1) for k, v in times.items()},
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(out_path)
    print(json.dumps({v: {t: round(r["score"], 3) for t, r in res.items()} for v, res in
                      {"baseline": baseline, **results}.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
