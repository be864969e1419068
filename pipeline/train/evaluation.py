"""Held-out LM loss per task: used by the loop (distributed, summed over ranks) and to check a saved adapter."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from pipeline.train.loss import token_loss_sums


@torch.no_grad()
def eval_loss(model, batches: Iterable[dict[str, torch.Tensor]], num_tasks: int, task_names: list[str],
              device: torch.device, reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict[str, float]:
    """Token-weighted CE over all batches; with `reduce` (an all-reduce sum) over all ranks too.

    Under ZeRO-3 every rank must see the same number of batches (each forward gathers parameters collectively);
    the data side pads the shards with empty batches where needed.
    """
    stats = torch.zeros(2 + 2 * num_tasks, device=device)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch, supervised_loss=True)
        sums = token_loss_sums(out.token_loss, out.token_index, batch["task_ids"], num_tasks)
        stats[0] += sums.total.float()
        stats[1] += sums.tokens
        stats[2:2 + num_tasks] += sums.per_task
        stats[2 + num_tasks:] += sums.per_task_tokens
    if reduce is not None:
        reduce(stats)
    result = {"loss": (stats[0] / stats[1].clamp(min=1)).item(), "tokens": stats[1].item()}
    for t, name in enumerate(task_names):
        if stats[2 + num_tasks + t] > 0:
            result[f"loss/{name}"] = (stats[2 + t] / stats[2 + num_tasks + t]).item()
    return result
