"""Token-level LM loss sums, split by task, for packed batches.

Sums (not means) are returned so the caller can normalise by the GLOBAL number of supervised tokens of an
optimizer step (all micro-batches, all ranks), which is what makes the loss independent of how the global
batch is split across ranks and accumulation steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.mask import supervised_positions


@dataclass
class LossSums:
    total: torch.Tensor  # scalar, differentiable: sum of token CE
    tokens: torch.Tensor  # scalar: supervised tokens
    per_task: torch.Tensor  # (num_tasks,) detached CE sums
    per_task_tokens: torch.Tensor  # (num_tasks,)


def lm_loss_sums(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                 position_ids: torch.Tensor | None = None) -> LossSums:
    """From full (B, L, V) logits: CE at the supervised positions, summed as `token_loss_sums` does."""
    index, targets = supervised_positions(labels, position_ids)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).index_select(0, index).float(), targets,
                         reduction="none")
    return token_loss_sums(ce, index, task_ids, num_tasks)


def token_loss_sums(token_loss: torch.Tensor, token_index: torch.Tensor, task_ids: torch.Tensor,
                    num_tasks: int) -> LossSums:
    """Sums of per-token CE at the supervised positions (`MoreCausalLM.forward(..., supervised_loss=True)` computes
    it there): `token_loss` (N,) fp32 CE, `token_index` (N,) flat (B*L) indices of the predicting positions; each
    token counts for the task of the token it predicts."""
    tasks = task_ids.reshape(-1)[token_index + 1].clamp(min=0)
    per_task = torch.zeros(num_tasks, device=token_loss.device, dtype=torch.float32)
    per_task_tokens = torch.zeros_like(per_task)
    per_task.index_add_(0, tasks, token_loss.detach().float())
    per_task_tokens.index_add_(0, tasks, torch.ones_like(token_loss, dtype=torch.float32))
    # torch.full, not torch.tensor: a fill on the device, not a copy from the host that waits for the GPU
    return LossSums(token_loss.sum(), torch.full((), float(len(tasks)), device=token_loss.device), per_task,
                    per_task_tokens)
