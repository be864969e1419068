"""Where one training step's time goes: the documented trainer's step on the real model, timed by phase and by
operator kind, so that the distance to the machine's matmul peak (bench/vs_trl.py) can be attributed.

The same run as vs_trl's `ours_1p_more` (SmolLM2 on an NF4 base, the GLUE mix through its chat template, 4 packed
rows of 512 per step, 1 process under ZeRO-3, gradient checkpointing off, --dtype auto), built in this process with
the trainer's own classes. After --warmup steps, --steps steps run under torch.profiler:
- phases (wall seconds per step): batch (data), forward, backward, optimizer (DeepSpeed's step), rest;
- operator kinds (self CPU seconds per step, by operator name): matmul, NF4 dequantization, attention, optimizer;
  LoRA/selector small ops are not separable from the model's other element-wise work and count as
  `elementwise/other`;
- the matmul operators' own rate (their FLOPs over their self time) against the GEMM peak measured in the same run:
  whether the matmuls are slow themselves (small shapes) or the time goes elsewhere;
- before those, one step without the profiler, its 16-bit matmuls timed by oneDNN itself (bench/onednn_matmuls.py):
  base linears, adapter, LM head, each with its GFLOP/s and share of that step, and the costliest shapes.

    .venv/bin/python bench/step_profile.py --model models/smollm2-135m-instruct   # ~3 min, 2 cores
    .venv/bin/python bench/step_profile.py --quick --model DIR                    # any model folder (the test)
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import onednn_matmuls  # noqa: E402
from gemm_peak import machine, peak_gflops  # noqa: E402
from vs_trl import TRAIN_CONFIG, ours_overrides, prepare_data  # noqa: E402
from pipeline.atomic import atomic_write  # noqa: E402
from pipeline.models.cpu import fastest_dtype  # noqa: E402

KINDS = {  # operator kind: substrings of profiler event names (self time; first match wins)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_addmm_activation"),
    "nf4_dequantize": ("bitsandbytes", "dequantize"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "packed_attention_cpu"),
    "optimizer": ("adam", "Adam", "_foreach_"),  # Adam's kernels and the foreach ops of its step and clipping
}


def kind_of(name: str) -> str:
    for kind, keys in KINDS.items():
        if any(k in name for k in keys):
            return kind
    return "elementwise/other"


class PhaseClock:
    """Wall time per phase: wraps the callables the trainer's step goes through."""

    def __init__(self):
        self.seconds = collections.Counter()

    def wrap(self, obj, attr: str, phase: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[phase] += time.perf_counter() - t0

        setattr(obj, attr, timed)


def build_trainer(model: Path, data: Path, out: Path, dtype: str, zero: int = 3):
    """The trainer of `python launch/train.py` with vs_trl's ours_1p_more settings (ZeRO stage `zero`), in this
    process."""
    from pipeline.config.base import load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train.loop import build_trainer as build

    sets = [*ours_overrides(out, model, data, 1000, 1, dtype), "eval.every=0"]
    with contextlib.chdir(ROOT):
        return build(load_config(TrainConfig, TRAIN_CONFIG, sets), str(ROOT / f"ds_configs/zero{zero}.json"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models/smollm2-135m-instruct")
    ap.add_argument("--quick", action="store_true", help="1 warm-up and 1 profiled step on few samples")
    ap.add_argument("--warmup", type=int, default=None, help="steps before profiling (3; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="profiled steps (3; quick 1)")
    ap.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--zero", type=int, choices=[2, 3], default=3, help="ds_configs/zero{2,3}.json (3)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (1 if args.quick else 3)
    work = args.work or ROOT / "runs" / ("bench-step-profile-quick" if args.quick else "bench-step-profile")
    out_file = args.out or ROOT / "bench/results" / ("step_profile_quick.json" if args.quick else "step_profile.json")
    dtype = fastest_dtype() if args.dtype == "auto" else args.dtype
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

    data = prepare_data(args.model.resolve(), work / "data", 40 if args.quick else 400)
    trainer = build_trainer(args.model.resolve(), data, work / "run", dtype, args.zero)
    peak = peak_gflops(torch_dtype, 1.0 if args.quick else 3.0)
    for _ in range(warmup):
        trainer.train_step()
    # one step without the profiler, its matmuls timed by oneDNN: their real share of a step
    vocab = trainer.engine.module.base_model.config.vocab_size
    onednn = onednn_matmuls.summarise(*onednn_matmuls.capture(trainer.train_step), trainer.cfg.more.max_rank, vocab,
                                      peak)

    clock = PhaseClock()
    clock.wrap(trainer.data, "next_train_batch", "batch")
    clock.wrap(trainer.engine, "forward", "forward")
    clock.wrap(trainer.engine, "backward", "backward")
    clock.wrap(trainer.engine, "step", "optimizer")
    tokens = 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens += trainer.train_step()["tokens"]
        wall = time.perf_counter() - t0
    phases = {k: v / steps for k, v in clock.seconds.items()}
    phases["rest"] = wall / steps - sum(phases.values())

    by_kind, matmul_flops = collections.Counter(), 0
    for e in prof.key_averages():
        kind = kind_of(e.key)
        by_kind[kind] += e.self_cpu_time_total / 1e6 / steps
        if kind == "matmul":
            matmul_flops += e.flops
    profiled = sum(by_kind.values())
    matmul_gflops = matmul_flops / 1e9 / steps / max(by_kind["matmul"], 1e-9)
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    result = {
        "command": "python bench/step_profile.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "dtype": dtype, "zero_stage": args.zero, "steps": steps, "real_tokens_per_step": tokens / steps,
        "step_seconds": wall / steps, "tokens_per_s": tokens / wall,
        "phases_s": phases, "op_kinds_self_s": dict(by_kind),
        "matmul_share_of_op_time": by_kind["matmul"] / max(profiled, 1e-9),
        "matmul_gflops": matmul_gflops, "matmul_peak_gflops": peak, "matmul_rate_vs_peak": matmul_gflops / peak,
        "top_ops": [{"name": e.key, "self_s_per_step": e.self_cpu_time_total / 1e6 / steps, "calls_per_step":
                     e.count / steps} for e in top],
        "onednn": onednn,
    }
    print(f"[step_profile] {dtype}, {tokens / steps:.0f} real tokens/step, {wall / steps:.2f} s/step "
          f"({tokens / wall:.0f} tokens/s; the profiler adds its own overhead)")
    print("  phases (s/step): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    print("  op kinds (self s/step): " + ", ".join(f"{k} {v:.3f}" for k, v in by_kind.most_common()))
    print(f"  matmuls: {result['matmul_share_of_op_time']:.0%} of operator time, {matmul_gflops:.0f} GFLOP/s "
          f"= {result['matmul_rate_vs_peak']:.0%} of the {peak:.0f} GFLOP/s GEMM peak")
    for e in result["top_ops"]:
        print(f"    {e['self_s_per_step']:8.3f} s  {e['calls_per_step']:7.0f} calls  {e['name']}")
    print("\n".join(onednn_matmuls.report(onednn)))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_file, json.dumps(result, indent=2) + "\n")
    from pipeline.train.distributed import shutdown
    shutdown(trainer.engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
