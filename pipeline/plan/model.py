"""Resolve a model config (HF folder, shipped name or config.json) and take inventory of its parameters.

The architecture is instantiated on the `meta` device, so any HF causal LM config is counted exactly without
allocating memory or downloading weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO_ROOT / "configs" / "models"


def shipped_models() -> list[str]:
    """Names of the config-only models under configs/models/."""
    return sorted(p.parent.name for p in SHIPPED_DIR.glob("*/config.json"))


def resolve_config(model):
    """`model` is a PretrainedConfig, an HF model folder, a config.json path, or a shipped name (`llama-2-70b`)."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    p = Path(str(model))
    if p.is_file() and p.suffix == ".json":
        p = p.parent
    if not (p / "config.json").is_file():
        shipped = SHIPPED_DIR / str(model).lower()
        if (shipped / "config.json").is_file():
            p = shipped
        else:
            raise FileNotFoundError(f"model {model!r}: no config.json there and not a shipped config "
                                    f"(shipped: {', '.join(shipped_models())})")
    return AutoConfig.from_pretrained(str(p), local_files_only=True)


def head_dim(config) -> int:
    """Width of one attention head: the config's own, else hidden size over heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def meta_model(config) -> nn.Module:
    """The real architecture with every tensor on `meta` (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class ParamInfo:
    name: str
    numel: int
    quantized: bool  # True for a Linear weight bitsandbytes would store as NF4


@dataclass(frozen=True)
class ModelInventory:
    """What the planner needs to know about the base model."""

    name: str
    model_type: str
    num_params: int
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: tuple[ParamInfo, ...]
    largest_fetch_unit_numel: int  # what ZeRO-3 gathers at once, in stored elements (16-bit): one decoder layer
    # (a leaf, train/zero3_units.py) or, outside the layers, one module's direct parameters
    largest_linear_numel: int  # largest quantizable Linear weight (the NF4 dequantization scratch)
    linear_names: tuple[str, ...]  # short names of the Linear modules inside the blocks (q_proj, ...)

    @property
    def quantizable_numel(self) -> int:
        return sum(p.numel for p in self.params if p.quantized)

    @property
    def other_numel(self) -> int:
        return sum(p.numel for p in self.params if not p.quantized)


def decoder_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every decoder layer of an HF causal LM: the modules whose class its
    `_no_split_modules` names (the unit transformers keeps whole on one device); empty if it names none. The trainer
    makes each one ZeRO-3 unit (train/zero3_units.py), so the planner counts one gathered whole."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return {n: m for n, m in model.named_modules() if type(m).__name__ in names}


def _output_embedding_names(model) -> set[str]:
    out = set()
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get else None
    for name, mod in model.named_modules():
        if head is not None and mod is head:
            out.add(name)
    return out


def inventory(model, name: str = "", quant: str = "nf4") -> ModelInventory:
    """Classify every parameter: Linear weights (except the output head, which bitsandbytes keeps 16-bit) are the
    quantizable ones; embeddings, norms, biases and lm_head stay 16-bit."""
    cfg = model.config
    skip = _output_embedding_names(model)
    params, seen = [], set()
    largest_module, largest_linear, linear_names = 0, 0, set()
    layers = decoder_layers(model)
    layer_numel = dict.fromkeys(layers, 0)  # decoder layer -> its stored elements
    layer_of = {sub: n for n, layer in layers.items() for sub, _ in layer.named_modules(prefix=n)}
    for mod_name, mod in model.named_modules():
        layer = layer_of.get(mod_name)
        is_q_linear = isinstance(mod, nn.Linear) and mod_name not in skip
        if is_q_linear:
            linear_names.add(mod_name.rsplit(".", 1)[-1])
            largest_linear = max(largest_linear, mod.weight.numel())
        direct = 0
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            q = is_q_linear and pname == "weight" and quant == "nf4"
            params.append(ParamInfo(f"{mod_name}.{pname}", p.numel(), q))
            direct += p.numel() // 4 if q else p.numel()  # NF4 in a 16-bit container: 4 values per element
        if layer is not None:
            layer_numel[layer] += direct
        else:
            largest_module = max(largest_module, direct)
    heads = cfg.num_attention_heads
    hidden = cfg.hidden_size
    return ModelInventory(
        name=name or getattr(cfg, "_name_or_path", "") or cfg.model_type,
        model_type=cfg.model_type,
        num_params=sum(p.numel for p in params),
        num_layers=cfg.num_hidden_layers,
        hidden=hidden,
        intermediate=getattr(cfg, "intermediate_size", None) or 4 * hidden,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim(cfg),
        vocab=cfg.vocab_size,
        params=tuple(params),
        largest_fetch_unit_numel=max(largest_module, *layer_numel.values()),
        largest_linear_numel=largest_linear,
        linear_names=tuple(sorted(linear_names)),
    )
