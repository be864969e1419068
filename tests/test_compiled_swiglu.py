"""The compiled silu(gate) * up computes the Llama MLP's function, forward and backward (without a C++ compiler it
stays eager: tests/test_compiled_norm.py)."""
import pytest
import torch

from more_fixtures import tiny_llama
from pipeline.models.compiled_swiglu import _compiled_forward, compile_swiglus


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
