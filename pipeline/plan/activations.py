"""Activation memory of a Llama-style decoder (RMSNorm, GQA attention, SwiGLU MLP) trained with LoRA-style adapters
on a frozen base.

What autograd keeps per layer (bytes per token unless stated; a = activation dtype bytes, h hidden, i MLP width,
hq = heads x head_dim, hkv = kv heads x head_dim, R adapter rank), derived from the HF Llama code and checked
against saved-tensor hooks in tests/test_plan.py:
- each RMSNorm keeps its fp32 input copy: 4h (x2 per layer);
- a frozen base Linear keeps NO input (bitsandbytes' MatMul4Bit and torch's linear save the input only for a weight
  gradient); an adapted Linear keeps its input for A's gradient: a*h once for q/k/v (shared), a*h once for
  gate/up, a*i for down; plus 2 rank-wide tensors a*R (the rank mask, the masked x A^T);
- attention keeps q, k, v after RoPE: a*(hq + 2hkv), or a*3hq when k/v are repeated to all heads (SDPA with a mask,
  eager); SDPA/flash also keep their output (a*hq, laid out so o_proj's input is the same storage) and the fp32
  logsumexp (4 x heads); eager keeps the fp32 softmax and its a-byte copy ((4 + a) x heads x S per token) and o_proj's
  input a*hq only if o_proj is adapted. `attention_fp32` (packed_sdpa on CPU through sdpa, which attends in
  fp32 copies; the fused CPU kernel keeps the 16-bit tensors): q, k, v and the output kept in fp32, plus o_proj's
  16-bit input (the output cast back) if o_proj is adapted;
- SwiGLU keeps gate (SiLU input), SiLU(gate) and up (the product's inputs): 3a*i;
- adapter dropout p>0 adds its output and a 1-byte mask per adapted Linear: (a + 1) x in_features.
Beyond the layers: the final norm 4h, a 4-D additive mask a*S^2 per row unless flash-varlen, and the loss peak
P*V*(a + 12) over the P positions the LM head runs at (every position, B*S, unless `loss_positions` bounds them: the
trainer runs it at supervised positions only, at most pipeline.data.mask.LOSS_CHUNK at a time): the logits, the fp32
log-softmax kept for backward, its incoming gradient and the gradient it makes.
"""
from __future__ import annotations

from dataclasses import dataclass

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ActivationEstimate:
    per_layer: int  # bytes one decoder layer keeps for backward
    layers: int  # all layers, no checkpointing
    ckpt_inputs: int  # all layers' checkpointed inputs
    outside: int  # final norm + attention mask
    logits_peak: int  # logits + fp32 loss tensors at the start of backward
    backward_workspace: int  # gradients in flight for one layer
    no_ckpt: int  # peak without gradient checkpointing
    ckpt: int  # peak with per-layer (reentrant) gradient checkpointing


def activation_bytes(*, batch: int, seq: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                     head_dim: int, vocab: int, layers: int, act_bytes: int = 2, adapted=ROLES, rank: int = 8,
                     attn_impl: str = "flash", packed_mask: bool = True, dropout: float = 0.0,
                     loss_positions: int | None = None, attention_fp32: bool = False) -> ActivationEstimate:
    """Peak activation bytes of one micro batch (B x S tokens), with and without gradient checkpointing."""
    if attn_impl not in ("flash", "sdpa", "eager"):
        raise ValueError(f"attn_impl must be flash, sdpa or eager, got {attn_impl!r}")
    a, h, i = act_bytes, hidden, intermediate
    hq, hkv = heads * head_dim, kv_heads * head_dim
    known = set(adapted) & set(ROLES)
    ad = known if known or not adapted else set(ROLES)  # unknown module names (fused qkv...): assume all adapted
    repeat_kv = attn_impl == "eager" or (attn_impl == "sdpa" and packed_mask)
    tok = 4 * h + 4 * h + 2 * 4  # two RMSNorm fp32 copies + their fp32 rsqrt
    tok += a * h if ad & {"q_proj", "k_proj", "v_proj"} else 0
    tok += a * h if ad & {"gate_proj", "up_proj"} else 0
    tok += a * i if "down_proj" in ad else 0
    tok += 2 * a * rank * len(ad)
    qkv = 4 if attention_fp32 and a != 4 else a  # bytes per element attention keeps
    tok += qkv * (3 * hq if repeat_kv else hq + 2 * hkv)  # q, k, v
    if attn_impl == "eager":
        tok += a * hq if "o_proj" in ad else 0
    else:
        tok += qkv * hq + 4 * heads  # output (= o_proj's input unless cast back from fp32) + logsumexp
        tok += a * hq if qkv != a and "o_proj" in ad else 0
    tok += 3 * a * i
    if dropout > 0:
        widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": hq, "gate_proj": h, "up_proj": h, "down_proj": i}
        tok += sum((a + 1) * widths[r] for r in ad)
    per_layer = batch * seq * tok
    if attn_impl == "eager":
        per_layer += batch * heads * seq * seq * (4 + (a if a != 4 else 0))
    n = batch * seq
    mask = a * batch * seq * seq if (attn_impl != "flash" and packed_mask) else 0
    outside = 4 * n * h + mask
    logits_peak = min(n, loss_positions or n) * vocab * (a + 12)
    workspace = a * n * (2 * h + 2 * i)
    all_layers = layers * per_layer
    ckpt_inputs = layers * a * n * h
    no_ckpt = all_layers + outside + max(logits_peak, workspace)
    ckpt = ckpt_inputs + outside + max(logits_peak, per_layer + workspace)
    return ActivationEstimate(per_layer, all_layers, ckpt_inputs, outside, logits_peak, workspace, no_ckpt, ckpt)
