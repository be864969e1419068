"""Merged per-task checkpoints reproduce the adapter model: fp32 base exactly (atol 1e-5), NF4 base within a stated
tolerance, and load with plain transformers."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from more_fixtures import TASKS, save_tiny_llama, tiny_llama
from pipeline.config.more import MoreConfig
from pipeline.export import merge_task, merge_task_into
from pipeline.models.loading import load_base_model
from pipeline.more import rank_map
from pipeline.more.io import save_adapter
from test_more_io import trained_like


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", seed=0)


def _ids():
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _logits(model, ids, task=None):
    with torch.no_grad():
        if task is None:
            return model(input_ids=ids).logits.float()
        return model(input_ids=ids, task_ids=task).logits.float()


@pytest.mark.parametrize("rank_scaling", ["none", "linear"])
def test_merged_fp32_equals_adapter_model(tmp_path, base_dir, rank_scaling):
    m = trained_like(cfg=MoreConfig(gate_init="random", rank_scaling=rank_scaling),
                     base=load_base_model(str(base_dir), "none", "fp32"))
    rm = rank_map(m)
    assert len({tuple(rm[t].values()) for t in TASKS}) > 1  # the tasks really differ
    ad = save_adapter(m, tmp_path / "ad")
    ids = _ids()
    for t, task in enumerate(TASKS):
        out = merge_task(str(base_dir), ad, task, tmp_path / task, dtype="fp32")
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert not any("Linear4bit" in type(x).__name__ for x in merged.modules())
        torch.testing.assert_close(_logits(merged, ids), _logits(m, ids, t), atol=1e-5, rtol=0)
    # and differs from the base: the merge really added something
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    assert (_logits(base, ids) - _logits(m, ids, 0)).abs().max() > 1e-3


def test_merged_nf4_fp32_compute_equals_adapter_model(tmp_path, base_dir):
    """NF4 with fp32 compute: the merge into dequant(NF4(W)) reproduces the adapter model to fp32 precision."""
    m = trained_like(base=load_base_model(str(base_dir), "nf4", "fp32"))
    assert m.quantized_base
    ad = save_adapter(m, tmp_path / "ad")
    ids = _ids()
    out = merge_task(str(base_dir), ad, TASKS[1], tmp_path / "m", dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, ids), _logits(m, ids, 1), atol=1e-4, rtol=0)


def test_merged_nf4_bf16_within_tolerance(tmp_path, base_dir):
    """NF4 storage + bf16 compute (the QLoRA setting), merged to bf16: stated tolerance = 2% of the logit range
    (bf16 rounding of activations and of the merged weights), and far closer than merging into the original W."""
    m = trained_like(base=load_base_model(str(base_dir), "nf4", "bf16"))
    ad = save_adapter(m, tmp_path / "ad")
    ids = _ids()
    ref = _logits(m, ids, 2)
    merged = AutoModelForCausalLM.from_pretrained(merge_task(str(base_dir), ad, TASKS[2], tmp_path / "m",
                                                             dtype="bf16"), dtype=torch.bfloat16).eval()
    err = (_logits(merged, ids) - ref).abs().max().item()
    assert err <= 0.02 * ref.abs().max().item(), err
    orig = AutoModelForCausalLM.from_pretrained(merge_task(str(base_dir), ad, TASKS[2], tmp_path / "o",
                                                           dtype="fp32", target="original"), dtype=torch.float32)
    err_orig = (_logits(orig.eval(), ids) - ref).abs().max().item()
    assert err < err_orig


def test_merge_into_loaded_base_streams_module_by_module(tmp_path, base_dir):
    from pipeline.export.merge import AdapterDeltas, iter_merged_tensors
    m = trained_like(base=load_base_model(str(base_dir), "none", "fp32"))
    ad = save_adapter(m, tmp_path / "ad")
    fresh = load_base_model(str(base_dir), "none", "fp32")
    names = [n for n, _ in iter_merged_tensors(fresh, AdapterDeltas(ad), TASKS[0], torch.float32)]
    assert names == list(fresh.state_dict().keys())
    out = merge_task_into(fresh, ad, TASKS[0], tmp_path / "x", dtype="bf16")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
