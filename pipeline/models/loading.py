"""Load a base causal LM for training, merging or evaluation.

NF4 follows the QLoRA recipe that ZeRO-3 can shard: 4-bit NF4 weights stored in a bf16 container
(`bnb_4bit_quant_storage`), bf16 compute. Under ZeRO-3 no `device_map` is passed (DeepSpeed places the shards).

bitsandbytes' CPU fast path is kept off for every NF4 layer loaded here (`keep_nf4_layout`): on a CPU with
AVX512-BF16, `Linear4bit.forward` in eval mode repacks the weight IN PLACE into a kernel layout with bf16 absmax.
That layout breaks ZeRO-3 partitions (reshape of an empty shard), `state_dict()` (asserts uint8 storage, so the
first checkpoint after an in-training eval dies) and exact merges (logits move by ~2e-3). Off, every CPU computes
the same dequantize-then-matmul as an AVX2-only one.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from pipeline.models import packed_attention  # noqa: F401  (registers attn_implementation="packed_sdpa")

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
                    attn_implementation: str = "sdpa", device_map: Optional[str] = None,
                    nf4_dequant_buffers: bool = True):
    """`path` is a local HF folder or a hub id. With `nf4`, `dtype` is both compute and storage dtype, and
    `nf4_dequant_buffers` dequantises each CPU matmul's weight into a reused buffer (pipeline/models/nf4_matmul.py)."""
    torch_dtype = DTYPES[dtype]
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation)
    if quantization == "nf4":
        kwargs["quantization_config"] = nf4_config(torch_dtype, torch_dtype)
        # bitsandbytes quantizes while loading onto a device; on CPU-only machines that device is "cpu".
        kwargs["device_map"] = device_map or ("cpu" if not torch.cuda.is_available() else None)
    elif device_map:
        kwargs["device_map"] = device_map
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization == "nf4":
        keep_nf4_layout(model)
        if nf4_dequant_buffers:
            from pipeline.models.nf4_matmul import use_dequant_buffers

            use_dequant_buffers(model)
    return model


def keep_nf4_layout(model) -> int:
    """Switch off bitsandbytes' in-place CPU repack on every Linear4bit of `model`; returns how many layers."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)
