"""Per-task PEFT LoRA export: peft.PeftModel.from_pretrained loads it and gives the adapter model's logits."""
import json

import pytest
import torch

from more_fixtures import TASKS, save_tiny_llama
from pipeline.config.more import MoreConfig
from pipeline.export import export_peft
from pipeline.models.loading import load_base_model
from pipeline.more import rank_map
from pipeline.more.io import save_adapter
from test_more_io import trained_like


@pytest.mark.parametrize("rank_scaling", ["none", "linear"])
def test_peft_export_gives_same_logits(tmp_path, rank_scaling):
    from peft import PeftModel

    base_dir = save_tiny_llama(tmp_path / "base")
    m = trained_like(cfg=MoreConfig(gate_init="random", rank_scaling=rank_scaling),
                     base=load_base_model(str(base_dir), "none", "fp32"))
    ad = save_adapter(m, tmp_path / "ad")
    rm = rank_map(m)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    for t, task in enumerate(TASKS):
        out = export_peft(ad, task, tmp_path / "peft" / task, base_model_name_or_path=str(base_dir))
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"] == rm[task]
        pm = PeftModel.from_pretrained(load_base_model(str(base_dir), "none", "fp32"), str(out)).eval()
        for name, r in rm[task].items():
            assert pm.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == r
        with torch.no_grad():
            theirs = pm(input_ids=ids).logits
            ours = m(input_ids=ids, task_ids=t).logits
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
