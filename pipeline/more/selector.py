"""Task embeddings, per-layer gates and the straight-through top-1 choice of a nested-rank expert.

Two layouts (`MoreConfig.task_embedding`):
- `shared` (default): one table E (num_tasks x e, e = task_embedding_dim, e.g. 16) owned by `MoreSelector`, read by a
  small gate Linear(e, K) in every adapted layer, plus a projection head hidden_size -> e for the contrastive loss
  and zero-shot routing. Under ZeRO-3 every MoRE layer registers E as an external parameter.
- `per_layer` (the reference): every adapted layer owns Embedding(num_tasks, in_features) and Linear(in_features, K).

Parameter counts (8 tasks, K = 8 experts, all 7 Llama linears adapted, max_rank 8; A/B = the LoRA pairs):

| model (layers, d, ffn, kv)        | linears | A/B (rank 8) | shared selector (e=16)                      | per_layer selector          |
|-----------------------------------|---------|--------------|---------------------------------------------|-----------------------------|
| Llama-2-7B (32, 4096, 11008, 4096)| 224     | 19.99 M      | 0.096 M (30.5 K gates, 128 emb, 65.5 K head)| 18.22 M (9.11 M emb + 9.11 M gates) |
| Llama-2-70B (80, 8192, 28672, 1024)| 560    | 103.55 M     | 0.207 M (76.2 K gates, 128 emb, 131 K head) | 99.62 M (49.81 M emb + 49.81 M gates) |

The per_layer selector is ~as large as the adapters themselves at 70B; the shared one is 0.2 % of them.
(`param_count_table()` below recomputes these; per_layer = num_tasks*sum(in) + (sum(in)*K + K*n_linears).)
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def nested_expert_mask(ranks: Sequence[int], max_rank: int, device=None) -> torch.Tensor:
    """C (K x R): C[k, j] = 1 for j < ranks[k] (expert k is the rank-ranks[k] prefix)."""
    j = torch.arange(max_rank, device=device)
    return (j[None, :] < torch.tensor(list(ranks), device=device)[:, None]).float()


def column_scale(max_rank: int, mode: str, device=None) -> torch.Tensor:
    """Per-component factor: 1, or the reference's (j/R) on A's row and B's column, i.e. (j/R)^2 (j 1-based)."""
    if mode == "linear":
        return (torch.arange(1, max_rank + 1, device=device, dtype=torch.float32) / max_rank) ** 2
    return torch.ones(max_rank, device=device)


def straight_through(p: torch.Tensor, mode: str = "all_experts") -> torch.Tensor:
    """Hard top-1 in the forward pass (exactly one-hot), gradient to p in the backward pass.

    `all_experts`: w = hard + (p - p.detach()), dL/dp_k = <dL/dy, expert_k output> for every k.
    `selected`: w = hard * (1 + p - p.detach()), gradient only to the chosen p (the reference's estimator).
    """
    # scatter, not F.one_hot: one_hot checks its indices' range with a host read (on a GPU a sync per MoRE layer)
    hard = torch.zeros_like(p).scatter_(-1, p.argmax(-1, keepdim=True), 1.0)
    delta = p - p.detach()
    return hard + delta if mode == "all_experts" else hard * (1.0 + delta)


class Gate(nn.Module):
    """Linear(dim, K) + softmax(logits / temperature) over the K nested experts."""

    def __init__(self, dim: int, num_experts: int, temperature: float = 1.0, init: str = "max_rank",
                 margin: float = 0.5, generator: torch.Generator | None = None, weight_std: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.bias = nn.Parameter(torch.zeros(num_experts))
        self.temperature = temperature
        with torch.no_grad():
            if weight_std is not None:
                self.weight.normal_(0.0, weight_std, generator=generator)
            else:  # nn.Linear's default init
                bound = 1.0 / math.sqrt(dim)
                self.weight.uniform_(-bound, bound, generator=generator)
            if init == "max_rank":
                self.bias[-1] = margin

    def probs(self, emb: torch.Tensor) -> torch.Tensor:
        logits = F.linear(emb.to(self.weight.dtype), self.weight, self.bias)
        return torch.softmax(logits.float() / self.temperature, dim=-1)


class MoreSelector(nn.Module):
    """Shared task-embedding table + contrastive projection head (shared layout); holds nothing in per_layer."""

    def __init__(self, num_tasks: int, dim: int, hidden_size: int, shared: bool, generator=None):
        super().__init__()
        self.shared = shared
        if shared:
            self.task_embedding = nn.Parameter(torch.empty(num_tasks, dim))
            self.proj = nn.Linear(hidden_size, dim, bias=False)
            with torch.no_grad():
                self.task_embedding.normal_(0.0, 1.0, generator=generator)
                self.proj.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size), generator=generator)

    def forward(self, reps: torch.Tensor) -> torch.Tensor:
        """Cosine similarity (S x T) between projected sample representations and the task embeddings."""
        z = F.normalize(self.proj(reps.to(self.proj.weight.dtype)).float(), dim=-1)
        e = F.normalize(self.task_embedding.float(), dim=-1)
        return z @ e.t()


def param_count_table(num_tasks: int = 8, max_rank: int = 8, num_experts: int = 8, dim: int = 16) -> List[Dict]:
    """Trainable parameters of MoRE on Llama-2-7B / 70B shapes, all 7 linears adapted."""
    shapes = {  # name: (layers, hidden, ffn, kv_out)
        "Llama-2-7B": (32, 4096, 11008, 4096),
        "Llama-2-70B": (80, 8192, 28672, 1024),
    }
    rows = []
    for name, (L, d, f, kv) in shapes.items():
        linears = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]  # (in, out)
        n_lin = L * len(linears)
        lora = L * sum(max_rank * (i + o) for i, o in linears)
        sum_in = L * sum(i for i, _ in linears)
        shared_gates = n_lin * (dim * num_experts + num_experts)
        shared = shared_gates + num_tasks * dim + d * dim
        per_layer_emb = num_tasks * sum_in
        per_layer_gates = sum_in * num_experts + n_lin * num_experts
        rows.append(dict(model=name, adapted_linears=n_lin, lora=lora, shared_selector=shared,
                         shared_gates=shared_gates, per_layer_selector=per_layer_emb + per_layer_gates,
                         per_layer_embeddings=per_layer_emb, per_layer_gates=per_layer_gates))
    return rows
