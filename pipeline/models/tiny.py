"""Small Llama-shaped models built from a config, so tests and the default run never download weights."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.atomic import replace_dir, temp_dir_for


def tiny_llama_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int | None = None,
                      max_position_embeddings: int = 2048) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def build_tiny_llama(out_dir: str | Path, vocab_size: int, seed: int = 0, tokenizer=None, **shape) -> Path:
    """Write a randomly initialised Llama (fp32 safetensors) and optionally its tokenizer to `out_dir`."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size, **shape))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def build_random_like(src_dir: str | Path, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      **shape) -> Path:
    """A randomly initialised model of `src_dir`'s architecture and tokenizer at another size (`shape`: config
    fields such as hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads), in
    `dtype`: a throughput stand-in for a bigger model of that family, where matmuls take a larger share of a step."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src_dir)
    unknown = sorted(k for k in shape if not hasattr(config, k))
    if unknown:
        raise ValueError(f"{src_dir}/config.json has no field(s) {unknown}")
    for key, value in shape.items():
        setattr(config, key, value)
    if hasattr(config, "head_dim"):
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out = Path(out_dir)
    tmp = temp_dir_for(out)
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src_dir).save_pretrained(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
