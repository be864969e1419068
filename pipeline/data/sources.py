"""Read a task's examples into a `datasets.Dataset` (local JSONL/JSON, `save_to_disk` folders, hub names).

Every row gets `_example_id` (its index in the source: line number - 1 for JSONL), so a packed sample can be
traced back and held-out splits stay the same however the data is sharded.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import datasets

from pipeline.config.tasks import SourceConfig, TaskConfig
from pipeline.data.errors import PrepError

EXAMPLE_ID = "_example_id"


def source_path(source: SourceConfig, split: Optional[str]) -> str:
    """Local file sources may name the split in their path: `data/arith/{split}.jsonl`."""
    return source.path.replace("{split}", split) if split and "{split}" in source.path else source.path


def row_location(task: TaskConfig, split: Optional[str], example_id: int) -> str:
    """Where example `example_id` of a split is, as a user finds it: `file:line` for JSONL, the item or row index
    otherwise."""
    src = task.source
    if src.type == "jsonl":
        return f"{source_path(src, split)}:{example_id + 1}"
    if src.type == "json":
        return f"{source_path(src, split)}: item {example_id}"
    return f"{src.path} (split {split}): row {example_id}"


def _read_jsonl(path: Path, task: str, skip_invalid: bool) -> tuple[list[dict], int]:
    rows, invalid = [], 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                if skip_invalid:
                    invalid += 1
                    continue
                what = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "malformed JSON line"
                raise PrepError(f"task {task!r}: {path}:{lineno}: {what} ({e}); "
                                f"fix it or set skip_invalid: true") from None
            row[EXAMPLE_ID] = lineno - 1
            rows.append(row)
    return rows, invalid


def _read_json(path: Path, task: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise PrepError(f"task {task!r}: {path}: not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise PrepError(f"task {task!r}: {path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise PrepError(f"task {task!r}: {path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return [dict(r, **{EXAMPLE_ID: i}) for i, r in enumerate(data)]


def _kind(value) -> str:
    """A JSON value's type as one Arrow column can hold it: int and float mix (as text, `_as_written`), nothing
    else does."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _first_type_clash(rows: list[dict], columns: list[str], where) -> str:
    """The first row whose value in some column has another JSON type than that column's first non-null value."""
    for col in columns:
        first = None
        for row in rows:
            value = row.get(col)
            if value is None:
                continue
            if first is None:
                first = (row, _kind(value))
            elif _kind(value) != first[1]:
                return (f"{where(row)}: field {col!r} is {_kind(value)} {value!r}, but {where(first[0])} has "
                        f"{first[1]} {first[0][col]!r} there")
    return ""


def _as_written(values: list) -> list:
    """A column holding both JSON integers and decimals, as text the way the file writes the numbers (Python's
    shortest form of a decimal): Arrow would make it a float column, and an answer 42 beside 2.5 would render, and
    train, as "42.0"."""
    kinds = {type(v) for v in values}
    if int in kinds and float in kinds:
        return [None if v is None else str(v) for v in values]
    return values


def _from_rows(rows: list[dict], task: str, where) -> datasets.Dataset:
    """One table with every column any row has (a row without a key gets null there, which prep reports by row
    when the task reads that column); `where(row)` names a row in errors."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return datasets.Dataset.from_dict({c: _as_written([row.get(c) for row in rows]) for c in columns})
    except Exception as e:  # pyarrow type clashes between rows
        clash = _first_type_clash(rows, columns, where)
        raise PrepError(f"task {task!r}: {clash or where(None)}: rows do not share one schema ({e})") from None


def _same_data(task: TaskConfig, split: Optional[str], what: str) -> PrepError:
    """Reading split `split` where the source has no splits would silently give the training rows again."""
    return PrepError(f"task {task.name!r}: split {split!r} would read the same rows as the training split "
                     f"{task.source.split!r} from {what}: put {{split}} in the path (one file per split) or point "
                     f"the source at split files")


def load_split(task: TaskConfig, split: Optional[str], skip_invalid: bool = False) -> tuple[datasets.Dataset, int]:
    """All rows of one split of the task's source (before `max_examples`), plus the number of invalid rows skipped."""
    src, invalid = task.source, 0
    if src.type in ("jsonl", "json"):
        path = Path(source_path(src, split))
        if not path.is_file():
            raise PrepError(f"task {task.name!r}: source file not found: {path}")
        if src.type == "jsonl":
            rows, invalid = _read_jsonl(path, task.name, skip_invalid)
        else:
            rows = _read_json(path, task.name)
        if not rows:
            raise PrepError(f"task {task.name!r}: source {path} has no examples"
                            + (f" ({invalid} invalid lines skipped)" if invalid else ""))
        if split != src.split and "{split}" not in src.path:
            raise _same_data(task, split, f"{path} (no {{split}} in its path)")

        def where(row):  # a row as errors name it; None: the whole file
            return str(path) if row is None else row_location(task, split, row[EXAMPLE_ID])

        return _from_rows(rows, task.name, where), invalid
    if src.type == "disk":
        path = Path(src.path)
        if not path.exists():
            raise PrepError(f"task {task.name!r}: dataset folder not found: {path}")
        try:
            obj = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:  # a folder that save_to_disk did not write (e.g. the parent of one)
            raise PrepError(f"task {task.name!r}: {path} is not a dataset folder written by save_to_disk ({e})"
                            ) from None
        if isinstance(obj, datasets.DatasetDict):
            if split not in obj:
                raise PrepError(f"task {task.name!r}: {path} has splits {sorted(obj)}, not {split!r}")
            obj = obj[split]
        elif split != src.split:
            raise _same_data(task, split, f"{path} (one dataset, no splits)")
    else:  # hub: real loading code for users with network access (not exercised offline)
        obj = datasets.load_dataset(src.path, src.subset, split=split or "train")
    if len(obj) == 0:
        raise PrepError(f"task {task.name!r}: source {src.path} split {split!r} has no examples")
    return obj.add_column(EXAMPLE_ID, list(range(len(obj)))), invalid


def load_task(task: TaskConfig, split: Optional[str], skip_invalid: bool = False,
              shard: Optional[tuple[int, int]] = None, max_examples: Optional[int] = -1) -> tuple[datasets.Dataset, int]:
    """Rows for prep: the first `max_examples` (default: the task's) of the split, then (for `--shard i/N`) the
    i-th contiguous slice.

    Contiguous slices concatenated in shard order give back exactly the unsharded rows, in the same order.
    """
    ds, invalid = load_split(task, split, skip_invalid)
    cap = task.max_examples if max_examples == -1 else max_examples
    if cap is not None and cap < len(ds):
        ds = ds.select(range(cap))
    if shard is not None:
        ds = ds.shard(num_shards=shard[1], index=shard[0], contiguous=True)
        invalid = invalid if shard[0] == 0 else 0  # invalid lines are counted once, by shard 0
    return ds, invalid


def fingerprint_source(task: TaskConfig, splits: list[Optional[str]]) -> str:
    """Content hash of the files a task reads (for the prep cache). Hub sources hash their name only."""
    h = hashlib.sha256()
    src = task.source
    if src.type == "hub":
        h.update(json.dumps([src.path, src.subset, splits]).encode())
        return h.hexdigest()
    paths = sorted({source_path(src, s) for s in splits}) if src.type in ("jsonl", "json") else [src.path]
    for p in map(Path, paths):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            if f.is_file():
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            else:
                h.update(b"<missing>")
    return h.hexdigest()
