"""Strict YAML -> pydantic loading with `a.b.c=value` overrides and errors that name the file, line and key."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from yaml.constructor import SafeConstructor


class ConfigError(ValueError):
    """A configuration problem, with the file and key it comes from in the message."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    def config_hash(self) -> str:
        """Stable hash of the validated content (key order and formatting do not matter)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


M = TypeVar("M", bound=BaseModel)
Path_ = tuple[str, ...]  # a key path, every part as text: ("tasks", "0", "template", "prompt")


# ---------------------------------------------------------------------------------------------------------------
# --set overrides
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Override:
    """One `--set key.path=value`: the value parsed as a YAML scalar, and the text as typed (used where the schema
    wants a string, so `--set name=yes` means the text "yes", not the boolean)."""

    item: str
    path: Path_
    raw: str
    value: Any


def _parse_override(item: str) -> Override:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    parts = tuple(p.strip() for p in key.strip().split("."))
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key (expected key.path=value)")
    if any(not p for p in parts):
        raise ConfigError(f"override {item!r}: key {key.strip()!r} has an empty part (a leading, trailing or "
                          f"doubled '.'); expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return Override(item, parts, raw, value)


def _nest(overrides: list[Override], raw_paths: frozenset = frozenset()) -> dict[str, Any]:
    """Overrides -> the nested dict `_apply` merges; `raw_paths` take the text as typed. Refuses an override that
    would silently undo an earlier one (`a.b=1` then `a=2`, or `a=2` then `a.b=1`)."""
    out: dict[str, Any] = {}
    owner: dict[Path_, str] = {}  # which override set a path (to name both sides of a conflict)
    for ov in overrides:
        node = out
        for i, part in enumerate(ov.path[:-1]):
            if part in node and not isinstance(node[part], dict):
                earlier = next(owner[ov.path[:j]] for j in range(i + 1, 0, -1) if ov.path[:j] in owner)
                raise ConfigError(f"override {ov.item!r} conflicts with the earlier override {earlier!r}")
            node = node.setdefault(part, {})
        last = ov.path[-1]
        earlier = next((o for p, o in owner.items() if len(p) > len(ov.path) and p[:len(ov.path)] == ov.path), None)
        if earlier is not None:  # `a.b=1` then `a=2`: the second would silently drop the first
            raise ConfigError(f"override {ov.item!r} conflicts with the earlier override {earlier!r}")
        node[last] = ov.raw if ov.path in raw_paths else ov.value
        owner[ov.path] = ov.item
    return out


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "tasks.0.max_examples=10"]` -> nested dict; values are parsed as YAML scalars."""
    return _nest([_parse_override(i) for i in items])


def _apply(data: Any, overrides: dict[str, Any], where: str = "") -> Any:
    """Merge overrides into loaded YAML; list items are addressed by index (`tasks.0.name=x`)."""
    if not isinstance(overrides, dict):
        return overrides
    if isinstance(data, list):
        data = list(data)
        for key, val in overrides.items():
            if not str(key).isdigit() or int(key) >= len(data):
                raise ConfigError(f"override {where}{key}: {where.rstrip('.') or 'root'} is a list of {len(data)} items")
            data[int(key)] = _apply(data[int(key)], val, f"{where}{key}.")
        return data
    if data is not None and not isinstance(data, dict):
        first = next(iter(overrides), "")
        raise ConfigError(f"override {where}{first}: {where.rstrip('.')} is {data!r} in the config, not a mapping")
    data = dict(data or {})
    for key, val in overrides.items():
        data[key] = _apply(data.get(key), val, f"{where}{key}.") if isinstance(val, dict) else val
    return data


# ---------------------------------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Spot:
    line: int  # 1-based line of the key (mappings) or of the item (lists)
    text: Optional[str]  # the scalar value as written, when it is a plain scalar


def _yaml_problem(e: yaml.YAMLError) -> str:
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    return "; ".join(p for p in parts if p) or str(e)


