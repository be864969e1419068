"""Host memory of the trainer's data start-up against the data's size: O(rows), not O(tokens).

    python bench/loader_memory.py [--tokens 20000000,200000000] [--quick]

For each size, a synthetic packed train split (rows of 512 tokens, 8 samples of 64 tokens each, 5 tasks drawn at
random per sample, the prep stage's column types) is written once, then a fresh process builds the trainer's own
data object (`pipeline.train.data.TrainData`: memory-mapped rows, per-row task counts, the task sampler) and draws
its first 100 micro-batches. Its anonymous resident memory (RssAnon: what the process owns, not the page cache of
the memory-mapped columns) is sampled every millisecond; the peak above the process's state before start-up is the
figure, beside what one int64 task id per token would take. Writes bench/results/loader_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.atomic import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ROW, SAMPLE, TASKS, PROMPT = 512, 64, 5, 56  # tokens per row, per sample; tasks; prompt tokens per sample


def write_split(data_dir: Path, tokens: int, seed: int = 0) -> dict:
    """A packed train split of `tokens` tokens (whole rows) and its manifest, in the prep stage's format."""
    import datasets
    import numpy as np
    import pyarrow as pa

    rows, per_row = max(1, tokens // ROW), ROW // SAMPLE
    n_samples, n_tokens = rows * per_row, rows * ROW
    rng = np.random.default_rng(seed)
    sample_task = rng.integers(0, TASKS, n_samples, dtype=np.int16)
    ids = rng.integers(3, 1000, n_tokens, dtype=np.int32)
    in_sample = np.tile(np.arange(SAMPLE, dtype=np.int32), n_samples)
    labels = np.where(in_sample >= PROMPT, ids, np.int32(-100)).astype(np.int32)

    def lists(values, width):
        return pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, width, dtype=np.int32)), pa.array(values))

    table = pa.table({
        "input_ids": lists(ids, ROW), "labels": lists(labels, ROW), "position_ids": lists(in_sample, ROW),
        "task_ids": lists(np.repeat(sample_task, SAMPLE), ROW),
        "prompt_mask": lists((in_sample < PROMPT).astype(np.int8), ROW),
        "seq_lens": lists(np.full(n_samples, SAMPLE, dtype=np.int32), per_row)})
    del ids, labels, in_sample
    datasets.Dataset(table).save_to_disk(str(data_dir / "train"), num_shards=max(1, n_tokens // 50_000_000))
    counts = np.bincount(sample_task, minlength=TASKS)
    manifest = {"format_version": 2, "max_seq_len": ROW, "max_token_id": 999, "num_sequences": rows,
                "num_tokens": n_tokens, "splits": {"train": {"num_samples": n_samples, "num_sequences": rows,
                                                             "num_tokens": n_tokens}},
                "tasks": {f"task{t}": {"id": t, "examples": int(counts[t])} for t in range(TASKS)},
                "sampling": {"temperature": 2.0, "caps": {}, "weights": {}}, "tokenizer": {"path": "tokenizer"}}
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return {"rows": rows, "samples": n_samples, "tokens": n_tokens}


def measure(data_dir: Path) -> dict:
    """Runs in a fresh process: peak RssAnon growth while TrainData starts and serves 100 micro-batches."""
    import threading
    import time

    import torch

    from pipeline.config import load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train.data import TrainData
    from pipeline.train.distributed import DistInfo

    def rss_anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    cfg = load_config(TrainConfig, data={"output_dir": str(data_dir / "run"), "model": {"path": str(data_dir)},
                                         "data": {"dir": str(data_dir), "temperature": 2.0},
                                         "optim": {"micro_batch_size": 2}})
    before, peak, done = rss_anon(), [0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.001)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    data = TrainData(cfg, [f"task{t}" for t in range(TASKS)], DistInfo(0, 0, 1, torch.device("cpu")), torch.float32)
    startup = time.perf_counter() - t0
    for _ in range(100):
        data.next_train_batch()
    done.set()
    watcher.join()
    peak[0] = max(peak[0], rss_anon())
    return {"startup_s": startup, "peak_anon_growth_bytes": peak[0] - before, "rows_in_sampler": len(data.sampler.counts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="20000000,200000000", help="comma-separated data sizes in tokens")
    ap.add_argument("--quick", action="store_true", help="2M and 8M tokens (the test)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the fresh measuring process
    ap.add_argument("--out", default=str(RESULTS / "loader_memory.json"))
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return
    sizes = [2_000_000, 8_000_000] if args.quick else [int(float(s)) for s in args.tokens.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="loader-memory-") as tmp:
        for tokens in sizes:
            data_dir = Path(tmp) / f"d{tokens}"
            shape = write_split(data_dir, tokens)
            proc = subprocess.run([sys.executable, __file__, "--measure", str(data_dir)], cwd=ROOT,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"measuring {tokens:,} tokens failed:\n{proc.stderr[-3000:]}")
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {**shape, **m, "int64_task_id_per_token_bytes": 8 * shape["tokens"],
                   "bytes_per_row": m["peak_anon_growth_bytes"] / shape["rows"]}
            results.append(row)
            print(f"[loader_memory] {shape['tokens']:,} tokens, {shape['rows']:,} rows: start-up {m['startup_s']:.2f} s, "
                  f"peak anonymous memory +{m['peak_anon_growth_bytes'] / 2**20:,.1f} MiB "
                  f"(one int64 per token: {8 * shape['tokens'] / 2**20:,.0f} MiB)", flush=True)
            shutil.rmtree(data_dir)
    out = {"command": "python bench/loader_memory.py" + (" --quick" if args.quick else f" --tokens {args.tokens}"),
           "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
           "layout": {"row_tokens": ROW, "sample_tokens": SAMPLE, "tasks": TASKS, "micro_batch_size": 2,
                      "batches_drawn": 100},
           "sizes": results}
    atomic_write(args.out, json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
