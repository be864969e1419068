"""Export one task of a MoRE adapter as a standard PEFT LoRA adapter folder (multi-LoRA servers, lm-eval `peft=`).

Per layer the task's rank r goes to `rank_pattern`; PEFT scales by lora_alpha / r, so `alpha_pattern` holds
scale * r (scale = alpha / max_rank, fixed in MoRE whatever rank is chosen). The reference's per-component (j/R)^2
factors are folded into B. Keys follow PEFT's saved format: `base_model.model.<module>.lora_{A,B}.weight`.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, Optional

import torch

from pipeline.export.merge import DTYPES, AdapterDeltas


def export_peft(adapter_dir, task: str, out_dir, dtype: str = "fp32",
                base_model_name_or_path: Optional[str] = None) -> Path:
    """Write `task`'s PEFT adapter into `out_dir` (a fresh temp folder: export/run.py checks it, then renames it)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    d = AdapterDeltas(adapter_dir)
    dt = DTYPES[dtype]
    tensors: Dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for name in d.targets:
        B, A = d.factors(task, name)  # B already carries scale * colscale
        r = A.shape[0]
        ranks[name] = r
        alphas[name] = d.scale * r
        # PEFT multiplies by alpha/r = scale: undo the scale folded into B
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dt).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = (B / d.scale).to(dt).contiguous()
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    cfg = LoraConfig(
        r=r_default, lora_alpha=d.scale * r_default, target_modules=sorted(d.targets), lora_dropout=0.0,
        bias="none", task_type="CAUSAL_LM", rank_pattern=ranks, alpha_pattern=alphas,
        base_model_name_or_path=base_model_name_or_path or d.meta["base_model"].get("id"), inference_mode=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out

