"""Train MoRE adapters: `deepspeed launch/train.py --deepspeed ds_configs/zero3.json --config configs/train/X.yaml`.

Also runs as `python launch/train.py ...` (one process), under torchrun, and under srun (one task per GPU).
Exit codes: 0 done, 75 preempted (requeue me: after a checkpoint, or before training started, with the checkpoints
as they were), anything else an error.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from pipeline.config import ConfigError, load_config
from pipeline.config.train import TrainConfig
from pipeline.train.distributed import EXIT_REQUEUE


class PreemptedBeforeTraining(BaseException):
    """SIGTERM while the run starts (process group, model load, DeepSpeed init). Nothing is written in that phase,
    so the process stops where it is and exits 75; the trainer replaces this handler with its own (finish the step,
    checkpoint, exit 75) once it is built."""


def _term_before_training(signum, frame):
    raise PreemptedBeforeTraining()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="training YAML (configs/train/*.yaml)")
    ap.add_argument("--deepspeed", default="ds_configs/zero3.json", help="DeepSpeed JSON; \"auto\" values are filled")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set optim.lr=1e-4 (repeatable)")
    resume = ap.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="require a checkpoint to resume from")
    resume.add_argument("--no-resume", action="store_true", help="start fresh; refused when the output folder already holds checkpoints")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("checkpoint.resume=must")
    if args.no_resume:
        overrides.append("checkpoint.resume=never")
    previous = signal.signal(signal.SIGTERM, _term_before_training)
    try:
        cfg = load_config(TrainConfig, args.config, overrides)
        from pipeline.train.loop import train

        return train(cfg, args.deepspeed, args.local_rank)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except PreemptedBeforeTraining:
        print(f"SIGTERM before training started: no checkpoint written; exiting {EXIT_REQUEUE} to requeue",
              file=sys.stderr, flush=True)
        from pipeline.train.distributed import abort_job

        abort_job("SIGTERM before training started", EXIT_REQUEUE)  # a rank the signal missed stops too, as 75
        return EXIT_REQUEUE
    except BaseException as e:
        # This rank's error goes to its own stderr and exit code; the other ranks stop through the store
        # (abort_job), the launcher (deepspeed/torchrun, srun -K) or their collective timeouts.
        traceback.print_exc()
        sys.stderr.flush()
        from pipeline.train.distributed import abort_job

        abort_job(f"{type(e).__name__}: {e}")
        return 1
    finally:
        if signal.getsignal(signal.SIGTERM) is _term_before_training:  # not replaced by the trainer's
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: it can block on a broken (or never shut down) process group, and even after a clean
    # destroy_process_group it rarely aborts ("terminate called without an active exception", exit -6: a C++ thread
    # destroyed at exit; seen in CI after all four training steps, checkpoint and evaluation were done). Every file
    # the trainer writes is closed (or atomically renamed) before main returns.
    os._exit(code)
