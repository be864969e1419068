"""Keep the frozen base whole on every rank under ZeRO-3 (`model.frozen_base: replicated`), sharding only what trains.

DeepSpeed partitions every parameter of the engine's module and gathers each one again in every step: at the end of
a step it releases the whole model, and even "persistent" parameters are partitioned before each optimizer step and
all-gathered after it, one collective per tensor. For a frozen NF4 base that is the same bytes sent every step: on
2 CPU ranks over gloo, SmolLM2-135M's 115 MB (its bf16 embedding is half of it) took ~0.25 s of each ~3-4 s step,
waiting on the gather (2-core AMX Xeon, 2026-12-06). Made non-persistent buffers before `deepspeed.initialize`, the
frozen tensors are not DeepSpeed's at all: each rank keeps the copy it loaded, its layers multiply by it without
hooks or gathers, and checkpoints stay adapter-sized (non-persistent buffers are not in the state dict). The LoRA
pairs, gates, task embeddings and the optimizer state stay ZeRO-3 partitioned. The price is the whole frozen base on
every rank (NF4: half a byte per weight, plus the 16-bit embedding): the memory planner decides (`auto`, the
default: replicated where it fits, pipeline/train/loop.py).
"""
from __future__ import annotations

from torch import nn


def replicate_frozen_parameters(model: nn.Module) -> int:
    """Turn every frozen parameter of `model` into a non-persistent buffer of the same module, under the same name
    (tied weights stay one tensor); returns how many tensors."""
    moved = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or p.requires_grad:
                continue
            del module._parameters[name]
            module.register_buffer(name, p, persistent=False)
            moved[id(p)] = p
    return len(moved)
