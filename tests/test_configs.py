"""Every shipped stage config validates against its schema (a typo in a YAML a user runs is caught here)."""
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.config.base_model import BaseModelConfig
from pipeline.config.prep import PrepConfig
from pipeline.config.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {"prep": PrepConfig, "train": TrainConfig, "base": BaseModelConfig}
FILES = sorted((kind, p) for kind in SCHEMAS for p in (ROOT / "configs" / kind).glob("*.yaml"))


@pytest.mark.parametrize("kind,path", FILES, ids=[f"{k}/{p.name}" for k, p in FILES])
def test_shipped_config_validates(kind, path):
    load_config(SCHEMAS[kind], path)


def test_every_stage_has_configs():
    assert {k for k, _ in FILES} == set(SCHEMAS) and len(FILES) >= 7
