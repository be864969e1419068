"""Schema of a memory-plan request (`launch/plan.py --config FILE`); fields mirror `pipeline.plan.PlanInputs`."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .base import StrictModel


class PlanConfig(StrictModel):
    # HF model folder, config.json, or a shipped name under configs/models/ (required: here or `--model`)
    model: Optional[str] = None
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    gpu_mem_gb: float = Field(80.0, gt=0)
    quant: Literal["nf4", "none"] = "nf4"
    seq_len: int = Field(4096, ge=1)
    micro_batch: int = Field(1, ge=1)
    offload: Optional[bool] = None  # ZeRO-3 CPU offload of optimizer and parameters; None: as ds_config says
    # the frozen base whole on every GPU, only what trains sharded: what training's `model.frozen_base: replicated`
    # does, and what its `auto` picks where this plan fits
    replicate_frozen: bool = False
    grad_ckpt: bool = True
    max_rank: int = Field(8, ge=1)
    targets: str = "all-linear"
    num_tasks: int = Field(8, ge=1)
    task_embedding: Literal["shared", "per_layer"] = "shared"
    task_embedding_dim: Optional[int] = Field(16, ge=1)
    num_experts: Optional[int] = Field(None, ge=1)
    attn_impl: Literal["flash", "sdpa", "eager"] = "flash"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    adapter_dropout: float = Field(0.0, ge=0, lt=1)
    double_quant: bool = False
    overhead_gb: float = Field(1.5, ge=0)
    host_mem_gb: Optional[float] = Field(None, gt=0)
    ds_config: Optional[str] = Field(None, description="DeepSpeed JSON whose zero_optimization section is used")
