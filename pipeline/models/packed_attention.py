"""Attention over packed rows, each sample attending only within itself: `attn_implementation="packed_sdpa"`.

A packed row of 512 holds ~7 GLUE-style samples of ~70 tokens. With a dense (B, 1, L, L) block-causal mask, sdpa
computes all L^2 scores of the row and masks most of them away (on CPU its backward took a fifth of a SmolLM2
training step), and the mask itself is built and held for every micro-batch. Here no mask exists; the samples'
boundaries come in as `packed_segments` (per row, its samples' lengths), computed once per forward
(`packed_segments(...)`) and passed through the model's keyword arguments to every layer. Two kernels:
- CUDA, bf16/fp16: torch's varlen flash attention (`torch.nn.attention.varlen.varlen_attn`) over the whole batch
  as one flat sequence of tokens, each sample (and each row's padding tail) a sequence of its own: one kernel call
  per layer, sum of l^2 scores. Its cumulative lengths are built once per forward and shared by every layer.
- CPU, bf16/fp32, no dropout: a fused kernel built for this machine on first use (pipeline/models/cpu_attention.py),
  one task per (sample, KV head), reading the 16-bit tensors as they are and computing in fp32: the default
  (`model.cpu_attention: fused`).
- otherwise (`cpu_attention: sdpa`, where the kernel cannot be built; fp32 or dropout on CUDA): each sample runs its
  own causal sdpa over its own tokens (on CPU in fp32). Consecutive samples of equal length (prep puts each row's
  samples longest first, so equal lengths sit together) share ONE sdpa call as a batch: a view of the row, no copy,
  no padding; ~22 samples per 4 GLUE rows take ~13 calls.
Padding positions get a zero output on both (nothing reads them: no label, no contrastive pooling).
"""
from __future__ import annotations

import functools
import inspect
import itertools
import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from pipeline.models import cpu_attention

NAME = "packed_sdpa"
CPU_KERNELS = ("fused", "sdpa")
_cpu_kernel = ["fused"]  # the process's choice (the trainer sets `model.cpu_attention`)


def use_cpu_kernel(name: str) -> None:
    """Which kernel packed attention runs on CPU in this process: "fused" (where it builds) or "sdpa"."""
    if name not in CPU_KERNELS:
        raise ValueError(f"CPU attention kernel must be one of {CPU_KERNELS}, got {name!r}")
    _cpu_kernel[0] = name


def cpu_attends_in_fp32(head_dim: int, dtype: torch.dtype, kernel: str = "fused") -> bool:
    """Whether packed attention on CPU keeps fp32 copies of a 16-bit model's q, k, v (the sdpa path) rather than
    running the fused kernel on them as they are: what the memory planner needs to know."""
    return dtype != torch.float32 and not (kernel == "fused" and cpu_attention.runs_on(head_dim, dtype))


class PackedSegments(list):
    """Per row, its samples' lengths in order (a list of lists), plus the varlen kernel's layout of them, built on
    first use and kept: one object serves every layer of one forward."""

    def __init__(self, lengths):
        super().__init__(lengths)
        self._varlen = self._table = None

    def sample_table(self) -> torch.Tensor:
        """(N, 3) int64: every sample's row, first position and length (the fused CPU kernel's input)."""
        if self._table is None:
            firsts = [list(itertools.accumulate(lens, initial=0))[:-1] for lens in self]
            self._table = torch.tensor([(b, f, n) for b, lens in enumerate(self) for f, n in zip(firsts[b], lens)],
                                       dtype=torch.int64).reshape(-1, 3)
        return self._table

    def varlen_layout(self, row_len: int, device: torch.device):
        """(cu_seqlens int32 (N+1,), longest sequence, padding (B*L,) bool or None) for B rows of `row_len` tokens
        flattened into one: every sample, and every row's padding tail, is one of the N sequences."""
        if self._varlen is None or self._varlen[0] != (row_len, device):
            lengths, padding = [], []
            for lens in self:
                pad = row_len - sum(lens)
                if pad < 0:
                    raise ValueError(f"packed samples of {sum(lens)} tokens in a row of {row_len}")
                lengths += lens + ([pad] if pad else [])
                padding += [False] * sum(lens) + [True] * pad
            cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(device)
            pad_mask = torch.tensor(padding).to(device) if any(padding) else None
            self._varlen = ((row_len, device), (cu, max(lengths), pad_mask))
        return self._varlen[1]


def packed_segments(segment_ids: torch.Tensor) -> PackedSegments:
    """(B, L) segment ids (-1 = padding, each row's samples contiguous from position 0) -> per row, its samples'
    lengths in order. Read on the CPU: one copy from a GPU, not a wait per row."""
    return PackedSegments([torch.unique_consecutive(row[row >= 0], return_counts=True)[1].tolist()
                           for row in segment_ids.cpu()])


