"""Training tokens/s of packed vs padded batches on the GLUE mix, side by side in one run.

Why: packing (bench/prep.py: efficiency ~0.996) only pays if the packed step - rows of max_seq_len with a
block-diagonal causal mask, so attention runs over the whole row - is not slower per useful token than the
padded step it replaces. This measures one training step (forward, LM loss + MoRE's contrastive loss, backward,
AdamW) of a small Llama with MoRE on the SAME samples in both layouts:

- packed: B prepared rows per step (`PackedDataset` + `PackedCollator`: additive block-diagonal causal mask,
  rows padded to the batch's longest row).
- padded: the samples of those rows (rows split at `seq_lens`), shuffled, one sample per row padded to the
  batch's longest, with a plain HF attention_mask (labels -100 on padding). Batches are filled greedily while
  samples x longest <= B x max_seq_len, so a padded step holds at most as many slots as a packed one.

Reported: real (non-pad) and supervised tokens per second over the whole sample set for each layout (median of
--repeats passes, the two layouts interleaved and alternating which goes first), their ratio packed / padded,
and each layout's efficiency (real tokens / padded slots). fp32, CPU, --threads torch threads. A check that both
layouts do the same work: the first packed step's samples give the same LM loss sum padded (rel. diff < 1e-4).
The data is the GLUE mix of configs/prep/glue.yaml, prepared in --data if missing or stale (as data_prep does).

    .venv/bin/python bench/packing.py            # 48 rows (24k tokens), d=256, 4 layers: ~2 min (2 idle cores)
    .venv/bin/python bench/packing.py --quick    # 8 rows, d=128, 2 layers: seconds
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config.base import load_config  # noqa: E402
from pipeline.config.more import MoreConfig  # noqa: E402
from pipeline.config.prep import PrepConfig  # noqa: E402
from pipeline.data.loader import PackedCollator, PackedDataset, split_samples  # noqa: E402
from pipeline.data.prep import run_prep  # noqa: E402
from pipeline.models.tiny import tiny_llama_config  # noqa: E402
from pipeline.more import inject  # noqa: E402
from pipeline.train.loss import lm_loss_sums  # noqa: E402


def prepared_glue(data_dir: Path) -> PackedDataset:
    """The GLUE mix as `python -m data_prep --config configs/prep/glue.yaml` writes it (reused when up to date)."""
    with contextlib.chdir(ROOT):  # the config's source paths (and so its cache key) are relative to the repo root
        cfg = load_config(PrepConfig, "configs/prep/glue.yaml", [f"output_dir={data_dir}"])
        return PackedDataset(run_prep(cfg), "train")


def padded_batches(samples: list[dict], slots: int, collate: PackedCollator) -> list[dict]:
    """Samples in the given order, greedily batched while count x longest <= slots; a plain 2-D attention_mask."""
    groups, cur, longest = [], [], 0
    for s in samples:
        n = len(s["input_ids"])
        if cur and (len(cur) + 1) * max(longest, n) > slots:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(s)
        longest = max(longest, n)
    groups.append(cur)
    batches = []
    for g in groups:
        b = collate(g)
        b["attention_mask"] = (b["segment_ids"] >= 0).long()  # HF padding mask; the model adds the causal part
        batches.append(b)
    return batches


def stats(batches: list[dict]) -> dict:
    real = sum(int((b["segment_ids"] >= 0).sum()) for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    sup = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    return dict(steps=len(batches), real_tokens=real, supervised_tokens=sup, slots=slots,
                efficiency=round(real / slots, 4), rows_per_step=round(statistics.mean(
                    b["input_ids"].shape[0] for b in batches), 2),
                mean_padded_len=round(statistics.mean(b["input_ids"].shape[1] for b in batches), 1))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT / "data/built/glue"), help="prepared GLUE mix (made if missing)")
    ap.add_argument("--rows", type=int, default=48, help="packed rows measured (a fixed random subset)")
    ap.add_argument("--batch", type=int, default=4, help="packed rows per step (padded: <= batch x max_seq_len slots)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="8 rows, d=128, 2 layers, 2 repeats")
    ap.add_argument("--out", default=str(ROOT / "bench/results/packing.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.hidden, args.layers, args.repeats = 8, 128, 2, 2
    torch.set_num_threads(args.threads)

    data = prepared_glue(Path(args.data))
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(data.tokenizer_path)
    L = data.manifest["max_seq_len"]
    rng = np.random.default_rng(args.seed)
    rows = [data[int(i)] for i in rng.choice(len(data), size=min(args.rows, len(data)), replace=False)]
    collate = PackedCollator(dtype=torch.float32, pad_token_id=tok.pad_token_id)
    samples = [s for r in rows for s in split_samples(r)]
    samples = [samples[i] for i in rng.permutation(len(samples))]  # a padded loader shuffles samples
    layouts = {"packed": [collate(rows[i:i + args.batch]) for i in range(0, len(rows), args.batch)],
               "padded": padded_batches(samples, args.batch * L, collate)}
    info = {k: stats(v) for k, v in layouts.items()}
    assert info["packed"]["real_tokens"] == info["padded"]["real_tokens"], info  # the same samples

    torch.manual_seed(args.seed)
    cfg = tiny_llama_config(len(tok), hidden_size=args.hidden, num_layers=args.layers,
                            num_heads=max(1, args.hidden // 64), num_kv_heads=max(1, args.hidden // 128),
                            max_position_embeddings=max(2048, L))
    cfg._attn_implementation = "sdpa"  # what training uses (configs: model.attn_implementation)
    model = inject(LlamaForCausalLM(cfg), MoreConfig(max_rank=args.rank, target_modules="all-linear",
                                                     selector_warmup_steps=0), data.task_names).train()
    opt = torch.optim.AdamW(model.param_groups(lr=1e-4))

    def forward(b):
        out = model(**{k: b[k] for k in ("input_ids", "attention_mask", "position_ids", "task_ids", "segment_ids",
                                         "prompt_mask")})
        return out, lm_loss_sums(out.logits, b["labels"], b["task_ids"], len(data.task_names), b["position_ids"])

    with torch.no_grad():  # same work: the first packed step's samples have the same LM loss sum when padded
        first = layouts["packed"][0]
        n = int(first["segment_ids"].max()) + 1
        ce_packed = float(forward(first)[1].total)
        ce_padded = sum(float(forward(b)[1].total) for b in padded_batches(
            [s for r in rows[:args.batch] for s in split_samples(r)], args.batch * L, collate))
    rel = abs(ce_packed - ce_padded) / abs(ce_padded)
    assert n > 1 and rel < 1e-4, (n, ce_packed, ce_padded)

    def step(b):
        out, s = forward(b)
        loss = s.total / s.tokens.clamp(min=1)
        (loss if out.aux_loss is None else loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for v in layouts.values():  # warm-up: one step of each
        step(v[0])
    seconds = {k: [] for k in layouts}
    for r in range(args.repeats):
        for k in (("packed", "padded") if r % 2 == 0 else ("padded", "packed")):
            t0 = time.perf_counter()
            for b in layouts[k]:
                step(b)
            seconds[k].append(time.perf_counter() - t0)
        print(f"pass {r + 1}/{args.repeats}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in seconds.items()),
              flush=True)
    for k, v in info.items():
        med = statistics.median(seconds[k])
        v.update(seconds=[round(x, 3) for x in seconds[k]], median_seconds=round(med, 3),
                 tokens_per_s=round(v["real_tokens"] / med, 1),
                 supervised_tokens_per_s=round(v["supervised_tokens"] / med, 1))
    p, q = info["packed"], info["padded"]
    res = {
        "command": " ".join(["python bench/packing.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": dict(data=os.path.relpath(data.data_dir, ROOT), cache_key=data.manifest["cache_key"],
                         tasks=data.task_names, max_seq_len=L, rows=len(rows), samples=len(samples),
                         batch_rows=args.batch, padded_slots_per_step=args.batch * L, hidden=args.hidden,
                         layers=args.layers, vocab=len(tok), rank=args.rank, target_modules="all-linear", dtype="fp32",
                         attn="sdpa", step="forward + LM loss + contrastive + backward + AdamW",
                         threads=args.threads, repeats=args.repeats, seed=args.seed),
        "layouts": info,
        "loss_check": dict(samples=n, lm_loss_sum_packed=ce_packed, lm_loss_sum_padded=ce_padded, rel_diff=rel),
        "prep_packing_efficiency": data.manifest["packing_efficiency"],
        "ratio_packed_over_padded": round(p["tokens_per_s"] / q["tokens_per_s"], 3),
        "goal_efficiency_met": data.manifest["packing_efficiency"] >= 0.98 and p["efficiency"] >= 0.98,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"\nGLUE mix, {len(rows)} rows = {len(samples)} samples, {p['real_tokens']:,} tokens; d={args.hidden}, "
          f"{args.layers} layers, MoRE r{args.rank}, fp32, {args.threads} threads, median of {args.repeats}")
    print(f"{'':22}{'steps':>7}{'rows/step':>11}{'mean len':>10}{'efficiency':>12}{'tokens/s':>11}{'sup. tok/s':>12}")
    for k, v in info.items():
        print(f"{k:22}{v['steps']:>7}{v['rows_per_step']:>11}{v['mean_padded_len']:>10}{v['efficiency']:>12.4f}"
              f"{v['tokens_per_s']:>11,.0f}{v['supervised_tokens_per_s']:>12,.1f}")
    print(f"packed / padded tokens/s: {res['ratio_packed_over_padded']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
