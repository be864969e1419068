"""The compiled silu(gate) * up computes the Llama MLP's function, forward and backward, and stays eager where
torch.compile cannot run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from more_fixtures import tiny_llama
from pipeline.models.compiled_swiglu import _compiled_forward, compile_swiglus

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_mlp_matches_eager_forward_and_backward(dtype):
    model = tiny_llama().to(dtype)
    mlp = model.model.layers[0].mlp
    g = torch.Generator().manual_seed(0)
    x = (2 * torch.randn(2, 10, model.config.hidden_size, generator=g)).to(dtype).requires_grad_()
    up = torch.randn(2, 10, model.config.hidden_size, generator=g).to(dtype)
    (mlp(x) * up).sum().backward()
    params = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    eager = [mlp(x).detach(), x.grad, *(p.grad for p in params)]
    x.grad = None
    for p in params:
        p.grad = None

    assert compile_swiglus(model) == model.config.num_hidden_layers and mlp.forward.__func__ is _compiled_forward
    out = mlp(x)
    (out * up).sum().backward()
    got = [out.detach(), x.grad, *(p.grad for p in params)]
    if dtype == torch.float32:
        for a, b in zip(got, eager):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        return
    # bf16: eager rounds silu(gate) before the product, the compiled kernel once at the end; the products (and the
    # gradients, sums of them) as close as bf16 itself
    for a, b in zip(got, eager):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2 ** -7


def test_without_a_cxx_compiler_the_mlps_stay_eager_with_a_warning(tmp_path):
    code = ("import warnings, torch; from more_fixtures import tiny_llama; "
            "from pipeline.models.compiled_swiglu import compile_swiglus\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); n = compile_swiglus(tiny_llama())\n"
            "print(n, [str(x.message) for x in w if 'stays eager' in str(x.message)])")
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    n, rest = out.stdout.strip().split(" ", 1)
    assert n == "0" and "C++ compiler" in rest, out.stdout
