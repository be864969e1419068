"""Learning-rate schedules as multipliers of each parameter group's base lr (warmup, then cosine/linear/constant)."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_multiplier(step: int, warmup: int, total: int, kind: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup: int, total: int, kind: str) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup, total, kind))
