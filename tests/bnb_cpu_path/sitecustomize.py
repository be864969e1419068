"""Test-only start-up hook: with `BNB_FORCE_AVX512BF16=1` (or `0`) every bitsandbytes Linear4bit built in this
process believes the CPU has (lacks) AVX512-BF16, so a test's subprocesses (DeepSpeed ranks, `make demo`) take the
bitsandbytes CPU branch the test chose, whatever CPU runs the suite. Reaches processes through PYTHONPATH."""
import os

_forced = os.environ.get("BNB_FORCE_AVX512BF16")
if _forced in ("0", "1"):
    import bitsandbytes.nn.modules as _bnb_modules

    _bnb_modules.has_avx512bf16 = lambda: _forced == "1"
