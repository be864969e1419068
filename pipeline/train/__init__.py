"""The training stage: DeepSpeed ZeRO-3 loop over packed multi-task data with a MoRE adapter."""
