"""Configuration of the MoRE adapter (Mixture of Low-Rank Experts, arXiv 2505.22694).

Defaults are our design; `MoreConfig.reference()` gives the settings of the reference code (NLPfreshman0/MoRE):
per-layer task embeddings of width in_features, (j/R)^2 per-component scaling, InfoNCE at tau 0.05, weight 0.1.
"""
from __future__ import annotations

from typing import List, Literal, Optional, Union

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ContrastiveConfig(StrictModel):
    """InfoNCE between a per-sample representation and the task embeddings (negatives: the other tasks).

    `representation`: `prompt_mean` (mean over the sample's prompt tokens) or `last_prompt` (its last prompt token,
    which has seen the whole prompt). Token 0 is deliberately not offered: in a causal LM it sees only itself.
    `layer`: which entry of the model's `hidden_states` (0 = embeddings, -1 = final normed state) feeds the
    shared-embedding projection head. Per-layer embeddings compare each decoder layer's input with that layer's
    embeddings, whatever `layer` says.
    """

    weight: float = Field(0.1, ge=0.0)
    temperature: float = Field(0.05, gt=0.0)
    representation: Literal["prompt_mean", "last_prompt"] = "prompt_mean"
    layer: int = -1


class MoreConfig(StrictModel):
    max_rank: int = Field(8, ge=1)
    # Nested rank prefixes r_1 < ... < r_K, each in 1..max_rank; None = every rank 1..max_rank.
    expert_ranks: Optional[List[int]] = None
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Union[List[str], Literal["all-linear"]] = Field(default_factory=lambda: list(LLAMA_LINEARS))
    # `shared`: one (num_tasks x task_embedding_dim) table + a small gate per adapted layer (our default).
    # `per_layer`: the reference's Embedding(num_tasks, in_features) + Linear(in_features, K) in every adapted layer.
    task_embedding: Literal["shared", "per_layer"] = "shared"
    task_embedding_dim: int = Field(16, ge=1)
    # `linear`: the reference's per-component factor j/R on row j of A and column j of B, i.e. (j/R)^2 overall.
    rank_scaling: Literal["none", "linear"] = "none"
    # p = softmax(gate(e) / gate_temperature); < 1 sharpens p and amplifies the gate's gradient.
    gate_temperature: float = Field(1.0, gt=0.0)
    # `all_experts`: backward as if the output were sum_k w_k * expert_k (w = hard - p.detach() + p): every p_k learns
    # whether its rank would help. `selected`: the reference's form, only the chosen expert's p gets gradient.
    ste: Literal["all_experts", "selected"] = "all_experts"
    # `max_rank`: every task starts on the largest expert (all components train from step 0, tasks then shrink);
    # `random`: the argmax of the randomly initialised gate (the reference's start).
    gate_init: Literal["max_rank", "random"] = "max_rank"
    gate_init_margin: float = Field(0.5, ge=0.0)
    # Learning-rate multiplier for the selector (task embeddings, gates, contrastive head); training puts
    # `MoreCausalLM.selector_parameters()` in their own parameter group with lr * this.
    selector_lr_multiplier: float = Field(10.0, gt=0.0)
    # For the first steps the selection is used but gets no gradient (the adapter is underfit, so "more rank" helps
    # every task and the gates would saturate at max rank). Steps are optimizer steps when the trainer calls
    # `MoreCausalLM.set_training_step(step)`, otherwise training forward passes. None: the trainer makes it a
    # fraction of the run (`TrainConfig.more_for_run`); a model used without the trainer has none.
    selector_warmup_steps: Optional[int] = Field(None, ge=0)
    contrastive: ContrastiveConfig = Field(default_factory=ContrastiveConfig)
    init_seed: int = 0
    # Ablation, not for use: every task's rank in every layer is fixed at the initial gate's choice and never
    # trained, which is what the reference code does (its selector never learns: each task keeps the rank its
    # initial gate picked at the first forward).
    # With gate_init: random this is the reference's random start.
    selector_frozen: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.expert_ranks is not None:
            r = self.expert_ranks
            if not r:
                raise ValueError("expert_ranks must not be empty")
            if any(b <= a for a, b in zip(r, r[1:])):
                raise ValueError(f"expert_ranks must be strictly increasing, got {r}")
            if r[0] < 1 or r[-1] > self.max_rank:
                raise ValueError(f"expert_ranks must lie in 1..max_rank={self.max_rank}, got {r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must not be empty")
        return self

    @property
    def ranks(self) -> List[int]:
        return list(self.expert_ranks) if self.expert_ranks is not None else list(range(1, self.max_rank + 1))

    @property
    def scale(self) -> float:
        """alpha / max_rank, fixed whatever rank a task chooses (as in the reference)."""
        return self.alpha / self.max_rank

    @classmethod
    def reference(cls, **overrides) -> "MoreConfig":
        base = dict(max_rank=8, alpha=32.0, dropout=0.1, task_embedding="per_layer", rank_scaling="linear",
                    ste="selected", gate_init="random", contrastive=ContrastiveConfig(weight=0.1, temperature=0.05))
        base.update(overrides)
        return cls(**base)
