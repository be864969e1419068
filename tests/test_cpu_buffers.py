"""The CPU buffer pool (pipeline/models/cpu_buffers.py) hands a block out again only once nothing holds it: not
while the tensor, a view of it or autograd's saved copy lives. The pooled SwiGLU (pipeline/models/pooled_swiglu.py)
computes bit-for-bit what the eager MLP computes, forward and backward, in a model and alone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from more_fixtures import save_tiny_llama
from pipeline.models import cpu_buffers
from pipeline.models.loading import load_base_model
from pipeline.models.pooled_swiglu import pool_swiglu_mlps, swiglu

MiB = 1 << 20


@pytest.fixture(autouse=True)
def empty_pool():
    cpu_buffers.release()
    yield
    cpu_buffers.release()


def test_a_block_is_reused_only_when_nothing_holds_it():
    a = cpu_buffers.empty((512, 1024), torch.float32)  # 2 MiB
    ptr = a.data_ptr()
    assert cpu_buffers.empty((512, 1024), torch.float32).data_ptr() != ptr  # `a` still holds its block
    view = a[:10]
    del a
    assert cpu_buffers.empty((512, 1024), torch.float32).data_ptr() != ptr  # a view of it still does
    del view
    b = cpu_buffers.empty((512, 1024), torch.float32)
    assert b.data_ptr() == ptr and not b._is_view() and b.is_contiguous()
    w = torch.randn(1024, 8, requires_grad=True)
    y = b.mm(w)  # autograd keeps `b` for w's gradient
    del b
    assert cpu_buffers.empty((512, 1024), torch.float32).data_ptr() != ptr
    del y
    assert cpu_buffers.empty((512, 1024), torch.float32).data_ptr() == ptr


def test_size_classes_and_small_tensors():
    assert [cpu_buffers.size_class(n) for n in (8 * MiB, 8 * MiB + 1, 9 * MiB - 1, 9 * MiB)] == [8 * MiB, 9 * MiB,
                                                                                                  9 * MiB, 9 * MiB]
    full = cpu_buffers.empty((4, 512, 1024), torch.bfloat16)  # 4 MiB
    ptr = full.data_ptr()
    del full
    shorter = cpu_buffers.empty((4, 497, 1024), torch.bfloat16)  # a batch a few tokens shorter: same class
    assert shorter.data_ptr() == ptr and shorter.shape == (4, 497, 1024)
    held = cpu_buffers.held_bytes()
    cpu_buffers.empty((100, 100), torch.float32)  # under 1 MiB: glibc's, not the pool's
    assert cpu_buffers.held_bytes() == held == 4 * MiB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pooled_swiglu_is_bit_equal_to_eager(dtype):
    g = torch.Generator().manual_seed(0)
    gate0, up0, gh = (torch.randn(2, 512, 768, generator=g).to(dtype) for _ in range(3))

    def grads(fn):
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        h = fn(gate, up)
        h2 = fn(gate * 2, up)  # a second call while the first's saved tensors are alive
        (h * gh + h2).sum().backward()
        return h.detach(), gate.grad, up.grad

    for ours, ref in zip(grads(swiglu), grads(lambda a, b: F.silu(a) * b)):
        assert torch.equal(ours, ref)
    assert cpu_buffers.held_bytes() > 0  # the pooled path ran
    with torch.no_grad():
        assert torch.equal(swiglu(gate0, up0), F.silu(gate0) * up0)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_llama_with_pooled_mlps_matches_eager(tmp_path, quantization):
    path = save_tiny_llama(tmp_path / "base")
    ref = load_base_model(str(path), quantization, "fp32")
    ours = copy.deepcopy(ref)
    assert pool_swiglu_mlps(ours) == ref.config.num_hidden_layers
    ids = torch.randint(3, 100, (4, 1024), generator=torch.Generator().manual_seed(0))  # MLP tensors of 2 MiB

    def logits_and_embedding_grad(model):
        model.get_input_embeddings().weight.requires_grad_(True)
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), model.get_input_embeddings().weight.grad

    for a, b in zip(logits_and_embedding_grad(ours), logits_and_embedding_grad(ref)):
        assert torch.equal(a, b)
    assert cpu_buffers.held_bytes() > 0  # the pooled path ran
