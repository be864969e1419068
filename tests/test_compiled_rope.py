"""The compiled rotary embedding (pipeline/models/compiled_rope.py): transformers' rotation, in fp32, forward and
backward; every Llama-family attention routed through it; eager where torch.compile cannot run."""
import warnings

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from more_fixtures import tiny_llama
from pipeline.models import compiled_rope
from pipeline.models.compiled_rope import compile_rope


def _inputs(dtype, g):
    B, H, Hkv, L, D = 2, 4, 2, 6, 8
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
    ang = torch.randn(B, L, D // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    return q, k, v, cos, sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_and_gradients_match_transformers(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v, cos, sin = _inputs(dtype, g)
    ups = [torch.randn(t.shape, generator=g) for t in (q, k, v)]
    rq, rk = apply_rotary_pos_emb(q, k, cos, sin)
    sum(((o.float() * u).sum() for o, u in zip((rq, rk, v), ups))).backward()
    eager = [rq.detach().float(), rk.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    q.grad = k.grad = v.grad = None

    out = compiled_rope._compiled(q, k, v, cos, sin)
    assert all(o.dtype == torch.float32 for o in out)
    sum(((o * u).sum() for o, u in zip(out, ups))).backward()
    assert q.grad.dtype == dtype and v.grad.dtype == dtype
    got = [out[0].detach(), out[1].detach(), q.grad.float(), k.grad.float(), v.grad.float()]
    # fp32: the same arithmetic; bf16: eager rounds each product and the sum, the kernel rounds nothing (the exact
    # rotation of the bf16 inputs), so the two differ by about one bf16 ulp of the result
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2 ** -7, rtol=2 ** -7)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, **tol)


def test_every_attention_of_a_llama_is_routed_and_grads_keep():
    from more_fixtures import mixed_batch
    from pipeline.models.packed_attention import packed_segments

    model = tiny_llama().train()
    model.config._attn_implementation = "packed_sdpa"
    b = mixed_batch()
    kw = dict(input_ids=b["input_ids"], packed_segments=packed_segments(b["segment_ids"]))
    real = b["segment_ids"] >= 0

    def run():
        model.zero_grad()
        logits = model(**kw).logits
        logits[real].float().logsumexp(-1).sum().backward()
        return [logits.detach()[real]] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    want = run()
    assert compile_rope(model) == model.config.num_hidden_layers
    got = run()
    assert len(got) == len(want)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-4)


def test_attention_with_normalised_q_k_is_not_routed():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    assert compile_rope(Qwen3ForCausalLM(cfg)) == 0


def test_where_compile_fails_attention_stays_eager_with_a_warning(monkeypatch):
    def broken(*a):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compiled_rope, "_compiled", broken)
    model = tiny_llama()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert compile_rope(model) == 0
    assert any("rotary embedding stays eager" in str(x.message) for x in w)
    assert not any(hasattr(m, "_eager_forward") for m in model.modules())
