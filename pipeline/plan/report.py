"""Printing of a `MemoryPlan` (kept apart from the arithmetic so callers can log or refuse as they like)."""
from __future__ import annotations

from .planner import GiB, MemoryPlan


def _g(b: int) -> str:
    return f"{b / GiB:8.2f}"


def format_plan(p: MemoryPlan) -> str:
    i, m, a = p.inputs, p.model, p.adapter
    out = [
        f"model {m.name} ({m.model_type}): {m.num_params / 1e9:.2f}B params, {m.num_layers} layers, h={m.hidden}, "
        f"ffn={m.intermediate}, heads={m.heads}/{m.kv_heads} kv, vocab={m.vocab}",
        f"run: {i.nodes} node(s) x {i.gpus_per_node} GPU(s) = {i.world_size} ranks, {i.gpu_mem_gb:g} GiB each; "
        f"quant={i.quant}, {i.dtype}, seq {i.seq_len}, micro batch {i.micro_batch}, attn={i.attn_impl}, "
        f"grad ckpt={'on' if i.grad_ckpt else 'off'}, offload={'on' if p.zero.offload_param else 'off'}",
        f"MoRE: rank {i.max_rank} on {a.modules} Linear layers ({i.targets}), {i.num_tasks} tasks, "
        f"{i.task_embedding} task embedding: {a.lora / 1e6:.2f}M LoRA + {a.gate / 1e6:.3f}M gate + "
        f"{a.task_embedding / 1e6:.3f}M task-emb" + (f" + {a.head / 1e6:.3f}M contrastive head" if a.head else ""),
        f"ZeRO-3 ({p.zero_source}): reduce bucket {p.zero.reduce_bucket_size:,.0f}, prefetch bucket "
        f"{p.zero.prefetch_bucket_size:,.0f}, persistence threshold {p.zero.param_persistence_threshold:,.0f}, "
        f"reuse distance {p.zero.max_reuse_distance:,.0f} elements",
        "",
        f"{'per GPU':52s} {'GiB':>8s}  note",
    ]
    for l in p.lines:
        out.append(f"{l.label:52s} {_g(l.bytes)}  {l.note}")
    pct = 100 * p.total_bytes / p.gpu_bytes
    out += [f"{'TOTAL':52s} {_g(p.total_bytes)}  of {p.gpu_bytes / GiB:.2f} GiB ({pct:.0f}%)",
            f"verdict: {p.verdict}"]
    held = ("the full NF4 base" if i.quant == "nf4" else f"the whole {i.dtype} base (DeepSpeed moves the loaded "
            f"model to the GPU)")
    out.append(f"load time: each rank first holds {held} ({p.load_bytes / GiB:.2f} GiB) on its GPU "
               f"(on the host if loaded on CPU) before ZeRO-3 partitions it: "
               f"{'fits' if p.load_fits else 'DOES NOT FIT'}")
    if p.suggestion:
        out.append(f"smallest change that fits: {p.suggestion}")
        out += [f"  also fits: {s}" for s in p.alternatives]
    out += ["", f"{'host RAM per node':52s} {'GiB':>8s}"]
    for l in p.host_lines:
        out.append(f"{l.label:52s} {_g(l.bytes)}  {l.note}")
    hf = p.host_fits
    out.append(f"{'TOTAL':52s} {_g(p.host_bytes)}"
               + ("" if hf is None else f"  of {i.host_mem_gb:g} GiB: {'fits' if hf else 'DOES NOT FIT'}"))
    out += [f"warning: {w}" for w in p.warnings]
    return "\n".join(out)
