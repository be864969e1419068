"""Base-model construction and loading (local HF folder or hub id; plain, bf16 or NF4 4-bit)."""
from pipeline.models.loading import load_base_model, nf4_config
from pipeline.models.tiny import build_tiny_llama

__all__ = ["build_tiny_llama", "load_base_model", "nf4_config"]
