"""The base checkpoint's weights fingerprint: the same weights give the same fingerprint however they are sharded or
stored (a 16-bit copy matches when training ran in that dtype), any changed leading value of any tensor changes it,
and a folder without safetensors has none."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from more_fixtures import save_tiny_llama
from pipeline.models.base_weights import checkpoint_files, local_model_dir, weights_fingerprint


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("fp") / "base", seed=0)


def _resave(src, dst, edit=None, dtype=None, shards=1):
    """Copy src's tensors into dst (config too), optionally edited, cast or split into `shards` files + index."""
    tensors = load_file(str(src / "model.safetensors"))
    if edit:
        edit(tensors)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    dst.mkdir(parents=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k] for k in part}, str(dst / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def test_same_weights_same_fingerprint_however_stored(base, tmp_path):
    want = weights_fingerprint(base, "fp32")
    assert len(want) == 64
    sharded = _resave(base, tmp_path / "sharded", shards=3)
    assert len(set(checkpoint_files(sharded).values())) == 3
    assert weights_fingerprint(sharded, "fp32") == want
    # bf16 training saw bf16(W): a bf16 copy of the fp32 checkpoint holds exactly that; an fp32-trained adapter did not
    half = _resave(base, tmp_path / "bf16", dtype=torch.bfloat16)
    assert weights_fingerprint(half, "bf16") == weights_fingerprint(base, "bf16")
    assert weights_fingerprint(half, "fp32") != want


@pytest.mark.parametrize("where", ["matrix_first_row", "matrix_second_row", "norm_vector", "embedding"])
def test_one_changed_leading_value_changes_it(base, tmp_path, where):
    names = load_file(str(base / "model.safetensors"))
    target = {"matrix_first_row": ("model.layers.1.mlp.down_proj.weight", (0, 3)),
              "matrix_second_row": ("model.layers.0.self_attn.q_proj.weight", (1, 0)),  # within the first 4096 values
              "norm_vector": ("model.layers.1.input_layernorm.weight", (5,)),
              "embedding": ("model.embed_tokens.weight", (0, 0))}[where]
    assert target[0] in names

    def edit(tensors):
        tensors[target[0]][target[1]] += 0.5

    other = _resave(base, tmp_path / "other", edit=edit)
    assert weights_fingerprint(other, "fp32") != weights_fingerprint(base, "fp32")


def test_other_seed_and_missing_checkpoint(base, tmp_path):
    assert weights_fingerprint(save_tiny_llama(tmp_path / "seed1", seed=1), "fp32") != weights_fingerprint(base, "fp32")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert weights_fingerprint(empty, "fp32") is None
    for shards in (1, 2):  # a truncated file: single, or one shard of an index
        cut = _resave(base, tmp_path / f"cut{shards}", shards=shards)
        victim = sorted(cut.glob("*.safetensors"))[-1]
        victim.write_bytes(victim.read_bytes()[:1000])
        with pytest.raises(ValueError, match=str(cut)):
            weights_fingerprint(cut, "fp32")
    assert local_model_dir(str(base)) == base
    assert local_model_dir(None) is None and local_model_dir("org/not-in-any-cache") is None


def test_save_records_the_fingerprint_or_warns_without_it(tmp_path, capsys):
    from more_fixtures import TASKS
    from pipeline.config.more import MoreConfig
    from pipeline.models.loading import load_base_model
    from pipeline.more import inject, save_adapter

    base = save_tiny_llama(tmp_path / "base", seed=0)
    model = inject(load_base_model(str(base), "none", "fp32"), MoreConfig(), TASKS)
    recorded = lambda d: json.loads((d / "more_config.json").read_text())["base_model"]["weights_sha256"]  # noqa: E731
    assert recorded(save_adapter(model, tmp_path / "a")) == weights_fingerprint(base, "fp32")
    model = inject(load_base_model(str(base), "none", "fp32"), MoreConfig(), TASKS)
    (base / "model.safetensors").write_bytes(b"")  # the base's files became unreadable after loading
    capsys.readouterr()
    assert recorded(save_adapter(model, tmp_path / "b")) is None
    assert "no base weights fingerprint recorded" in capsys.readouterr().err
