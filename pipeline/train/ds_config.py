"""Fill a DeepSpeed JSON's "auto" values from the training config, so one JSON serves every model size."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config.base import ConfigError
from pipeline.config.train import TrainConfig


def _auto_values(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    o = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": o.micro_batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "train_batch_size": o.micro_batch_size * o.grad_accum * world_size,
        "gradient_clipping": o.clip_grad_norm,
        "bf16.enabled": cfg.model.dtype == "bf16",
        "fp16.enabled": cfg.model.dtype == "fp16",
        "optimizer.params.lr": o.lr,
        "optimizer.params.betas": list(o.betas),
        "optimizer.params.eps": o.eps,
        "optimizer.params.weight_decay": o.weight_decay,
    }


def fill_ds_config(path: str | Path, cfg: TrainConfig, world_size: int) -> dict:
    p = Path(path)
    try:
        ds = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"DeepSpeed config not found: {p}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    wanted = _auto_values(cfg, world_size)

    def walk(node: dict, prefix: str) -> None:
        for key, val in list(node.items()):
            dotted = f"{prefix}{key}"
            if isinstance(val, dict):
                walk(val, dotted + ".")
            elif val == "auto":
                if dotted not in wanted:
                    raise ConfigError(f"{p}: no training-config value fills \"auto\" at {dotted!r}")
                node[key] = wanted[dotted]
            elif dotted in wanted and val != wanted[dotted]:
                raise ConfigError(f"{p}: {dotted} = {val!r} disagrees with the training config ({wanted[dotted]!r}); "
                                  "set it to \"auto\" or change the training config")

    walk(ds, "")
    # both sections, also where the JSON lacks one: without DeepSpeed's fp16 mode an fp16 run would train with no
    # loss scaling (gradients that underflow in fp16 lost) and no fp32 master weights
    for mode in ("bf16", "fp16"):
        ds.setdefault(mode, {})["enabled"] = cfg.model.dtype == mode
    if cfg.model.dtype == "fp16":
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise ConfigError(f"model.dtype: fp16 trains in DeepSpeed's fp16 mode (dynamic loss scaling), which this "
                              f"device does not support ({get_accelerator().device_name()}): use bf16 or fp32")
    return ds
