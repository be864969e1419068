"""Training throughput side by side: 1 vs 2 ranks under ZeRO-3, NF4 vs unquantized base, same data and model.

    python bench/train_throughput.py [--steps 12] [--dtype fp32] [--hidden 128] [--layers 2]

Each variant runs the real trainer (`launch/train.py`; 2 ranks through the deepspeed launcher) on the small built-in
data set and a Llama-shaped base built from config. Tokens/s is the median over steps after the first two (start-up
and ZeRO-3's first trace excluded); scaling efficiency = tokens/s(2 ranks) / (2 x tokens/s(1 rank)).
Writes bench/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def prepare(work: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    from pipeline.config import load_config
    from pipeline.config.base_model import BaseModelConfig
    from pipeline.config.prep import PrepConfig
    from pipeline.data.prep import run_prep
    from pipeline.models.pretrain import build_base

    raw = yaml.safe_load((ROOT / "configs/prep/default.yaml").read_text())
    for t in raw["tasks"]:
        t["source"]["path"] = t["source"]["path"].replace("data/built/builtin", str(work / "builtin"))
    raw.update(output_dir=str(work / "data"), builtin={"dir": str(work / "builtin"), "scale": 0.2, "seed": 0})
    data = run_prep(load_config(PrepConfig, data=raw))
    base = build_base(load_config(BaseModelConfig, data={
        "data_dir": str(data), "output_dir": str(work / "base"), "hidden_size": hidden, "num_layers": layers,
        "intermediate_size": 2 * hidden, "pretrain_steps": 0}))
    return data, base


def run_variant(work: Path, data: Path, base: Path, ranks: int, quant: str, dtype: str, steps: int) -> dict:
    out = work / f"run-{ranks}-{quant}-{dtype}"
    args = ["--config", str(ROOT / "configs/train/default.yaml"), "--deepspeed", str(ROOT / "ds_configs/zero3.json"),
            "--set", f"output_dir={out}", "--set", f"model.path={base}", "--set", f"data.dir={data}",
            "--set", f"model.quantization={quant}", "--set", f"model.dtype={dtype}",
            "--set", f"optim.max_steps={steps}", "--set", "checkpoint.every=0", "--set", "eval.max_batches=1",
            "--set", "more.selector_warmup_steps=0", "--no-resume"]
    if ranks == 1:
        cmd = [sys.executable, str(ROOT / "launch/train.py"), *args, "--set", "optim.grad_accum=2"]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(free_port()), str(ROOT / "launch/train.py"), *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {ranks} ranks {quant}/{dtype} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/tokens_per_s" in r]
    return {"ranks": ranks, "quantization": quant, "dtype": dtype, "steps": steps,
            "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in train[2:]),
            "tokens_per_step": statistics.median(r["train/tokens"] for r in train)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(tmp)
        data, base = prepare(work, args.hidden, args.layers)
        rows = [run_variant(work, data, base, r, q, args.dtype, args.steps) for q in ("nf4", "none") for r in (1, 2)]
    by = {(r["ranks"], r["quantization"]): r["tokens_per_s"] for r in rows}
    scaling = {q: by[(2, q)] / (2 * by[(1, q)]) for q in ("nf4", "none")}
    print(f"\ntraining throughput (global batch {rows[0]['tokens_per_step']:.0f} tokens/step, {args.dtype}, "
          f"hidden {args.hidden}, {args.layers} layers, median of steps 3..{args.steps})")
    print(f"{'base':>6} {'1 rank tok/s':>13} {'2 ranks tok/s':>14} {'scaling eff.':>13}")
    for q in ("nf4", "none"):
        print(f"{q:>6} {by[(1, q)]:>13,.0f} {by[(2, q)]:>14,.0f} {scaling[q]:>13.2f}")
    print(f"NF4 / unquantized tokens/s: 1 rank {by[(1, 'nf4')] / by[(1, 'none')]:.2f}, "
          f"2 ranks {by[(2, 'nf4')] / by[(2, 'none')]:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]), "rows": rows,
              "scaling_efficiency": scaling}
    tmp_file = RESULTS / "train_throughput.json.tmp"
    tmp_file.write_text(json.dumps(result, indent=2))
    os.replace(tmp_file, RESULTS / "train_throughput.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
