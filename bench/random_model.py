"""A randomly initialised ~1B model of SmolLM2's architecture and tokenizer, for throughput where matmuls dominate:

    .venv/bin/python bench/random_model.py --like models/smollm2-135m-instruct --out models/random-llama-1b
    .venv/bin/python bench/vs_trl.py --model models/random-llama-1b --work runs/bench-vs-trl-1b ...

Default shape: Llama-3.2-1B's decoder (hidden 2,048, MLP 8,192, 16 layers, 32 heads, 8 KV heads) with SmolLM2's
49,152-word tied embedding: 1.07 B parameters, 0.97 B of them in decoder linears. Nothing here is trained: its
losses say nothing about quality, only its step times count.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.models.tiny import build_random_like  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--like", default="models/smollm2-135m-instruct", help="model folder: architecture, tokenizer")
    ap.add_argument("--out", default="models/random-llama-1b")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not (Path(a.like) / "config.json").is_file():
        sys.exit(f"--like {a.like}: not a model folder (run `make model` first)")
    out = build_random_like(a.like, a.out, seed=a.seed, hidden_size=a.hidden, intermediate_size=a.intermediate,
                            num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
