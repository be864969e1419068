"""Turn one source row into (prompt, response) text, the same way for training (prep) and scoring (evaluate).

- `template`: `str.format` over the row's columns; `{label_text}` is the verbalized label.
- `alpaca`: instruction / input / output columns.
- `chat`: `messages` (role/content); the last message is the assistant's answer and the only supervised part.
  With a tokenizer that has a chat template, the prompt is the template applied to the earlier turns with the
  generation prompt, and the response is what the template adds for the last turn (end-of-turn tokens included).
  Without one, a plain `role: content` rendering is used.
- `chat_template: true` on a `template`/`alpaca` task: its prompt becomes the user turn and its response the
  assistant turn of the tokenizer's chat template (how an instruct model was trained); only the reply is supervised.
"""
from __future__ import annotations

import os
import string
from decimal import Decimal
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config.tasks import TaskConfig
from pipeline.data.errors import PrepError
from pipeline.data.sources import EXAMPLE_ID, row_location

ALPACA_PROMPT = "Instruction: {instruction}\n{input_block}Response:"


def template_columns(fmt: str) -> set[str]:
    """Top-level column names a `str.format` template reads (`{a.b}`/`{a[0]}` read column `a`)."""
    cols = set()
    for _, field, _, _ in string.Formatter().parse(fmt):
        if field:
            cols.add(field.split(".")[0].split("[")[0])
    return cols


def required_columns(task: TaskConfig) -> set[str]:
    if task.format == "alpaca":
        return {"instruction", "output"}
    if task.format == "chat":
        return {"messages"}
    tpl = task.template
    cols = (template_columns(tpl.prompt) | template_columns(tpl.response)) - {"label_text"}
    if "{label_text" in tpl.prompt + tpl.response:
        cols.add(tpl.label_column)
    return cols


def check_columns(task: TaskConfig, columns: list[str], where: str) -> None:
    """Fail once, before any work, if the task's template reads a column the source does not have."""
    missing = sorted(required_columns(task) - set(columns))
    if missing:
        shown = sorted(c for c in columns if not c.startswith("_"))
        raise PrepError(f"task {task.name!r}: template needs column(s) {missing} missing from {where}; "
                        f"available columns: {shown}")


def check_rows(task: TaskConfig, ds, split: Optional[str], skip_invalid: bool):
    """Rows the task cannot render are errors naming the row (or, with `skip_invalid`, are left out and counted):
    a field the task reads missing or null (a JSONL row without a key gets null when the rows become one table, and
    the template would render the word "None"), a label without verbalizer entry, a chat row whose `messages` are
    empty, hold a null role or content, or do not end with the assistant's reply.

    Returns (dataset without such rows, number left out). Nulls and labels are checked per column (vectorised), chat
    rows one by one."""
    bad = np.zeros(len(ds), dtype=bool)
    for col in sorted(required_columns(task)):
        column = ds.data.column(col)
        if column.null_count == 0:
            continue
        nulls = pc.is_null(column).to_numpy(zero_copy_only=False)
        if not skip_invalid:
            first = int(np.flatnonzero(nulls)[0])
            ex = int(ds.data.column(EXAMPLE_ID)[first].as_py())
            raise PrepError(f"task {task.name!r}: {row_location(task, split, ex)}: field {col!r} is missing or null "
                            f"({int(nulls.sum())} such row(s) in this source); the task's "
                            f"{'template' if task.format == 'template' else task.format + ' format'} reads it. "
                            f"Fix the data or set skip_invalid: true")
        bad |= nulls
    tpl = task.template
    if task.format == "template" and tpl.verbalizer is not None and "{label_text" in tpl.prompt + tpl.response:
        column = ds.data.column(tpl.label_column)
        unknown = [v for v in pc.unique(column).to_pylist() if v is not None and verbalizer_key(tpl.verbalizer, v)
                   is None]
        if unknown:
            rows = pc.is_in(column, value_set=pa.array(unknown, type=column.type)).to_numpy(zero_copy_only=False)
            if not skip_invalid:
                first = int(np.flatnonzero(rows)[0])
                ex = int(ds.data.column(EXAMPLE_ID)[first].as_py())
                raise _no_verbalizer_entry(task, column[first].as_py(), row_location(task, split, ex),
                                           f" ({int(rows.sum())} such row(s); fix the data or set skip_invalid: true)")
            bad |= rows
    if task.format == "chat" and "messages" in ds.column_names:
        column, step = ds.data.column("messages"), 10_000  # Python objects for a slice of rows at a time
        for start in range(0, len(column), step):
            for i, msgs in enumerate(column.slice(start, step).to_pylist(), start):
                problem = None if bad[i] else chat_problem(msgs)
                if problem and not skip_invalid:
                    ex = int(ds.data.column(EXAMPLE_ID)[i].as_py())
                    raise PrepError(f"task {task.name!r}: {row_location(task, split, ex)}: {problem}. Fix the data or "
                                    f"set skip_invalid: true")
                bad[i] |= problem is not None
    if not bad.any():
        return ds, 0
    return ds.select(np.flatnonzero(~bad)), int(bad.sum())


