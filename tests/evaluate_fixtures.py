"""Helpers for the evaluate tests: a very small Llama (fast on 2 shared cores) with the prepared tokenizer, and
an in-process CLI call that returns (exit code, stderr)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)


def tiny_with_tokenizer(out_dir, tokenizer_dir, seed: int = 0) -> Path:
    from pipeline.data.tokenizer import load_tokenizer
    from pipeline.models import build_tiny_llama

    tok = load_tokenizer(tokenizer_dir)
    return build_tiny_llama(out_dir, len(tok), seed=seed, tokenizer=tok, **SHAPE)


def _cli_module():
    """launch/evaluate.py loaded by path (the name `evaluate` would clash with the HF `evaluate` package)."""
    if "_launch_evaluate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_launch_evaluate", REPO / "launch" / "evaluate.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["_launch_evaluate"] = mod
    return sys.modules["_launch_evaluate"]


def run_cli(*args) -> tuple[int, str]:
    """`launch/evaluate.py ARGS` in this process (saves the interpreter start-up); returns (code, stderr)."""
    cli = _cli_module()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main([str(a) for a in args] + ["--no-progress", "--device", "cpu"])
    return code, err.getvalue()


def results(out_dir) -> dict:
    return json.loads((Path(out_dir) / "results.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On the shared 2-core test machine, 2 intra-op threads make every tiny matmul wait for a busy core (~30 ms
    per linear instead of 0.06 ms); one thread keeps these tests fast. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
