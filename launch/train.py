"""Train MoRE adapters: `deepspeed launch/train.py --deepspeed ds_configs/zero3.json --config configs/train/X.yaml`.

Also runs as `python launch/train.py ...` (one process), under torchrun, and under srun (one task per GPU).
Exit codes: 0 done, 75 preempted after a checkpoint (requeue me), anything else an error.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from pipeline.config import ConfigError, load_config
from pipeline.config.train import TrainConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training YAML (configs/train/*.yaml)")
    ap.add_argument("--deepspeed", default="ds_configs/zero3.json", help="DeepSpeed JSON; \"auto\" values are filled")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    ap.add_argument("--no-resume", action="store_true", help="start fresh even if a checkpoint exists")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("checkpoint.resume=must")
    if args.no_resume:
        overrides.append("checkpoint.resume=never")
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        from pipeline.train.loop import train

        return train(cfg, args.deepspeed, args.local_rank)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except BaseException:
        # This rank's error goes to its own stderr and exit code; the launcher (deepspeed/torchrun/srun) stops
        # the other ranks, and collective timeouts cover any that are mid-collective.
        traceback.print_exc()
        sys.stderr.flush()
        return 1


if __name__ == "__main__":
    code = main()
    if code not in (0, 75):
        import os

        os._exit(code)  # skip interpreter teardown, which can block on a broken process group
    sys.exit(code)
