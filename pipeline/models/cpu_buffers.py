"""Reused CPU memory for a training step's large activations and gradients.

PyTorch keeps no cache of freed CPU memory, and glibc maps every block above its mmap threshold (at most 32 MiB)
afresh, so each new large tensor page-faults all of its memory on first write. On the 2-core AMX Xeon a (2048, 8192)
bf16 MLP activation of a ~1B Llama cost that much again as the work that fills it: x @ W.T into a fresh output
37 ms, into a mapped one 27 ms; silu 12.9 vs 4.3 ms; a product 13.8 vs 2.8 ms. Lowering glibc's thresholds instead
lets its heap fragment (peak RSS grew by a third and the gain was inside the noise, bench/NOTES.md); here a block is
only ever reused for a tensor of its size class (eight per doubling, so a packed batch a few tokens shorter still
fits the block of a full one), and the pool holds at most the step's peak of live tensors of each class, which the
step needs anyway. Blocks under 1 MiB are left to glibc, whose heap serves them without page faults.

A block is free when nothing but the pool holds its storage: tensors handed out, their views and autograd's saved
copies all count. Used from the training thread only (the batch prefetch thread never takes blocks).
"""
from __future__ import annotations

from math import prod

import torch

_BLOCKS: dict[int, list[torch.UntypedStorage]] = {}
_MIN_BYTES = 1 << 20


def size_class(nbytes: int) -> int:
    """`nbytes` rounded up to a multiple of 1/8 of its power of two: at most 12.5% more than asked."""
    step = 1 << max(0, nbytes.bit_length() - 4)
    return -(-nbytes // step) * step


def _unused(storage: torch.UntypedStorage) -> bool:
    return torch._C._storage_Use_Count(storage._cdata) == 1


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, in a pooled block that nothing else holds now."""
    shape = tuple(shape)
    nbytes = prod(shape) * dtype.itemsize
    if nbytes < _MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    size = size_class(nbytes)
    blocks = _BLOCKS.setdefault(size, [])
    storage = next((s for s in blocks if _unused(s)), None)
    if storage is None:
        storage = torch.UntypedStorage(size)
        blocks.append(storage)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def held_bytes() -> int:
    """Bytes the pool holds, in use or not."""
    return sum(s.nbytes() for blocks in _BLOCKS.values() for s in blocks)


def release() -> None:
    """Drop the pool's references: blocks in use live on with their tensors, the rest are freed."""
    _BLOCKS.clear()
