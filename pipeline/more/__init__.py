"""MoRE adapters (Mixture of Low-Rank Experts): nested-rank LoRA experts, a learned per-task rank selector,
mixed-task batches in one matmul pair, contrastive task embeddings, zero-shot routing, save/load, rank maps."""
from pipeline.config.more import ContrastiveConfig, MoreConfig
from pipeline.more.inject import find_targets, inject
from pipeline.more.layer import MoreLinear
from pipeline.more.model import MoreCausalLM, MoreOutput, pool_samples, rank_map

__all__ = ["ContrastiveConfig", "MoreConfig", "MoreCausalLM", "MoreLinear", "MoreOutput", "find_targets", "inject",
           "pool_samples", "rank_map", "save_adapter", "load_adapter", "route", "routing_accuracy"]


def __getattr__(name):  # io / routing import lazily (safetensors, json)
    if name in ("save_adapter", "load_adapter"):
        from pipeline.more import io
        return getattr(io, name)
    if name in ("route", "routing_accuracy"):
        from pipeline.more import routing
        return getattr(routing, name)
    raise AttributeError(name)
