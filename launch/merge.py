"""Merge each task's chosen ranks into the base: `python launch/merge.py --adapter RUN/adapter --out RUN/merged`.

Writes RUN/merged/<task>/ per task (a plain HF model folder, or with --format peft a PEFT LoRA adapter), checks
its logits against the adapter model and (full merges) every merged tensor against base + the task's delta, and
records tolerances and errors in RUN/merged/merge_report.json.
The merge streams the base checkpoint tensor by tensor: peak memory is about one largest tensor in fp32 plus one
output shard (--max-shard-size), whatever the model size; the check loads the adapter model and the result
(--no-check skips it, e.g. to check on a bigger machine later).
Exit codes: 0 done, 1 a check failed (the message names the task and the error), 2 bad input (nothing written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, type=Path, help="saved MoRE adapter folder (RUN/adapter)")
    ap.add_argument("--out", required=True, type=Path, help="output root; one folder per task (RUN/merged)")
    ap.add_argument("--base", default=None, help="base model folder (default: the base in more_config.json)")
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="output dtype")
    ap.add_argument("--format", default="full", choices=["full", "peft"],
                    help="full: merged HF model; peft: standard PEFT LoRA adapter")
    ap.add_argument("--target", default="trained", choices=["trained", "original", "nf4"],
                    help="merge into the base as trained (NF4: dequant(NF4(W)), exact) or into the stored 16-bit "
                         "W (adds W - dequant(NF4(W)) the adapter never saw; measured in the report)")
    ap.add_argument("--check-samples", default=None, type=Path, metavar="DATA_DIR",
                    help="prep output whose eval split gives the check prompts (default: random token prompts)")
    ap.add_argument("--check-n", default=4, type=int, help="prompts per task for the check")
    ap.add_argument("--check-rtol", default=None, type=float,
                    help="check tolerance relative to max(1, max |logit|) (default by precision: fp32 1e-5, "
                         "fp16 1e-2, bf16 3e-2; see pipeline/export/check.py)")
    ap.add_argument("--no-check", action="store_true", help="skip the checks (logits and tensors)")
    ap.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (e.g. 2GB, 500MB)")
    ap.add_argument("--allow-other-base-weights", action="store_true",
                    help="merge even if the base's weights differ from those the adapter recorded at training "
                         "(same shape, other checkpoint)")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.export.check import CheckError
    from pipeline.export.run import MergeInputError, MergeOptions, run_merge

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    opts = MergeOptions(adapter=args.adapter, out=args.out, base=args.base, tasks=tasks, dtype=args.dtype,
                        format=args.format, target=args.target, check_samples=args.check_samples,
                        check=not args.no_check, check_n=args.check_n, check_rtol=args.check_rtol,
                        max_shard_size=args.max_shard_size,
                        allow_other_base_weights=args.allow_other_base_weights, log=not args.quiet)
    try:
        report = run_merge(opts)
    except MergeInputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except CheckError as e:
        print(f"error: merge check failed: {e}", file=sys.stderr, flush=True)
        return 1
    for task, entry in report["tasks"].items():
        chk = entry.get("check")
        err = f"max |logit err| {chk['max_abs_err']:.3g} <= {chk['tolerance']:.3g}" if chk else "not checked"
        if chk and "tensors" in chk:
            err += f"; {chk['tensors']['adapted']} adapted layers = base + delta"
        print(f"{task}: {entry['path']} ({entry['merge_seconds']:.1f}s, {err})")
    print(f"report: {Path(args.out) / 'merge_report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
