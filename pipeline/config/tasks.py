"""One place defines a task: where its data comes from, how it is rendered, and how it is scored.

Prep renders training examples from it; evaluation renders prompts and scores predictions from the same object.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel


class SourceConfig(StrictModel):
    """Where examples come from.

    - `jsonl` / `json`: local files; `format` says how a row becomes prompt/response.
    - `disk`: a `datasets` folder written by `save_to_disk` (a Dataset or a DatasetDict + `split`).
    - `hub`: a Hugging Face hub dataset name (+ optional `subset`), for users with network access.
    """

    type: Literal["jsonl", "json", "disk", "hub"]
    path: str
    split: Optional[str] = None
    subset: Optional[str] = None


class TemplateConfig(StrictModel):
    """`prompt` and `response` are `str.format` templates over the row's columns.

    `verbalizer` maps a label value (as written in YAML, compared as a string) to the word the model must produce,
    e.g. {0: unacceptable, 1: acceptable}; the response template sees it as `{label_text}`. A value must be text
    (numbers are taken as written): YAML reads an unquoted `yes`/`no`/`on`/`off`/`true`/`false` as a boolean, and
    `{0: yes, 1: no}` used to become the words "True"/"False", so a boolean value is an error that says to quote it.
    """

    prompt: str
    response: str = "{label_text}"
    verbalizer: Optional[dict[str, str]] = None
    label_column: str = "label"

    @model_validator(mode="before")
    @classmethod
    def _stringify_verbalizer_keys(cls, data):
        """Keys are label values compared as text (`str(label)`, so a `true:` key matches a boolean label); number
        values become text; anything else (booleans, null, lists) is left for the `str` check to reject."""
        if isinstance(data, dict) and isinstance(data.get("verbalizer"), dict):
            data = dict(data)
            data["verbalizer"] = {str(k): str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                                  for k, v in data["verbalizer"].items()}
        return data


class TaskConfig(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: SourceConfig
    # How a row becomes (prompt, response): `template` uses `template`; `alpaca` reads instruction/input/output;
    # `chat` reads `messages` (role/content) and uses the tokenizer's chat template when it has one.
    format: Literal["template", "alpaca", "chat"] = "template"
    template: Optional[TemplateConfig] = None
    max_examples: Optional[int] = Field(default=None, gt=0)
    # Evaluation: which split to score and how.
    eval_split: Optional[str] = None
    kind: Literal["classification", "generation", "regression"] = "generation"
    metrics: list[Literal["accuracy", "f1", "mcc", "pearson", "spearman", "exact_match", "rouge_l", "bleu"]] = Field(
        default_factory=lambda: ["exact_match"]
    )
    max_new_tokens: int = Field(default=16, gt=0)
    # `template` / `alpaca` tasks: render through the tokenizer's chat template (user turn = the prompt, assistant
    # turn = the response, loss on the assistant reply only), as an instruct model was trained. null: the prep
    # config's `chat_template`. `chat` tasks always use the chat template when the tokenizer has one.
    chat_template: Optional[bool] = None

    @model_validator(mode="after")
    def _template_needed(self):
        if self.format == "template" and self.template is None:
            raise ValueError(f"task {self.name!r}: format 'template' needs a `template` section")
        if self.kind == "classification" and (self.template is None or not self.template.verbalizer):
            raise ValueError(f"task {self.name!r}: kind 'classification' needs template.verbalizer")
        return self
