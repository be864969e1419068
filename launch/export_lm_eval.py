"""Write each task as an lm-evaluation-harness task YAML, so the same task runs in the standard evaluator.

  python launch/export_lm_eval.py --data data/built/glue --out lm_eval_tasks [--tasks rte,mrpc]
  lm_eval --model hf --model_args pretrained=RUN/merged/rte,add_bos_token=False --include_path lm_eval_tasks \\
      --tasks rte

Each YAML's metadata.model_args says the add_bos_token the data was encoded with. Template classification tasks
only (lm-eval's multiple_choice); another task is a named error and nothing is written.
Exit codes: 0 done, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError
from pipeline.evaluate import EvalError
from pipeline.evaluate.api import resolve_tokenizer
from pipeline.evaluate.lm_eval_export import write_lm_eval_tasks
from pipeline.evaluate.tasks import from_config, from_data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defs = ap.add_mutually_exclusive_group(required=True)
    defs.add_argument("--config", help="prep config YAML defining the tasks")
    defs.add_argument("--data", help="prepared data folder (manifest.json + tokenizer/)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: --data's, else the config's tokenizer.path)")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: all tasks)")
    ap.add_argument("--out", required=True, help="folder for the task YAMLs (lm_eval --include_path)")
    args = ap.parse_args(argv)
    try:
        taskset = from_data(args.data) if args.data else from_config(args.config)
        tasks = taskset.select([t.strip() for t in args.tasks.split(",") if t.strip()])
        if args.tokenizer is None and taskset.tokenizer_path is None:
            raise EvalError("no tokenizer: pass --tokenizer (the config trains its own sentencepiece model)")
        tok = resolve_tokenizer(taskset, args.tokenizer)
        written = write_lm_eval_tasks(tasks, tok, args.out, taskset.add_bos, taskset.add_eos)
    except (EvalError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
