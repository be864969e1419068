"""Regenerate bench/RESULTS.md from bench/results/*.json (what `make bench` just measured).

Each section is rendered only from its JSON file; a benchmark that has not been run is listed as missing.
Hand-measured notes that `make bench` does not produce live in bench/NOTES.md only (RESULTS.md links to it).
"""
from __future__ import annotations

import json
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _load(name: str):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else None


def _versions() -> str:
    import importlib.metadata as md

    pkgs = ["torch", "deepspeed", "transformers", "datasets", "bitsandbytes", "peft"]
    return ", ".join(f"{p} {md.version(p)}" for p in pkgs)


def prep(r) -> list[str]:
    e, t = r["efficiency"], r["tokens_per_s"]
    return [
        "## Prep: packing and throughput (`python bench/prep.py`)",
        f"GLUE mix ({', '.join(r['tasks'])}), {r['samples']:,} samples, max_seq_len {r['max_seq_len']}.",
        "",
        "| | ours (packed) | padded to batch max, B=8 | B=32 | padded to max_seq_len |",
        "|---|---|---|---|---|",
        f"| packing efficiency | **{e['ours_packed']:.4f}** | {e['pad_to_batch_max_B8']:.4f} | "
        f"{e['pad_to_batch_max_B32']:.4f} | {e['pad_to_max_seq_len']:.4f} |",
        "",
        f"Prep tokens/s: ours {t['ours']:,} vs `datasets.map(tokenize)` + pad baseline {t['baseline']:,}: "
        f"**{r['speedup']:.2f}×** (goal ≥ 2×; efficiency goal ≥ 0.98).",
    ]


def packing(r) -> list[str]:
    s, lay = r["settings"], r["layouts"]
    return [
        "## Packing: training tokens/s, packed vs padded (`" + r["command"] + "`)",
        f"The same {s['samples']:,} GLUE samples ({s['rows']} packed rows of <= {s['max_seq_len']}) in both layouts; "
        f"one step = {s['step']}; tiny Llama d={s['hidden']}, {s['layers']} layers, MoRE r{s['rank']} all-linear, "
        f"{s['dtype']}, {s['threads']} threads, median of {s['repeats']} interleaved passes. Packed: {s['batch_rows']} "
        f"rows per step, block-diagonal mask; padded: shuffled samples, one per row, <= {s['padded_slots_per_step']} "
        "slots per step, HF attention_mask.",
        "",
        "| layout | steps | efficiency | tokens/s | supervised tokens/s |",
        "|---|---|---|---|---|",
        *[f"| {k} | {v['steps']} | {v['efficiency']:.4f} | {v['tokens_per_s']:,.0f} | "
          f"{v['supervised_tokens_per_s']:,.1f} |" for k, v in lay.items()],
        "",
        f"Packed / padded training tokens/s = **{r['ratio_packed_over_padded']:.2f}×**; packed efficiency "
        f"{lay['packed']['efficiency']:.4f} (goal ≥ 0.98).",
    ]


def adapter_step(r) -> list[str]:
    s, ra = r["shape"], r["ratios"]
    return [
        "## Adapter step: forward + backward (`python bench/adapter_step.py`)",
        f"d={s['hidden']}, ffn {s['ffn']}, {s['layers']} layers, {s['batch']}×{s['seq']} tokens, rank {s['rank']}, "
        f"{s['tasks']} tasks, {s['dtype']}, {r['threads']} threads, median of {r['repeats']}.",
        "",
        "| variant | median s | / frozen base |",
        "|---|---|---|",
        *[f"| {k} | {v:.2f} | {v / r['median_seconds']['base']:.2f} |" for k, v in r["median_seconds"].items()],
        "",
        f"MoRE / PEFT LoRA = **{ra['more/peft']:.2f}** (goal ≤ 1.00); MoRE / frozen base = **{ra['more/base']:.2f}** "
        "(goal ≤ 1.20).",
    ]


def train_throughput(r) -> list[str]:
    rows = {(x["ranks"], x["quantization"]): x for x in r["rows"]}
    dtype = r["rows"][0]["dtype"]
    lines = ["## Training throughput, ZeRO-3 on CPU (`" + r["command"].strip() + "`)",
             f"Global batch of {r['rows'][0]['tokens_per_step']:.0f} tokens per step, {dtype}; "
             "median tokens/s over steps after the first two. The unquantized base runs in fp32, not bf16: "
             "bf16 matmuls are ~10× slower on this AVX2-only CPU (measured), which would time the CPU, not the "
             "pipeline; GPU rows need a GPU (none was lent).", "",
             "| base | 1 rank tok/s | 2 ranks tok/s | scaling efficiency |", "|---|---|---|---|"]
    for q in ("nf4", "none"):
        lines.append(f"| {q} | {rows[(1, q)]['tokens_per_s']:,.0f} | {rows[(2, q)]['tokens_per_s']:,.0f} | "
                     f"{r['scaling_efficiency'][q]:.2f} |")
    return lines


