"""The NF4 Linear that dequantises into reused buffers (pipeline/models/nf4_matmul.py) computes bit-for-bit what
bitsandbytes' Linear4bit computes, forward and backward, also when layers of one shape share the buffer; it steps
aside where its kernel does not apply, and refuses a weight that is not gathered. Its ZeRO-3 use (weights released
after forward, gathered again for backward) is covered by tests/test_more_zero3.py, whose model loads through it."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from more_fixtures import save_tiny_llama
from pipeline.models.loading import load_base_model
from pipeline.models import cpu_buffers
from pipeline.models.nf4_matmul import buffered, pool_outputs, use_dequant_buffers

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def linear4bit(n_in: int, n_out: int, dtype: torch.dtype, bias: bool = False, nested: bool = False, seed: int = 0):
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=bias, compute_dtype=dtype, quant_type="nf4", quant_storage=dtype)
    lin.weight = bnb.nn.Params4bit((torch.randn(n_out, n_in, generator=g) * 0.05).to(dtype), requires_grad=False,
                                   quant_type="nf4", compress_statistics=nested, quant_storage=dtype)
    if bias:
        lin.bias = nn.Parameter((torch.randn(n_out, generator=g) * 0.1).to(dtype), requires_grad=False)
    lin.weight = lin.weight._quantize("cpu")
    lin.support_avx512bf16_for_cpu = False  # as load_base_model leaves every NF4 layer
    return lin


def run(model: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.float().square().sum().backward()
    return y.detach(), x.grad


def grad_fn(layer: nn.Module, x: torch.Tensor) -> str:
    return type(layer(x.clone().requires_grad_(True)).grad_fn).__name__


def buffered_copy(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    assert use_dequant_buffers(other) == sum(1 for _ in model.modules() if type(_).__name__ == "Linear4bit")
    return other


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pooled", [False, True])
def test_bit_equal_to_bitsandbytes_forward_and_backward(dtype, bias, pooled):
    dt = DTYPES[dtype]
    # two layers of one shape between others: the second overwrites the first's buffer before either backward;
    # SiLU keeps each layer's output for backward, so a pooled output block reused too early changes the gradient
    ref = nn.Sequential(linear4bit(64, 96, dt, bias, seed=1), nn.SiLU(), linear4bit(96, 96, dt, bias, seed=2),
                        nn.SiLU(), linear4bit(96, 96, dt, bias, seed=3), nn.SiLU(), linear4bit(96, 32, dt, bias, seed=4))
    ours = buffered_copy(ref)
    if pooled:
        assert pool_outputs(ours) == 4
    # 2 x 4096 tokens: outputs and input gradients of >= 1 MiB, which the pool takes (smaller ones it leaves)
    x = torch.randn(2, 4096 if pooled else 5, 64, generator=torch.Generator().manual_seed(0)).to(dt)
    y_ref, gx_ref = run(ref, x)
    cpu_buffers.release()
    y, gx = run(ours, x)
    assert grad_fn(ours[2], x.new_zeros(1, 96)) == "_NF4MatmulBackward"  # the buffered path ran
    assert (cpu_buffers.held_bytes() > 0) == pooled
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def test_steps_aside_where_its_kernel_does_not_apply():
    ref = nn.Sequential(linear4bit(64, 32, torch.float32, nested=True))  # double-quantised absmax
    ours = buffered_copy(ref)
    x = torch.randn(3, 64)
    assert not buffered(x, ours[0].weight, None)
    assert not buffered(x.bfloat16(), linear4bit(64, 32, torch.float32).weight, None)  # dtype differs from weight's
    y_ref, gx_ref = run(ref, x)
    y, gx = run(ours, x)
    assert grad_fn(ours[0], x) == "MatMul4BitBackward"  # bitsandbytes' own
    assert torch.equal(y, y_ref) and torch.equal(gx, gx_ref)


def test_a_released_weight_is_an_error_not_a_read_out_of_bounds():
    layer = buffered_copy(nn.Sequential(linear4bit(64, 32, torch.float32)))[0]
    layer.weight.data = torch.empty(0, dtype=layer.weight.dtype)  # what ZeRO-3 leaves in a released parameter
    with pytest.raises(RuntimeError, match="not gathered"):
        layer(torch.randn(2, 64))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_load_base_model_uses_it_and_logits_match(tmp_path, dtype):
    base = save_tiny_llama(tmp_path / "base")
    ours = load_base_model(str(base), "nf4", dtype)
    plain = load_base_model(str(base), "nf4", dtype, nf4_dequant_buffers=False)
    kinds = lambda m: {type(x).__name__ for x in m.modules() if "Linear4bit" in type(x).__name__}  # noqa: E731
    assert kinds(ours) == {"BufferedLinear4bit"} and kinds(plain) == {"Linear4bit"}
    assert ours.state_dict().keys() == plain.state_dict().keys()
    ids = torch.arange(3, 19).view(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)
