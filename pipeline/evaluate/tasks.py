"""Which tasks to evaluate and their examples, from the SAME task definitions prep used.

Task definitions come from a prep config (`configs/prep/*.yaml`) or from a prepared data folder's manifest.json
(`tasks.<name>.config` is the full TaskConfig prep ran with, and the folder holds the tokenizer it encoded with).
Prompts are encoded by `pipeline.data.tokenize.prompt_ids`, so they are exactly the ids training saw before the
response; label candidates are the task's response template rendered with each verbalizer key and encoded the way
prep encodes responses (plus EOS when prep added it: the score is then that of the whole answer, so a label
that is a prefix of another cannot win by being short).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from pipeline.config.tasks import TaskConfig
from pipeline.evaluate.errors import EvalError
from pipeline.evaluate.scoring import parse_number


@dataclass
class TaskSet:
    """Task definitions plus how prep encoded them (BOS/EOS) and, for a data folder, its tokenizer."""

    tasks: list[TaskConfig]
    add_bos: Optional[bool] = None  # None: the tokenizer's convention (see TokenizerConfig)
    add_eos: bool = True
    tokenizer_path: Optional[str] = None
    source: str = ""

    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def select(self, names: Optional[Sequence[str]]) -> list[TaskConfig]:
        """The named tasks in the order given (all when `names` is empty); unknown names are an error."""
        if not names:
            return list(self.tasks)
        by_name = {t.name: t for t in self.tasks}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise EvalError(f"task(s) {missing} not defined in {self.source}; its tasks: {', '.join(self.names())}")
        return [by_name[n] for n in names]


def from_config(path, overrides: Sequence[str] = ()) -> TaskSet:
    from pipeline.config.base import load_config
    from pipeline.config.prep import PrepConfig

    if not Path(path).is_file():
        raise EvalError(f"--config: file not found: {path}")
    cfg = load_config(PrepConfig, path, list(overrides))
    return TaskSet(cfg.tasks, cfg.tokenizer.add_bos, cfg.tokenizer.add_eos,
                   cfg.tokenizer.path, source=str(path))


def from_data(data_dir) -> TaskSet:
    d = Path(data_dir)
    mf = d / "manifest.json"
    if not mf.is_file():
        raise EvalError(f"--data: {d} is not a prepared data folder (no manifest.json)")
    manifest = json.loads(mf.read_text())
    items = sorted(manifest["tasks"].items(), key=lambda kv: kv[1]["id"])
    missing = [name for name, info in items if "config" not in info]
    if missing:
        raise EvalError(f"--data: {mf} has no task config for {missing} (written by an older prep; re-run prep)")
    tok = manifest.get("tokenizer", {})
    tok_path = d / tok.get("path", "tokenizer")
    return TaskSet([TaskConfig(**info["config"]) for _, info in items], tok.get("add_bos", True),
                   tok.get("add_eos", True), str(tok_path) if tok_path.is_dir() else None, source=str(mf))


def eval_rows(task: TaskConfig, max_examples: Optional[int] = None, seed: int = 0,
              split: Optional[str] = None) -> tuple[list[dict], str, int]:
    """(rows, split, rows in the split): the task's `eval_split` (or `split`), subsampled to `max_examples`
    rows chosen by a seeded permutation and kept in source order, so the same N are scored on every run."""
    from pipeline.data.errors import PrepError
    from pipeline.data.sources import load_split

    split = split or task.eval_split
    if not split:
        raise EvalError(f"task {task.name!r} has no eval_split in its config; set one (or pass --eval-split "
                        f"{task.name}=SPLIT)")
    try:
        ds, _ = load_split(task, split)
    except PrepError as e:
        raise EvalError(str(e)) from None
    total = len(ds)
    if max_examples is not None and max_examples < total:
        idx = np.sort(np.random.default_rng(seed).permutation(total)[:max_examples])
        ds = ds.select(idx.tolist())
    return ds.to_list(), split, total


@dataclass
class Encoded:
    """Model inputs and references of one task's rows.

    `refs`: label keys (classification), floats (regression) or answer strings (generation); `ref_texts` is the
    answer text for every kind (the verbalized label for classification).
    """

    prompts: list[list[int]]
    refs: list[Any]
    ref_texts: list[str]
    labels: Optional[list[str]] = None
    candidates: Optional[list[list[list[int]]]] = None


def _label_key(task: TaskConfig, row: dict) -> str:
    from pipeline.data.render import verbalizer_key
    value = row[task.template.label_column]
    key = verbalizer_key(task.template.verbalizer, value)
    if key is None:
        raise EvalError(f"task {task.name!r}: label {value!r} has no verbalizer entry "
                        f"(keys: {sorted(task.template.verbalizer)})")
    return key


def _reference_text(task: TaskConfig, row: dict, tokenizer) -> str:
    """The answer as written in the data (a chat's last message, not its template's end-of-turn tokens)."""
    from pipeline.data.render import render_plain
    if task.format == "chat":
        return str(row["messages"][-1]["content"])
    return render_plain(task, row)[1]


def _regression_ref(task: TaskConfig, row: dict, text: str) -> float:
    """The numeric column the answer template writes (full precision: stsb's 3.75, not the template's "3.8"), else
    the number in the rendered answer. A `label` column the answer does not read (SICK's class label beside its
    relatedness score) is not the reference."""
    from pipeline.data.render import template_columns

    def numeric(c):
        return isinstance(row.get(c), (int, float)) and not isinstance(row.get(c), bool)

    if task.template is None:
        col = "label"
    else:
        written = [c for c in sorted(template_columns(task.template.response)) if numeric(c)]
        col = task.template.label_column if task.template.label_column in written else (
            written[0] if len(written) == 1 else None)
    if col is not None and numeric(col):
        return float(row[col])
    value = parse_number(text)
    if value is None:
        raise EvalError(f"task {task.name!r}: regression reference {text!r} holds no number")
    return value


def stop_token_ids(task: TaskConfig, tokenizer) -> list[int]:
    """Where a generated answer ends: what prep put after each training reply. EOS, and for a task rendered through
    the chat template the first special token the template writes after the reply's content, its end of turn
    (SmolLM2's <|im_end|> is its EOS; the base tokenizers of Llama-3 and Qwen2.5 end a turn with another token)."""
    from pipeline.data.render import apply_chat_template, uses_chat_template
    from pipeline.data.tokenize import encode_texts

    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if uses_chat_template(task, tokenizer):
        content = "ok"
        reply = apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}],
                                    tokenizer)[1]
        if content not in reply:  # a template that rewrites the reply: EOS alone
            return stop
        tail = encode_texts(tokenizer, [reply[reply.find(content) + len(content):]])[0]
        special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
        first = next((t for t in tail if t in special), None)
        if first is not None and first not in stop:
            stop.append(first)
    return stop


