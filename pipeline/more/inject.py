"""Put MoRE layers into a causal LM: target matching, base freezing, ZeRO-3 registration, parameter report."""
from __future__ import annotations

import zlib
from typing import Dict, List, Sequence

import torch
from torch import nn

from pipeline.config.more import MoreConfig
from pipeline.more.layer import MoreContext, MoreLinear, is_linear4bit
from pipeline.more.selector import MoreSelector


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or is_linear4bit(m)


def find_targets(model: nn.Module, target_modules) -> List[str]:
    """Names of the linears to adapt. A list entry matches a module whose dotted name equals it or ends with
    `.entry` (`q_proj`, `self_attn.q_proj`, `model.layers.0.mlp.up_proj`); `all-linear` = every Linear /
    Linear4bit except the output head. Unmatched list entries are errors."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    if target_modules == "all-linear":
        for name, m in model.named_modules():
            if _is_linear(m) and m is not head and not name.endswith("lm_head"):
                names.append(name)
    else:
        used = set()
        for name, m in model.named_modules():
            for t in target_modules:
                if name == t or name.endswith("." + t):
                    if not _is_linear(m):
                        raise ValueError(f"target {t!r} matched {name!r}, a {type(m).__name__}, not a linear layer")
                    names.append(name)
                    used.add(t)
                    break
        missing = [t for t in target_modules if t not in used]
        if missing:
            raise ValueError(f"target_modules {missing} match no module of {type(model).__name__}")
    if not names:
        raise ValueError("no module to adapt")
    return names


def _layer_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _register_external(layer: nn.Module, param: nn.Parameter) -> None:
    """Tell ZeRO-3 that `layer`'s forward reads `param` (owned elsewhere); harmless without ZeRO-3."""
    try:
        import deepspeed
    except ImportError:  # deepspeed absent: nothing to coordinate
        return
    deepspeed.zero.register_external_parameter(layer, param)


def inject_layers(model: nn.Module, config: MoreConfig, num_tasks: int, context: MoreContext) -> Dict[str, MoreLinear]:
    """Replace the target linears of `model` in place; returns {name: MoreLinear}. Freezes everything else."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in find_targets(model, config.target_modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        g = torch.Generator().manual_seed(_layer_seed(config.init_seed, name))
        layer = MoreLinear(base, config, num_tasks, context, generator=g)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def _base_numel(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if is_linear4bit(m) and p is m.weight:
                n += m.in_features * m.out_features  # logical weights, not the packed 4-bit storage
            else:
                n += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return n


def parameter_report(more_model) -> Dict[str, int | float]:
    def count(params):
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)

    adapter = count(more_model.adapter_parameters())
    gates = count([p for l in more_model.layers.values() for p in l.gate.parameters()])
    emb = count([l.task_embedding for l in more_model.layers.values() if l.task_embedding is not None])
    head = 0
    inside = adapter + gates + emb  # what inject added inside the base model
    if more_model.selector.shared:
        emb += count([more_model.selector.task_embedding])
        head = count(more_model.selector.proj.parameters())
    base = _base_numel(more_model.base_model) - inside
    trainable = adapter + gates + emb + head
    return dict(adapted_layers=len(more_model.layers), adapter=adapter, gates=gates, task_embeddings=emb,
                contrastive_head=head, trainable=trainable, base=base,
                trainable_fraction=trainable / max(base, 1))


def inject(model: nn.Module, more_config: MoreConfig, task_names: Sequence[str], base_model_id: str | None = None):
    """Wrap an HF causal LM in place with MoRE layers; returns a `MoreCausalLM` (see model.py)."""
    from pipeline.more.model import MoreCausalLM

    return MoreCausalLM(model, more_config, list(task_names), base_model_id=base_model_id)
