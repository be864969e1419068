"""Refuse a GPU run the memory planner says will not fit, before any model is built or process group started."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.config.base import ConfigError
from pipeline.config.train import TrainConfig

# The planner's attention models: per-sample packed attention holds no L x L mask or scores, like a varlen kernel.
PLANNER_ATTENTION = {"packed_sdpa": "flash", "sdpa": "sdpa", "eager": "eager"}


def check_fits(cfg: TrainConfig, ds_config: str, num_tasks: int, nodes: int, gpus_per_node: int, gpu_mem_gb: float):
    """Plan the run's per-GPU memory; raise ConfigError with the planner's table when it does not fit."""
    from pipeline.plan import format_plan, plan

    seq_len = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())["max_seq_len"]
    targets = cfg.more.target_modules
    result = plan(cfg.model.path, ds_config=ds_config, nodes=nodes, gpus_per_node=gpus_per_node,
                  gpu_mem_gb=gpu_mem_gb, quant=cfg.model.quantization, seq_len=seq_len,
                  micro_batch=cfg.optim.micro_batch_size, grad_ckpt=cfg.model.gradient_checkpointing,
                  max_rank=cfg.more.max_rank, targets=targets if isinstance(targets, str) else ",".join(targets),
                  num_tasks=num_tasks, task_embedding=cfg.more.task_embedding,
                  task_embedding_dim=cfg.more.task_embedding_dim,
                  attn_impl=PLANNER_ATTENTION[cfg.model.attn_implementation], dtype=cfg.model.dtype)
    if not (result.fits and result.load_fits):
        raise ConfigError("the memory planner says this run will not fit (set preflight: false to try anyway):\n"
                          + format_plan(result))
    return result


def preflight(cfg: TrainConfig, ds_config: str, num_tasks: int):
    """On CUDA, check this launch's GPUs; on CPU there is no device budget to check (returns None)."""
    if not (cfg.preflight and torch.cuda.is_available()):
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(min(world, torch.cuda.device_count()))))
    gpu_gb = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory / 2**30
    return check_fits(cfg, ds_config, num_tasks, max(1, world // per_node), per_node, gpu_gb)
