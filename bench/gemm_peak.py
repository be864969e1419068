"""The GEMM peak that bench/vs_trl.py and bench/step_profile.py divide by (`peak_gflops`), and a probe of whether it
is really this machine's best: the bf16 (or fp32) `torch.mm` rate of square shapes and of a model's own linear
shapes (a 4 x 512-token step: forward and input-gradient products), on all threads of one process, and with one
thread in each of several processes at once (the 2-rank ZeRO-3 layout). Were another shape clearly faster than the
peak, the benchmarks' "share of the peak" would flatter us.

    .venv/bin/python bench/gemm_peak.py --model models/smollm2-135m-instruct --out bench/results/gemm_peak.json
    .venv/bin/python bench/gemm_peak.py --quick --out DIR/gemm.json     # the test: small shapes, 0.2 s each
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import queue as queue_module
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.atomic import atomic_write  # noqa: E402
from pipeline.models.cpu import cpu_isa, cpu_model, fastest_dtype, vector_flags  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PEAK_SIZES = (512, 1024, 2048)  # squares; on a 2-core AVX512-BF16 EPYC 512-1024 ran 3-7% faster than 2048
CUDA_PEAK_SIZES = (4096, 8192)  # a GPU needs large squares to reach its peak


def best_gflops(m: int, k: int, n: int, dtype: torch.dtype, seconds: float, device: str = "cpu") -> float:
    """Best rate of (m x k) @ (k x n) over `seconds` of back-to-back calls (on CUDA each call synchronised)."""
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return best


def machine() -> dict:
    """The CPU a result was measured on, as gemm_peak and step_profile record it (report.py reads it back)."""
    return {"cpu": platform.processor() or platform.machine(), "model": cpu_model(), "isa": cpu_isa(),
            "flags": vector_flags(), "threads": torch.get_num_threads()}


def peak_sizes(device: str = "cpu") -> tuple[int, ...]:
    return CUDA_PEAK_SIZES if device == "cuda" else PEAK_SIZES


def peak_gflops(dtype: torch.dtype, seconds: float = 3.0, device: str = "cpu") -> float:
    """This process's GEMM peak on all its threads (or its GPU): the best rate over the peak squares, `seconds` in
    all."""
    sizes = peak_sizes(device)
    return max(best_gflops(s, s, s, dtype, seconds / len(sizes), device) for s in sizes)


def model_shapes(model_dir: Path, tokens: int) -> dict[str, tuple[int, int, int]]:
    """(m, k, n) of every distinct decoder linear of a Llama-family config, forward and input gradient."""
    from transformers import AutoConfig

    from pipeline.plan.model import head_dim

    c = AutoConfig.from_pretrained(model_dir)
    d, f = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * head_dim(c)
    shapes = {}
    for name, (i, o) in {"q/o": (d, d), "k/v": (d, kv), "gate/up": (d, f), "down": (f, d)}.items():
        shapes[f"{name} forward"] = (tokens, i, o)
        shapes[f"{name} input grad"] = (tokens, o, i)
    return shapes


def _worker(shape, dtype, seconds, barrier, queue) -> None:
    torch.set_num_threads(1)
    torch.mm(torch.randn(64, 64, dtype=dtype), torch.randn(64, 64, dtype=dtype))
    barrier.wait()
    queue.put(best_gflops(*shape, dtype, seconds))


def per_process_gflops(shape, dtype, seconds: float, processes: int) -> list[float]:
    """Each of `processes` single-thread processes' best rate, all running at once."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(shape, dtype, seconds, barrier, queue)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = []
    try:
        while len(rates) < processes:
            try:
                rates.append(queue.get(timeout=1.0))
            except queue_module.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:  # the others wait at the barrier or have finished: stop rather than hang
                    raise RuntimeError(f"gemm worker exited with {dead[0]}") from None
    finally:
        for p in procs:
            if p.is_alive() and len(rates) < processes:
                p.terminate()
            p.join()
    return sorted(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="add this model's linear shapes (a Llama config)")
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto")
    ap.add_argument("--seconds", type=float, default=3.0, help="per shape (best call counts)")
    ap.add_argument("--processes", type=int, default=2, help="single-thread processes at once (0: skip)")
    ap.add_argument("--quick", action="store_true", help="small shapes, 0.2 s each")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gemm_peak.json")
    a = ap.parse_args()
    dtype_name = fastest_dtype() if a.dtype == "auto" else a.dtype
    dtype = DTYPES[dtype_name]
    seconds = 0.2 if a.quick else a.seconds
    peak_sizes = (128, 256) if a.quick else PEAK_SIZES
    shapes = {f"{s}^3": (s, s, s) for s in (*peak_sizes, *(() if a.quick else (256, 4096)))}
    if not a.quick:
        shapes["2048x2048x8192"] = (2048, 2048, 8192)
        shapes["2048x8192x2048"] = (2048, 8192, 2048)
    if a.model is not None:
        shapes.update(model_shapes(a.model, 256 if a.quick else 2048))

    rates = {}
    for name, shape in shapes.items():
        rates[name] = best_gflops(*shape, dtype, seconds)
        print(f"  {name:28s} {'x'.join(map(str, shape)):>16s}  {rates[name]:8.1f} GFLOP/s", flush=True)
    peak_names = [f"{s}^3" for s in peak_sizes]
    peak_shape = max(peak_names, key=rates.get)  # what peak_gflops would return
    split = []
    if a.processes > 0:
        split = per_process_gflops(shapes[peak_shape], dtype, seconds, a.processes)
        print(f"  {peak_shape} on 1 thread in each of {a.processes} processes at once: "
              + ", ".join(f"{r:.1f}" for r in split) + f" GFLOP/s (sum {sum(split):.1f})")
    best = max(rates, key=rates.get)
    result = {
        "command": "python bench/gemm_peak.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "dtype": dtype_name, "seconds_per_shape": seconds,
        "shapes": {n: {"mkn": list(s), "gflops": rates[n]} for n, s in shapes.items()},
        "peak_shapes": peak_names, "peak_shape": peak_shape, "peak_gflops": rates[peak_shape],
        "best_shape": best, "best_gflops": rates[best], "best_over_peak": rates[best] / rates[peak_shape],
        "processes": a.processes, "per_process_one_thread_gflops": split,
    }
    print(f"[gemm_peak] {dtype_name}: best {best} {rates[best]:.1f} GFLOP/s = {result['best_over_peak']:.2f}x the "
          f"benchmarks' peak (best of {', '.join(peak_names)}: {peak_shape} {rates[peak_shape]:.1f})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
