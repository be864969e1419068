"""Typed configuration for every stage: YAML files validated into pydantic models.

Each stage's schema lives in its own module here; `load_config` is the one way to read them.
"""
from pipeline.config.base import ConfigError, StrictModel, load_config, parse_overrides

__all__ = ["ConfigError", "StrictModel", "load_config", "parse_overrides"]
