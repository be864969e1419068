"""Reused CPU memory for a training step's large activations and gradients.

PyTorch keeps no cache of freed CPU memory, and glibc maps every block above its mmap threshold (at most 32 MiB)
afresh, so each new large tensor page-faults all of its memory on first write. On the 2-core AMX Xeon, for a
(2048, 8192) bf16 MLP activation of a ~1B Llama, fresh against already-mapped memory: x @ W.T 37 vs 27 ms, silu 12.9
vs 4.3 ms, a product 13.8 vs 2.8 ms. Raising glibc's thresholds instead keeps freed memory in its heap, which
fragments: peak RSS grew by a third in one process and ZeRO-3 got slower (bench/NOTES.md). Here a block is
only ever reused for a tensor of its size class (eight per doubling, so a packed batch a few tokens shorter still
fits the block of a full one), and per class the pool holds as many blocks as the step keeps tensors of that class
alive at once. Blocks under 1 MiB are left to glibc. Opt-in (`model.cpu_buffer_pool`): faster in short runs of one
process, not in the side-by-side benchmark (README, Benchmarks).

A block is free when nothing but the pool holds its storage: tensors handed out, their views and autograd's saved
copies all count. Used from the training thread only.
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


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, pooled: bool = True) -> torch.Tensor:
    """a (..., k) @ b (k, n) (+ bias), into a pooled block when `pooled`, else as F.linear computes it: the same
    matrix kernel either way, so the numbers are equal."""
    if not pooled or a.device.type != "cpu":
        return torch.nn.functional.linear(a, b.t(), bias)
    out = empty((*a.shape[:-1], b.shape[1]), a.dtype)
    a2, out2 = a.reshape(-1, a.shape[-1]), out.view(-1, b.shape[1])
    if bias is None:
        torch.mm(a2, b, out=out2)
    else:
        torch.addmm(bias, a2, b, out=out2)
    return out


def held_bytes() -> int:
    """Bytes the pool holds, in use or not."""
    return sum(s.nbytes() for blocks in _BLOCKS.values() for s in blocks)


def release() -> None:
    """Drop the pool's references: blocks in use live on with their tensors, the rest are freed."""
    _BLOCKS.clear()
