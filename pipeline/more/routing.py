"""Zero-shot task routing: for a prompt without a task id, pick the task whose embedding is nearest to its
representation, computed BEFORE any task is known (a base pass with the adapters disabled, or every layer at a
default rank), i.e. what the contrastive loss trains the embeddings toward.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch

from pipeline.more.model import MoreCausalLM


@torch.no_grad()
def route(model, input_ids, attention_mask=None, position_ids=None, segment_ids=None, prompt_mask=None,
          default_rank: Optional[int] = None) -> torch.Tensor:
    """Predicted task id per packed sample (segment), shape (S,).

    `default_rank` None: representation from the base model (adapters off); an int: every task's adapter at that
    rank, task 0's weights (the adapter is shared, only the mask differs), which the contrastive loss saw more alike.
    Without segment_ids each row is one sample; without prompt_mask every non-padding token counts.
    """
    model = getattr(model, "module", model)
    B, L = input_ids.shape
    if segment_ids is None:
        segment_ids = torch.arange(B).unsqueeze(1).expand(B, L).clone()
        if attention_mask is not None and attention_mask.dim() == 2:
            segment_ids[attention_mask == 0] = -1
    if prompt_mask is None:
        prompt_mask = segment_ids >= 0
    was = model.training
    model.eval()
    try:
        if default_rank is None:
            with model.disable_adapters():
                out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, output_hidden_states=True, use_cache=False)
        else:
            with model.forced_rank(default_rank), model.task_context(0):
                out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=position_ids, output_hidden_states=True, use_cache=False)
        sims, _, keep = model.task_similarities(out.hidden_states, segment_ids, prompt_mask, None)
    finally:
        model.train(was)
    pred = sims.argmax(-1)
    pred[~keep] = -1
    return pred


@torch.no_grad()
def routing_accuracy(model: MoreCausalLM, batches: Iterable[Dict[str, torch.Tensor]],
                     default_rank: Optional[int] = None) -> Dict:
    """Accuracy of `route` on labelled batches (the training batch format: task ids give the truth).

    Returns {accuracy, n, per_task: {name: accuracy}, confusion: T x T list (rows = truth)}.
    """
    from pipeline.more.model import pool_samples

    model_ = getattr(model, "module", model)
    T = len(model_.task_names)
    conf = torch.zeros(T, T, dtype=torch.long)
    for b in batches:
        pred = route(model_, b["input_ids"], b.get("attention_mask"), b.get("position_ids"), b["segment_ids"],
                     b["prompt_mask"], default_rank=default_rank)
        # the truth per segment, with the same bookkeeping as route
        dummy = torch.zeros(*b["input_ids"].shape, 1)
        _, truth, keep = pool_samples(dummy, b["segment_ids"], b["prompt_mask"], b["task_ids"])
        for t, p in zip(truth[keep].tolist(), pred[keep].tolist()):
            conf[t, p] += 1
    n = int(conf.sum())
    per_task = {name: (float(conf[i, i]) / max(int(conf[i].sum()), 1)) for i, name in enumerate(model_.task_names)}
    return dict(accuracy=float(conf.diag().sum()) / max(n, 1), n=n, per_task=per_task, confusion=conf.tolist())