@functools.cache
def torch_varlen_kernel():
    """kernel(q (T, H, D), k, v (T, Hkv, D), cu_seqlens, max_len, scale, window) -> causal attention within each
    sequence (each token over itself and at most window - 1 tokens before it, when `window`), through torch's varlen
    flash attention; None where this torch has none. Its keywords moved between releases (torch 2.10: is_causal, no
    window; later: window_size=(left, 0), scale, enable_gqa); the flash kernel itself takes grouped KV heads.
    `kernel.takes_window`: whether it can apply a sliding window."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    takes_window, takes_scale = "window_size" in params, "scale" in params
    base = {"enable_gqa": True} if "enable_gqa" in params else {}

    def kernel(q, k, v, cu, max_len, scale, window=None):
        if window is not None and not takes_window:
            raise ValueError("this torch's varlen attention takes no sliding window")
        kw = dict(base, **({"window_size": (window - 1 if window else -1, 0)} if takes_window else {"is_causal": True}))
        if takes_scale:
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **kw)
        if scale is not None:  # the kernel's own scale is 1/sqrt(D)
            q = q * (scale * math.sqrt(q.shape[-1]))
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

    kernel.takes_window = takes_window
    return kernel


def varlen_attention(query, key, value, segments: PackedSegments, scaling=None, kernel=None,
                     window=None) -> torch.Tensor:
    """query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D): every row's tokens in one flat sequence,
    one kernel call (`kernel`: torch_varlen_kernel()'s signature; tests pass a reference)."""
    B, H, L, D = query.shape
    cu, max_len, padding = segments.varlen_layout(L, query.device)
    flat = [t.transpose(1, 2).reshape(B * L, t.shape[1], t.shape[-1]) for t in (query, key, value)]
    out = (kernel or torch_varlen_kernel())(*flat, cu, max_len, scaling, window)
    if padding is not None:  # padding tails attended among themselves: give them the per-sample path's zeros
        out = out.masked_fill(padding[:, None, None], 0.0)
    return out.view(B, L, H, value.shape[-1])


def causal_band(n: int, window, device) -> torch.Tensor | None:
    """(n, n) bool: token i sees tokens i - window + 1 .. i (transformers' sliding window); None when the window
    covers the whole sample (plain causal attention)."""
    if window is None or n <= window:
        return None
    i = torch.arange(n, device=device)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)


def per_sample_attention(query, key, value, segments, dropout: float = 0.0, scaling=None,
                         window=None) -> torch.Tensor:
    """query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D): one sdpa call per run of equal-length samples;
    a sample longer than a sliding `window` gets its band mask."""
    B, H, L, D = query.shape
    gqa = key.shape[1] != H
    rows = []
    # split/unbind, not per-sample slicing: slicing's backward fills and adds a full-size (B, H, L, D) gradient per
    # piece and tensor; split's backward is one cat per row
    for q, k, v, lens in zip(query.unbind(0), key.unbind(0), value.unbind(0), segments):
        runs = [(n, len(list(same))) for n, same in itertools.groupby(lens)]  # (sample length, how many in a row)
        sizes = [n * count for n, count in runs]
        sizes.append(L - sum(sizes))  # the last piece is the row's padding (possibly empty)
        parts = []
        for (n, count), qs, ks, vs in zip(runs, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1)):
            qs, ks, vs = (t.unflatten(1, (count, n)).transpose(0, 1) for t in (qs, ks, vs))  # (count, heads, n, D)
            band = causal_band(n, window, q.device)
            out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=band, dropout_p=dropout, scale=scaling,
                                                 is_causal=band is None, enable_gqa=gqa)
            parts.append(out.transpose(1, 2).reshape(count * n, H, value.shape[-1]))
        if sizes[-1]:  # padding positions: zero output
            parts.append(query.new_zeros(sizes[-1], H, value.shape[-1]))
        rows.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    return torch.stack(rows)


def takes_varlen(query: torch.Tensor, dropout: float) -> bool:
    """Whether the varlen kernel runs: CUDA on an Ampere or newer GPU (flash attention's), 16-bit, no attention
    dropout (it has none), a flash head size."""
    D = query.shape[-1]
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and not dropout
            and D % 8 == 0 and D <= 256 and torch.cuda.get_device_capability(query.device) >= (8, 0)
            and torch_varlen_kernel() is not None)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          packed_segments=None, out_dtype=None, sliding_window=None, softcap=None, **kwargs):
    """query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D) in `out_dtype` (default value's), as
    transformers' attention functions return. `sliding_window`: the layer's window (Mistral v0.1, Gemma 2/3's
    local layers), applied within each sample."""
    if softcap is not None:
        raise ValueError(f"attn_implementation={NAME!r} does not apply attention logit soft-capping (this model's "
                         f"softcap={softcap}, Gemma 2): set model.attn_implementation: eager (its dense mask has no "
                         f"sliding window: rows no longer than the model's window, prep max_seq_len)")
    if packed_segments is None:
        raise ValueError("attn_implementation='packed_sdpa' needs packed_segments=... in the forward call (the "
                         "samples' lengths per row; pipeline.models.packed_attention.packed_segments)")
    if len(packed_segments) != query.shape[0]:
        raise ValueError(f"packed_segments holds {len(packed_segments)} rows for a batch of {query.shape[0]}")
    out_dtype = out_dtype or value.dtype
    if not isinstance(packed_segments, PackedSegments):
        packed_segments = PackedSegments(packed_segments)
    if takes_varlen(query, dropout) and (sliding_window is None or torch_varlen_kernel().takes_window):
        return varlen_attention(query, key, value, packed_segments, scaling, window=sliding_window).to(out_dtype), None
    if _cpu_kernel[0] == "fused" and cpu_attention.takes_fused(query, key, dropout):
        samples = packed_segments.sample_table()
        return cpu_attention.fused_attention(query, key, value, samples, scaling, sliding_window).to(out_dtype), None
    if query.device.type == "cpu":  # CPU sdpa in bf16 ran 1.5-5x slower than in fp32 per sample (AMX machine)
        query, key, value = query.float(), key.float(), value.float()
    return per_sample_attention(query, key, value, packed_segments, dropout, scaling, sliding_window).to(out_dtype), None


AttentionInterface.register(NAME, packed_sdpa_attention)
