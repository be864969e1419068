"""The Llama-family MLP's silu(gate) * up, with its outputs and gradients in the CPU buffer pool.

Each of these element-wise passes writes a (tokens, intermediate) tensor, the largest of a ~1B Llama's step; fresh,
each page-faults all of its memory (pipeline/models/cpu_buffers.py). Same kernels, same saved tensors (gate, up and
silu(gate), as autograd would keep) and the same arithmetic as the eager MLP: outputs and gradients are bit-equal.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import cpu_buffers


class _PooledSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        act = torch.ops.aten.silu.out(gate, out=cpu_buffers.empty(gate.shape, gate.dtype))
        h = torch.mul(act, up, out=cpu_buffers.empty(gate.shape, gate.dtype))
        ctx.save_for_backward(gate, up, act)
        return h

    @staticmethod
    def backward(ctx, gh):
        gate, up, act = ctx.saved_tensors
        g_act = torch.mul(gh, up, out=cpu_buffers.empty(gh.shape, gh.dtype))
        g_up = torch.mul(gh, act, out=cpu_buffers.empty(gh.shape, gh.dtype)) if ctx.needs_input_grad[1] else None
        g_gate = torch.ops.aten.silu_backward.grad_input(g_act, gate,
                                                         grad_input=cpu_buffers.empty(gh.shape, gh.dtype))
        return g_gate, g_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; pooled for same-shape, same-dtype CPU tensors, eager otherwise."""
    if gate.device.type != "cpu" or gate.shape != up.shape or gate.dtype != up.dtype:
        return F.silu(gate) * up
    return _PooledSwiGLU.apply(gate, up)  # without grad mode it keeps nothing for backward


_SILU_MODULES = ("SiLU", "SiLUActivation")  # torch's, and transformers' own for hidden_act "silu"


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def is_swiglu_mlp(module: nn.Module) -> bool:
    """Llama-family MLPs (Llama, Mistral, Qwen2, ...): down_proj(silu(gate_proj(x)) * up_proj(x))."""
    act = getattr(module, "act_fn", None)
    return (type(module).__name__.endswith("MLP") and type(act).__name__ in _SILU_MODULES
            and all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")))


def pool_swiglu_mlps(model: nn.Module) -> int:
    """Route every Llama-family MLP of `model` through `swiglu`; returns how many."""
    mlps = [m for m in model.modules() if is_swiglu_mlp(m)]
    for m in mlps:
        m.forward = types.MethodType(_forward, m)
    return len(mlps)
