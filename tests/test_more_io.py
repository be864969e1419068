"""Save -> load round trip (exact), the post-save checks, base identity checks, rank_map.json."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from more_fixtures import TASKS, mixed_batch, tiny_llama
from pipeline.config.more import MoreConfig
from pipeline.more import inject, rank_map
from pipeline.more.io import check_saved, load_adapter, save_adapter


def trained_like(seed=0, cfg=None, base=None):
    """An injected tiny Llama whose B matrices and selection look trained (tasks at different ranks)."""
    m = inject(base if base is not None else tiny_llama(seed), cfg or MoreConfig(gate_init="random"), TASKS)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for layer in m.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g).to(layer.lora_B.dtype) * 0.05)
    return m.eval()


@pytest.mark.parametrize("layout", ["shared", "per_layer"])
def test_round_trip_is_exact(tmp_path, layout):
    m = trained_like(cfg=MoreConfig(gate_init="random", task_embedding=layout, rank_scaling="linear"))
    b = mixed_batch()
    with torch.no_grad():
        want = m(**b).logits
    save_adapter(m, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {"adapter_model.safetensors", "more_config.json",
                                                           "rank_map.json"}
    meta = json.loads((tmp_path / "ad" / "more_config.json").read_text())
    assert meta["task_names"] == TASKS and meta["expert_ranks"] == list(range(1, 9))
    assert meta["targets"] == list(m.layers) and meta["base_model"]["model_type"] == "llama"
    assert json.loads((tmp_path / "ad" / "rank_map.json").read_text()) == rank_map(m)
    loaded = load_adapter(tiny_llama(0), tmp_path / "ad").eval()
    with torch.no_grad():
        got = loaded(**b).logits
    assert torch.equal(got, want)
    frozen = load_adapter(tiny_llama(0), tmp_path / "ad", freeze_selection=True).eval()
    with torch.no_grad():
        assert torch.equal(frozen(**b).logits, want)
    assert rank_map(frozen) == rank_map(m)


def test_post_save_check_catches_empty_and_zero_tensors(tmp_path):
    m = trained_like()
    d = save_adapter(m, tmp_path / "ad")
    tensors = load_file(str(d / "adapter_model.safetensors"))
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    check_saved(d, shapes)  # the real save passes
    key = next(k for k in tensors if k.endswith("lora_A"))
    for bad in [torch.zeros(0), torch.zeros_like(tensors[key])]:  # ungathered ZeRO-3 partition / zeros
        broken = dict(tensors)
        broken[key] = bad
        save_file(broken, str(d / "adapter_model.safetensors"))
        with pytest.raises(RuntimeError):
            check_saved(d, shapes)
    del tensors[key]
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="tensors saved"):
        check_saved(d, shapes)


def test_load_refuses_other_base(tmp_path):
    d = save_adapter(trained_like(), tmp_path / "ad")
    with pytest.raises(ValueError, match="different base"):
        load_adapter(tiny_llama(0, hidden_size=32, num_heads=4, num_kv_heads=2), d)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_save_is_atomic_a_failed_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    """The folder is written under a temporary name and renamed only after the post-save check: a save that fails
    (here the check, as for an ungathered ZeRO-3 partition) leaves the previous adapter byte for byte, no temp
    folder; a successful save replaces every file."""
    import pipeline.more.io as io

    d = save_adapter(trained_like(seed=0), tmp_path / "ad")
    before = _snapshot(d)

    def broken_check(folder, shapes):
        raise RuntimeError("simulated: all zeros")

    monkeypatch.setattr(io, "check_saved", broken_check)
    with pytest.raises(RuntimeError, match="simulated"):
        save_adapter(trained_like(seed=1), d)
    assert _snapshot(d) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temp or old folder left
    monkeypatch.undo()
    m1 = trained_like(seed=1, cfg=MoreConfig(gate_init="random"))
    save_adapter(m1, d)
    after = _snapshot(d)
    assert set(after) == set(before) and all(after[k] != before[k] for k in ("adapter_model.safetensors",))
    assert json.loads(after["rank_map.json"]) == rank_map(m1)
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]


def test_save_refuses_to_replace_a_folder_that_is_not_an_adapter(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an adapter folder"):
        save_adapter(trained_like(), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
