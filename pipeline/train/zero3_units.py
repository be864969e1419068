"""ZeRO-3 fetch granularity: each decoder layer (its NF4 linears, LoRA pairs, gates and norms) is one unit.

DeepSpeed installs gather/release hooks and autograd nodes on every module that holds parameters, and gathers each
module's parameters with its own collective. A decoder layer holds ~20 such modules (7 MoRE linears with their base
layers and gates, 2 norms); as a ZeRO-3 leaf it runs one module's hooks and one coalesced all-gather instead.
SmolLM2-135M NF4, bf16, 10 steps, A/B against one unit per MoRE linear alternated 3 times on 2 ranks: 1.02x, 1.07x,
1.12x real tokens/s (1 process, twice: 1.08x, 1.12x); fp32 losses identical. The price is a whole layer gathered at
once (Llama-2-70B: ~0.43 GB in NF4, less than its 16-bit embedding, 0.52 GB, gathered whole anyway), which the
memory planner counts (`plan/model.py`, largest fetch unit). Models that name no decoder-layer class
(`_no_split_modules`) keep DeepSpeed's per-module units.

Not one unit per MoRE linear: in the per_layer layout the contrastive loss calls each linear again after the model's
forward (its own task embeddings), and a leaf called twice reduces its gradients twice (DeepSpeed asserts). As part
of a decoder-layer unit it is called without hooks of its own; both layouts train as under ZeRO-2 in one process,
checked tensor by tensor (tests/test_train.py), and per_layer gave the same losses with `stage3_max_reuse_distance`
and `stage3_max_live_parameters` 0 as with ds_configs' 1e9 (SmolLM2, 2 ranks, fp32, 3 steps).

A leaf reduces its gradients from a full backward hook, which fires once the gradients of the module's inputs exist,
or, if no input needs one, as soon as its output's gradient does, before its own parameters' gradients are
accumulated. So the embeddings' output is made to require a gradient: then every layer's input does (layer 0's too).
"""
from __future__ import annotations

from torch import nn

from pipeline.plan.model import decoder_layers


def make_zero3_units(model: nn.Module) -> int:
    """Mark each decoder layer of `model` (a MoreCausalLM) a ZeRO-3 leaf before `deepspeed.initialize`; returns
    how many (0: the model names no decoder layer, DeepSpeed's per-module units stay)."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = list({type(m) for m in decoder_layers(model.base_model).values()})
    if not classes:
        return 0
    leaves = set_z3_leaf_modules(model, classes)
    model.base_model.enable_input_require_grads()
    return len(leaves)
