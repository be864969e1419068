"""Prep stage (sources -> render/tokenize -> mask -> pack -> write) and the packed-data loader for training.

Public API: `run_prep` (pipeline.data.prep), `PackedDataset`, `PackedCollator`, `block_causal_mask`
(pipeline.data.loader), `TaskSampler`, `task_probabilities` (pipeline.data.sampler).
"""
