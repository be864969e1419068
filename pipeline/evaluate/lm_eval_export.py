"""A task of this project as an lm-evaluation-harness task YAML, so the same task runs in the standard evaluator.

Covered: `template` tasks of kind `classification` (lm-eval's `multiple_choice`, metric `acc`) whose response reads
only `{label_text}`. The prompt template becomes `doc_to_text` (Jinja), the verbalizer's words rendered through the
response template become `doc_to_choice` (in the verbalizer's order, which is our scorer's order too), and the row's
label becomes `doc_to_target`. `target_delimiter` is empty: our template already holds every space.

What lm-eval does not do by itself, and how the export matches our encoding:
- BOS: lm-eval's `hf` model adds none unless `add_bos_token=True` is in `--model_args`; `model_args` below says
  which this data's encoding needs.
- EOS after the label: our scorer appends it when prep did (`tokenizer.add_eos`); it is appended here as the EOS
  token's text, which an HF tokenizer reads back as that one special token.
- lm-eval tokenizes prompt + label as one string and splits it; we encode them apart (as training saw them). The
  ids agree unless a token spans the boundary (`tests/test_lm_eval_agreement.py` measures both).
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.atomic import atomic_write
from pipeline.config.tasks import TaskConfig
from pipeline.data.render import template_columns
from pipeline.data.sources import source_path
from pipeline.data.tokenize import resolve_add_bos
from pipeline.evaluate.errors import EvalError


def jinja_from_format(fmt: str, where: str) -> str:
    """A `str.format` template as the equivalent Jinja template (`{text}` -> `{{ text }}`); literal text that Jinja
    would read as markup is wrapped in `{% raw %}`."""
    out = []
    for literal, field, spec, conversion in string.Formatter().parse(fmt):
        if literal:
            out.append("{% raw %}" + literal + "{% endraw %}" if any(m in literal for m in ("{", "}", "{#", "%"))
                       else literal)
        if field is not None:
            if spec or conversion:
                raise EvalError(f"{where}: field {{{field}}} uses a format spec or conversion, which lm-eval's Jinja "
                                f"templates do not have")
            out.append("{{ " + field + " }}")
    return "".join(out)


def _dataset(task: TaskConfig, split: str) -> dict[str, Any]:
    src = task.source
    if src.type in ("jsonl", "json"):
        path = Path(source_path(src, split)).resolve()
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {split: str(path)}}}
    if src.type == "disk":
        folder = Path(src.path).resolve()
        files = sorted((folder / split).glob("*.arrow")) or sorted(folder.glob("*.arrow"))
        if not files:
            raise EvalError(f"task {task.name!r}: no .arrow files in {folder / split} or {folder}")
        return {"dataset_path": "arrow", "dataset_kwargs": {"data_files": {split: [str(f) for f in files]}}}
    return {"dataset_path": src.path, **({"dataset_name": src.subset} if src.subset else {})}


def lm_eval_task(task: TaskConfig, tokenizer, add_bos: Optional[bool] = None, add_eos: bool = True,
                 split: Optional[str] = None) -> dict[str, Any]:
    """The harness's task config (a dict to dump as YAML) for `task`, encoded as prep encoded it."""
    if task.format != "template" or task.kind != "classification":
        raise EvalError(f"task {task.name!r}: only template classification tasks export to lm-eval "
                        f"(this one is format {task.format!r}, kind {task.kind!r})")
    if task.chat_template:
        raise EvalError(f"task {task.name!r}: rendered through the chat template (chat_template: true); export it "
                        f"with chat_template: false, or run lm-eval with --apply_chat_template on your own task")
    tpl = task.template
    if template_columns(tpl.response) - {"label_text"}:
        raise EvalError(f"task {task.name!r}: the response template {tpl.response!r} reads columns other than "
                        f"label_text, so its choices differ per row; lm-eval's fixed choice list cannot say that")
    split = split or task.eval_split
    if not split:  # as evaluate: never the training split by default
        raise EvalError(f"task {task.name!r} has no eval_split in its config; set one (the export never scores the "
                        f"training split)")
    eos = tokenizer.eos_token if add_eos and tokenizer.eos_token_id is not None else ""
    keys = list(tpl.verbalizer)
    choices = [tpl.response.format(label_text=tpl.verbalizer[k]) + eos for k in keys]
    index = "{" + ", ".join(f"{k!r}: {i}" for i, k in enumerate(keys)) + "}"
    col = tpl.label_column
    return {
        "task": task.name,
        **_dataset(task, split),
        "test_split": split,
        "output_type": "multiple_choice",
        "doc_to_text": jinja_from_format(tpl.prompt, f"task {task.name!r} template.prompt"),
        "doc_to_choice": choices,
        # a float label column's 1.0 is key "1", as prep and evaluate read it
        "doc_to_target": "{{ " + index + "[(" + col + " | int | string) if (" + col + " is number and " + col +
                         " == " + col + " | int) else (" + col + " | string)] }}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0,
                     "model_args": f"add_bos_token={resolve_add_bos(tokenizer, add_bos)}",
                     "exported_by": "more-pipeline (pipeline/evaluate/lm_eval_export.py)"},
    }


def write_lm_eval_tasks(tasks: list[TaskConfig], tokenizer, out_dir, add_bos: Optional[bool] = None,
                        add_eos: bool = True) -> list[Path]:
    """One `<task>.yaml` per exportable task in `out_dir` (an lm-eval `--include_path`); the others are named in
    the error, so nothing is half exported."""
    configs, errors = [], []
    for task in tasks:
        try:
            configs.append(lm_eval_task(task, tokenizer, add_bos, add_eos))
        except EvalError as e:
            errors.append(str(e))
    if errors:
        raise EvalError("; ".join(errors))
    out = Path(out_dir)
    return [atomic_write(out / f"{c['task']}.yaml", yaml.safe_dump(c, sort_keys=False, allow_unicode=True))
            for c in configs]
