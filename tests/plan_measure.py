"""Measurements the memory planner's activation model is checked against: bytes autograd saves in one decoder layer
(saved-tensor hooks) and the peak RSS of a tiny CPU forward/backward. A stand-in LoRA adapter (A, B, per-token rank
mask) plays MoRE's part. (Parameter counts are checked against the real injected MoRE model in tests/test_plan.py.
Measured once against the real `MoreLinear` with bf16 parameters: it saves ~1% more per layer than this stand-in,
its per-token rank mask, B*S x R per adapted linear, which the planner does not count yet.)

    python tests/plan_measure.py [--grad-ckpt] [--dtype fp32|bf16]   # prints one JSON line (peak RSS check)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


class StandInLoRA(nn.Module):
    """base(x) + ((x A^T) * rank_mask) B^T * scale, the shape of a MoRE layer's autograd graph."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base, self.rank = base, rank
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) * 0.01)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x):
        mask = torch.ones(x.shape[:-1] + (self.rank,), dtype=x.dtype, device=x.device)
        return self.base(x) + F.linear(F.linear(x, self.A) * mask, self.B) * 2.0


def tiny_model(shape: dict, attn: str, targets=ALL, rank: int = 4, dtype=torch.bfloat16):
    from transformers import LlamaForCausalLM

    from pipeline.models.tiny import tiny_llama_config

    torch.manual_seed(0)
    cfg = tiny_llama_config(**shape)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).to(dtype)
    model.requires_grad_(False)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and name in targets:
                    setattr(parent, name, StandInLoRA(child, rank))
    return model, cfg


def causal_mask(batch: int, seq: int, dtype) -> torch.Tensor:
    """The additive (B, 1, L, L) mask the collator emits (one sample per row)."""
    return torch.full((batch, 1, seq, seq), torch.finfo(dtype).min, dtype=dtype).triu(1)


def saved_bytes_one_layer(model, batch: int, seq: int, layer_idx: int = 1) -> int:
    """Unique storage bytes autograd saves inside one decoder layer (parameters and the shared mask/RoPE excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, shared, active = {}, set(), [False]

    def pre(mod, args, kwargs):
        active[0] = True
        for v in kwargs.values():
            for t in v if isinstance(v, tuple) else (v,):
                if torch.is_tensor(t):
                    shared.add(t.untyped_storage().data_ptr())

    def post(mod, args, kwargs, out):
        active[0] = False

    def pack(t):
        if active[0]:
            s = t.untyped_storage()
            if s.data_ptr() not in params and s.data_ptr() not in shared:
                seen[s.data_ptr()] = s.nbytes()
        return t

    layer = model.model.layers[layer_idx]
    h1 = layer.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = layer.register_forward_hook(post, with_kwargs=True)
    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    if model.config._attn_implementation == "packed_sdpa":  # one sample per row, given by its length
        from pipeline.models.packed_attention import PackedSegments

        inputs = dict(packed_segments=PackedSegments([[seq]] * batch), position_ids=torch.arange(seq).repeat(batch, 1))
    else:
        inputs = dict(attention_mask=causal_mask(batch, seq, dtype))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, **inputs)
    finally:
        h1.remove(), h2.remove()
    return sum(seen.values())


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


RSS_SHAPE = dict(vocab_size=8000, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=688)
RSS_RUN = dict(batch=4, seq=512, rank=8)


def peak_rss_run(grad_ckpt: bool, dtype: str) -> dict:
    """Peak RSS growth of one forward + loss + backward over the RSS after a warm-up step, vs the planner's figure."""
    from pipeline.plan import activation_bytes, more_param_count

    torch.set_num_threads(1)
    b, s, r = RSS_RUN["batch"], RSS_RUN["seq"], RSS_RUN["rank"]
    model, cfg = tiny_model(RSS_SHAPE, "sdpa", rank=r, dtype=DT[dtype])
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    ids = torch.randint(0, cfg.vocab_size, (b, s))
    mask = causal_mask(b, s, DT[dtype])

    def step():
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.float().view(-1, cfg.vocab_size), ids.view(-1))
        loss.backward()

    step()  # warm-up: lazily built kernels, caches, first .grad buffers
    gc.collect()
    before = _rss()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    step()
    peak = _hwm() - before
    a = 4 if dtype == "fp32" else 2
    est = activation_bytes(batch=b, seq=s, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                           heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                           head_dim=cfg.hidden_size // cfg.num_attention_heads, vocab=cfg.vocab_size,
                           layers=cfg.num_hidden_layers, act_bytes=a, rank=r, attn_impl="sdpa")
    predicted = est.ckpt if grad_ckpt else est.no_ckpt
    return {"grad_ckpt": grad_ckpt, "dtype": dtype, "measured_bytes": peak, "predicted_bytes": predicted,
            "ratio": round(peak / predicted, 3), "shape": RSS_SHAPE, "run": RSS_RUN}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--dtype", choices=sorted(DT), default="fp32")
    args = ap.parse_args()
    print(json.dumps(peak_rss_run(args.grad_ckpt, args.dtype)))
