"""Base-model construction, import (a GGUF file -> a plain HF folder: gguf_import.py) and loading (local HF folder
or hub id; plain, bf16 or NF4 4-bit)."""
from pipeline.models.gguf_import import ImportModelError, import_gguf
from pipeline.models.loading import load_base_model, nf4_config
from pipeline.models.tiny import build_tiny_llama

__all__ = ["ImportModelError", "build_tiny_llama", "import_gguf", "load_base_model", "nf4_config"]
