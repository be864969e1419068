"""Memory planner: will a MoRE + ZeRO-3 (+ NF4) run fit, per GPU and per node, before anything is built."""
from .activations import ActivationEstimate, activation_bytes
from .adapter import AdapterCount, more_param_count, target_linears
from .model import ModelInventory, inventory, meta_model, resolve_config, shipped_models
from .planner import GiB, MemLine, MemoryPlan, PlanInputs, nf4_bytes, plan
from .report import format_plan
from .zero import ZeroSettings

__all__ = ["plan", "format_plan", "MemoryPlan", "PlanInputs", "MemLine", "more_param_count", "AdapterCount",
           "activation_bytes", "ActivationEstimate", "meta_model", "inventory", "resolve_config", "ModelInventory",
           "ZeroSettings", "nf4_bytes", "shipped_models", "target_linears", "GiB"]
