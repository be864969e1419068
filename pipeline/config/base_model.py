"""Schema of the `base` stage: the small Llama-shaped base the built-in default trains MoRE on.

A frozen RANDOM base gives an adapter nothing to build on, so the default first pretrains a tiny base as a plain
language model on the prepared training samples' prompts and responses as SEPARATE texts, never one after the other:
the base learns the vocabulary and how to read prompts and write answers, but not which answer goes with which
prompt, so the untrained-baseline row of the report stays at chance and the adapter has the mapping to learn.
(A base pretrained on prompts followed by MISMATCHED responses learns to ignore the prompt when answering, and an
adapter on it did not move off chance in 400 steps: measured.)
"""
from __future__ import annotations

from pydantic import Field

from pipeline.config.base import StrictModel


class BaseModelConfig(StrictModel):
    data_dir: str  # a prep output (manifest.json, train/, tokenizer/)
    output_dir: str
    hidden_size: int = Field(default=128, gt=0)
    num_layers: int = Field(default=2, gt=0)
    num_heads: int = Field(default=4, gt=0)
    num_kv_heads: int = Field(default=2, gt=0)
    intermediate_size: int = Field(default=256, gt=0)
    pretrain_steps: int = Field(default=300, ge=0)  # 0: a random base
    batch_size: int = Field(default=8, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    seed: int = 0
