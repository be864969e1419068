"""NF4 Linear on CPU whose weight is dequantised into a reused buffer, forward and backward.

bitsandbytes' CPU path dequantises a 4-bit weight into a freshly allocated tensor on every forward and again in
backward. PyTorch keeps no CPU cache of freed blocks and glibc maps every block above its mmap threshold (at most
32 MiB) afresh, so each dequantised weight of that size page-faults all its memory again: an 8192 x 2048 bf16 weight
(a ~1B Llama's MLP) took 10.7 ms to dequantise into a fresh tensor and 1.6 ms into one already mapped (2-core AMX
Xeon). Here each (shape, dtype) has one buffer, the weight lives there only for the one matmul that reads it, and
the arithmetic is bitsandbytes' own kernel: outputs and gradients are bit-equal to `Linear4bit.forward`.

The autograd Function keeps the weight PARAMETER for backward, not a view of its data: under ZeRO-3 the packed
weight is released after forward and gathered again before backward (bitsandbytes' own Function keeps a view, which
keeps every gathered shard alive from forward to backward).
"""
from __future__ import annotations

import ctypes
import functools
from math import prod

import bitsandbytes as bnb
import torch
from bitsandbytes.cextension import lib
from bitsandbytes.functional import get_ptr
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from torch import nn

from pipeline.models import cpu_buffers

_BUFFERS: dict[tuple, torch.Tensor] = {}
_DTYPE_SUFFIX = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.cache
def _kernel(quant_type: str, dtype: torch.dtype):
    """bitsandbytes' CPU dequantisation entry point for (quant_type, dtype), or None where its library has none."""
    suffix = _DTYPE_SUFFIX.get(dtype)
    return getattr(lib, f"cdequantize_blockwise_cpu_{quant_type}_{suffix}", None) if suffix else None


def _buffer(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    key = (shape, dtype)
    buf = _BUFFERS.get(key)
    if buf is None:
        buf = _BUFFERS[key] = torch.empty(shape, dtype=dtype)
    return buf


def dequantize_into_buffer(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) weight of a 4-bit parameter, in the shared buffer for its shape: valid until the next call
    for the same shape and dtype."""
    qs = weight.quant_state
    m, n = prod(qs.shape[:-1]), qs.shape[-1]
    packed = weight.data.view(torch.uint8)
    if packed.numel() * 2 != m * n:
        raise RuntimeError(f"4-bit weight holds {packed.numel()} bytes, its quant_state says {tuple(qs.shape)}: "
                           "the parameter is not gathered (ZeRO-3 released it before this matmul)")
    out = _buffer(tuple(qs.shape), qs.dtype)
    kernel = _kernel(qs.quant_type, qs.dtype)
    with torch.profiler.record_function("nf4_matmul::dequantize_into_buffer"):  # a ctypes call: named for profiles
        kernel(get_ptr(packed), get_ptr(qs.absmax), get_ptr(out), ctypes.c_longlong(qs.blocksize),
               ctypes.c_longlong(m), ctypes.c_longlong(n))
    return out


class _NF4Matmul(torch.autograd.Function):
    """y = x W^T (+ b) with W a frozen 4-bit parameter; x: (..., in). `pooled`: y and x's gradient in blocks of
    the CPU buffer pool (pipeline/models/cpu_buffers.py)."""

    @staticmethod
    def forward(ctx, x, weight, bias, pooled):
        ctx.weight, ctx.pooled = weight, pooled
        return cpu_buffers.matmul(x, dequantize_into_buffer(weight).t(), bias, pooled)

    @staticmethod
    def backward(ctx, gy):
        gx = cpu_buffers.matmul(gy, dequantize_into_buffer(ctx.weight), None, ctx.pooled) if ctx.needs_input_grad[0] \
            else None
        gb = gy.reshape(-1, gy.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return gx, None, gb, None


def buffered(x: torch.Tensor, weight: torch.Tensor, bias) -> bool:
    """Whether the buffered path computes exactly what `Linear4bit.forward` would: on CPU, in the weight's own
    dtype, with the weight in bitsandbytes' standard layout (not double-quantised, not repacked for its CPU
    inference kernel) and a block size and shape its CPU kernel takes without a fallback."""
    qs = getattr(weight, "quant_state", None)
    return (qs is not None and x.device.type == "cpu" and not weight.requires_grad
            and x.dtype == qs.dtype and not qs.nested and qs.absmax.dtype == torch.float32
            and not getattr(qs, "packing_format_for_cpu", False) and qs.blocksize < 2048 and qs.shape[-1] % 2 == 0
            and (bias is None or bias.dtype == x.dtype) and _kernel(qs.quant_type, qs.dtype) is not None)


class BufferedLinear4bit(bnb.nn.Linear4bit):
    """A Linear4bit whose CPU forward dequantises into the shared buffer; elsewhere its parent's forward.
    `pooled_outputs`: its output and input gradient also go to the CPU buffer pool."""

    pooled_outputs = False

    def dequantizer_for(self, x: torch.Tensor):
        """`dequantize_into_buffer` where the buffered path computes this layer's output for input `x`, else None:
        for a caller that multiplies by the weight itself (the MoRE layer's fused Function)."""
        fix_4bit_weight_quant_state_from_module(self)
        ok = self.compute_dtype in (None, x.dtype) and buffered(x, self.weight, self.bias)
        return dequantize_into_buffer if ok else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dequantizer_for(x) is None:
            return super().forward(x)
        return _NF4Matmul.apply(x, self.weight, self.bias, self.pooled_outputs)


def use_dequant_buffers(model: nn.Module) -> int:
    """Make every bitsandbytes Linear4bit of `model` a BufferedLinear4bit (same parameters, same state dict);
    returns how many."""
    layers = [m for m in model.modules() if type(m) is bnb.nn.Linear4bit]
    for m in layers:
        m.__class__ = BufferedLinear4bit
    return len(layers)


def pool_outputs(model: nn.Module) -> int:
    """Put the outputs and input gradients of `model`'s BufferedLinear4bit layers in the CPU buffer pool (for
    training, whose shapes repeat; not for generation, whose shapes change every token); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, BufferedLinear4bit)]
    for m in layers:
        m.pooled_outputs = True
    return len(layers)
