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


def test_selector_warmup_defaults_to_a_fifth_of_the_run():
    """A fixed warm-up outlasted short runs (the selector never chose); unset, it scales with optim.max_steps."""
    from pipeline.config.more import MoreConfig
    from pipeline.more.model import MoreCausalLM

    base = {"output_dir": "x", "model": {"path": "m"}, "data": {"dir": "d"}}
    assert TrainConfig(**base, optim={"max_steps": 150}).more_for_run().selector_warmup_steps == 30
    assert TrainConfig(**base, optim={"max_steps": 20000}).more_for_run().selector_warmup_steps == 4000
    assert TrainConfig(**base, optim={"max_steps": 150},
                       more={"selector_warmup_steps": 7}).more_for_run().selector_warmup_steps == 7
    # the config itself keeps "unset": a resume with another max_steps is not a changed more.* setting
    assert TrainConfig(**base, optim={"max_steps": 150}).more.selector_warmup_steps is None
    # The adapter alone (no trainer to say how long the run is) has no warm-up.
    assert MoreConfig().selector_warmup_steps is None
    assert not MoreCausalLM.selector_warming_up(type("M", (), {"_training_step": 0, "_train_forwards": 0,
                                                                "config": MoreConfig()})())
