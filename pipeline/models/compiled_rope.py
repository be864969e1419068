"""Rotary embedding and packed attention's fp32 inputs in one compiled kernel (training on CPU).

On CPU, packed attention runs each sample's sdpa in fp32 (packed_attention.py). Eager, a Llama-family attention
first rotates q and k in bf16 (transformers' apply_rotary_pos_emb: two muls, a neg, a cat and an add per tensor,
each a fresh full-size tensor, and autograd's mirror of each in backward), then casts q, k and v to fp32: six passes
over q and k per layer each way. Here one torch.compile'd function takes the projections as they come and returns
fp32 q, k (rotated in fp32 from the bf16 inputs: one rounding less than eager, within one bf16 ulp of it) and v,
one loop per tensor each way. Random ~1B Llama, 1 process, eager / compiled alternated per step: 1.07x tokens/s;
on the documented 2-rank ZeRO-3 path 0.95x, 0.98x and 1.01x in bench/vs_trl.py, so opt-in (`model.compile_rope`).

Only the attention modules' forward is replaced (q/k/v projections, the compiled function, packed attention, o_proj),
not the decoder layer: the per-sample attention loop stays eager Python, and ZeRO-3's module hooks stay where they
were (they run in Module.__call__, not forward).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from pipeline.models.compiled_norm import route_if_compiled
from pipeline.models.packed_attention import packed_sdpa_attention


def rope_fp32(q, k, v, cos, sin):
    """q (B, H, L, D), k, v (B, Hkv, L, D), cos / sin (B, L, D) -> rotated q, k and v, all fp32."""
    cos, sin = cos.float().unsqueeze(1), sin.float().unsqueeze(1)

    def rotate(x):
        x = x.float()
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    return rotate(q), rotate(k), v.float()


_compiled = torch.compile(rope_fp32, dynamic=False)  # a run sees few shapes: (rows, heads, row length, head dim)


def _forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
    """LlamaAttention.forward for training on packed rows (no KV cache), through the compiled rotary embedding."""
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        return self._eager_forward(hidden_states, position_embeddings, attention_mask, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    q, k, v = _compiled(q, k, v, *position_embeddings)
    out, _ = packed_sdpa_attention(self, q, k, v, attention_mask, dropout=self.attention_dropout if self.training
                                   else 0.0, scaling=self.scaling, out_dtype=hidden_states.dtype, **kwargs)
    return self.o_proj(out.reshape(*input_shape, -1).contiguous()), None


def is_llama_attention(module: nn.Module) -> bool:
    """Llama-family attentions (Llama, Mistral, Qwen2, ...): q/k/v/o projections and the rotate-half rotary
    embedding; not those that normalise q and k (Qwen3) or rotate part of the head (Phi)."""
    modeling = sys.modules[type(module).__module__]
    return (type(module).__name__.endswith("Attention") and hasattr(module, "head_dim")
            and hasattr(module, "scaling")
            and all(isinstance(getattr(module, n, None), nn.Module) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            and not hasattr(module, "q_norm") and not hasattr(module, "k_norm")
            and callable(getattr(modeling, "apply_rotary_pos_emb", None))
            and getattr(getattr(module, "config", None), "partial_rotary_factor", 1.0) == 1.0)


def compile_rope(model: nn.Module) -> int:
    """Route every Llama-family attention of `model` (loaded with attn_implementation="packed_sdpa") through the
    compiled rotary embedding; returns how many (0, with a warning, where torch.compile does not work here)."""
    attns = [m for m in model.modules() if is_llama_attention(m)]
    if not attns:
        return 0
    a, dt = attns[0], getattr(model, "dtype", torch.float32)  # a transformers model: its compute dtype
    x = [torch.randn(1, h, 4, a.head_dim, dtype=dt, requires_grad=True) for h in (2, 1, 1)]
    cs = [torch.randn(1, 4, a.head_dim, dtype=dt) for _ in range(2)]
    return route_if_compiled(attns, _forward, _compiled, [*x, *cs], "rotary embedding", "compile_rope")
