"""Packed attention's kernels side by side on one layer's shapes: forward + backward of attention over packed rows
of GLUE-like samples, each sample attending only within itself.

    fused_cpu   the fused CPU kernel, one task per (sample, KV head) (the trainer's CPU path; CPU only)
    per_sample  one sdpa call per run of equal-length samples (`model.cpu_attention: sdpa`; on CPU in fp32, as the
                trainer runs it)
    varlen      torch's varlen flash kernel over the flat batch, one call (the CUDA path in bf16/fp16; CUDA only)
    dense_mask  one sdpa call per batch with the (B, 1, L, L) block-causal mask (`attn_implementation=sdpa`)

Every kernel's output and input gradients are checked against dense_mask's at the real positions before timing.
Shapes: SmolLM2-135M's heads (9 query, 3 KV, 64 wide) and a ~1B Llama's (32, 8, 64); sample lengths drawn once
(seeded, log-normal around 70 tokens like the GLUE mix through a chat template) and packed as prep packs them.

    python bench/packed_attention_kernels.py --device cuda --out bench/results/packed_attention_cuda.json
    python bench/packed_attention_kernels.py --device cpu --dtype bf16 --out bench/results/packed_attention_cpu_bf16.json
    python bench/packed_attention_kernels.py --quick --out DIR/k.json        # the test: CPU, small, few repeats
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.atomic import atomic_write  # noqa: E402
from pipeline.data.loader import block_causal_mask  # noqa: E402
from pipeline.data.pack import pack  # noqa: E402
from pipeline.models import cpu_attention  # noqa: E402
from pipeline.models import packed_attention as pa  # noqa: E402
from pipeline.models.cpu import cpu_isa, cpu_model  # noqa: E402

SHAPES = {"smollm2-135m": (9, 3, 64), "llama-1b": (32, 8, 64)}  # query heads, KV heads, head width


def glue_like_rows(rows: int, row_len: int, seed: int = 0) -> list[list[int]]:
    """Sample lengths (log-normal, median ~70, 12..row_len) packed by prep's packer; the `rows` fullest rows, each
    row's sample lengths longest first."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(2 * rows * row_len // 70, generator=g) * 0.5 + 4.25).exp().round().clamp(12, row_len)
    lengths = lengths.long().numpy()
    packed = [lengths[r].tolist() for r in pack(lengths, row_len)]
    return sorted(packed, key=sum, reverse=True)[:rows]


def segment_ids(segments: list[list[int]], row_len: int) -> torch.Tensor:
    """(B, row_len) segment ids of rows holding samples of these lengths (-1 = padding), as prep writes them."""
    seg = torch.full((len(segments), row_len), -1)
    for b, lens in enumerate(segments):
        seg[b, :sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    return seg


def kernels(device: str, dtype: torch.dtype, mask: torch.Tensor):
    """name -> f(q, k, v, segments) -> (B, L, H, D), as the trainer would run it on this device."""
    def per_sample(q, k, v, seg):
        if q.device.type == "cpu":  # the trainer's CPU path computes in fp32
            return pa.per_sample_attention(q.float(), k.float(), v.float(), seg).to(q.dtype)
        return pa.per_sample_attention(q, k, v, seg)

    def dense(q, k, v, seg):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
                                              ).transpose(1, 2)

    out = {"per_sample": per_sample, "dense_mask": dense}
    probe = torch.empty(1, 1, 1, 64, dtype=dtype, device=device)
    if cpu_attention.takes_fused(probe, probe, 0.0):
        out["fused_cpu"] = lambda q, k, v, seg: cpu_attention.fused_attention(q, k, v, seg.sample_table())
    if device == "cuda" and pa.takes_varlen(torch.empty(1, 1, 1, 64, device=device, dtype=dtype), 0.0):
        out["varlen"] = lambda q, k, v, seg: pa.varlen_attention(q, k, v, seg)
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, q, k, v, seg, upstream, repeats: int, device: str) -> tuple[float, list[torch.Tensor]]:
    """(median ms of forward + backward, [output, dq, dk, dv] of one call)."""
    def step():
        for t in (q, k, v):
            t.grad = None
        out = fn(q, k, v, seg)
        (out.float() * upstream).sum().backward()
        return out

    out = step()
    got = [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=None, help="packed rows per batch (default: 16 on CUDA, 4 on CPU)")
    ap.add_argument("--row-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per kernel (default 20; quick 2)")
    ap.add_argument("--quick", action="store_true", help="SmolLM2's shape, 2 rows of 256, 2 repeats (the test)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="q, k, v as the model hands them over (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = a.device
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: torch {torch.__version__} sees no GPU here (take --device cpu)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if device == "cuda" else "fp32")]
    rows = a.rows or (2 if a.quick else 16 if device == "cuda" else 4)
    row_len = 256 if a.quick else a.row_len
    repeats = a.repeats or (2 if a.quick else 20)
    shapes = {"smollm2-135m": SHAPES["smollm2-135m"]} if a.quick else SHAPES
    segments = pa.PackedSegments(glue_like_rows(rows, row_len))
    seg = segment_ids(segments, row_len)
    mask = block_causal_mask(seg, dtype).to(device)  # the collator's mask for attn_implementation=sdpa
    real = (seg >= 0).to(device)
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    results = {}
    for shape_name, (heads, kv_heads, width) in shapes.items():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(rows, h, row_len, width, generator=g).to(device, dtype).requires_grad_()
                   for h in (heads, kv_heads, kv_heads))
        upstream = (torch.randn(rows, row_len, heads, width, generator=g).to(device) * real[:, :, None, None])
        rec, reference = {}, None
        for name, fn in sorted(kernels(device, dtype, mask).items(), key=lambda kv: kv[0] != "dense_mask"):
            ms, got = measure(fn, q, k, v, segments, upstream, repeats, device)
            if reference is None:
                reference = got
            worst = max(float((a_[real] if i == 0 else a_).sub(b_[real] if i == 0 else b_).abs().max())
                        for i, (a_, b_) in enumerate(zip(got, reference)))
            if worst > tol * max(1.0, float(reference[0][real].abs().max())):
                sys.exit(f"{shape_name} {name}: differs from dense_mask by {worst:.3g} (outputs or gradients)")
            rec[name] = {"ms": round(ms, 3), "max_abs_diff_vs_dense": worst}
            print(f"[kernels] {shape_name} {name}: {ms:.2f} ms forward + backward", flush=True)
        for name in rec:
            rec[name]["speedup_vs_per_sample"] = round(rec["per_sample"]["ms"] / rec[name]["ms"], 3)
        results[shape_name] = {"heads": heads, "kv_heads": kv_heads, "head_dim": width, "kernels": rec}
    out = {"command": "python bench/packed_attention_kernels.py" + (" --quick" if a.quick else "")
                      + f" --device {device}" + (f" --rows {a.rows}" if a.rows else "")
                      + (f" --dtype {a.dtype}" if a.dtype else "")
                      + (f" --out {a.out}" if a.out else ""),
           "device": (torch.cuda.get_device_name() if device == "cuda"
                      else f"{cpu_model()} ({cpu_isa()}), {torch.get_num_threads()} threads"),
           "dtype": str(dtype).removeprefix("torch."), "rows": rows, "row_len": row_len, "repeats": repeats,
           "samples": sum(len(s) for s in segments), "real_tokens": sum(map(sum, segments)),
           "torch": torch.__version__, "shapes": results}
    path = Path(a.out or ROOT / "bench" / "results" / f"packed_attention_{device}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
