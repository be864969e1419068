"""Seconds and peak memory of the per-task merge (`pipeline.export.stream_merge`, streaming tensor by tensor) on a
model of a few hundred MB (random weights, built from config, saved locally as a sharded fp32 checkpoint), for an
fp32 base and an NF4 base (target trained, i.e. per-tensor NF4 round trip; and target original).

Each merge runs in a fresh subprocess; after its imports (torch, transformers, bitsandbytes and its one-time native set-up, the model classes) the
peak-RSS counter is reset (/proc/self/clear_refs), so `peak` is the merge's own peak RSS and `peak - base` what the
merge added on top of the imported libraries. Prints a table and
writes bench/results/merge.json.

    .venv/bin/python bench/merge.py                      # Llama d=1024, 8 layers, ffn 2816, vocab 32000 (~680 MB)
    .venv/bin/python bench/merge.py --quick              # small shapes, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ["alpha", "beta", "gamma"]


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) so it measures only what follows (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    """One merge in this process; prints a JSON line with seconds and memory."""
    import bitsandbytes.functional  # noqa: F401  (imports counted in the baseline)
    import torch
    from safetensors import safe_open  # noqa: F401
    from transformers import AutoConfig

    from pipeline.export.merge import _meta_model, nf4_roundtrip, stream_merge
    _meta_model(AutoConfig.from_pretrained(args.base))  # imports the model classes; its tensors are on "meta"
    nf4_roundtrip(torch.randn(256, 256), torch.bfloat16)  # bitsandbytes' one-time native library set-up
    reset = _reset_peak()
    base_rss = _status_mb("VmRSS")
    t0 = time.perf_counter()
    st = stream_merge(args.base, args.adapter, args.task, args.out, args.dtype, args.target, args.max_shard_size)
    files = len(st.files)
    secs = time.perf_counter() - t0
    # VmHWM after the reset = the peak of the merge alone; ru_maxrss (never reset) as a fallback
    peak = _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(seconds=secs, rss_base_mb=base_rss, peak_rss_mb=peak, files=files)))


def build(work: Path, a) -> dict:
    """Base checkpoint (fp32, 200 MB shards) and two adapters (fp32 base; NF4 base with bf16 compute)."""
    import torch
    from transformers import LlamaForCausalLM

    from pipeline.config.more import MoreConfig
    from pipeline.models.loading import load_base_model
    from pipeline.models.tiny import tiny_llama_config
    from pipeline.more import inject
    from pipeline.more.io import save_adapter

    torch.manual_seed(0)
    cfg = tiny_llama_config(a.vocab, hidden_size=a.hidden, num_layers=a.layers, num_heads=a.hidden // 64,
                            num_kv_heads=a.hidden // 64, intermediate_size=a.ffn)
    model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    base = work / "base"
    model.save_pretrained(base, max_shard_size="200MB")
    del model
    adapters = {}
    for name, quant, dt in [("fp32", "none", "fp32"), ("nf4", "nf4", "bf16")]:
        m = inject(load_base_model(str(base), quant, dt), MoreConfig(max_rank=a.rank, gate_init="random"), TASKS)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in m.layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g).to(layer.lora_B.dtype) * 0.02)
        adapters[name] = save_adapter(m, work / f"adapter_{name}")
        del m
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    return dict(base=base, adapters=adapters, params=params, base_bytes=size)


def run_worker(kind, base, adapter, task, out, dtype, target, shard) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--base", str(base), "--adapter", str(adapter), "--task", task,
           "--out", str(out), "--dtype", dtype, "--target", target, "--max-shard-size", shard]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-shard-size", default="100MB")
    ap.add_argument("--quick", action="store_true", help="d=256, 2 layers, vocab 4096")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "merge.json"))
    # worker mode (internal)
    for k in ("--worker", "--base", "--adapter", "--task", "--dtype", "--target"):
        ap.add_argument(k, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        a.out = Path(a.out)
        return worker(a)
    if a.quick:
        a.hidden, a.ffn, a.layers, a.vocab = 256, 704, 2, 4096
    work = Path(a.work or tempfile.mkdtemp(prefix="bench_merge_"))
    try:
        t0 = time.perf_counter()
        b = build(work, a)
        print(f"model: {b['params'] / 1e6:.1f}M params, fp32 checkpoint {b['base_bytes'] / 1e6:.0f} MB "
              f"(built in {time.perf_counter() - t0:.0f}s); output shards <= {a.max_shard_size}", flush=True)
        cases = [("stream", "fp32", "fp32", "trained"), ("stream", "nf4", "bf16", "trained"),
                 ("stream", "nf4", "bf16", "original")]
        rows = []
        hdr = f"{'merge':<10}{'base':<6}{'out':<6}{'target':<10}{'task':<7}{'s':>7}{'files':>6}" \
              f"{'rss base MB':>13}{'peak MB':>9}{'peak-base':>11}"
        print(hdr)
        for kind, base_kind, dtype, target in cases:
            for task in TASKS:
                r = run_worker(kind, b["base"], b["adapters"][base_kind], task, work / "out", dtype, target,
                               a.max_shard_size)
                row = dict(merge=kind, base=base_kind, dtype=dtype, target=target, task=task, **r)
                rows.append(row)
                print(f"{kind:<10}{base_kind:<6}{dtype:<6}{target:<10}{task:<7}{r['seconds']:>7.1f}{r['files']:>6}"
                      f"{r['rss_base_mb']:>13.0f}{r['peak_rss_mb']:>9.0f}"
                      f"{r['peak_rss_mb'] - r['rss_base_mb']:>11.0f}", flush=True)
        result = dict(shape=dict(hidden=a.hidden, ffn=a.ffn, layers=a.layers, vocab=a.vocab, rank=a.rank,
                                 params=b["params"], base_checkpoint_bytes=b["base_bytes"],
                                 largest_tensor_fp32_bytes=a.vocab * a.hidden * 4),
                      max_shard_size=a.max_shard_size, threads=torch_threads(), cpu=platform.processor() or
                      platform.machine(), rows=rows)
        from pipeline.atomic import atomic_write
        atomic_write(a.out, json.dumps(result, indent=2))
        print(f"wrote {a.out}")
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


if __name__ == "__main__":
    main()
