"""Loss mask: labels equal the input ids on response tokens and -100 elsewhere.

Labels are aligned with `input_ids` (HF models shift them inside the loss). The first token of every sample never
carries a label, even with `train_on_prompt`: after packing, its label would be predicted by the previous sample's
last token, i.e. across a sample boundary.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
# positions per LM-head chunk of the supervised loss (pipeline.more.model.supervised_ce): (chunk x vocab) logits
# live at a time; the memory planner counts at most this many
LOSS_CHUNK = 2048


def build_labels(ids: np.ndarray, positions: np.ndarray, n_prompt_per_token: np.ndarray,
                 train_on_prompt: bool) -> np.ndarray:
    """`positions`: index of each token within its sample; `n_prompt_per_token`: its sample's prompt length (0 for
    an empty prompt without BOS: its first token still gets no label)."""
    keep = positions > 0
    if not train_on_prompt:
        keep &= positions >= n_prompt_per_token
    return np.where(keep, ids, IGNORE_INDEX).astype(np.int32)


def next_token_targets(labels, position_ids=None):
    """(B, L-1) targets of positions 0..L-2 of packed rows: the next token's label, -100 where there is none. The
    first token of each packed sample (position id 0) is never a target: the previous sample's last token would
    predict it. Torch tensors in, a new tensor out."""
    targets = labels[:, 1:].clone()
    if position_ids is not None:
        targets[position_ids[:, 1:] == 0] = IGNORE_INDEX
    return targets


def supervised_positions(labels, position_ids=None):
    """(index, targets): flat (B*L) indices of the positions that predict a supervised token (`next_token_targets`),
    and those tokens."""
    targets = next_token_targets(labels, position_ids)
    L1 = targets.shape[1]
    sup = (targets != IGNORE_INDEX).reshape(-1).nonzero().squeeze(1)
    return sup // L1 * (L1 + 1) + sup % L1, targets.reshape(-1).index_select(0, sup)
