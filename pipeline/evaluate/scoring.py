"""Batched scoring primitives, independent of where the model comes from (see models.py).

- `label_logprobs`: classification by log-likelihood. For every (example, label) pair the model reads
  prompt + label tokens once (no sampling) and the label's score is the SUM of the log-probs of its tokens after
  the prompt, so multi-token labels are scored exactly; the prediction is the argmax. Sequences are LEFT padded
  (position ids from the mask), so every label ends at the last position and the model only has to return the
  logits of the last `max label length + 1` positions (`keep`): (B, k, V) instead of (B, L, V), which matters
  with 128k-token vocabularies.
- `greedy_generate`: greedy decoding of a batch of prompts (left padding, so every row's next token comes from
  its last prompt token), cut at EOS.
- `parse_number`: the first number in a generated answer (regression).

A model is anything with `logits(input_ids, attention_mask, tasks, position_ids=None, keep=None)` (logits of the
last `keep` positions, all when None) and
`generate(input_ids, attention_mask, tasks, max_new_tokens, pad_id, stop_ids)`; `tasks` lists, per row, which
adapter task runs it (ignored by single models). Pairs are sorted by length so batches carry little padding.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

import torch

# thousands separators only in groups of three ("1,234"; "1,5" stays 1), an optional exponent
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+(?:\.\d*)?|\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _batches(order: Sequence[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(order), size):
        yield list(order[i:i + size])


def pad_batch(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        sl = slice(L - len(s), L) if left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, ... over each row's real tokens (left padding shifts them; padding positions get 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def label_logprobs(model, prompts: Sequence[list[int]], candidates: Sequence[Sequence[list[int]]],
                   tasks: Sequence[str], batch_size: int = 16, pad_id: int = 0, progress=None) -> torch.Tensor:
    """(N, K) summed log-probs of candidate k of example i after prompt i (float64 sums of fp32 log-softmaxes).

    `candidates[i][k]` are the token ids of label k as a continuation of prompt i (rows may differ when the
    response template reads other columns). Every prompt must be non-empty (the first label token needs a
    preceding position).
    """
    n = len(prompts)
    k = len(candidates[0]) if n else 0
    pairs = [(i, j) for i in range(n) for j in range(k)]
    for i in range(n):
        if not prompts[i]:
            raise ValueError(f"example {i}: empty prompt (add BOS or check the template)")
        if len(candidates[i]) != k or any(not c for c in candidates[i]):
            raise ValueError(f"example {i}: expected {k} non-empty label candidates")
    seqs = [list(prompts[i]) + list(candidates[i][j]) for i, j in pairs]
    order = sorted(range(len(pairs)), key=lambda p: -len(seqs[p]))
    scores = torch.zeros(n, k, dtype=torch.float64)
    for idx in _batches(order, batch_size):
        ids, mask = pad_batch([seqs[p] for p in idx], pad_id, left=True)
        keep = max(len(candidates[pairs[p][0]][pairs[p][1]]) for p in idx) + 1
        logits = model.logits(ids, mask, [tasks[pairs[p][0]] for p in idx], position_ids=position_ids(mask),
                              keep=keep)[:, -keep:]
        for row, p in enumerate(idx):
            i, j = pairs[p]
            cand = candidates[i][j]
            # logits at position t predict token t+1; the label fills the last len(cand) positions, so it is
            # predicted by kept positions keep-len-1 .. keep-2
            lp = torch.log_softmax(logits[row, keep - len(cand) - 1:keep - 1].float(), dim=-1)
            target = torch.tensor(cand, dtype=torch.long, device=lp.device)
            scores[i, j] = lp.gather(-1, target[:, None]).double().sum().cpu()
        if progress is not None:
            progress.update(len(idx))
    return scores


@torch.no_grad()
def greedy_generate(model, prompts: Sequence[list[int]], tasks: Sequence[str], max_new_tokens: int,
                    batch_size: int = 16, pad_id: int = 0, stop_ids: Sequence[int] = (),
                    progress=None) -> list[list[int]]:
    """New token ids per prompt (greedy, at most `max_new_tokens`, ending before the first stop token: EOS, or a
    chat template's end of turn, `tasks.stop_token_ids`)."""
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for idx in _batches(order, batch_size):
        ids, mask = pad_batch([list(prompts[i]) for i in idx], pad_id, left=True)
        new = model.generate(ids, mask, [tasks[i] for i in idx], max_new_tokens, pad_id, list(stop_ids))
        for row, i in enumerate(idx):
            toks = new[row].tolist()
            end = next((j for j, t in enumerate(toks) if t in stop_ids), len(toks))
            out[i] = toks[:end]
        if progress is not None:
            progress.update(len(idx))
    return out


def parse_number(text: str) -> Optional[float]:
    """The first number in `text` ("3.8 out of 5" -> 3.8), or None."""
    m = _NUMBER.search(text.replace("\u2212", "-"))  # the typographic minus sign too
    return float(m.group(0).replace(",", "")) if m else None
