#!/usr/bin/env python
"""Will this run fit? Prints the per-GPU and per-node memory plan of a MoRE + ZeRO-3 (+ NF4) run.

    python launch/plan.py --model llama-2-70b --nodes 2 --gpus-per-node 8 --gpu-mem-gb 80 --quant nf4 \
        --seq-len 4096 --micro-batch 1 --max-rank 8 --targets all-linear

`--config FILE` (schema: pipeline/config/plan.py) with `--set key=value` works too; flags win over the file.
Exit status: 0, or 3 with `--check` when the run does not fit.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.base import ConfigError, load_config  # noqa: E402
from pipeline.config.plan import PlanConfig  # noqa: E402

DEFAULT_DS = Path(__file__).resolve().parents[1] / "ds_configs" / "zero3.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML plan request (pipeline/config/plan.py)")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of --config")
    a("--model", help="HF model folder, config.json, or shipped name (configs/models/*)")
    a("--nodes", type=int)
    a("--gpus-per-node", type=int)
    a("--gpu-mem-gb", type=float, help="memory per GPU in GiB")
    a("--quant", choices=["nf4", "none"])
    a("--seq-len", type=int)
    a("--micro-batch", type=int)
    a("--offload", action=argparse.BooleanOptionalAction, default=None, help="ZeRO-3 CPU offload (optimizer+params)")
    a("--replicate-frozen", action=argparse.BooleanOptionalAction, default=None,
      help="the frozen base whole on every GPU (training's model.frozen_base: replicated; auto picks it where it fits)")
    a("--grad-ckpt", action=argparse.BooleanOptionalAction, default=None)
    a("--max-rank", type=int)
    a("--targets", help="all-linear or comma-separated module names (q_proj,v_proj)")
    a("--num-tasks", type=int)
    a("--task-embedding", choices=["shared", "per_layer"])
    a("--task-embedding-dim", type=int)
    a("--attn-impl", choices=["flash", "sdpa", "eager"])
    a("--dtype", choices=["bf16", "fp16", "fp32"])
    a("--adapter-dropout", type=float)
    a("--double-quant", action=argparse.BooleanOptionalAction, default=None)
    a("--overhead-gb", type=float)
    a("--host-mem-gb", type=float, help="host RAM per node in GiB, for the host verdict")
    a("--ds-config", help="DeepSpeed JSON (buckets, thresholds, offload); default ds_configs/zero3.json")
    a("--check", action="store_true", help="exit 3 when the run does not fit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "set", "check")}
    try:
        if args.set and not args.config:
            raise ConfigError("--set overrides keys of --config; without a file give flags (--nodes 2 ...)")
        base = load_config(PlanConfig, args.config, args.set).model_dump(exclude_unset=True) if args.config else {}
        cfg = load_config(PlanConfig, data={**base, **flags})
        if cfg.model is None:
            raise ConfigError("no model: give --model, or model: in --config")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.plan import format_plan, plan

    kwargs = cfg.model_dump()
    model, ds = kwargs.pop("model"), kwargs.pop("ds_config")
    if ds is None and DEFAULT_DS.is_file():  # what launch/train.py uses by default
        ds = os.path.relpath(DEFAULT_DS)
    try:
        result = plan(model, ds_config=ds, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_plan(result))
    return 3 if args.check and not result.runs else 0


if __name__ == "__main__":
    sys.exit(main())
