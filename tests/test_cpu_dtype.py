"""`model.dtype: auto`: bf16 where the CPU has bf16 instructions (or on a GPU), fp32 elsewhere, resolved when the
config loads, on any host (the CPU's flags are stubbed)."""
from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from pipeline.config.train import ModelConfig
from pipeline.models import cpu


@pytest.fixture
def flags(monkeypatch):
    def set_flags(*names):
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(names))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return set_flags


@pytest.mark.parametrize("names,dtype,isa", [
    (("avx2",), "fp32", "AVX2"),
    (("avx2", "avx512f"), "fp32", "AVX-512"),
    (("avx2", "avx512f", "avx512_bf16"), "bf16", "AVX-512 AVX512-BF16"),
    (("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"), "bf16", "AVX-512 AVX512-BF16 AMX"),
])
def test_auto_dtype_follows_the_cpu(flags, names, dtype, isa):
    flags(*names)
    assert cpu.fastest_dtype() == dtype and cpu.cpu_isa() == isa
    assert ModelConfig(path="m", dtype="auto").dtype == dtype
    assert ModelConfig(path="m").dtype == dtype  # auto is the default
    assert ModelConfig(path="m", dtype="fp32").dtype == "fp32"  # an explicit dtype stays


@pytest.mark.skipif(not (Path("/proc/cpuinfo").is_file() and platform.machine() == "x86_64"),
                    reason="reads a Linux x86-64 /proc/cpuinfo")
def test_real_cpu_flags_are_read():
    """The flags line of /proc/cpuinfo is parsed: every x86-64 CPU has sse2, and the ISA word matches the flags."""
    got = cpu.cpu_flags()
    assert "sse2" in got and "flags" not in got and ":" not in got
    assert ("AVX-512" in cpu.cpu_isa()) == ("avx512f" in got)


def test_cpu_model_names_the_first_processor_with_its_family(tmp_path):
    """Results record the CPU's generation: two EPYCs that both call themselves "AMD EPYC" differ in family."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\nflags\t\t: sse2 avx2\n\nprocessor\t: 1\ncpu family\t: 25\n")
    assert cpu.cpu_model(info) == "AMD EPYC, family 26 model 2"
    info.write_text("processor\t: 0\nmodel name\t: Neoverse-V2\n")
    assert cpu.cpu_model(info) == "Neoverse-V2"
    assert cpu.cpu_model(tmp_path / "none") == "unknown"