def lm_head(r) -> list[str]:
    t, sec = r["tokens_per_s"], r["seconds_per_pass"]
    return [
        "## LM head at supervised positions only vs every position (`" + r["command"] + "`)",
        f"{r['model']}, NF4 base + MoRE on all linears, fp32; one training step (forward, LM + contrastive loss, "
        f"backward) on {r['rows_per_step']} packed GLUE rows of {r['seq_len']} tokens "
        f"({r['real_tokens_per_pass']} real, {r['supervised_tokens_per_pass']} supervised tokens per pass of "
        f"{r['steps_per_pass']} steps), the two paths interleaved, median of {r['repeats']}; {r['threads']} threads, "
        f"CPU flags: {' '.join(r['cpu_flags'])}.", "",
        "| LM head | s per pass | real tokens/s |", "|---|---|---|",
        f"| every position (full logits) | {sec['full_logits']:.1f} | {t['full_logits']:.0f} |",
        f"| supervised positions only (what the trainer uses) | {sec['supervised_only']:.1f} | "
        f"{t['supervised_only']:.0f} |", "",
        f"Speed-up **{r['speedup_supervised_vs_full']:.2f}×**; the LM loss sums of both paths agree (rel. 1e-5).",
    ]


def merge(r) -> list[str]:
    s = r["shape"]
    lines = ["## Merge: seconds and peak memory per task (`python bench/merge.py`)",
             f"Llama-shaped model, {s['params'] / 1e6:.0f}M params ({s['base_checkpoint_bytes'] / 2**20:.0f} MiB "
             f"checkpoint, largest tensor {s['largest_tensor_fp32_bytes'] / 2**20:.0f} MiB in fp32), "
             f"shards of {r['max_shard_size']}.", "",
             "| merge | base | target | out dtype | task | seconds | peak RSS MiB (process before: MiB) |",
             "|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['merge']} | {x['base']} | {x['target']} | {x['dtype']} | {x['task']} | {x['seconds']:.2f} | "
                     f"{x['peak_rss_mb']:.0f} ({x['rss_base_mb']:.0f}) |")
    if any(x["merge"] == "in_memory" for x in r["rows"]):  # runs from before the in-memory merge was removed
        lines += ["", "`in_memory`: the former in-memory merge (whole base model loaded, then merged), measured in "
                      "this run for comparison and removed since; `stream` is the merge `launch/merge.py` runs."]
    return lines


def fidelity(r) -> list[str]:
    md = RESULTS / "fidelity.md"
    head = ["## Method fidelity: does the rank selector choose well? (`" + r.get("command", "python bench/fidelity.py")
            + "`)"]
    return head + ([md.read_text().strip()] if md.is_file() else ["(table missing: run bench/fidelity.py)"])


REPRODUCE = """## Paper scale

The GLUE table above is a 135M model on a few hundred thousand tokens; the paper's numbers need pretrained 7B
weights, which this environment cannot download. With Llama-2-7B weights, hub access and 8 GPUs, the paper's GLUE
setting (8 tasks; the paper reports a GLUE average of 88.8 for MoRE vs 87.8 for LoRA on Llama-2-7B) is:

    python -m data_prep --config configs/prep/glue8-hub.yaml
    deepspeed --num_gpus 8 launch/train.py --deepspeed ds_configs/zero3.json --config configs/train/llama2-7b-glue-paper.yaml
    python launch/merge.py --adapter runs/llama2-7b-glue-paper/adapter --out runs/llama2-7b-glue-paper/merged --dtype bf16
    python launch/evaluate.py --model runs/llama2-7b-glue-paper/merged --config configs/prep/glue8-hub.yaml \\
        --baseline meta-llama/Llama-2-7b-hf --out runs/llama2-7b-glue-paper/eval

and `bench/glue_variants.py`'s overrides (`more.expert_ranks=[8]`, `data.tasks=[t]`, `more.selector_frozen=true
more.gate_init=random` or `max_rank`) give the other variants."""


