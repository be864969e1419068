"""`model.frozen_base`: under ZeRO-3 the frozen base is either whole on every rank (only what trains sharded,
pipeline/train/zero3_frozen.py) or sharded with the rest; `auto` asks the memory planner. The 2-rank runs of both
settings are checked against ZeRO-2 in tests/test_train.py."""
import pytest
import torch

from pipeline.config.base import load_config
from pipeline.config.more import MoreConfig
from pipeline.config.train import TrainConfig
from pipeline.plan import plan
from pipeline.train import checkpoint, loop, preflight
from pipeline.train.distributed import DistInfo
from pipeline.train.zero3_frozen import replicate_frozen_parameters

DS = "ds_configs/zero3.json"


def _more_model(base_dir):
    from pipeline.models.loading import load_base_model
    from pipeline.more import inject

    base = load_base_model(str(base_dir), "nf4", "fp32", "sdpa")
    return inject(base, MoreConfig(max_rank=4, target_modules="all-linear"), ["a", "b"])


def test_frozen_parameters_become_unsaved_buffers_and_compute_the_same(tiny_train_setup):
    model = _more_model(tiny_train_setup["base"]).eval()
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    keys = set(model.state_dict())
    assert frozen and trainable
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids, task_ids=torch.ones_like(ids)).logits

    assert replicate_frozen_parameters(model) == len(frozen)
    assert dict(model.named_parameters()) == trainable  # the same Parameter objects, nothing else
    assert set(model.state_dict()) == keys - set(frozen)  # checkpoints stay adapter-sized
    buffers = dict(model.named_buffers())
    for name, p in frozen.items():
        assert buffers[name] is p  # same tensor (an NF4 weight keeps its quant_state)
    with torch.no_grad():
        after = model(input_ids=ids, task_ids=torch.ones_like(ids)).logits
    assert torch.equal(before, after)


def test_planner_holds_the_whole_frozen_base_on_every_gpu_when_replicated(tiny_train_setup):
    kwargs = dict(nodes=1, gpus_per_node=8, seq_len=512, max_rank=4, num_tasks=2)
    sharded = plan(str(tiny_train_setup["base"]), ds_config=DS, **kwargs)
    replicated = plan(str(tiny_train_setup["base"]), ds_config=DS, replicate_frozen=True, **kwargs)
    for key in ("base_packed", "base_16bit"):
        assert replicated.line(key) > 0
        assert replicated.line(key) == pytest.approx(8 * sharded.line(key), abs=8)
    assert replicated.line("gathered") < sharded.line("gathered")  # only trainable tensors are gathered
    assert "replicated" in next(l.label for l in replicated.lines if l.key == "base_packed")


@pytest.fixture
def cfg(tiny_train_setup):
    return load_config(TrainConfig, tiny_train_setup["config"], [])


def _decide(cfg):
    return loop.decide_frozen_base(cfg, DS, 5, DistInfo(0, 0, 1, torch.device("cpu")))


def test_auto_replicates_where_the_base_fits_and_shards_where_it_does_not(cfg, monkeypatch, capsys):
    assert cfg.model.frozen_base == "auto"
    assert _decide(cfg).model.frozen_base == "replicated"
    assert "frozen_base auto: replicated" in capsys.readouterr().out

    # a process whose memory holds less than the replicated plan (on this tiny model the plans of both settings
    # are within a few kB: a sharded base is gathered whole anyway)
    need = preflight.plan_run(cfg, DS, 5, 1, 8, 1000.0, True, True).total_bytes / 2**30
    monkeypatch.setattr(preflight, "memory_budget", lambda: (1, 8, need * 0.9))
    assert _decide(cfg).model.frozen_base == "sharded"


def test_an_explicit_setting_is_kept_and_a_resume_must_not_change_it(tiny_train_setup):
    for value in ("replicated", "sharded"):
        cfg = load_config(TrainConfig, tiny_train_setup["config"], [f"model.frozen_base={value}"])
        assert _decide(cfg).model.frozen_base == value
    refused, _ = checkpoint.compare({"model": {"frozen_base": "replicated"}}, {"model": {"frozen_base": "sharded"}})
    assert refused == ['model.frozen_base: "replicated" -> "sharded"']
