"""Build the small default base model: `python launch/base.py --config configs/base/default.yaml`."""
from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config
from pipeline.config.base_model import BaseModelConfig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--force", action="store_true", help="rebuild even if an up-to-date base exists")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(BaseModelConfig, args.config, args.overrides)
        from pipeline.models.pretrain import build_base

        print(build_base(cfg, force=args.force))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