def glue_variants(r) -> list[str]:
    s, names, V = r["settings"], r["tasks"], r["variants"]
    variants = [v for v in V if V[v]]
    seeds = [str(x) for x in s["seeds"]]
    have = {v: [x for x in seeds if x in V[v]] for v in variants}  # a run may add seeds variant by variant

    def spread(values: list[float]) -> str:
        mean = sum(values) / len(values)
        return f"{mean:.3f}" + (f" ({', '.join(f'{v:.3f}' for v in values)})" if len(values) > 1 else "")

    def mean_score(rec) -> float:
        return sum(rec["scores"][t]["score"] for t in names) / len(names)

    metric = {t: " / ".join(r["baseline"][t]["metrics"]) for t in names}
    lines = [f"## MoRE vs LoRA on a real LLM: GLUE (`{r['command']}`)",
             f"{s['model']} (NF4 base, chat-template prompts), tasks packed per task into rows of {s['row_len']}; "
             f"every variant trains on ~{s['tokens_budget']:,} real tokens ({s['steps']} steps of {s['rows_per_step']} "
             f"rows; per-task LoRA: {', '.join(f'{t} {n}' for t, n in s['per_task_steps'].items())} steps), "
             f"{s['train_config']}, seeds {', '.join(seeds)}; {s['cpu_threads']} CPU threads. Validation: up to "
             f"{s['max_examples']} examples per task (mnli: validation_mismatched), scored by `launch/evaluate.py "
             f"--adapter`. Cells: the task score (its metrics' mean) averaged over seeds, each seed's in brackets. "
             f"Variants' wall time (training, evaluation, routing) {r['wall_seconds'] / 60:.0f} min.", "",
             "| task | metric | zero-shot | " + " | ".join(variants) + " |", "|---|---|---|" + "---|" * len(variants)]
    for t in names:
        lines.append(f"| {t} | {metric[t]} | {r['baseline'][t]['score']:.3f} | " + " | ".join(
            spread([V[v][x]["scores"][t]["score"] for x in have[v]]) for v in variants) + " |")
    zero = sum(r["baseline"][t]["score"] for t in names) / len(names)
    means = {v: [mean_score(V[v][x]) for x in have[v]] for v in variants}
    lines += [f"| **mean** | | **{zero:.3f}** | " + " | ".join(f"**{spread(means[v])}**" for v in variants) + " |", "",
              "| variant | seeds | LoRA A/B params | selector params | real training tokens | train s (incl. load) | CPU |",
              "|---|---|---|---|---|---|---|"]
    for v in variants:
        rec = V[v][have[v][0]]
        sel = f"{rec['params']['selector']:,}" if v.startswith("more") else "(unused)"
        lines.append(f"| {v} | {', '.join(have[v])} | {rec['params']['lora']:,} | {sel} | {rec['tokens']:,} | "
                     f"{sum(V[v][x]['train_seconds'] for x in have[v]) / len(have[v]):.0f} | "
                     + ", ".join(sorted({V[v][x].get("cpu", "not recorded") for x in have[v]})) + " |")
    lines += ["", "Final rank maps: per task, the mean chosen rank and the share of layers at max rank "
              f"({s['max_rank']}); `same rank`: the share of layers where two tasks chose the same rank (min–max over "
              "task pairs; 1.00 = one shared LoRA in effect).", "",
              "| variant | seed | " + " | ".join(names) + " | same rank |", "|---|---|" + "---|" * (len(names) + 1)]
    for v in [v for v in ("more", "more_frozen") if v in variants]:
        for x in have[v]:
            st = V[v][x]["rank_stats"]
            same = list(st["same_rank"].values())
            lines.append(f"| {v} | {x} | " + " | ".join(
                f"{st['mean_rank'][t]:.1f} ({st['at_max_rank'][t]:.0%})" for t in names)
                + f" | {min(same):.2f}–{max(same):.2f} |")
    if "more" in variants:
        rec = [V["more"][x] for x in have["more"]]
        lines += ["", f"Zero-shot routing (`launch/evaluate.py --routing`, no task id given; {s['routing_examples']} "
                  "examples per task): accuracy of the routed task, and the task score with the routed adapter.", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
                  "| routing accuracy | " + " | ".join(spread([x["routing_accuracy"][t] for x in rec]) for t in names)
                  + " |",
                  "| score, routed | " + " | ".join(spread([x["routed_scores"][t] for x in rec]) for t in names) + " |"]
        stem = "glue_variants" + ("_quick" if "--quick" in r["command"] else "")
        maps = [(f"MoRE (learned), seed {x}", f"{stem}_more_seed{x}.png") for x in have["more"]]
        maps += [(f"frozen selector, seed {x}", f"{stem}_more_frozen_seed{x}.png") for x in have.get("more_frozen", [])]
        maps = [(title, png) for title, png in maps if (RESULTS / png).is_file()]
        lines += ["", "Rank maps (a row per task, a column per adapted layer; colour = chosen rank): "
                  + ", then ".join(title for title, _ in maps) + "."]
        lines += [line for title, png in maps for line in ("", f"![{title} rank map](results/{png})")]
    goals = [("per_task_lora", ">=", "per-task LoRA"), ("shared_lora", ">", "shared LoRA"),
             ("more_frozen", ">", "frozen selector"), ("more_max_rank", ">", "the same adapter at max rank")]
    if "more" in variants and {"per_task_lora", "shared_lora", "more_frozen"} <= set(variants):
        said = []
        for v, op, label in [g for g in goals if g[0] in variants]:
            common = [x for x in have["more"] if x in have[v]]  # compare on the seeds both variants have
            if not common:
                continue
            ours, theirs = (sum(mean_score(V[k][x]) for x in common) / len(common) for k in ("more", v))
            ok = ours >= theirs if op == ">=" else ours > theirs
            said.append(f"{op} {label} ({ours:.3f} vs {theirs:.3f}, seed{'s' if len(common) > 1 else ''} "
                        f"{', '.join(common)}): {'yes' if ok else 'NO'}")
        lines += ["", "Goals, MoRE's mean " + "; ".join(said) + "."]
    return lines