def encode(task: TaskConfig, rows: list[dict], tokenizer, add_bos: Optional[bool] = None, add_eos: bool = True) -> Encoded:
    from pipeline.data.errors import PrepError
    from pipeline.data.render import render, uses_chat_template
    from pipeline.data.tokenize import encode_texts, prompt_ids

    try:
        prompts = prompt_ids(task, tokenizer, rows, add_bos)
        texts = [_reference_text(task, r, tokenizer) for r in rows]
    except PrepError as e:
        raise EvalError(str(e)) from None
    if task.kind == "regression":
        return Encoded(prompts, [_regression_ref(task, r, t) for r, t in zip(rows, texts)], texts)
    if task.kind == "generation":
        return Encoded(prompts, list(texts), texts)
    labels = list(task.template.verbalizer)
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None \
        and not uses_chat_template(task, tokenizer) else []
    cache: dict[str, list[int]] = {}
    candidates = []
    for r in rows:
        row_cands = []
        for key in labels:
            text = render(task, dict(r, **{task.template.label_column: key}), tokenizer)[1]
            if text not in cache:
                cache[text] = encode_texts(tokenizer, [text])[0] + eos
            row_cands.append(cache[text])
        candidates.append(row_cands)
    refs = [_label_key(task, r) for r in rows]
    return Encoded(prompts, refs, [task.template.verbalizer[k] for k in refs], labels, candidates)
