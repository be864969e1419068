"""Schema of the prep stage (`configs/prep/*.yaml`): which tasks, which tokenizer, how to mask, pack and mix.

Everything that changes the written bytes is part of `PrepConfig.cache_hash()`; knobs that only change speed
(`num_proc`, `output_dir`, `batch_size`) are not, so a re-run with more processes reuses the cached result.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel
from pipeline.config.tasks import TaskConfig


class SentencePieceConfig(StrictModel):
    """Train a sentencepiece BPE model on the rendered training text, so the default needs no download.

    BPE (not unigram): transformers converts a sentencepiece BPE model into a fast Llama tokenizer with the same ids;
    a unigram model converts to a different (character-level) tokenization. `num_threads` is fixed because the
    trained model depends on it (checked: 1 and 2 threads give different models).
    """

    vocab_size: int = Field(default=1024, ge=300)
    character_coverage: float = Field(default=1.0, gt=0, le=1)
    max_sentences: int = Field(default=200_000, gt=0)
    split_digits: bool = True
    num_threads: int = Field(default=1, ge=1)


class TokenizerConfig(StrictModel):
    """Exactly one of `path` (an HF tokenizer folder or hub id) or `train_sentencepiece`.

    `add_bos`: null (default) follows the tokenizer's own convention, as its `tokenizer(text)` does (HF
    `add_bos_token`: Llama's tokenizers add BOS, SmolLM2's and GPT-2's do not); true/false force it. Scoring an
    instruct model with a BOS it never sees in use costs accuracy (SmolLM2 on a GLUE task: see README). Prep records
    the resolved value in the manifest, so evaluate encodes prompts as training saw them. Chat-template text always
    brings its own special tokens."""

    path: Optional[str] = None
    train_sentencepiece: Optional[SentencePieceConfig] = None
    add_bos: Optional[bool] = None
    add_eos: bool = True

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.train_sentencepiece is None):
            raise ValueError("tokenizer: give exactly one of `path` or `train_sentencepiece`")
        return self


class BuiltinDataConfig(StrictModel):
    """Generate the built-in multi-task JSONL set (pipeline.data.builtin) before reading the tasks."""

    dir: str = "data/built/builtin"
    scale: float = Field(default=1.0, gt=0)
    seed: int = 0


class SamplingConfig(StrictModel):
    """Multi-task mixing used by the loader's TaskSampler: p_t ∝ weight_t · min(n_t, cap_t)^(1/T).

    n_t is the number of training examples of task t. Names in `caps`/`weights` must be tasks of this config.
    Rows holding several tasks are weighted by the examples of each task they hold (pipeline/data/sampler.py).
    """

    temperature: float = Field(default=1.0, gt=0)
    caps: dict[str, int] = Field(default_factory=dict)
    weights: dict[str, float] = Field(default_factory=dict)


class EvalSplitConfig(StrictModel):
    """A held-out packed `eval/` split: a `fraction` of every task's examples (chosen by a hash of seed, task and
    example index, so sharding does not change it), or each task's own `eval_split` of the same source."""

    fraction: float = Field(default=0.0, ge=0, lt=1)
    from_task_eval_split: bool = False
    max_examples: Optional[int] = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_way(self):
        if self.fraction > 0 and self.from_task_eval_split:
            raise ValueError("eval: use either `fraction` or `from_task_eval_split`, not both")
        return self


class PrepConfig(StrictModel):
    tasks: list[TaskConfig] = Field(min_length=1)
    tokenizer: TokenizerConfig
    output_dir: str
    builtin: Optional[BuiltinDataConfig] = None
    max_seq_len: int = Field(default=512, ge=8)
    overflow: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = False
    # Every task whose own `chat_template` is null: render it through the tokenizer's chat template (instruct
    # models); false (default) keeps the plain template, right for base models.
    chat_template: bool = False
    pack_per_task: bool = False
    skip_invalid: bool = False
    eval: EvalSplitConfig = Field(default_factory=EvalSplitConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    seed: int = 0
    # Speed only (not part of the cache key).
    num_proc: int = Field(default=1, ge=1)
    batch_size: int = Field(default=1000, gt=0)

    @model_validator(mode="after")
    def _resolve_chat_template(self):
        """Each task carries its resolved `chat_template`, so the manifest (and evaluate) sees what prep did."""
        if any(t.chat_template is None for t in self.tasks):  # (assignment re-validates: resolve once)
            self.tasks = [t if t.chat_template is not None else
                          t.model_copy(update={"chat_template": self.chat_template}) for t in self.tasks]
        return self

    @model_validator(mode="after")
    def _check_names(self):
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"tasks: duplicate task names {dup}")
        for field in ("caps", "weights"):
            for key in getattr(self.sampling, field):
                if key not in names:
                    raise ValueError(f"sampling.{field} names unknown task {key!r}; tasks are: {', '.join(names)}")
        if self.eval.from_task_eval_split:
            missing = [t.name for t in self.tasks if not t.eval_split]
            if missing:
                raise ValueError(f"eval.from_task_eval_split: tasks without `eval_split`: {missing}")
        return self

    def cache_hash(self) -> str:
        """Hash of the settings that change the output (speed knobs and the output path excluded)."""
        return self.model_copy(update={"num_proc": 1, "batch_size": 1000, "output_dir": ""}).config_hash()