def vs_trl(r) -> list[str]:
    label = {"ours_zero3_more": "this project, MoRE, ZeRO-3, 2 ranks (documented path)",
             "ours_zero3_lora": "this project, plain LoRA r8, ZeRO-3, 2 ranks",
             "ours_1p_more": "this project, MoRE, 1 process", "ours_1p_lora": "this project, plain LoRA r8, 1 process",
             "ours_1p_more_dense_mask": "this project, MoRE, 1 process, dense block-causal mask (before)",
             "ours_1p_more_fp32": "this project, MoRE, 1 process, fp32",
             "ours_1p_more_zero2": "this project, MoRE, 1 process, ZeRO-2 instead of ZeRO-3",
             "ours_zero3_more_eager_norms": "this project, MoRE, ZeRO-3, 2 ranks, eager RMSNorm (before)",
             "ours_zero3_more_eager_mlp": "this project, MoRE, ZeRO-3, 2 ranks, eager silu(gate) * up (before)",
             "ours_zero3_more_all_threads": "this project, MoRE, ZeRO-3, 2 ranks, each on all of torch's default "
                                            "threads (before the split)",
             "ours_zero3_more_compiled_rope": "this project, MoRE, ZeRO-3, 2 ranks, compiled rotary embedding",
             "ours_1p_more_compiled_rope": "this project, MoRE, 1 process, compiled rotary embedding",
             "ours_zero3_more_fresh_dequant": "this project, MoRE, ZeRO-3, 2 ranks, fresh NF4 dequantisation (before)",
             "ours_1p_more_fresh_dequant": "this project, MoRE, 1 process, fresh NF4 dequantisation (before)",
             "ours_zero3_more_pooled": "this project, MoRE, ZeRO-3, 2 ranks, CPU buffer pool on",
             "ours_1p_more_pooled": "this project, MoRE, 1 process, CPU buffer pool on",
             # runs of 2026-12-05 afternoon, when the pool was on by default: these rows are today's default
             "ours_zero3_more_fresh_outputs": "this project, MoRE, ZeRO-3, 2 ranks, CPU buffer pool off",
             "ours_1p_more_fresh_outputs": "this project, MoRE, 1 process, CPU buffer pool off",
             "ours_zero3_more_sharded_base": "this project, MoRE, ZeRO-3, 2 ranks, frozen base sharded (before)",
             "ours_1p_more_sharded_base": "this project, MoRE, 1 process, frozen base a ZeRO-3 parameter (before)",
             "ours_zero3_more_sdpa_attention": "this project, MoRE, ZeRO-3, 2 ranks, per-sample sdpa attention (before)",
             "ours_1p_more_sdpa_attention": "this project, MoRE, 1 process, per-sample sdpa attention (before)",
             "trl_padded": "TRL SFTTrainer + PEFT LoRA r8, padded micro-batches of 16",
             "trl_packed": "TRL SFTTrainer + PEFT LoRA r8, `packing=True` (samples not isolated: sdpa, no varlen kernel)",
             "trl_packed_compiled": "TRL, `packing=True`, `torch_compile=True` (compiles in its first step)"}
    v, S, R = r["versions"], r["systems"], r["ratios"]
    if any(n.endswith("_fresh_outputs") for n in S):  # the pool was on by default in these runs
        for n in ("ours_zero3_more", "ours_zero3_lora", "ours_1p_more"):
            label[n] += ", CPU buffer pool on (its default then)"
    if any(n.endswith("_sharded_base") for n in S):  # runs since the frozen base is whole on each rank by default
        for n in ("ours_zero3_more", "ours_zero3_lora", "ours_1p_more", "ours_1p_lora", "ours_1p_more_fp32"):
            label[n] += ", frozen base whole on each rank (default)"
    dtype = r.get("dtype", "fp32")  # runs before --dtype existed computed in fp32
    isa = r.get("cpu_isa") or ("AVX-512" if "avx512f" in r["cpu_flags"] else "AVX2")
    gpu = r.get("gpu")  # runs on a GPU: its name
    where = (f"{dtype} GEMM on the {gpu}, best of " if gpu else f"{dtype} GEMM, {r['cores']} cores, best of ")
    cpu = cpu_name(r.get("cpu_model"), isa)  # runs since 2026-12-07 name the model
    lines = [f"## Training throughput against TRL + PEFT, {gpu or cpu}, {dtype} (`" + r["command"] + "`)",
             f"{r['model']} on an NF4 base, {dtype} compute, gradient checkpointing off everywhere, the same GLUE "
             f"samples "
             f"(chat template, loss on the answer: {r['supervised_share']:.1%} of real tokens), about "
             f"{r['tokens_per_system']:,} real training tokens per system, rows of {r['row_len']}, "
             f"{r.get('rows_per_step', 2)} rows per optimizer step"
             + (f" (TRL packed: micro-batches of {r['trl_micro_rows']} row, accumulated)" if "trl_micro_rows" in r
                else "") + f"; rates over the "
             f"steps after the first {r['skip_steps']}; the systems ran one after another in the table's row order"
             + (f", {r['rounds']} rounds alternated (each rate over its steps of every round)" if r.get("rounds", 1) > 1
                else "") + ". "
             f"Matmul peak measured in the same run: "
             f"{r['matmul_peak_gflops']:.0f} GFLOP/s ({where}"
             f"{', '.join(r.get('matmul_peak_shapes', ['2048^3']))}); useful work "
             f"{r['useful_flops_per_token'] / 1e6:.0f} MFLOP per real token. trl {v['trl']}, peft {v['peft']}, "
             f"transformers {v['transformers']}, torch {v['torch']}; CPU flags: "
             f"{' '.join(r['cpu_flags'])}.", "",
             f"| system | steps | real tokens/s | × TRL's best | peak {r.get('memory', 'RSS per process')} (GB) "
             f"| share of matmul peak{' (MFU)' if gpu else ''} | s to the target loss |",
             "|---|---|---|---|---|---|---|"]
    best = max((x["tokens_per_s"] for n, x in S.items() if n.startswith("trl")), default=None)
    for n, x in S.items():
        ratio = f"{x['tokens_per_s'] / best:.2f}" if best else "–"
        to_loss = x.get("seconds_to_target_loss")  # runs before it was measured have none
        lines.append(f"| {label.get(n, n)} | {x['steps']} | {x['tokens_per_s']:.0f} | {ratio} | "
                     f"{x.get('peak_mem_gb', x.get('peak_rss_gb')):.2f} | {x['matmul_peak_share']:.1%} | "
                     f"{'–' if to_loss is None else f'{to_loss:.0f}'} |")
    if r.get("failed"):
        lines += ["", "Failed in this run (its log under the run's --work folder): " + ", ".join(
            label.get(n, n) for n in r["failed"])]
    if "target_loss" in r:
        lines += ["", f"Target loss {r['target_loss']:.3f}: the highest final held-out loss of any system (answer tokens "
                      f"of {r['eval_samples']} held-out samples, evaluated at step 0 and every {r['eval_every']} "
                      f"steps); seconds of training, evaluations not counted."]
    notes = []
    for path, what in (("zero3", "ZeRO-3, 2 ranks"), ("1p", "1 process")):
        if f"more_over_lora_time_{path}" in R:
            notes.append(f"MoRE / plain LoRA step time, {what}: **{R[f'more_over_lora_time_{path}']:.2f}** (goal ≤ 1.05)")
    if "packed_attention_speedup_1p" in R:
        notes.append(f"Per-sample attention (no mask) / dense block-causal mask, MoRE 1 process tokens/s: "
                     f"{R['packed_attention_speedup_1p']:.2f}")
    if "dtype_auto_speedup_1p" in R and dtype != "fp32":
        notes.append(f"{dtype} / fp32, MoRE 1 process tokens/s: {R['dtype_auto_speedup_1p']:.2f}")
    for n in S:
        if f"{n}_time_to_loss_speedup_vs_trl_best" in R:
            notes.append(f"TRL's best time to the target loss / {label.get(n, n)}'s: "
                         f"{R[f'{n}_time_to_loss_speedup_vs_trl_best']:.2f}")
    for n, x in S.items():
        if "rounds_tokens_per_s" in x:
            by_round = R.get(f"{n}_vs_trl_best_by_round")
            notes.append(f"{label.get(n, n)}, tokens/s by round: "
                         + " / ".join(f"{t:.0f}" for t in x["rounds_tokens_per_s"])
                         + (" (× TRL's best of the round: " + " / ".join(f"{q:.2f}" for q in by_round) + ")"
                            if by_round else ""))
    if "zero2_over_zero3_1p_tokens_per_s" in R:
        notes.append(f"ZeRO-2 / ZeRO-3 in 1 process, MoRE tokens/s: {R['zero2_over_zero3_1p_tokens_per_s']:.2f}")
    if "compiled_norms_speedup_zero3" in R:
        notes.append(f"Compiled / eager RMSNorm, MoRE ZeRO-3 2 ranks tokens/s: {R['compiled_norms_speedup_zero3']:.2f}")
    for path, what in (("zero3", "ZeRO-3 2 ranks"), ("1p", "1 process")):
        if f"compiled_rope_speedup_{path}" in R:
            notes.append(f"Compiled / eager rotary embedding, MoRE {what} tokens/s: "
                         f"{R[f'compiled_rope_speedup_{path}']:.2f}")
        if f"dequant_buffers_speedup_{path}" in R:
            notes.append(f"NF4 dequantised into reused buffers / fresh tensors, MoRE {what} tokens/s: "
                         f"{R[f'dequant_buffers_speedup_{path}']:.2f}")
        if f"buffer_pool_speedup_{path}" in R:
            notes.append(f"Large activations in reused blocks / fresh memory, MoRE {what} tokens/s: "
                         f"{R[f'buffer_pool_speedup_{path}']:.2f}")
    for path, what in (("zero3", "ZeRO-3 2 ranks"), ("1p", "1 process")):
        fused, sdpa = S.get(f"ours_{path}_more"), S.get(f"ours_{path}_more_sdpa_attention")
        if fused and sdpa:
            notes.append(f"Fused CPU attention kernel / per-sample sdpa, MoRE {what} tokens/s: "
                         f"{fused['tokens_per_s'] / sdpa['tokens_per_s']:.2f}")
    if "zero3_2ranks_over_1p_tokens_per_s" in R:
        notes.append(f"ZeRO-3 on 2 ranks / 1 process, MoRE tokens/s: {R['zero3_2ranks_over_1p_tokens_per_s']:.2f}")
    return lines + ([""] + [f"- {n}" for n in notes] if notes else [])


