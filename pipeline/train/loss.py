"""Token-level LM loss sums, split by task, for packed batches.

Sums (not means) are returned so the caller can normalise by the GLOBAL number of supervised tokens of an
optimizer step (all micro-batches, all ranks), which is what makes the loss independent of how the global
batch is split across ranks and accumulation steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossSums:
    total: torch.Tensor  # scalar, differentiable: sum of token CE
    tokens: torch.Tensor  # scalar: supervised tokens
    per_task: torch.Tensor  # (num_tasks,) detached CE sums
    per_task_tokens: torch.Tensor  # (num_tasks,)


def supervised_targets(labels: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets; the first token of each packed sample has nothing in its own sample to predict it from."""
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = -100
    return targets


def lm_loss_sums(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                 position_ids: torch.Tensor | None = None) -> LossSums:
    targets = supervised_targets(labels, position_ids)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                         reduction="none")
    valid = targets.flatten() != -100
    tasks = task_ids[:, 1:].flatten().clamp(min=0)
    per_task = torch.zeros(num_tasks, device=logits.device, dtype=torch.float32)
    per_task_tokens = torch.zeros_like(per_task)
    per_task.index_add_(0, tasks[valid], ce.detach()[valid])
    per_task_tokens.index_add_(0, tasks[valid], torch.ones_like(ce[valid]))
    return LossSums(ce.sum(), valid.sum().to(torch.float32), per_task, per_task_tokens)
