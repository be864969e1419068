"""ZeRO-3's recorded module order must come from a training step, not from the evaluation at step 0.

DeepSpeed records the order in which modules fetch their parameters during the first forward(+backward) and then,
at the end of each module's forward, keeps gathered the parameters the rest of that order uses again (the backward,
within `stage3_max_reuse_distance`). It memoises that decision per (module, position in the order) with an
`lru_cache` that nothing clears (deepspeed 0.19.8, `PartitionedParameterCoordinator.__params_to_release`).
When the run evaluates before its first step (eval.at_start, or a resumed run's owed eval) the first order recorded
is a forward alone: no backward follows it, so every layer's parameters are released after its forward, and that
answer stays cached after the training step's order replaces it. Every later step then all-gathers every layer
again in backward (SmolLM2-135M NF4 on 2 CPU ranks: 1,110 extra parameter gathers per step; README's benchmark
runs before and after the fix).

`forget_forward_only_trace` drops such an order and the cached decisions, so the first training step records its
own. Evaluations after a training step follow the recorded order's forward part and need nothing. Another change
of order mid-run would leave decisions cached from the old order too; the end of the selector's warm-up is not
one (tests/test_train.py counts the layers' releases after it).
"""
from __future__ import annotations

import inspect

from torch import nn


def _release_decisions_cache():
    """The lru_cache under DeepSpeed's NVTX wrapper (a closure without __wrapped__), or None if it is gone."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    fn = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for _ in range(4):
        if fn is None or hasattr(fn, "cache_clear"):
            return fn
        fn = getattr(fn, "__wrapped__", None) or inspect.getclosurevars(fn).nonlocals.get("func")
    return None


def forget_forward_only_trace(engine: nn.Module) -> None:
    """Invalidate the ZeRO-3 module trace and clear the coordinator's cached release decisions (nothing to do when
    the engine is not under ZeRO-3)."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None:
        return
    coordinator = offload.get_param_coordinator()
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # the next forward records the order afresh
    cached = _release_decisions_cache()  # keyed by (coordinator, module, step), not by the trace they came from
    if cached is not None:
        cached.cache_clear()