def _index_nodes(node: yaml.Node, path: Path_, spots: dict[Path_, _Spot], source: Path,
                 construct: SafeConstructor) -> None:
    """Record where every key path sits in the file, and refuse duplicate keys (PyYAML silently keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = construct.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) \
                else key_node.value
            key, line = str(key), key_node.start_mark.line + 1
            dotted = ".".join(path + (key,))
            if key in seen:
                raise ConfigError(f"{source}:{line}: duplicate key {dotted!r} (first at line {seen[key]})")
            seen[key] = line
            _record(value_node, path + (key,), line, spots, source, construct)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record(item, path + (str(i),), item.start_mark.line + 1, spots, source, construct)


def _record(node, path, line, spots, source, construct) -> None:
    plain = isinstance(node, yaml.ScalarNode) and node.style is None
    spots[path] = _Spot(line, node.value if plain else None)
    _index_nodes(node, path, spots, source, construct)


def _read_yaml(p: Path) -> tuple[dict, dict[Path_, _Spot]]:
    text = p.read_text()
    try:
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    spots: dict[Path_, _Spot] = {}
    if root is not None:
        _index_nodes(root, (), spots, p, SafeConstructor())
    return data, spots


# ---------------------------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------------------------

def _loc(e: dict) -> Path_:
    return tuple(str(p) for p in e["loc"])


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _origin(loc: Path_, source: str, spots: dict[Path_, _Spot], overrides: list[Override]) -> str:
    """`--set x=1` when an override set this key (or a key above it), else `file:line` of the nearest key."""
    for ov in reversed(overrides):
        n = min(len(loc), len(ov.path))
        if loc[:n] == ov.path[:n] and n:
            return f"--set {ov.item}"
    for n in range(len(loc), 0, -1):
        if loc[:n] in spots:
            return f"{source}:{spots[loc[:n]].line}"
    return source


def _format_error(err: ValidationError, source: str, spots: dict[Path_, _Spot] | None = None,
                  overrides: list[Override] | None = None) -> str:
    spots, overrides = spots or {}, overrides or []
    lines = [f"invalid configuration in {source}{' (with overrides)' if overrides else ''}:"]
    for e in err.errors():
        loc = _loc(e)
        dotted = ".".join(loc) or "<root>"
        where = _origin(loc, source, spots, overrides)
        if e["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key {dotted!r}")
        elif e["type"] == "missing":
            lines.append(f"  {where}: missing required key {dotted!r}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            line = f"  {where}: {dotted}: {msg} (got {_short(e.get('input'))})"
            value = e.get("input")
            if e["type"] == "string_type" and isinstance(value, (bool, int, float)):
                spot, what = spots.get(loc), "a boolean" if isinstance(value, bool) else "a number"
                if spot is not None and spot.text and not where.startswith("--set "):
                    line += f"; YAML reads the unquoted {spot.text} as {what}: write \"{spot.text}\" (in quotes)"
                elif isinstance(value, bool):
                    line += "; YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value"
                else:
                    line += "; YAML reads an unquoted number as a number: quote the value"
            lines.append(line)
    return "\n".join(lines)


def load_config(cls: type[M], path: str | Path | None = None, overrides: Iterable[str] | dict | None = None,
                data: dict | None = None) -> M:
    """Read `path` (YAML) or `data`, apply overrides, validate into `cls`.

    Errors name the file and line (or the `--set` override) of every bad key. A `--set` value is a YAML scalar,
    except where the schema wants a string and the scalar is not one: then the text as typed is used
    (`--set tasks.0.name=2024`). Relative paths inside the file stay as written; callers resolve them against the
    working directory, which is how every command in the README is run (from the repository root).
    """
    source = str(path) if path is not None else "<dict>"
    spots: dict[Path_, _Spot] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        data, spots = _read_yaml(p)
    data = data or {}
    parsed: list[Override] = []
    if isinstance(overrides, dict):
        merged = _apply(data, overrides) if overrides else data
        source += " (with overrides)" if overrides else ""
    else:
        parsed = [_parse_override(i) for i in overrides or ()]
        merged = _apply(data, _nest(parsed)) if parsed else data
    try:
        return cls.model_validate(merged)
    except ValidationError as e:
        err = e
    # A string field set from the command line to something YAML reads as a bool/number: use the typed text.
    as_text = frozenset(ov.path for ov in parsed if isinstance(ov.value, (bool, int, float)) and any(
        x["type"] == "string_type" and _loc(x) == ov.path for x in err.errors()))
    if as_text:
        try:
            return cls.model_validate(_apply(data, _nest(parsed, as_text)))
        except ValidationError as e:
            err = e
    raise ConfigError(_format_error(err, source, spots, parsed)) from None
