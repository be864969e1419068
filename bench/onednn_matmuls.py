"""A training step's matrix products timed by oneDNN's own clock: how much of the step its GEMMs are, and how fast.

torch.profiler adds its overhead to every operator (a SmolLM2 step profiled takes 1.4-1.8x as long), so it cannot
say what share of a real step the GEMMs take. oneDNN, which runs PyTorch's 16-bit CPU matmuls, can: with its
verbose mode on it prints one line per primitive executed, with the problem's shape, the operands' memory layouts
and the execution time in ms. fp32 CPU matmuls go to MKL instead, which prints nothing: then there are no records
(nor in a PyTorch built without oneDNN).
"""
from __future__ import annotations

import collections
import ctypes
import os
import re
import sys
import tempfile
import time
from typing import Callable

import torch

_LIBC = ctypes.CDLL(None)


def capture(fn: Callable[[], object]) -> tuple[float, list[str]]:
    """Runs fn() with oneDNN's verbose mode on; returns its wall seconds and oneDNN's `exec` lines. oneDNN writes to
    the process's stdout (file descriptor 1) through C stdio, so that descriptor goes to a file meanwhile."""
    if not torch.backends.mkldnn.is_available():  # a build without oneDNN: the step, and no records
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0, []
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                t0 = time.perf_counter()
                fn()
                wall = time.perf_counter() - t0
        finally:
            _LIBC.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = [ln for ln in log if ln.startswith("onednn_verbose") and ",exec," in ln]
    return wall, lines


_DIMS = re.compile(r"^(\d+(?:x\d+)*):(\d+(?:x\d+)*)$")


def parse(line: str) -> dict | None:
    """One matmul `exec` line as {M, K, N, batch, layouts, ms}; None for other primitives (reorders are timed too
    but are not matmuls)."""
    fields = line.rstrip("\n").split(",")
    if len(fields) < 8 or fields[5] != "matmul":
        return None
    m = _DIMS.match(fields[-2])
    if not m:
        return None
    src, wei = ([int(d) for d in part.split("x")] for part in m.groups())
    batch = 1
    for d in src[:-2]:
        batch *= d
    descs = [d.split(":") for d in fields[8].split()]  # e.g. src:bf16::blocked:ab::f0
    layouts = " ".join(f"{d[0]}:{d[4]}" for d in descs if len(d) > 4)
    return {"M": src[-2], "K": src[-1], "N": wei[-1], "batch": batch, "layouts": layouts, "ms": float(fields[-1])}


def kind(rec: dict, rank: int, vocab: int) -> str:
    """What a product belongs to: the LM head (the vocabulary is one of its sides), the adapter (rank R is one of
    its sides: LoRA's A and B products and their gradients), the base's linears (one side is the tokens: the
    forward and the input gradients), else `other` (the selector's gate and other small products)."""
    dims = (rec["M"], rec["K"], rec["N"])
    if vocab in dims:
        return "head"
    if rank in dims:
        return "adapter"
    return "base" if rec["M"] >= 64 else "other"


def summarise(wall: float, lines: list[str], rank: int, vocab: int, peak: float, top: int = 10) -> dict:
    """Per kind: seconds, calls, GFLOP/s and its share of the GEMM peak (`peak` GFLOP/s); each kind's share of the
    step's wall time; the costliest shapes."""
    recs = [r for r in map(parse, lines) if r]
    shapes: dict[tuple, dict] = collections.defaultdict(lambda: {"calls": 0, "seconds": 0.0, "gflop": 0.0})
    for r in recs:
        s = shapes[(kind(r, rank, vocab), f"{r['M']}x{r['K']}:{r['K']}x{r['N']}", r["layouts"])]
        s["calls"] += 1
        s["seconds"] += r["ms"] / 1e3
        s["gflop"] += 2.0 * r["batch"] * r["M"] * r["K"] * r["N"] / 1e9
    by_kind: dict[str, dict] = {}
    for (k, _, _), s in shapes.items():
        agg = by_kind.setdefault(k, {"seconds": 0.0, "calls": 0, "gflop": 0.0})
        for field in agg:
            agg[field] += s[field]
    for agg in by_kind.values():
        agg["gflops"] = agg["gflop"] / max(agg["seconds"], 1e-12)
        agg["share_of_peak"] = agg["gflops"] / peak
        agg["share_of_step"] = agg["seconds"] / wall
    gemm = sum(a["seconds"] for a in by_kind.values())
    return {
        "step_seconds": wall, "records": len(recs), "gemm_seconds": gemm, "gemm_share_of_step": gemm / wall,
        "by_kind": by_kind,
        "top_shapes": [{"kind": k, "shape": shape, "layouts": lay, "calls": s["calls"], "seconds": s["seconds"],
                        "gflops": s["gflop"] / max(s["seconds"], 1e-12)}
                       for (k, shape, lay), s in sorted(shapes.items(), key=lambda kv: -kv[1]["seconds"])[:top]],
    }


def report(summary: dict) -> list[str]:
    """The summary as printable lines."""
    if not summary["records"]:
        return ["  oneDNN: no matmul records (fp32 CPU matmuls run in MKL, which has no such clock)"]
    out = [f"  oneDNN's clock, one step of {summary['step_seconds']:.2f} s: GEMMs {summary['gemm_seconds']:.2f} s "
           f"({summary['gemm_share_of_step']:.0%})"]
    for k, a in sorted(summary["by_kind"].items(), key=lambda kv: -kv[1]["seconds"]):
        out.append(f"    {k:8s} {a['seconds']:7.3f} s  {a['calls']:5d} calls  {a['gflops']:7.0f} GFLOP/s "
                   f"({a['share_of_peak']:.0%} of the peak)  {a['share_of_step']:.1%} of the step")
    for s in summary["top_shapes"]:
        out.append(f"      {s['seconds']:7.3f} s  {s['calls']:4d} x {s['kind']:7s} {s['shape']:22s} {s['gflops']:6.0f} "
                   f"GFLOP/s  {s['layouts']}")
    return out
