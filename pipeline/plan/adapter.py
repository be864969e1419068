"""Trainable-parameter count of a MoRE adapter, from the (meta) model's target Linear shapes.

Per adapted Linear (in -> out): one LoRA pair A (R x in) and B (out x R) whose rank prefixes are the experts, and a
gate Linear(d, K) + bias choosing among K experts from a task embedding of width d. The task embedding is one
table (num_tasks x task_embedding_dim) shared by every layer, with the contrastive head Linear(hidden, d, no bias)
("shared"), or one per adapted Linear, as wide as its input ("per_layer", as in the MoRE reference code; the
trainer's task_embedding_dim does not apply there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn


@dataclass(frozen=True)
class AdapterCount:
    lora: int
    gate: int
    task_embedding: int
    head: int  # the shared layout's contrastive projection (hidden x d); 0 in per_layer
    modules: int  # number of adapted Linear layers
    tensor_numels: tuple[int, ...]  # every trainable tensor's size (ZeRO-3 persistence is decided per tensor)

    @property
    def total(self) -> int:
        return self.lora + self.gate + self.task_embedding + self.head


def parse_targets(targets: str | Iterable[str]) -> list[str] | None:
    """`"all-linear"` -> None (every Linear in the blocks); `"q_proj,v_proj"` or a list -> the short names."""
    if isinstance(targets, str):
        if targets.strip() in ("all-linear", "all_linear", "all"):
            return None
        targets = [t for t in targets.split(",")]
    out = [t.strip() for t in targets if t.strip()]
    if not out:
        raise ValueError("targets is empty: give 'all-linear' or module names such as q_proj,v_proj")
    return out


def target_linears(model: nn.Module, targets: str | Iterable[str] = "all-linear") -> list[tuple[str, nn.Linear]]:
    """The Linear modules an adapter would wrap (never the output head)."""
    wanted = parse_targets(targets)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    if wanted is None:
        return found
    chosen = [(n, m) for n, m in found if n.rsplit(".", 1)[-1] in wanted]
    missing = set(wanted) - {n.rsplit(".", 1)[-1] for n, _ in chosen}
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in found})
        raise ValueError(f"target modules {sorted(missing)} not in the model; its Linear layers are {names}")
    return chosen


def more_param_count(model: nn.Module, max_rank: int = 8, targets: str | Iterable[str] = "all-linear",
                     num_tasks: int = 8, task_embedding: str = "shared", task_embedding_dim: int | None = 16,
                     num_experts: int | None = None) -> AdapterCount:
    """Count the MoRE adapter's trainable parameters on `model` (usually a meta-device model)."""
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if task_embedding not in ("shared", "per_layer"):
        raise ValueError(f"task_embedding must be 'shared' or 'per_layer', got {task_embedding!r}")
    k = num_experts or max_rank
    lora = gate = emb = head = 0
    dim = task_embedding_dim or 16
    numels: list[int] = []
    linears = target_linears(model, targets)
    for _, lin in linears:
        a, b = max_rank * lin.in_features, lin.out_features * max_rank
        d = lin.in_features if task_embedding == "per_layer" else dim
        lora += a + b
        gate += d * k + k
        numels += [a, b, d * k, k]
        if task_embedding == "per_layer":
            emb += num_tasks * d
            numels.append(num_tasks * d)
    if task_embedding == "shared":
        emb, head = num_tasks * dim, model.config.hidden_size * dim
        numels += [emb, head]
    return AdapterCount(lora, gate, emb, head, len(linears), tuple(numels))
