"""Load a base causal LM for training, merging or evaluation.

NF4 follows the QLoRA recipe that ZeRO-3 can shard: 4-bit NF4 weights stored in a bf16 container
(`bnb_4bit_quant_storage`), bf16 compute. Under ZeRO-3 no `device_map` is passed (DeepSpeed places the shards).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16, storage_dtype: torch.dtype = torch.bfloat16):
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage_dtype,
        bnb_4bit_use_double_quant=False,
    )


def load_base_model(path: str, quantization: Literal["nf4", "none"] = "none", dtype: str = "bf16",
                    attn_implementation: str = "sdpa", device_map: Optional[str] = None):
    """`path` is a local HF folder or a hub id. With `nf4`, `dtype` is both compute and storage dtype."""
    torch_dtype = DTYPES[dtype]
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(torch_dtype, torch_dtype)
        # bitsandbytes quantizes while loading onto a device; on CPU-only machines that device is "cpu".
        kwargs["device_map"] = device_map or ("cpu" if not torch.cuda.is_available() else None)
    elif device_map:
        kwargs["device_map"] = device_map
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
