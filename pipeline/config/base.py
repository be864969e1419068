"""Strict YAML -> pydantic loading with `a.b.c=value` overrides and errors that name the file and key."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


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


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "tasks.0.max_examples=10"]` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


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
    data = dict(data or {})
    for key, val in overrides.items():
        data[key] = _apply(data.get(key), val, f"{where}{key}.") if isinstance(val, dict) else val
    return data


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key {loc!r}")
        elif e["type"] == "missing":
            lines.append(f"  missing required key {loc!r}")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(cls: type[M], path: str | Path | None = None, overrides: Iterable[str] | dict | None = None,
                data: dict | None = None) -> M:
    """Read `path` (YAML) or `data`, apply overrides, validate into `cls`.

    Relative paths inside the file stay as written; callers resolve them against the working directory,
    which is how every command in the README is run (from the repository root).
    """
    source = str(path) if path is not None else "<dict>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    data = data or {}
    if overrides:
        ov = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        data = _apply(data, ov)
        source += " (with overrides)"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None
