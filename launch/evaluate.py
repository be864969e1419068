"""Evaluate trained models on each task's eval split and write OUT/results.json + OUT/report.md.

  python launch/evaluate.py --model RUN/merged --config configs/prep/glue.yaml --tasks cola,mrpc --out RUN/eval \\
      [--max-examples N] [--baseline BASE_DIR]
  python launch/evaluate.py --adapter RUN/adapter --base BASE_DIR [--routing] --data data/built/glue --out RUN/eval

--model is a folder of per-task merged models (RUN/merged/<task>/) or one HF model folder used for every task.
Task definitions (template, verbalizer, eval split, kind, metrics) come from the prep config (--config) or a
prepared data folder (--data: its manifest.json and tokenizer). --baseline adds the untrained/base row.
Exit codes: 0 done, 2 bad input (the message names the task/folder), 1 anything else.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.evaluate import EvalError
from pipeline.evaluate.api import evaluate
from pipeline.evaluate.report import render_report


def _splits(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        task, sep, split = item.partition("=")
        if not sep or not task or not split:
            raise EvalError(f"--eval-split {item!r}: expected TASK=SPLIT")
        out[task] = split
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="RUN/merged (per-task folders) or one HF model folder")
    src.add_argument("--adapter", help="a MoRE adapter folder (needs --base)")
    ap.add_argument("--base", help="the base model folder the adapter was trained on")
    ap.add_argument("--routing", action="store_true", help="with --adapter: route each prompt zero-shot")
    ap.add_argument("--allow-other-base-weights", action="store_true",
                    help="with --adapter: evaluate even if --base's weights differ from those the adapter recorded "
                         "at training (same shape, other checkpoint)")
    defs = ap.add_mutually_exclusive_group(required=True)
    defs.add_argument("--config", help="prep config YAML defining the tasks (configs/prep/*.yaml)")
    defs.add_argument("--data", help="prepared data folder (manifest.json + tokenizer/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value of --config (repeatable)")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: all tasks)")
    ap.add_argument("--out", required=True, help="output folder for results.json and report.md")
    ap.add_argument("--max-examples", type=int, default=None, help="score at most N examples per task (seeded)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --max-examples subsample")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--baseline", help="untrained/base model folder: adds the baseline row")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: --data's, else the model's)")
    ap.add_argument("--eval-split", action="append", default=[], metavar="TASK=SPLIT",
                    help="score TASK on SPLIT instead of its configured eval_split (repeatable)")
    ap.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                    help="dtype of --model/--baseline (auto: as saved); an adapter's base defaults to its "
                         "training dtype")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        results = evaluate(
            args.out, model=args.model, adapter=args.adapter, base=args.base, routing=args.routing,
            config=args.config, data=args.data, overrides=args.overrides,
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()], max_examples=args.max_examples,
            seed=args.seed, batch_size=args.batch_size, baseline=args.baseline, tokenizer=args.tokenizer,
            eval_splits=_splits(args.eval_split), device=args.device, dtype=args.dtype,
            progress=not args.no_progress, allow_other_base_weights=args.allow_other_base_weights)
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(render_report(results))
    print(f"wrote {Path(args.out) / 'results.json'} and {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
