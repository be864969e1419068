"""Schema of the `base` stage: the small Llama-shaped base the built-in default trains MoRE on.

A frozen RANDOM base gives an adapter little to build on (measured: MoRE on a random 128x2 base learns sentiment
and rating partly and reverse/sort not at all in 600 steps), so the default first pretrains a tiny base, like a
real LLM, on skills rather than on the tasks themselves. Two corpora:
- `skills` (configs/base/default.yaml; built-in tasks only): the five built-in skills in OTHER words
  (`pipeline.data.builtin.skill_texts`). The base can do the skills but not the tasks' prompts, so the untrained
  row of the report stays low and the adapter learns each task's format (README: the demo's table).
- `unpaired` (any prepared data, e.g. GLUE): the prepared samples' prompts and responses as SEPARATE texts, never
  one after the other: the vocabulary and how prompts read, but not which answer goes with which prompt. (A base
  pretrained on prompts followed by MISMATCHED responses learns to ignore the prompt: measured.)
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel


class BaseModelConfig(StrictModel):
    data_dir: str  # a prep output (manifest.json, train/, tokenizer/)
    output_dir: str
    hidden_size: int = Field(default=128, gt=0)
    num_layers: int = Field(default=2, gt=0)
    num_heads: int = Field(default=4, gt=0)
    num_kv_heads: int = Field(default=2, gt=0)
    intermediate_size: int = Field(default=256, gt=0)
    corpus: Literal["skills", "unpaired"] = "unpaired"  # configs/base/default.yaml: skills
    skill_examples_per_task: int = Field(default=3000, gt=0)  # corpus=skills: texts generated per skill
    pretrain_steps: int = Field(default=1500, ge=0)  # 0: a random base
    batch_size: int = Field(default=32, gt=0)
    lr: float = Field(default=3e-3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _heads_fit(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads} "
                             f"(each KV head serves a group of query heads)")
        return self
