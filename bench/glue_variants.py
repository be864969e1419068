"""MoRE against the alternatives a user would weigh, on a real LLM: SmolLM2-135M-Instruct (NF4 base, `make model`)
and the GLUE tasks (cola, mrpc, rte, stsb, mnli; configs/prep/glue.yaml rendered through the model's chat
template), every stage through the project's own commands, the same training-token budget for every variant.

    more           MoRE, max rank 8, learning selector (library defaults: warm-up a fifth of the run)
    more_max_rank  the same adapter held at rank 8 for every task (`more.selector_frozen`, gate at max rank):
                   does choosing a rank beat not choosing?
    shared_lora    one rank-8 LoRA for every task (`more.expert_ranks=[8]`, no contrastive loss: plain LoRA)
    per_task_lora  one rank-8 LoRA per task (`data.tasks=[t]`), T x the adapter parameters; task t trains on
                   the share of the token budget the joint runs give it
    more_frozen    ranks fixed at the random initial gate (`more.selector_frozen`, `more.gate_init=random`): what
                   the reference code does
    zero-shot      the base alone (the `baseline` row), the same chat-template rendering

Each variant's results are saved as soon as it is done, and a later call with the same settings skips what is
saved: a long run can be split (`--seeds 0 --variants more,per_task_lora`, then the rest).

Data is packed per task (`pack_per_task: true`) so that a per-task run never sees another task's tokens. Training:
1 process (`launch/train.py` under ZeRO-3), 2 packed rows of 512 per step, configs/train/smollm2-glue.yaml
otherwise. Evaluation: `launch/evaluate.py --adapter` on up to --max-examples validation examples per task (mnli:
validation_mismatched), and zero-shot routing (`--routing`, no task id given) for `more`.

    .venv/bin/python bench/glue_variants.py            # 2 seeds x 200k tokens: ~7 h on 2 CPU cores (fp32)
    .venv/bin/python bench/glue_variants.py --quick    # 2 tasks, a few steps (the test and `make bench`)
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models.cpu import cpu_isa  # noqa: E402  (each row records the CPU it ran on)

PY = sys.executable
TRAIN_CONFIG = "configs/train/smollm2-glue.yaml"
ROWS_PER_STEP = 2  # micro batch 2 x 1 process x no accumulation
VARIANTS = {  # in the order they run
    "more": [],
    "per_task_lora": ["more.expert_ranks=[8]", "more.contrastive.weight=0"],
    "shared_lora": ["more.expert_ranks=[8]", "more.contrastive.weight=0"],
    "more_frozen": ["more.selector_frozen=true", "more.gate_init=random"],
    "more_max_rank": ["more.selector_frozen=true", "more.gate_init=max_rank"],
}


def run(cmd: list, log: Path, env: dict | None = None) -> None:
    """Run a stage command (with `env` over this environment); its output goes to `log`, and a failure stops the
    benchmark with the log's tail."""
    with open(log, "w") as f:
        proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=dict(os.environ, TOKENIZERS_PARALLELISM="false", **(env or {})))
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")


def budget_steps(manifest: dict, tokens: int, names: list[str]) -> tuple[int, dict[str, int]]:
    """Steps of the joint runs for `tokens` real training tokens, and each per-task run's share of them: task t
    gets the fraction of real tokens the joint runs' sampler gives it (p_t times its mean sample length)."""
    row_tokens = manifest["num_tokens"] / manifest["num_sequences"]
    steps = max(1, round(tokens / (ROWS_PER_STEP * row_tokens)))
    p = manifest["sampling"]["probabilities"]
    t = manifest["tasks"]
    mass = {n: p[n] * t[n]["tokens"] / t[n]["examples"] for n in names}
    return steps, {n: max(1, round(steps * mass[n] / sum(mass.values()))) for n in names}


def train(out: Path, model: Path, data: Path, steps: int, seed: int, extra: list[str], log: Path) -> dict:
    t0 = time.perf_counter()
    sets = [f"output_dir={out}", f"model.path={model}", f"data.dir={data}", f"seed={seed}", f"more.init_seed={seed}",
            f"optim.max_steps={steps}", f"optim.warmup_steps={max(1, steps // 15)}",
            f"optim.micro_batch_size={ROWS_PER_STEP}", "optim.grad_accum=1", "checkpoint.every=0",
            "checkpoint.keep=1", "eval.every=0", "eval.max_batches=4",
            "model.dtype=fp32", *extra]  # fp32 on every CPU, as every row so far
    run([PY, "launch/train.py", "--deepspeed", "ds_configs/zero3.json", "--config", TRAIN_CONFIG, "--no-resume",
         *[a for s in sets for a in ("--set", s)]], log)
    summary = json.loads((out / "train_summary.json").read_text())
    return {"seconds": time.perf_counter() - t0, "tokens": int(summary["tokens"]), "steps": int(summary["steps"])}


