"""packed_sdpa against one sdpa call with the dense block-causal mask: outputs and gradients at real positions."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.models.packed_attention import packed_sdpa_attention


@pytest.mark.parametrize("segments", [
    [[3, 5, 4, 2], [6, 2]],  # one sdpa call per sample; the second row ends in 6 padding positions
    [[3, 3, 3, 5], [4, 4, 2, 2]],  # runs of equal lengths: one batched call per run
], ids=["distinct_lengths", "equal_length_runs"])
@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_outputs_and_gradients_equal_the_dense_block_mask(kv_heads, segments):
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 4, 14, 8
    q = torch.randn(B, H, L, D, generator=g, requires_grad=True)
    k = torch.randn(B, kv_heads, L, D, generator=g, requires_grad=True)
    v = torch.randn(B, kv_heads, L, D, generator=g, requires_grad=True)
    seg = torch.full((B, L), -1)
    for b, lens in enumerate(segments):
        seg[b, :sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    real = seg >= 0
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal & real[:, :, None]
    mask |= ~real[:, :, None] & torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    upstream = torch.randn(B, L, H, D, generator=g) * real[:, :, None, None]

    out, _ = packed_sdpa_attention(None, q, k, v, None, packed_segments=segments)
    (out * upstream).sum().backward()
    packed = [out.detach(), q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=kv_heads != H)
    (dense.transpose(1, 2) * upstream).sum().backward()

    assert (packed[0][~real] == 0).all()
    torch.testing.assert_close(packed[0][real], dense.transpose(1, 2).detach()[real], atol=1e-5, rtol=1e-5)
    for got, want in zip(packed[1:], [q.grad, k.grad, v.grad]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
