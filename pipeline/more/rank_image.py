"""A rank map as a picture: tasks x adapted layers, each cell coloured by the rank the task chose there.

Hundreds of layers per task are unreadable as a table; as a heatmap, shared and task-specific ranks show at a
glance. Used by the trainer's TensorBoard log (at every eval) and the evaluate report (PNG beside report.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

CELL_W, CELL_H, LABEL_W, LEGEND_H = 3, 18, 90, 26


def _colour(frac: np.ndarray) -> np.ndarray:
    """Dark blue (lowest rank) -> teal -> yellow (highest); fractions in [0, 1] -> uint8 RGB."""
    stops = np.array([[40, 20, 90], [30, 140, 140], [250, 230, 40]], dtype=np.float64)
    x = np.clip(frac, 0.0, 1.0) * (len(stops) - 1)
    lo = np.minimum(x.astype(int), len(stops) - 2)
    t = (x - lo)[..., None]
    return ((1 - t) * stops[lo] + t * stops[lo + 1]).round().astype(np.uint8)


def rank_image(ranks: Dict[str, Dict[str, int]], max_rank: int) -> np.ndarray:
    """HxWx3 uint8: one row per task (labelled), one column per layer in the map's order, a legend below."""
    from PIL import Image, ImageDraw

    tasks = list(ranks)
    layers = list(ranks[tasks[0]]) if tasks else []
    grid = np.array([[ranks[t][name] for name in layers] for t in tasks], dtype=np.float64).reshape(len(tasks), -1)
    cells = _colour((grid - 1) / max(max_rank - 1, 1))
    cells = cells.repeat(CELL_H, axis=0).repeat(CELL_W, axis=1)
    width = LABEL_W + max(cells.shape[1], 8 * 24)
    canvas = np.full((cells.shape[0] + LEGEND_H, width, 3), 255, dtype=np.uint8)
    canvas[:cells.shape[0], LABEL_W:LABEL_W + cells.shape[1]] = cells
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    for i, t in enumerate(tasks):
        draw.text((2, i * CELL_H + 4), t[:14], fill=(0, 0, 0))
    y = cells.shape[0] + 4
    draw.text((2, y + 4), "rank", fill=(0, 0, 0))
    shown = sorted({1, max_rank, *range(1, max_rank + 1, max(1, max_rank // 8))})
    for j, r in enumerate(shown):
        x = LABEL_W + j * 24
        colour = tuple(int(c) for c in _colour(np.array((r - 1) / max(max_rank - 1, 1))))
        draw.rectangle([x, y, x + 10, y + 10], fill=colour)
        draw.text((x + 12, y), str(r), fill=(0, 0, 0))
    return np.asarray(img)


def save_rank_image(ranks: Dict[str, Dict[str, int]], max_rank: int, path: Path) -> Path:
    from PIL import Image

    from pipeline.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(rank_image(ranks, max_rank)).save(tmp, format="PNG")
    return path
