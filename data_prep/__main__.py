"""python -m data_prep --config configs/prep/<name>.yaml [--set k=v ...] [--force] [--shard i/N] [--merge-shards]"""
from __future__ import annotations

import argparse
import sys

from pipeline.config.base import ConfigError, load_config
from pipeline.config.prep import PrepConfig
from pipeline.data.errors import PrepError
from pipeline.data.prep import run_prep


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard expects i/N (e.g. 0/4), got {text!r}") from None
    return i, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep", description="Prepare packed multi-task training data.")
    ap.add_argument("--config", required=True, help="YAML file (configs/prep/*.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set max_seq_len=1024 (repeatable)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the cached output matches")
    ap.add_argument("--shard", type=_shard, metavar="i/N", help="prepare only slice i of N of every source")
    ap.add_argument("--merge-shards", action="store_true", help="pack and write all prepared slices")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(PrepConfig, args.config, args.overrides)
        out = run_prep(cfg, force=args.force, shard=args.shard, merge_shards=args.merge_shards)
    except (ConfigError, PrepError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
