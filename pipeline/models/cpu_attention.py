"""Packed attention's fused CPU kernel (csrc/packed_attention_cpu.cpp), built for this machine on first use.

The kernel computes each (sample, KV head) in one task: no per-sample sdpa calls, no fp32 copies of q, k, v and
their gradients (it reads bf16 or fp32 and computes in fp32), the causal half only. It is compiled with
-march=native by torch's C++ extension loader (needs the machine's C++ compiler and ninja, a declared dependency),
cached under the name of this CPU's vector extensions so that a shared cache never runs a binary built for another
CPU. Where it cannot be built, `kernel()` is None (with a warning) and the sdpa path runs instead.
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path

import torch

from pipeline.models.cpu import vector_flags

SOURCE = Path(__file__).with_name("csrc") / "packed_attention_cpu.cpp"
HEAD_DIMS = (32, 64, 80, 96, 128, 256)  # compiled in; others take the sdpa path


@functools.cache
def kernel(arch: str = "native"):
    """The compiled module (forward, backward), or None (with a warning) where it cannot be built here. `arch`: the
    compiler's -march; "native" is this CPU (the tests also build x86-64-v3 and -v2 to run the AVX2 and SSE code)."""
    from torch.utils import cpp_extension

    tag = hashlib.sha1(" ".join(vector_flags()).encode()).hexdigest()[:8] if arch == "native" else arch
    try:
        return cpp_extension.load(name=f"packed_attention_cpu_{tag}".replace("-", "_").replace(".", "_"),
                                  sources=[str(SOURCE)], verbose=False, extra_ldflags=["-fopenmp"],
                                  extra_cflags=["-O3", f"-march={arch}", "-fopenmp", "-fno-math-errno",
                                                "-fno-trapping-math"])
    except Exception as e:  # no compiler, no ninja, a failed build: training still runs, on sdpa
        warnings.warn(f"packed attention's CPU kernel could not be built ({type(e).__name__}: {e}); "
                      "per-sample sdpa runs instead")
        return None


class PackedAttention(torch.autograd.Function):
    """query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D) in their dtype; padding positions get zeros."""

    @staticmethod
    def forward(ctx, query, key, value, samples, scale, window, arch):
        with torch.profiler.record_function("packed_attention_cpu"):
            out, lse = kernel(arch).forward(query, key, value, samples, scale, window)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.samples, ctx.scale, ctx.window, ctx.arch = samples, scale, window, arch  # samples: shared by all layers
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        with torch.profiler.record_function("packed_attention_cpu_backward"):
            dq, dk, dv = kernel(ctx.arch).backward(query, key, value, out, lse, grad_out, ctx.samples, ctx.scale,
                                                   ctx.window)
        return dq, dk, dv, None, None, None, None


def runs_on(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes heads of this size and dtype (fp32 or bf16) here: compiled for it, and built."""
    return dtype in (torch.float32, torch.bfloat16) and head_dim in HEAD_DIMS and kernel() is not None


def takes_fused(query: torch.Tensor, key: torch.Tensor, dropout: float) -> bool:
    """Whether the fused kernel runs: CPU, no attention dropout, as many queries as keys of one dtype, and
    `runs_on` the head size and dtype."""
    return (query.device.type == "cpu" and not dropout and key.dtype == query.dtype
            and query.shape[2] == key.shape[2] and runs_on(query.shape[-1], query.dtype))


def fused_attention(query, key, value, samples: torch.Tensor, scaling=None, window=None,
                    arch: str = "native") -> torch.Tensor:
    """query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D): causal attention within each sample of
    `samples` ((N, 3) int64: row, first position, length), within a sliding `window` when one is set."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    return PackedAttention.apply(q, k, v, samples, float(scale), int(window or 0), arch)
