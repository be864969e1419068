"""`model.gradient_checkpointing: auto`: the memory planner decides at launch, from this process's share of memory
(a GPU's, or on CPU the host's RAM over its processes); recomputation only where the run does not fit without."""
import pytest
import torch

from pipeline.config.base import ConfigError, load_config
from pipeline.config.train import TrainConfig
from pipeline.train import loop, preflight
from pipeline.train.distributed import DistInfo

DS = "ds_configs/zero3.json"


@pytest.fixture
def cfg(tiny_train_setup):
    return load_config(TrainConfig, tiny_train_setup["config"], ["model.gradient_checkpointing=auto"])


def _decide(cfg):
    return loop.decide_checkpointing(cfg, DS, 5, DistInfo(0, 0, 1, torch.device("cpu")))


def test_auto_is_the_default_and_only_auto_or_a_bool_is_accepted(cfg, tiny_train_setup):
    assert cfg.model.gradient_checkpointing == "auto"
    data = cfg.model.model_dump()
    data.pop("gradient_checkpointing")
    assert type(cfg.model).model_validate(data).gradient_checkpointing == "auto"
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(TrainConfig, tiny_train_setup["config"], ["model.gradient_checkpointing=sometimes"])


def test_auto_turns_recomputation_off_where_the_run_fits(cfg):
    assert preflight.checkpointing_fits_without(cfg, DS, 5)
    assert _decide(cfg).model.gradient_checkpointing is False


def test_auto_turns_recomputation_on_where_memory_needs_it(cfg, monkeypatch):
    # a budget between the planned peaks with and without recomputation (the tiny model's activations)
    def peak(grad_ckpt):
        return preflight.plan_run(cfg, DS, 5, 1, 1, 1000.0, grad_ckpt).total_bytes / 2**30

    low, high = peak(True), peak(False)
    assert low < high
    monkeypatch.setattr(preflight, "memory_budget", lambda: (1, 1, (low + high) / 2))
    assert not preflight.checkpointing_fits_without(cfg, DS, 5)
    assert _decide(cfg).model.gradient_checkpointing is True


def test_an_explicit_setting_is_kept(tiny_train_setup):
    for value in (True, False):
        cfg = load_config(TrainConfig, tiny_train_setup["config"], [f"model.gradient_checkpointing={value}"])
        assert _decide(cfg).model.gradient_checkpointing is value


def test_a_model_the_planner_cannot_read_recomputes(cfg, monkeypatch, capsys):
    def broken(*a, **k):
        raise KeyError("no_such_architecture")

    monkeypatch.setattr(loop, "checkpointing_fits_without", broken)
    assert _decide(cfg).model.gradient_checkpointing is True
    assert "could not plan this model: KeyError" in capsys.readouterr().out