def cpu_name(model: str | None, isa: str) -> str:
    """A section title's CPU: its model name and vector ISA where the result recorded the model, else the ISA."""
    return f"{model} ({isa})" if model else isa + " CPU"


def step_profile(r) -> list[str]:
    m = r["machine"]
    cpu = cpu_name(m.get("model"), m["isa"])
    lines = [f"## One training step by phase and operator kind, {cpu}, {r['dtype']}, ZeRO-{r['zero_stage']} "
             f"(`{r['command']}`)",
             f"vs_trl's `ours_1p_more` step (packed rows of 512, {r['real_tokens_per_step']:.0f} real tokens) under "
             f"torch.profiler, mean of {r['steps']} steps after the warm-up: {r['step_seconds']:.2f} s per step "
             f"({r['tokens_per_s']:.0f} real tokens/s with the profiler on), {m['threads']} threads.", "",
             "| phase | s/step |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["phases_s"].items()]
    lines += ["", "| operator kind (self time) | s/step |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in sorted(r["op_kinds_self_s"].items(), key=lambda kv: -kv[1])]
    lines += ["", f"- matmuls: {r['matmul_share_of_op_time']:.0%} of operator time, running at "
                  f"{r['matmul_gflops']:.0f} GFLOP/s = {r['matmul_rate_vs_peak']:.0%} of the "
                  f"{r['matmul_peak_gflops']:.0f} GFLOP/s GEMM peak measured in the same run",
              "- top operators (self s/step, calls/step): " + "; ".join(
                  f"{e['name']} {e['self_s_per_step']:.3f} ({e['calls_per_step']:.0f})" for e in r["top_ops"][:8])]
    od = r.get("onednn")  # runs since 2026-12-07 evening
    if od and od["records"]:
        lines += ["", f"One step without the profiler, {od['step_seconds']:.2f} s, its matmuls timed by oneDNN "
                      f"(bench/onednn_matmuls.py): {od['gemm_seconds']:.2f} s, {od['gemm_share_of_step']:.0%} of "
                      "the step.", "",
                  "| matmuls of | s | calls | GFLOP/s | share of the GEMM peak | share of the step |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {a['seconds']:.3f} | {a['calls']} | {a['gflops']:.0f} | {a['share_of_peak']:.0%} | "
                  f"{a['share_of_step']:.1%} |"
                  for k, a in sorted(od["by_kind"].items(), key=lambda kv: -kv[1]["seconds"])]
        lines += ["", "| shape (M×K:K×N) | kind | layouts | calls | s | GFLOP/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {t['shape']} | {t['kind']} | {t['layouts']} | {t['calls']} | {t['seconds']:.3f} | "
                  f"{t['gflops']:.0f} |" for t in od["top_shapes"]]
    elif od:
        lines += ["", "No oneDNN matmul records: fp32 CPU matmuls run in MKL."]
    return lines


def gemm_peak(r) -> list[str]:
    m = r["machine"]
    lines = [f"## GEMM rates by shape, {m['isa']} CPU, {r['dtype']} (`{r['command']}`)",
             f"`torch.mm`, best call of {r['seconds_per_shape']:g} s per shape, {m['threads']} threads. The benchmarks' "
             f"peak is the best of {', '.join(r['peak_shapes'])}: here {r['peak_shape']}, {r['peak_gflops']:.1f} "
             f"GFLOP/s; the best shape measured, {r['best_shape']}, ran {r['best_over_peak']:.2f}× that.", "",
             "| shape | m × k × n | GFLOP/s |", "|---|---|---|"]
    lines += [f"| {n} | {' × '.join(map(str, s['mkn']))} | {s['gflops']:.1f} |" for n, s in r["shapes"].items()]
    if r["per_process_one_thread_gflops"]:
        rates = r["per_process_one_thread_gflops"]
        lines += ["", f"- {r['peak_shape']} on one thread in each of {r['processes']} processes at once: "
                      + ", ".join(f"{x:.1f}" for x in rates) + f" GFLOP/s (sum {sum(rates):.1f})"]
    return lines


def packed_attention_kernels(r) -> list[str]:
    names = {"fused_cpu": "fused CPU kernel (one task per sample and KV head)",
             "per_sample": "per-sample sdpa (one call per run of equal lengths)",
             "varlen": "varlen flash kernel (one call per batch)", "dense_mask": "dense (B, 1, L, L) block-causal mask"}
    lines = [f"## Packed attention kernels, {r['device']}, {r['dtype']} (`{r['command']}`)",
             f"One layer's attention over {r['rows']} packed rows of {r['row_len']} ({r['samples']} GLUE-like samples, "
             f"{r['real_tokens']:,} real tokens), forward + backward, median of {r['repeats']}; every kernel's output and "
             "input gradients checked against the dense mask's first (max abs difference below).", "",
             "| shape (heads, KV heads, width) | kernel | ms | per-sample / kernel time | max abs diff |",
             "|---|---|---|---|---|"]
    for shape, x in r["shapes"].items():
        for k, v in x["kernels"].items():
            lines.append(f"| {shape} ({x['heads']}, {x['kv_heads']}, {x['head_dim']}) | {names.get(k, k)} | "
                         f"{v['ms']:.2f} | {v['speedup_vs_per_sample']:.2f} | {v['max_abs_diff_vs_dense']:.1e} |")
    return lines


def loader_memory(r) -> list[str]:
    lay = r["layout"]
    lines = [f"## Trainer data start-up memory against data size (`{r['command']}`)",
             f"Synthetic packed train split (rows of {lay['row_tokens']}, samples of {lay['sample_tokens']} tokens, "
             f"{lay['tasks']} tasks); a fresh process builds the trainer's `TrainData` (memory-mapped rows, per-row "
             f"task counts, sampler) and draws {lay['batches_drawn']} micro-batches of {lay['micro_batch_size']}; peak "
             "anonymous resident memory (RssAnon) above the process's state before.", "",
             "| tokens | rows | start-up s | peak anonymous MiB | bytes per row | one int64 per token, MiB |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['tokens']:,} | {s['rows']:,} | {s['startup_s']:.2f} | {s['peak_anon_growth_bytes'] / 2**20:,.1f} | "
              f"{s['bytes_per_row']:,.0f} | {s['int64_task_id_per_token_bytes'] / 2**20:,.0f} |" for s in r["sizes"]]
    return lines


SECTIONS = [("prep", prep), ("packing", packing), ("adapter_step", adapter_step),
            ("train_throughput", train_throughput), ("lm_head", lm_head), ("vs_trl_1b_zen5_minslack", vs_trl),
            ("vs_trl_zen5_minslack", vs_trl), ("vs_trl_zen5_8rows_minslack", vs_trl), ("vs_trl_1b_zen4", vs_trl),
            ("vs_trl_zen4", vs_trl), ("vs_trl_zen4_8rows", vs_trl),
            ("vs_trl_zen5_8rows", vs_trl),
            ("vs_trl_1b_zen5_rounds", vs_trl), ("vs_trl_zen5_rounds", vs_trl),
            ("vs_trl_zen5_1p_zero2", vs_trl),
            ("vs_trl_1b_zen5_long", vs_trl), ("vs_trl_zen5_threads", vs_trl), ("vs_trl_1b_zen5_threads", vs_trl),
            ("vs_trl_zen5_fused", vs_trl),
            ("vs_trl_zen5_fused_first_kernel", vs_trl), ("vs_trl_1b_zen5_fused", vs_trl), ("vs_trl_zen5", vs_trl),
            ("vs_trl_1b_zen5", vs_trl), ("vs_trl_epyc", vs_trl),
            ("vs_trl_epyc_repeat", vs_trl), ("vs_trl_epyc_run3", vs_trl), ("vs_trl_epyc_trl_first", vs_trl),
            ("vs_trl_epyc_trl_eager_first", vs_trl), ("vs_trl_epyc_trl_compiled_first", vs_trl),
            ("vs_trl_epyc_run5", vs_trl),
            ("vs_trl_1b_epyc", vs_trl), ("vs_trl_1b_epyc_trl_first", vs_trl),
            ("gemm_peak", gemm_peak), ("gemm_peak_epyc", gemm_peak), ("gemm_peak_1b_epyc", gemm_peak),
            ("vs_trl_replicated_base", vs_trl), ("vs_trl_attention_runs", vs_trl),
            ("vs_trl", vs_trl), ("vs_trl_avx2", vs_trl), ("vs_trl_zero2", vs_trl), ("vs_trl_split_attention", vs_trl),
            ("vs_trl_1b", vs_trl), ("vs_trl_1b_dequant", vs_trl), ("vs_trl_1b_pool_ab", vs_trl),
            ("vs_trl_1b_pool_order", vs_trl), ("vs_trl_1b_pool_order_1p", vs_trl), ("vs_trl_1b_rope", vs_trl),
            ("vs_trl_1b_attention_runs", vs_trl), ("step_profile_zen4", step_profile), ("step_profile_zen5", step_profile),
            ("step_profile_1b_zen5", step_profile), ("step_profile", step_profile), ("loader_memory", loader_memory),
            ("packed_attention_cpu_bf16", packed_attention_kernels), ("packed_attention_cpu", packed_attention_kernels),
            ("packed_attention_cuda", packed_attention_kernels),
            ("vs_trl_135m_gpu", vs_trl), ("vs_trl_1b_gpu", vs_trl),
            ("merge", merge), ("fidelity", fidelity), ("glue_variants", glue_variants),
            ("glue_variants_quick", glue_variants)]


def main() -> int:
    out = ["# Benchmark results", "",
           "Regenerated by `make bench` (`python bench/report.py` renders what the benchmarks wrote to "
           "bench/results/). Each section comes from the command in its title; the figures within a section are measured "
           "side by side in one run, while sections may come from separate runs (README, Benchmarks, dates them).", "",
           f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU; Python {platform.python_version()}; "
           f"{_versions()}.", ""]
    missing = []
    for name, render in SECTIONS:
        r = _load(name)
        if r is None:
            missing.append(name)
            continue
        out += render(r) + [""]
        written = re.search(r"--out (\S+?)`?$", r.get("command", ""))
        if written and Path(written.group(1)).stem != name:  # a result moved or renamed after its run
            out += [f"(This section's file is bench/results/{name}.json: its command wrote {written.group(1)}; the "
                    "file was moved or renamed after the run, its contents as measured.)", ""]
    out += [REPRODUCE, ""]
    out += ["Not measured by `make bench`, in [bench/NOTES.md](NOTES.md): the memory planner's prediction vs the "
            "measured peak RSS of a tiny CPU step (`tests/plan_measure.py`).", ""]
    if missing:
        out += ["Not run yet: " + ", ".join(missing), ""]
    sys.path.insert(0, str(ROOT))
    from pipeline.atomic import atomic_write
    atomic_write(ROOT / "bench" / "RESULTS.md", "\n".join(out))
    print(f"wrote bench/RESULTS.md ({len(SECTIONS) - len(missing)} sections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
