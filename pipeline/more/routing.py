"""Zero-shot task routing: for a prompt without a task id, pick the task t that the contrastive loss, as trained,
would assign it to under hypothesis t.

Training computes a sample's representation with its own task's adapter on, and the contrastive loss is
cross-entropy over tasks of (similarity to each task embedding) / temperature. A routed prompt has no task yet, so
`route` runs it once per candidate task t (t's adapter on, exactly the representation training saw for a sample of
t) and scores t by that loss's log-probability of t; the prediction is the best-scoring task. One representation in
training and routing, at the cost of T prompt forwards (T = number of tasks).
"""
from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.nn.functional as F

from pipeline.data.loader import block_causal_mask
from pipeline.models.packed_attention import NAME as PACKED_ATTENTION, packed_segments
from pipeline.more.model import MoreCausalLM


def _sample_isolating_inputs(model, segment_ids, attention_mask, position_ids) -> dict:
    """The base model's attention inputs for rows that may hold several samples, each attending only within itself
    as in training: the samples' lengths for packed_sdpa (with positions restarting per sample), else the dense
    block mask where no mask was given and a row holds more than one sample."""
    if model.base_model.config._attn_implementation == PACKED_ATTENTION:
        real = segment_ids >= 0
        if (real[:, 1:] & ~real[:, :-1]).any():
            raise ValueError(f"attn_implementation={PACKED_ATTENTION!r} needs each row's samples from its first "
                             f"position on (right padding); this batch has padding before a sample")
        if position_ids is None:
            idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
            starts = torch.ones_like(real)
            starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
            position_ids = idx - torch.where(starts, idx, 0).cummax(1).values
        return dict(attention_mask=None, position_ids=position_ids, packed_segments=packed_segments(segment_ids))
    several = (segment_ids[:, 1:] != segment_ids[:, :-1]) & (segment_ids[:, 1:] >= 0) & (segment_ids[:, :-1] >= 0)
    if attention_mask is None and several.any():
        attention_mask = block_causal_mask(segment_ids, model.base_model.dtype)
    return dict(attention_mask=attention_mask, position_ids=position_ids)


@torch.no_grad()
def task_scores(model, input_ids, attention_mask=None, position_ids=None, segment_ids=None, prompt_mask=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores S x T, keep S): log p(task t | sample s) from the contrastive head, with t's own adapter on.

    Without segment_ids each row is one sample; without prompt_mask every non-padding token counts.
    """
    model = getattr(model, "module", model)
    B, L = input_ids.shape
    if segment_ids is None:
        segment_ids = torch.arange(B, device=input_ids.device).unsqueeze(1).expand(B, L).clone()
        if attention_mask is not None and attention_mask.dim() == 2:
            segment_ids[attention_mask == 0] = -1
    if prompt_mask is None:
        prompt_mask = segment_ids >= 0
    temperature = model.config.contrastive.temperature
    inputs = _sample_isolating_inputs(model, segment_ids, attention_mask, position_ids)
    was = model.training
    model.eval()
    try:
        columns, keep = [], None
        for t in range(len(model.task_names)):
            with model.task_context(t):
                out = model.base_model(input_ids=input_ids, output_hidden_states=True, use_cache=False, **inputs)
            sims, _, keep = model.task_similarities(out.hidden_states, segment_ids, prompt_mask, None)
            columns.append(F.log_softmax(sims.float() / temperature, dim=-1)[:, t])
    finally:
        model.train(was)
    return torch.stack(columns, dim=-1), keep


@torch.no_grad()
def route(model, input_ids, attention_mask=None, position_ids=None, segment_ids=None, prompt_mask=None
          ) -> torch.Tensor:
    """Predicted task id per packed sample (segment), shape (S,); -1 for a sample with no prompt token."""
    scores, keep = task_scores(model, input_ids, attention_mask, position_ids, segment_ids, prompt_mask)
    pred = scores.argmax(-1)
    pred[~keep] = -1
    return pred


@torch.no_grad()
def routing_accuracy(model: MoreCausalLM, batches: Iterable[Dict[str, torch.Tensor]]) -> Dict:
    """Accuracy of `route` on labelled batches (the training batch format: task ids give the truth).

    Returns {accuracy, n, per_task: {name: accuracy}, confusion: T x T list (rows = truth)}.
    """
    from pipeline.more.model import pool_samples

    model_ = getattr(model, "module", model)
    T = len(model_.task_names)
    conf = torch.zeros(T, T, dtype=torch.long)
    for b in batches:
        pred = route(model_, b["input_ids"], b.get("attention_mask"), b.get("position_ids"), b["segment_ids"],
                     b["prompt_mask"])
        # the truth per segment, with the same bookkeeping as route
        dummy = torch.zeros(*b["input_ids"].shape, 1)
        _, truth, keep = pool_samples(dummy, b["segment_ids"], b["prompt_mask"], b["task_ids"])
        for t, p in zip(truth[keep].tolist(), pred[keep].tolist()):
            conf[t, p] += 1
    n = int(conf.sum())
    per_task = {name: (float(conf[i, i]) / max(int(conf[i].sum()), 1)) for i, name in enumerate(model_.task_names)}
    return dict(accuracy=float(conf.diag().sum()) / max(n, 1), n=n, per_task=per_task, confusion=conf.tolist())
