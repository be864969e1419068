"""What this machine computes fast. oneDNN and bitsandbytes branch on the CPU's vector extensions, so the compute
dtype that trains fastest depends on them: on 2 AMX cores a 2048^2 bf16 GEMM ran ~4x the fp32 rate (837 vs 208
GFLOP/s), while a CPU without bf16 instructions (AVX2 only) runs bf16 ~10x slower than fp32."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return frozenset()
    text = info.read_text()
    if "flags" not in text:
        return frozenset()
    return frozenset(text.split("flags", 1)[1].split("\n", 1)[0].lstrip(" \t:").split())


def cpu_model(info: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name with its family and model numbers ("AMD EPYC, family 26 model 2"): a virtual machine's name
    often hides the generation (a Zen 4 and a Zen 5 EPYC both say "AMD EPYC") that the kernels' speed follows."""
    if not info.is_file():
        return "unknown"
    fields = {}
    for line in info.read_text().split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", "unknown")
    if "cpu family" in fields:
        name += f", family {fields['cpu family']} model {fields.get('model', '?')}"
    return name


def vector_flags() -> list[str]:
    """The AVX and AMX flags, sorted: what a benchmark result records of its CPU."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))


def cpu_isa() -> str:
    """The extensions the kernels branch on, in words ("AVX-512 AVX512-BF16 AMX", "AVX2"): results record it."""
    flags = cpu_flags()
    return " ".join(n for n, f in (("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_bf16"))
                    if f in flags) or ("AVX2" if "avx2" in flags else "no AVX2")


def fastest_dtype() -> str:
    """The training compute dtype for `model.dtype: auto`: bf16 on a GPU or on a CPU with bf16 instructions
    (AVX512-BF16 or AMX), fp32 on other CPUs.

    Measured with SmolLM2-135M + MoRE on NF4, 1 process, 2 cores: bf16 trained 1.77x faster than fp32 on an
    AVX512-BF16 EPYC (no AMX) and 1.48x on an AMX Xeon (bench/vs_trl.py); on an AVX2-only EPYC bf16 matmuls ran
    ~10x slower than fp32."""
    if torch.cuda.is_available():
        return "bf16"
    return "bf16" if {"avx512_bf16", "amx_bf16"} & cpu_flags() else "fp32"
