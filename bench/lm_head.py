"""Training step time with the LM head at supervised positions only vs over every position, side by side.

Why: on GLUE-style data a sample supervises ~2 of its ~70 tokens, while the full head computes (and upcasts to fp32)
vocab-wide logits at every position: for SmolLM2-135M (vocabulary 49,152, hidden 576) about a fifth of the
forward's FLOPs. `MoreCausalLM.forward(..., supervised_loss=True)` (what the trainer uses) runs the decoder, keeps
the hidden states of the positions that predict a supervised token and applies the head there only.

Measured: one training step (forward, LM + contrastive loss, backward; no optimizer, it is the same in both) of
SmolLM2-135M-Instruct on its NF4 base with MoRE on all linear layers, fp32 compute, on the same packed GLUE rows
(configs/prep/glue.yaml with the model's tokenizer), the two paths interleaved and alternating which goes first;
median step time over --repeats passes, real tokens per second, and their ratio. The losses of both paths are
checked equal (rel. 1e-5) on the first batch.

    .venv/bin/python bench/lm_head.py --model models/smollm2-135m-instruct   # make model first; ~3 min on 2 cores
    .venv/bin/python bench/lm_head.py --quick                                # a tiny random Llama, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.atomic import atomic_write  # noqa: E402
from pipeline.config.base import load_config  # noqa: E402
from pipeline.config.more import MoreConfig  # noqa: E402
from pipeline.config.prep import PrepConfig  # noqa: E402
from pipeline.data.loader import PackedCollator, PackedDataset  # noqa: E402
from pipeline.data.prep import run_prep  # noqa: E402
from pipeline.models import load_base_model  # noqa: E402
from pipeline.models.cpu import vector_flags  # noqa: E402
from pipeline.more import inject  # noqa: E402
from pipeline.train.loss import lm_loss_sums, token_loss_sums  # noqa: E402


def prepared(model_dir: Path | None, out: Path, per_task: int, seq_len: int) -> PackedDataset:
    """The GLUE mix with the model's tokenizer (None: the config's own small sentencepiece model)."""
    overrides = [f"output_dir={out}", f"max_seq_len={seq_len}"]
    if model_dir is not None:
        overrides += [f"tokenizer.path={model_dir}", "tokenizer.train_sentencepiece=null"]
    with contextlib.chdir(ROOT):
        cfg = load_config(PrepConfig, "configs/prep/glue.yaml", overrides)
        cfg = cfg.model_copy(update={"tasks": [t.model_copy(update={"max_examples": per_task}) for t in cfg.tasks]})
        return PackedDataset(run_prep(cfg), "train")


def step(model, batch, n_tasks: int, supervised: bool) -> float:
    """One forward + backward; returns the LM loss sum."""
    model.zero_grad(set_to_none=True)
    if supervised:
        out = model(**batch, supervised_loss=True)
        sums = token_loss_sums(out.token_loss, out.token_index, batch["task_ids"], n_tasks)
    else:
        out = model(**batch)
        sums = lm_loss_sums(out.logits, batch["labels"], batch["task_ids"], n_tasks, batch["position_ids"])
    loss = sums.total / sums.tokens
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    return float(sums.total)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/smollm2-135m-instruct", help="HF model folder (make model)")
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama with the built-in tokenizer")
    ap.add_argument("--rows", type=int, default=4, help="packed rows per step")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3, help="batches per pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None, help="result JSON (default: bench/results/lm_head.json, none with --quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_lm_head_"))
    if args.quick:
        from transformers import AutoTokenizer

        from pipeline.models import build_tiny_llama

        args.rows, args.seq_len, args.steps, args.repeats = 2, 512, 2, 2
        data = prepared(None, work / "data", per_task=20, seq_len=args.seq_len)
        tok = AutoTokenizer.from_pretrained(data.tokenizer_path)
        model_dir = build_tiny_llama(work / "tiny", vocab_size=len(tok), tokenizer=tok, hidden_size=64, num_layers=2)
    else:
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise SystemExit(f"{model_dir} is not a model folder: run `make model` first (or pass --model)")
        data = prepared(model_dir, work / "data", per_task=60, seq_len=args.seq_len)
    collate = PackedCollator(dtype=torch.float32)
    batches = [collate([data[(s * args.rows + r) % len(data)] for r in range(args.rows)]) for s in range(args.steps)]
    base = load_base_model(str(model_dir), "nf4", "fp32", device_map={"": "cpu"})
    model = inject(base, MoreConfig(target_modules="all-linear", selector_warmup_steps=0), data.task_names).train()
    n_tasks = len(data.task_names)

    full0, sup0 = step(model, batches[0], n_tasks, False), step(model, batches[0], n_tasks, True)
    if abs(full0 - sup0) > 1e-5 * abs(full0):
        raise SystemExit(f"the two paths disagree on the first batch: LM loss sum {full0} vs {sup0}")
    times = {"full_logits": [], "supervised_only": []}
    for rep in range(args.repeats):
        order = [False, True] if rep % 2 == 0 else [True, False]
        for supervised in order:
            t0 = time.perf_counter()
            for b in batches:
                step(model, b, n_tasks, supervised)
            times["supervised_only" if supervised else "full_logits"].append(time.perf_counter() - t0)
    real = int(sum(int((b["segment_ids"] >= 0).sum()) for b in batches))
    supervised_tokens = int(sum(int((b["labels"] != -100).sum()) for b in batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": str(model_dir) if not args.quick else "tiny random Llama (quick)",
        "rows_per_step": args.rows, "seq_len": args.seq_len, "steps_per_pass": args.steps, "repeats": args.repeats,
        "real_tokens_per_pass": real, "supervised_tokens_per_pass": supervised_tokens,
        "seconds_per_pass": med, "tokens_per_s": {k: real / v for k, v in med.items()},
        "speedup_supervised_vs_full": med["full_logits"] / med["supervised_only"],
        "threads": args.threads, "cpu": platform.processor() or platform.machine(), "cpu_flags": vector_flags(),
        "torch": torch.__version__,
        "command": "python bench/lm_head.py" + (" --quick" if args.quick else f" --model {args.model}"),
    }
    print(json.dumps(result, indent=1))
    out = args.out or (None if args.quick else ROOT / "bench/results/lm_head.json")
    if out:
        atomic_write(out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