def _number(value: Any) -> Optional[Decimal]:
    """A label or key as an exact number: an int or float, or text that is Python's own writing of one (a column
    mixing JSON integers and decimals is read as such text, `sources._as_written`; "01" is a code, not a number),
    else None. Decimal, not float: two long integer labels must not meet in one float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, str):
        for parse in (int, float):
            try:
                number = parse(value)
            except ValueError:
                continue
            if str(number) == value:
                return Decimal(value)
    return None


def verbalizer_key(verbalizer: dict[str, str], value: Any) -> Optional[str]:
    """The verbalizer key a label value matches, or None: its text, else the key that writes the same number
    (label 1.0 or "1" matches key "1" or "1.0")."""
    key = str(value)
    if key in verbalizer:
        return key
    number = _number(value)
    if number is None:
        return None
    return next((k for k in verbalizer if _number(k) == number), None)


def _no_verbalizer_entry(task: TaskConfig, value: Any, where: str, note: str = "") -> PrepError:
    verbalizer = task.template.verbalizer
    hint = ""
    if {"True", "False"} & set(verbalizer) and isinstance(value, str):
        hint = ("; YAML reads an unquoted yes/no/on/off/true/false key as a boolean (key 'True'/'False'): "
                "quote the key to match a text label")
    return PrepError(f"task {task.name!r}: {where}: label {value!r} has no verbalizer entry{note}; verbalizer keys: "
                     f"{sorted(verbalizer)}{hint}")


def _where(row: dict[str, Any], where: Optional[str]) -> str:
    return where or f"example {row.get('_example_id')}"


def _label_text(task: TaskConfig, row: dict[str, Any], where: Optional[str] = None) -> str:
    tpl = task.template
    value = row[tpl.label_column]
    if tpl.verbalizer is None:
        return str(value)
    key = verbalizer_key(tpl.verbalizer, value)
    if key is None:  # check_rows catches these in prep, naming the file and line
        raise _no_verbalizer_entry(task, value, _where(row, where))
    return tpl.verbalizer[key]


def apply_chat_template(msgs: list[dict], tokenizer) -> tuple[str, str]:
    """(prompt, response) of messages whose last is the assistant's: the template over the earlier turns with the
    generation prompt, and what the template adds for the last turn (end-of-turn tokens included)."""
    prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    if full.startswith(prompt):
        return prompt, full[len(prompt):]
    # The generation prompt is not a prefix of the conversation (DeepSeek-R1's adds "<think>\n" that the assistant
    # turn lacks): the reply from where its content starts after the common part, end-of-turn tokens included.
    content = msgs[-1]["content"]
    start = full.find(content, len(os.path.commonprefix([prompt, full]))) if content else -1
    return prompt, full[start:] if start >= 0 else content


def _has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def chat_problem(msgs) -> Optional[str]:
    """What makes a `messages` value unusable (None if nothing): a null role or content would render as "None"."""
    if not msgs:
        return "`messages` is empty"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"message {i} of `messages` needs a text `role` and `content`, got {m!r}"
    if msgs[-1]["role"] != "assistant":
        return "`messages` must end with an assistant message"
    return None


def _through_chat_template(task: TaskConfig, msgs: list[dict], tokenizer, row, where) -> tuple[str, str]:
    """apply_chat_template, with what the template refuses (a conversation without a user turn, roles that do not
    alternate: templates raise their own errors) named by the row."""
    try:
        return apply_chat_template(msgs, tokenizer)
    except Exception as e:  # jinja's TemplateError, transformers' ValueError, ...
        raise PrepError(f"task {task.name!r}: {_where(row, where)}: the tokenizer's chat template cannot render this "
                        f"row ({type(e).__name__}: {e})") from None


def _chat(task: TaskConfig, row: dict[str, Any], tokenizer, where: Optional[str] = None) -> tuple[str, str]:
    msgs = row["messages"]
    problem = chat_problem(msgs)
    if problem:  # check_rows catches these in prep, naming the file and line
        raise PrepError(f"task {task.name!r}: {_where(row, where)}: {problem}")
    msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    if _has_chat_template(tokenizer):
        return _through_chat_template(task, msgs, tokenizer, row, where)
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in msgs[:-1]) + "assistant:"
    return prompt, msgs[-1]["content"]


def uses_chat_template(task: TaskConfig, tokenizer) -> bool:
    """Chat-template text carries its own special tokens, so BOS/EOS are not added around it."""
    return (task.format == "chat" or bool(task.chat_template)) and _has_chat_template(tokenizer)


def render_plain(task: TaskConfig, row: dict[str, Any], where: Optional[str] = None) -> tuple[str, str]:
    """(prompt, response) of a `template` or `alpaca` task as its template writes them, before any chat template
    (the response is the answer a prediction is compared with). `where`: the row as an error names it (prep:
    file:line; default: its example id)."""
    if task.format == "alpaca":
        inp = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(instruction=row["instruction"], input_block=f"Input: {inp}\n" if inp else "")
        return prompt, str(row["output"])
    tpl = task.template
    fields = dict(row)
    if "{label_text" in tpl.prompt + tpl.response:
        fields["label_text"] = _label_text(task, row, where)
    try:
        return tpl.prompt.format(**fields), tpl.response.format(**fields)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:  # a field, index or spec the row lacks
        raise PrepError(f"task {task.name!r}: template could not be rendered for {_where(row, where)}: {e!r}"
                        ) from None


def render(task: TaskConfig, row: dict[str, Any], tokenizer: Optional[Any] = None,
           where: Optional[str] = None) -> tuple[str, str]:
    """(prompt, response) text of one row. `evaluate` uses the prompt and scores against the response. `where`:
    the row as an error names it (prep passes its file:line)."""
    if task.format == "chat":
        return _chat(task, row, tokenizer, where)
    prompt, response = render_plain(task, row, where)
    if task.chat_template:
        if not _has_chat_template(tokenizer):
            raise PrepError(f"task {task.name!r}: chat_template is set, but the tokenizer has no chat template "
                            f"(set chat_template: false, or use an instruct model's tokenizer)")
        return _through_chat_template(task, [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": response}], tokenizer, row, where)
    return prompt, response
