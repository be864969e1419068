"""The compiled RMSNorm computes LlamaRMSNorm's function, forward and backward; it and the compiled MLP product stay
eager where torch.compile cannot run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from more_fixtures import tiny_llama
from pipeline.models.compiled_norm import _compiled_forward, compile_rms_norms

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_norm_matches_eager_forward_and_backward(dtype):
    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48, generator=g))
    x = (3 * torch.randn(2, 10, 48, generator=g)).to(dtype).requires_grad_()
    up = torch.randn(2, 10, 48, generator=g).to(dtype)
    (norm(x) * up).sum().backward()
    eager = [norm(x).detach(), x.grad, norm.weight.grad]
    x.grad = norm.weight.grad = None

    model = torch.nn.Sequential(norm)
    assert compile_rms_norms(model) == 1 and norm.forward.__func__ is _compiled_forward
    out = norm(x)
    (out * up).sum().backward()
    if dtype == torch.float32:
        for got, want in zip([out.detach(), x.grad, norm.weight.grad], eager):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        return
    # bf16: eager rounds the normalised x before scaling, the fused kernel once at the end; outputs within one bf16
    # ulp, gradients (sums of such products) as close as bf16 itself
    torch.testing.assert_close(out.detach().float(), eager[0].float(), atol=0.0, rtol=2 ** -7)
    for got, want in zip([x.grad, norm.weight.grad], eager[1:]):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 2 ** -7


def test_every_norm_of_a_llama_is_routed_and_logits_keep():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    want = model(ids).logits
    assert compile_rms_norms(model) == 2 * model.config.num_hidden_layers + 1
    torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module,route,what", [("compiled_norm", "compile_rms_norms", "RMSNorm"),
                                               ("compiled_swiglu", "compile_swiglus", "silu(gate) * up")])
def test_without_a_cxx_compiler_the_modules_stay_eager_with_a_warning(tmp_path, module, route, what):
    code = ("import warnings, torch; from more_fixtures import tiny_llama; "
            f"from pipeline.models.{module} import {route}\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            f"    warnings.simplefilter('always'); n = {route}(tiny_llama())\n"
            f"print(n, [str(x.message) for x in w if {what!r} + ' stays eager' in str(x.message)])")
    env = {**os.environ, "CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    n, rest = out.stdout.strip().split(" ", 1)
    assert n == "0" and "C++ compiler" in rest, out.stdout