def evaluate(adapter: Path, model: Path, data: Path, out: Path, tasks: list[str], max_examples: int, log: Path,
             baseline: bool = False, routing: bool = False) -> dict:
    cmd = [PY, "launch/evaluate.py", "--adapter", adapter, "--base", model, "--data", data, "--out", out,
           "--tasks", ",".join(tasks), "--max-examples", max_examples, "--no-progress"]
    run(cmd + (["--baseline", model] if baseline else []) + (["--routing"] if routing else []), log)
    return json.loads((out / "results.json").read_text())["runs"]


def adapter_numel(adapter: Path) -> dict[str, int]:
    """Saved parameters: the LoRA pairs, and the selector (task embeddings, gates, contrastive head), which the
    LoRA variants carry but do not use."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    lora = sum(v for k, v in sizes.items() if "lora_" in k)
    return {"lora": lora, "selector": sum(sizes.values()) - lora}


def rank_stats(ranks: dict[str, dict[str, int]], max_rank: int) -> dict:
    """Per task: mean rank and the share of layers at max rank; per task pair: the share of layers where both
    chose the same rank (1.0 everywhere = one shared LoRA in effect)."""
    names = list(ranks)
    layers = list(ranks[names[0]])
    return {"mean_rank": {t: sum(ranks[t].values()) / len(layers) for t in names},
            "at_max_rank": {t: sum(r == max_rank for r in ranks[t].values()) / len(layers) for t in names},
            "same_rank": {f"{a}/{b}": sum(ranks[a][n] == ranks[b][n] for n in layers) / len(layers)
                          for a, b in itertools.combinations(names, 2)}}


def task_scores(run_result: dict) -> dict:
    return {t: {"metrics": r["metrics"], "score": r["score"], "n": r["n"]} for t, r in run_result["tasks"].items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 tasks, a few thousand tokens, 1 seed (tests, make bench)")
    ap.add_argument("--model", default="models/smollm2-135m-instruct", help="HF model folder (`make model`)")
    ap.add_argument("--tokens", type=int, default=None, help="real training tokens per variant (200k; quick 3k)")
    ap.add_argument("--seeds", default=None, help="comma-separated training seeds (0,1; quick 0)")
    ap.add_argument("--tasks", default=None, help="comma-separated GLUE tasks (all five; quick rte,mrpc)")
    ap.add_argument("--max-examples", type=int, default=None, help="validation examples per task (100; quick 8)")
    ap.add_argument("--routing-examples", type=int, default=None, help="examples per task routed (30; quick 4)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to run (default: all)")
    ap.add_argument("--work", default="runs/bench-glue", help="working folder (data, runs, evals)")
    ap.add_argument("--out", default=None, help="default bench/results/glue_variants[_quick].json")
    a = ap.parse_args()
    q = a.quick
    tokens = a.tokens or (3000 if q else 200_000)
    seeds = [int(s) for s in (a.seeds or ("0" if q else "0,1")).split(",")]
    max_examples = a.max_examples or (8 if q else 100)
    routing_examples = a.routing_examples or (4 if q else 30)
    model = Path(a.model).resolve()
    if not (model / "config.json").is_file():
        sys.exit(f"--model {model}: not a model folder (run `make model` first)")
    out_path = Path(a.out or ROOT / "bench" / "results" / f"glue_variants{'_quick' if q else ''}.json")
    work = (ROOT / a.work / ("quick" if q else "full")).resolve()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    data = work / "data"

    print(f"[glue] prep -> {data}", flush=True)
    prep_sets = [f"output_dir={data}", f"tokenizer.path={model}", "tokenizer.train_sentencepiece=null",
                 "chat_template=true", "pack_per_task=true"]
    prep_config = ROOT / "configs/prep/glue.yaml"
    if a.tasks or q:  # a copy of the config with only these tasks (source paths are relative to the project root)
        import yaml

        cfg = yaml.safe_load(prep_config.read_text())
        keep = (a.tasks or "rte,mrpc").split(",")
        unknown = sorted(set(keep) - {t["name"] for t in cfg["tasks"]})
        if unknown:
            sys.exit(f"--tasks: {unknown} are not in {prep_config}")
        cfg["tasks"] = [t for t in cfg["tasks"] if t["name"] in keep]
        prep_config = work / "prep.yaml"
        prep_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run([PY, "-m", "data_prep", "--config", prep_config, *[x for s in prep_sets for x in ("--set", s)]],
        logs / "prep.log")
    manifest = json.loads((data / "manifest.json").read_text())
    names = sorted(manifest["tasks"], key=lambda n: manifest["tasks"][n]["id"])
    steps, per_task = budget_steps(manifest, tokens, names)

    settings = {"model": a.model, "tokens_budget": tokens, "steps": steps, "per_task_steps": per_task,
                "rows_per_step": ROWS_PER_STEP, "row_len": manifest["max_seq_len"], "max_examples": max_examples,
                "routing_examples": routing_examples, "train_config": TRAIN_CONFIG + " (NF4 base, fp32, 1 process "
                "under ZeRO-3)", "cpu_threads": os.cpu_count()}
    # Results are saved after every variant; a later call with the same settings adds seeds or variants to them.
    prev = json.loads(out_path.read_text()) if out_path.is_file() else None
    if prev and {k: v for k, v in prev["settings"].items() if k not in ("seeds", "max_rank")} == settings:
        results, baseline, wall = prev["variants"], prev["baseline"], prev["wall_seconds"]
        print(f"[glue] adding to {out_path} (seeds so far: {prev['settings']['seeds']})", flush=True)
    else:
        if prev:
            print(f"[glue] {out_path} was measured with other settings: starting a new result", flush=True)
        results, baseline, wall = {v: {} for v in VARIANTS}, None, 0.0
    max_rank = prev["settings"].get("max_rank") if prev and baseline else None
    chosen = a.variants.split(",")
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        sys.exit(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
    from pipeline.atomic import atomic_write
    from pipeline.more.rank_image import save_rank_image

    for seed, (variant, extra) in itertools.product(seeds, VARIANTS.items()):
        if variant not in chosen or str(seed) in results[variant]:
            continue
        t_variant = time.perf_counter()
        jobs = ([(t, per_task[t], extra + [f"data.tasks=[{t}]"]) for t in names] if variant == "per_task_lora"
                else [(None, steps, extra)])
        rec = {"scores": {}, "train_seconds": 0.0, "tokens": 0, "steps": 0, "params": {"lora": 0, "selector": 0}}
        for task, n, sets in jobs:
            tag = f"{variant}{'-' + task if task else ''}-seed{seed}"
            print(f"[glue] train {tag}: {n} steps", flush=True)
            run_dir = work / "runs" / tag
            t = train(run_dir, model, data, n, seed, sets, logs / f"train-{tag}.log")
            rec["train_seconds"] += t["seconds"]
            rec["tokens"] += t["tokens"]
            rec["steps"] += t["steps"]
            adapter = run_dir / "adapter"
            runs = evaluate(adapter, model, data, work / "eval" / tag, [task] if task else names, max_examples,
                            logs / f"eval-{tag}.log", baseline=baseline is None)
            if baseline is None:
                baseline = task_scores(runs["baseline"])
            rec["scores"].update(task_scores(runs["trained"]))
            rec["params"] = {k: rec["params"][k] + v for k, v in adapter_numel(adapter).items()}
            if task is None:
                meta = json.loads((adapter / "more_config.json").read_text())
                max_rank = int(meta["more_config"]["max_rank"])
                rec["rank_map"] = json.loads((adapter / "rank_map.json").read_text())
                rec["rank_stats"] = rank_stats(rec["rank_map"], max_rank)
                rec["selector_warmup_steps"] = meta["more_config"]["selector_warmup_steps"]
                rec["train_loss_per_task"] = json.loads((run_dir / "train_summary.json").read_text()).get(
                    "final_train_loss_per_task")
            if variant == "more":
                print(f"[glue] routing {tag}", flush=True)
                routed = evaluate(adapter, model, data, work / "eval" / f"{tag}-routing", names, routing_examples,
                                  logs / f"routing-{tag}.log", routing=True)["trained"]["tasks"]
                rec["routing_accuracy"] = {t: r["routing"]["accuracy"] for t, r in routed.items()}
                rec["routed_scores"] = {t: r["score"] for t, r in routed.items()}
        rec["wall_seconds"] = round(time.perf_counter() - t_variant, 1)  # training + evaluation + routing
        rec["cpu"] = cpu_isa()
        results[variant][str(seed)] = rec
        wall += rec["wall_seconds"]
        done_seeds = sorted({int(x) for res in results.values() for x in res})
        out = {"command": "python bench/glue_variants.py" + (" --quick" if q else "")
                          + (f" --tokens {a.tokens}" if a.tokens else "")
                          + f" --seeds {','.join(map(str, done_seeds))}",
               "settings": {**settings, "seeds": done_seeds, "max_rank": max_rank},
               "tasks": names, "baseline": baseline, "variants": results, "wall_seconds": round(wall, 1)}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out_path, json.dumps(out, indent=2))
        if "rank_map" in rec and variant in ("more", "more_frozen"):
            save_rank_image(rec["rank_map"], max_rank, out_path.parent / f"{out_path.stem}_{variant}_seed{seed}.png")
        print(f"[glue] {variant} seed {seed}: mean score "
              f"{sum(r['score'] for r in rec['scores'].values()) / len(names):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
