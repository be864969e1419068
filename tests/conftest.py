"""Shared pytest fixtures. Keep each fixture small and named for what it provides."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
# Session fixtures shared by every module: defined here once. Imported into a test module instead, each module gets
# its own definition and re-runs them (the real model's import took ~25 s per module).
from real_model_fixtures import smollm2_import, tiny_chat_model  # noqa: F401

BNB_HOOK_DIR = Path(__file__).parent / "bnb_cpu_path"


def force_bnb_cpu_path(monkeypatch, avx512bf16: bool) -> None:
    """Make bitsandbytes take its AVX512-BF16 CPU branch (in-place weight repack in eval) or its plain one, in this
    process and in every subprocess it starts, whatever this host's CPU is."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512bf16)
    monkeypatch.setenv("BNB_FORCE_AVX512BF16", "1" if avx512bf16 else "0")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(BNB_HOOK_DIR), os.environ.get("PYTHONPATH"))
                                                     if p))


@pytest.fixture(params=["avx512bf16", "plain"])
def bnb_cpu_path(request, monkeypatch):
    """Runs the test once on each bitsandbytes CPU branch (see `force_bnb_cpu_path`)."""
    force_bnb_cpu_path(monkeypatch, request.param == "avx512bf16")
    return request.param


@pytest.fixture
def cpu_attention_kernel():
    """`cpu_attention_kernel("sdpa" | "fused")`: packed attention's CPU kernel for this test, "fused" again after."""
    from pipeline.models import packed_attention

    yield packed_attention.use_cpu_kernel
    packed_attention.use_cpu_kernel("fused")


def _small_builtin_config(root: Path, **overrides):
    """The default prep config shrunk for tests: built-in data at 5 % scale, a small tokenizer, outputs in `root`."""
    from pipeline.config.base import load_config
    from pipeline.config.prep import PrepConfig

    ov = {"output_dir": str(root / "out"), "builtin": {"dir": str(root / "builtin"), "scale": 0.05, "seed": 0},
          "tokenizer": {"train_sentencepiece": {"vocab_size": 320}}, "max_seq_len": 128, "num_proc": 1}
    cfg = load_config(PrepConfig, Path(__file__).parents[1] / "configs/prep/default.yaml", overrides=ov)
    for i, task in enumerate(cfg.tasks):  # point the tasks at the test copy of the built-in data
        cfg.tasks[i] = task.model_copy(update={"source": task.source.model_copy(
            update={"path": task.source.path.replace("data/built/builtin", str(root / "builtin"))})})
    return cfg.model_copy(update=overrides) if overrides else cfg


@pytest.fixture
def small_prep_config(tmp_path):
    """Factory: `small_prep_config(**field_overrides) -> PrepConfig` writing under this test's tmp_path."""
    return lambda **ov: _small_builtin_config(tmp_path, **ov)


@pytest.fixture(scope="session")
def prepared_builtin_config(tmp_path_factory):
    """The PrepConfig behind `prepared_builtin_data` (small built-in set, global packing)."""
    return _small_builtin_config(tmp_path_factory.mktemp("prepared_builtin"), pack_per_task=False)


@pytest.fixture(scope="session")
def prepared_builtin_data(prepared_builtin_config) -> Path:
    """A prepared (packed, mixed-task rows) copy of the small built-in set, shared by loader/sampler tests."""
    from pipeline.data.prep import run_prep

    return run_prep(prepared_builtin_config)


@pytest.fixture(scope="session")
def tiny_train_setup(prepared_builtin_data, tmp_path_factory):
    """Prepared data + a tiny Llama base with the data's tokenizer + a small training config file (fp32 NF4)."""
    from transformers import AutoTokenizer

    from pipeline.models import build_tiny_llama

    root = tmp_path_factory.mktemp("train")
    tok = AutoTokenizer.from_pretrained(prepared_builtin_data / "tokenizer")
    base = build_tiny_llama(root / "base", vocab_size=len(tok), tokenizer=tok, hidden_size=64, num_layers=2)
    cfg = {
        "output_dir": str(root / "unused"),
        "seed": 0,
        # compiled norms and MLPs cost ~2 s per process and gain nothing 64 wide; test_train.py's bf16 ZeRO-3 run
        # turns them on
        "model": {"path": str(base), "quantization": "nf4", "dtype": "fp32", "gradient_checkpointing": True,
                  "compile_norms": False, "compile_swiglu": False},
        "data": {"dir": str(prepared_builtin_data), "temperature": 2.0},
        "more": {"max_rank": 4, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "optim": {"lr": 1.0e-2, "warmup_steps": 0, "max_steps": 6, "micro_batch_size": 2, "grad_accum": 1,
                  "schedule": "constant"},
        "checkpoint": {"every": 0, "keep": 2},
        "eval": {"every": 0, "max_batches": 2},
    }
    import yaml

    cfg_file = root / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    return {"root": root, "config": cfg_file, "base": base, "data": prepared_builtin_data}
