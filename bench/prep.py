"""Prep benchmark on the GLUE mix (configs/prep/glue.yaml, max_seq_len 512), ours vs a plain baseline, side by side.

- Packing efficiency: real tokens / (rows x max_seq_len) of our packed train split, vs padding: real tokens /
  padded slots when each random micro-batch is padded to its longest sample (dynamic padding, B = 8 and 32), and
  when every sample is padded to max_seq_len.
- Prep throughput (real tokens per second, wall clock, same tokenizer, same num_proc): our whole stage (read,
  render, tokenize, mask, pack, write Arrow + manifest) vs the straightforward recipe of the HF examples:
  `datasets.map(render + tokenize(truncation))`, then `datasets.map(pad to max_seq_len + labels)`, `save_to_disk`.

Usage: .venv/bin/python bench/prep.py [--repeats 2] [--num-proc 1]   (writes bench/results/prep.json)
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config.base import load_config  # noqa: E402
from pipeline.config.prep import PrepConfig  # noqa: E402
from pipeline.data.prep import make_tokenizer, run_prep  # noqa: E402
from pipeline.data.render import render  # noqa: E402
from pipeline.data.sources import load_task  # noqa: E402


def baseline(cfg: PrepConfig, tok, out: Path, num_proc: int) -> tuple[int, list[int], float]:
    """Render + tokenize with datasets.map, pad to max_seq_len, save.

    Returns (real tokens, per-sample lengths, seconds spent in the tokenize map alone)."""
    L = cfg.max_seq_len
    lengths: list[int] = []
    t_tok = 0.0
    for task in cfg.tasks:
        ds, _ = load_task(task, task.source.split)

        def tok_fn(batch, task=task):
            rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["_example_id"]))]
            texts = [p + r for p, r in (render(task, row) for row in rows)]
            return tok(texts, truncation=True, max_length=L)

        def pad_fn(batch):
            ids = [x + [tok.pad_token_id] * (L - len(x)) for x in batch["input_ids"]]
            att = [[1] * len(x) + [0] * (L - len(x)) for x in batch["input_ids"]]
            labels = [x + [-100] * (L - len(x)) for x in batch["input_ids"]]
            return {"input_ids": ids, "attention_mask": att, "labels": labels}

        t0 = time.perf_counter()
        t = ds.map(tok_fn, batched=True, num_proc=num_proc, remove_columns=ds.column_names,
                   cache_file_name=str(out / f"{task.name}-tok.arrow"))
        t_tok += time.perf_counter() - t0
        lengths += [len(x) for x in t["input_ids"]]
        p = t.map(pad_fn, batched=True, num_proc=num_proc, cache_file_name=str(out / f"{task.name}-pad.arrow"))
        p.save_to_disk(str(out / task.name))
    return int(sum(lengths)), lengths, t_tok


def padding_efficiency(lengths: np.ndarray, batch: int, seed: int = 0) -> float:
    """Real tokens / padded slots when shuffled samples are batched and padded to each batch's longest."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    lens = lengths[order]
    n = len(lens) // batch * batch
    b = lens[:n].reshape(-1, batch)
    return float(b.sum() / (b.max(axis=1) * batch).sum())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/prep/glue.yaml"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-proc", type=int, default=1)
    args = ap.parse_args()
    datasets.disable_progress_bars()
    work = Path(tempfile.mkdtemp(prefix="bench-prep-", dir=ROOT / "bench"))
    try:
        cfg = load_config(PrepConfig, args.config, [f"num_proc={args.num_proc}", "eval.fraction=0",
                                                    f"output_dir={work / 'ours'}"])
        tok = make_tokenizer(cfg, work / "tokenizer")  # trained once, used by both sides
        cfg = load_config(PrepConfig, args.config, [
            f"num_proc={args.num_proc}", "eval.fraction=0", f"output_dir={work / 'ours'}",
            f"tokenizer.path={work / 'tokenizer'}", "tokenizer.train_sentencepiece=null"])
        ours_t, base_t, tok_t = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = run_prep(cfg, force=True)
            ours_t.append(time.perf_counter() - t0)
            bdir = work / "baseline"
            shutil.rmtree(bdir, ignore_errors=True)
            bdir.mkdir()
            t0 = time.perf_counter()
            base_tokens, lengths, t_tok = baseline(cfg, tok, bdir, args.num_proc)
            base_t.append(time.perf_counter() - t0)
            tok_t.append(t_tok)
        m = json.loads((out / "manifest.json").read_text())
        ours_tokens = m["num_tokens"]
        lens = np.asarray(lengths)
        res = {
            "device": f"{platform.processor() or platform.machine()}, {args.num_proc} procs",
            "tasks": list(m["tasks"]), "max_seq_len": cfg.max_seq_len, "samples": int(len(lens)),
            "real_tokens": {"ours": ours_tokens, "baseline": base_tokens},
            "efficiency": {
                "ours_packed": m["packing_efficiency"],
                "pad_to_batch_max_B8": round(padding_efficiency(lens, 8), 4),
                "pad_to_batch_max_B32": round(padding_efficiency(lens, 32), 4),
                "pad_to_max_seq_len": round(float(lens.sum() / (len(lens) * cfg.max_seq_len)), 4),
            },
            "seconds": {"ours": round(min(ours_t), 2), "baseline": round(min(base_t), 2),
                        "baseline_tokenize_map_only": round(min(tok_t), 2)},
            "tokens_per_s": {"ours": round(ours_tokens / min(ours_t)), "baseline": round(base_tokens / min(base_t)),
                             "baseline_tokenize_map_only": round(base_tokens / min(tok_t))},
        }
        res["speedup"] = round(res["tokens_per_s"]["ours"] / res["tokens_per_s"]["baseline"], 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    e, s = res["efficiency"], res["tokens_per_s"]
    print(f"\nGLUE mix ({', '.join(res['tasks'])}), {res['samples']} samples, max_seq_len {res['max_seq_len']}, "
          f"{args.num_proc} procs, best of {args.repeats}")
    print(f"{'':34}{'ours (pack)':>14}{'baseline (pad)':>16}")
    print(f"{'efficiency, batch max B=8':34}{e['ours_packed']:>14.4f}{e['pad_to_batch_max_B8']:>16.4f}")
    print(f"{'efficiency, batch max B=32':34}{e['ours_packed']:>14.4f}{e['pad_to_batch_max_B32']:>16.4f}")
    print(f"{'efficiency, pad to max_seq_len':34}{e['ours_packed']:>14.4f}{e['pad_to_max_seq_len']:>16.4f}")
    print(f"{'prep seconds':34}{res['seconds']['ours']:>14.2f}{res['seconds']['baseline']:>16.2f}")
    print(f"{'prep real tokens/s':34}{s['ours']:>14,}{s['baseline']:>16,}")
    print(f"{'speed-up':34}{res['speedup']:>14.2f}x")
    print(f"(baseline's tokenize map alone, no pad/save: {s['baseline_tokenize_map_only']:,} tokens/s; "
          f"ours does the full stage, write included)")
    out_file = ROOT / "bench/results/prep.json"
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
