"""Best-fit decreasing bin packing of whole samples into rows of at most `capacity` tokens.

Samples are placed longest first, each into the open row with the least room that still fits it (ties: the row
opened last). Rows are found through a sorted list of the distinct free capacities (at most capacity + 1 values),
so each placement costs O(log capacity); a million samples pack in seconds. The result depends only on the
lengths and their order, which makes the written data deterministic.
"""
from __future__ import annotations

import bisect
from typing import Optional

import numpy as np


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows as lists of sample indices (in placement order); rows in the order they were opened."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and int(lengths.max()) > capacity:
        raise ValueError(f"a sample of {int(lengths.max())} tokens does not fit in {capacity}")
    order = np.argsort(-lengths, kind="stable")
    rows: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free capacity -> rows with exactly that much room
    frees: list[int] = []  # sorted distinct free capacities with at least one row
    for i in order.tolist():
        size = int(lengths[i])
        k = bisect.bisect_left(frees, size)
        if k < len(frees):
            free = frees[k]
            row = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                frees.pop(k)
        else:
            free, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        left = free - size
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(frees, left)
            by_free[left].append(row)
    return rows


def pack(lengths: np.ndarray, capacity: int, groups: Optional[np.ndarray] = None) -> list[list[int]]:
    """Pack globally, or within each group (task) when `groups` is given, so every row holds one group."""
    if groups is None:
        return best_fit_decreasing(lengths, capacity)
    rows: list[list[int]] = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        rows += [[int(idx[j]) for j in row] for row in best_fit_decreasing(lengths[idx], capacity)]
    return rows
