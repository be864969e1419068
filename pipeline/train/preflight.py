"""The memory planner at launch: refuse a GPU run that will not fit, before any model is built or process group
started, and decide `gradient_checkpointing: auto` (recompute only where memory needs it) and `frozen_base: auto`
(the frozen base whole on every rank where it fits)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.config.base import ConfigError
from pipeline.config.train import TrainConfig

# The planner's attention models: per-sample packed attention holds no L x L mask or scores, like a varlen kernel.
PLANNER_ATTENTION = {"packed_sdpa": "flash", "sdpa": "sdpa", "eager": "eager"}


def attends_in_fp32(cfg: TrainConfig) -> bool:
    """Whether the run's attention keeps fp32 copies of q, k, v: packed_sdpa on CPU through sdpa."""
    if cfg.model.attn_implementation != "packed_sdpa" or torch.cuda.is_available():
        return False
    from pipeline.models.loading import DTYPES
    from pipeline.models.packed_attention import cpu_attends_in_fp32
    from pipeline.plan.model import head_dim, resolve_config

    return cpu_attends_in_fp32(head_dim(resolve_config(cfg.model.path)), DTYPES[cfg.model.dtype],
                               cfg.model.cpu_attention)


def plan_run(cfg: TrainConfig, ds_config: str, num_tasks: int, nodes: int, gpus_per_node: int, gpu_mem_gb: float,
             grad_ckpt: bool, replicate_frozen: bool | None = None):
    """The planner's memory plan of this training config on the given machines."""
    from pipeline.plan import plan

    seq_len = json.loads((Path(cfg.data.dir) / "manifest.json").read_text())["max_seq_len"]
    targets = cfg.more.target_modules
    return plan(cfg.model.path, ds_config=ds_config, nodes=nodes, gpus_per_node=gpus_per_node,
                gpu_mem_gb=gpu_mem_gb, quant=cfg.model.quantization, seq_len=seq_len,
                micro_batch=cfg.optim.micro_batch_size, grad_ckpt=grad_ckpt,
                max_rank=cfg.more.max_rank, targets=targets if isinstance(targets, str) else ",".join(targets),
                num_tasks=num_tasks, task_embedding=cfg.more.task_embedding,
                task_embedding_dim=cfg.more.task_embedding_dim, num_experts=len(cfg.more.ranks),
                adapter_dropout=cfg.more.dropout,
                attention_fp32=attends_in_fp32(cfg),
                attn_impl=PLANNER_ATTENTION[cfg.model.attn_implementation], dtype=cfg.model.dtype,
                replicate_frozen=(cfg.model.frozen_base == "replicated") if replicate_frozen is None
                else replicate_frozen)


def check_fits(cfg: TrainConfig, ds_config: str, num_tasks: int, nodes: int, gpus_per_node: int, gpu_mem_gb: float):
    """Plan the run's per-GPU memory; raise ConfigError with the planner's table when it does not fit (`auto`
    checkpointing: not even with recomputation)."""
    from pipeline.plan import format_plan

    result = plan_run(cfg, ds_config, num_tasks, nodes, gpus_per_node, gpu_mem_gb,
                      cfg.model.gradient_checkpointing in (True, "auto"))
    if not result.runs:
        raise ConfigError("the memory planner says this run will not fit (set preflight: false to try anyway):\n"
                          + format_plan(result))
    return result


def memory_budget() -> tuple[int, int, float]:
    """(nodes, processes per node, GiB per process): a GPU's memory, or on CPU the host's RAM over its processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(min(world, torch.cuda.device_count()))))
        gb = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory / 2**30
    else:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / max(per_node, 1)
    return max(1, world // max(per_node, 1)), per_node, gb


def preflight(cfg: TrainConfig, ds_config: str, num_tasks: int):
    """On CUDA, check this launch's GPUs; on CPU there is no device budget to check (returns None)."""
    if not (cfg.preflight and torch.cuda.is_available()):
        return None
    return check_fits(cfg, ds_config, num_tasks, *memory_budget())


def checkpointing_fits_without(cfg: TrainConfig, ds_config: str, num_tasks: int) -> bool:
    """For `gradient_checkpointing: auto`: does the planner fit this process's share of memory without
    recomputation? (Every rank must then agree: the caller takes any rank's "no", see train.loop.)"""
    result = plan_run(cfg, ds_config, num_tasks, *memory_budget(), grad_ckpt=False)
    return result.runs


def replicated_base_fits(cfg: TrainConfig, ds_config: str, num_tasks: int) -> bool:
    """For `frozen_base: auto`: does the planner fit this process's share of memory with the frozen base whole on
    every rank (and the run's checkpointing setting, decided before)?"""
    result = plan_run(cfg, ds_config, num_tasks, *memory_budget(), grad_ckpt=cfg.model.gradient_checkpointing is True,
                      replicate_frozen=True)
    return result.runs
