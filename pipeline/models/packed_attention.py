"""Attention over packed rows, sample by sample: `attn_implementation="packed_sdpa"`.

A packed row of 512 holds ~7 GLUE-style samples of ~70 tokens. With a dense (B, 1, L, L) block-causal mask, sdpa
computes all L^2 scores of the row and masks most of them away (on CPU its backward took a fifth of a SmolLM2
training step), and the mask itself is built and held for every micro-batch. Here each sample runs its own causal
sdpa over its own tokens (sum of l^2 scores instead of L^2, no mask tensor), which is what a varlen kernel does on
GPU. Consecutive samples of equal length (best-fit-decreasing packing places samples longest first, so a row is
mostly such runs) share ONE sdpa call as a batch: a view of the row, no copy, no padding; ~23 samples per 4 GLUE
rows take ~7 calls. The samples' boundaries come in as `packed_segments`, computed once per forward
(`packed_segments(...)`) and passed through the model's keyword arguments to every layer. Padding positions get a
zero output (nothing reads them: no label, no contrastive pooling).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "packed_sdpa"


def packed_segments(segment_ids: torch.Tensor) -> list[list[int]]:
    """(B, L) segment ids (-1 = padding, each row's samples contiguous from position 0) -> per row, its samples'
    lengths in order."""
    return [torch.unique_consecutive(row[row >= 0], return_counts=True)[1].tolist() for row in segment_ids]


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          packed_segments=None, out_dtype=None, **kwargs):
    """query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D) in `out_dtype` (default value's), as
    transformers' attention functions return."""
    if packed_segments is None:
        raise ValueError("attn_implementation='packed_sdpa' needs packed_segments=... in the forward call (the "
                         "samples' lengths per row; pipeline.models.packed_attention.packed_segments)")
    B, H, L, D = query.shape
    gqa = key.shape[1] != H
    out_dtype = out_dtype or value.dtype
    if query.device.type == "cpu":  # CPU sdpa in bf16 ran 1.5-5x slower than in fp32 per sample (AMX machine)
        query, key, value = query.float(), key.float(), value.float()
    rows = []
    # split/unbind, not per-sample slicing: slicing's backward fills and adds a full-size (B, H, L, D) gradient per
    # piece and tensor; split's backward is one cat per row
    for q, k, v, lens in zip(query.unbind(0), key.unbind(0), value.unbind(0), packed_segments):
        runs = [(n, len(list(same))) for n, same in itertools.groupby(lens)]  # (sample length, how many in a row)
        sizes = [n * count for n, count in runs]
        sizes.append(L - sum(sizes))  # the last piece is the row's padding (possibly empty)
        parts = []
        for (n, count), qs, ks, vs in zip(runs, q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1)):
            qs, ks, vs = (t.unflatten(1, (count, n)).transpose(0, 1) for t in (qs, ks, vs))  # (count, heads, n, D)
            out = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=scaling, is_causal=True,
                                                 enable_gqa=gqa)
            parts.append(out.transpose(1, 2).reshape(count * n, H, value.shape[-1]))
        if sizes[-1]:  # padding positions: zero output
            parts.append(query.new_zeros(sizes[-1], H, value.shape[-1]))
        rows.append(torch.cat(parts) if len(parts) > 1 else parts[0])
    return torch.stack(rows).to(out_dtype), None


AttentionInterface.register(NAME, packed_sdpa_attention)
