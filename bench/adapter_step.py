"""Forward + backward of one step, side by side in one run, on a Llama-like model (fp32, CPU by default):

- base:  the frozen model alone (gradient to the input only, so the backward runs through every layer)
- more:  MoRE on all 7 linears, a mixed-task batch (per-token task ids), gates training (no warm-up)
- peft:  PEFT LoRA, same targets, r = max_rank
- loop:  MoRE run the reference's way, one task per forward/backward over the same rows

Medians over repeats (variants interleaved in each round). Prints ratios and writes bench/results/adapter_step.json.
Goals: more / peft <= 1.00, more / base <= 1.20.

    .venv/bin/python bench/adapter_step.py            # d=1024, 4 layers, 8 x 512 tokens, rank 8
    .venv/bin/python bench/adapter_step.py --quick    # small shapes, seconds
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config.more import MoreConfig  # noqa: E402
from pipeline.models.tiny import tiny_llama_config  # noqa: E402
from pipeline.more import inject  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    cfg = tiny_llama_config(args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                            num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64,
                            intermediate_size=args.ffn, max_position_embeddings=max(2048, args.seq))
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "adapter_step.json"))
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.ffn, args.layers, args.batch, args.seq, args.repeats = 256, 512, 2, 4, 128, 3
    torch.set_num_threads(args.threads)

    base_model = build(args).train()
    for p in base_model.parameters():
        p.requires_grad_(False)
    more_cfg = MoreConfig(max_rank=args.rank, alpha=2.0 * args.rank, selector_warmup_steps=0,
                          contrastive=dict(weight=0.0))
    more = inject(copy.deepcopy(base_model), more_cfg, [f"t{i}" for i in range(args.tasks)]).train()
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                        target_modules=LINEARS, lora_dropout=0.0))
    peft_model.train()
    with torch.no_grad():  # non-zero B so no path is trivially skipped
        for l in more.layers.values():
            l.lora_B.normal_(0, 0.01)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)

    g = torch.Generator().manual_seed(0)
    B, L = args.batch, args.seq
    ids = torch.randint(3, args.vocab, (B, L), generator=g)
    row_task = torch.arange(B) % args.tasks  # one task per row: the same rows serve the mixed and the loop runs
    task_ids = row_task[:, None].expand(B, L).contiguous()
    embed = base_model.get_input_embeddings()

    def loss_of(logits):
        return logits.float().square().mean()

    def run_base():
        x = embed(ids).detach().requires_grad_(True)
        loss_of(base_model(inputs_embeds=x, use_cache=False).logits).backward()

    def run_more():
        loss_of(more(input_ids=ids, task_ids=task_ids).logits).backward()

    def run_peft():
        loss_of(peft_model(input_ids=ids, use_cache=False).logits).backward()

    def run_loop():
        for t in range(args.tasks):
            rows = (row_task == t).nonzero().squeeze(1)
            if rows.numel():
                (loss_of(more(input_ids=ids[rows], task_ids=t).logits) * rows.numel() / B).backward()

    variants = {"base": run_base, "more": run_more, "peft": run_peft, "loop": run_loop}
    times = {k: [] for k in variants}
    for f in variants.values():  # warm-up
        f()
    for r in range(args.repeats):
        for k, f in variants.items():
            more.zero_grad(set_to_none=True)
            peft_model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {"more/base": med["more"] / med["base"], "more/peft": med["more"] / med["peft"],
              "peft/base": med["peft"] / med["base"], "loop/base": med["loop"] / med["base"],
              "loop/more": med["loop"] / med["more"]}
    goals = {"more/peft <= 1.00": ratios["more/peft"] <= 1.00, "more/base <= 1.20": ratios["more/base"] <= 1.20}
    print("median seconds: " + "  ".join(f"{k} {v:.3f}" for k, v in med.items()))
    print("ratios: " + "  ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print("goals: " + "  ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in goals.items()))
    result = dict(shape=dict(hidden=args.hidden, ffn=args.ffn, layers=args.layers, vocab=args.vocab, batch=B, seq=L,
                             rank=args.rank, tasks=args.tasks, dtype="fp32"),
                  threads=args.threads, repeats=args.repeats, seconds=times, median_seconds=med, ratios=ratios,
                  goals=goals, torch=torch.__version__, machine=platform.processor() or platform.machine(),
                  when=time.strftime("%Y-%m-%d %H:%M:%S"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
