"""Token-level LM loss sums, split by task, for packed batches.

Sums (not means) are returned so the caller can normalise by the GLOBAL number of supervised tokens of an
optimizer step (all micro-batches, all ranks), which is what makes the loss independent of how the global
batch is split across ranks and accumulation steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data.mask import next_token_targets


@dataclass
class LossSums:
    total: torch.Tensor  # scalar, differentiable: sum of token CE
    tokens: torch.Tensor  # scalar: supervised tokens
    per_task: torch.Tensor  # (num_tasks,) detached CE sums
    per_task_tokens: torch.Tensor  # (num_tasks,)




def lm_loss_sums(logits: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, num_tasks: int,
                 position_ids: torch.Tensor | None = None) -> LossSums:
    targets = next_token_targets(labels, position_ids)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                         reduction="none")
    valid = targets.flatten() != -100
    tasks = task_ids[:, 1:].flatten().clamp(min=0)
    per_task = torch.zeros(num_tasks, device=logits.device, dtype=torch.float32)
    per_task_tokens = torch.zeros_like(per_task)
    per_task.index_add_(0, tasks[valid], ce.detach()[valid])
    per_task_tokens.index_add_(0, tasks[valid], torch.ones_like(ce[valid]))
    return LossSums(ce.sum(), valid.sum().to(torch.float32), per_task, per_task_tokens)


def token_loss_sums(token_loss: torch.Tensor, token_index: torch.Tensor, task_ids: torch.Tensor,
                    num_tasks: int) -> LossSums:
    """`lm_loss_sums` from a model that computed CE at supervised positions only (`MoreCausalLM.forward(...,
    supervised_loss=True)`): `token_loss` (N,) fp32 CE, `token_index` (N,) flat (B*L) indices of the predicting
    positions; each token counts for the task of the token it predicts."""
    tasks = task_ids.reshape(-1)[token_index + 1].clamp(min=0)
    per_task = torch.zeros(num_tasks, device=token_loss.device, dtype=torch.float32)
    per_task_tokens = torch.zeros_like(per_task)
    per_task.index_add_(0, tasks, token_loss.detach().float())
    per_task_tokens.index_add_(0, tasks, torch.ones_like(per_task[:1]).expand(len(tasks)))
    return LossSums(token_loss.sum(), torch.tensor(float(len(tasks)), device=token_loss.device), per_task,
                    per_task_tokens)
