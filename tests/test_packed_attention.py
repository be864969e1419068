"""packed_sdpa against one sdpa call with the dense block-causal mask: outputs and gradients at real positions, on
each of its kernels: the fused CPU kernel (fp32 and bf16), per-sample sdpa (CPU), varlen over the flat batch with a
reference kernel standing in for torch's CUDA-only flash kernel (its layout: cumulative lengths, padding tails,
zeroed padding), and the real varlen kernel where a GPU is present."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import cpu_attention
from pipeline.models.cpu import cpu_flags
from pipeline.models import packed_attention as pa

SEGMENTS = {
    "distinct_lengths": [[3, 5, 4, 2], [6, 2]],  # one sdpa call per sample; the second row ends in 6 padding positions
    "equal_length_runs": [[3, 3, 3, 5], [4, 4, 2, 2]],  # runs of equal lengths: one batched call per run
}


def band_mask(n: int, window=None) -> torch.Tensor:
    """(n, n) causal mask, limited to the last `window` tokens (the token itself included) when given."""
    i = torch.arange(n)
    return (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)


def reference_varlen(q, k, v, cu, max_len, scale, window=None):
    """What varlen flash attention computes, from its arguments alone: causal attention within each of the flat
    sequences that `cu` delimits (within `window`), as one dense masked sdpa."""
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == q.shape[0]
    lengths = (cu[1:] - cu[:-1]).long()
    assert (lengths > 0).all() and max_len == int(lengths.max())
    seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    mask = (seq[:, None] == seq[None, :]) & band_mask(len(seq), window)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(0, 1)


def run_packed(path, q, k, v, segments, scaling, window):
    if path == "varlen_reference":
        return pa.varlen_attention(q, k, v, pa.PackedSegments(segments), scaling, kernel=reference_varlen,
                                   window=window)
    assert (path == "varlen_cuda") == pa.takes_varlen(q, 0.0)
    assert cpu_attention.takes_fused(q, k, 0.0) == (path != "varlen_cuda")  # on CPU the switch below decides
    pa.use_cpu_kernel("sdpa" if path == "per_sample" else "fused")
    try:
        return pa.packed_sdpa_attention(None, q, k, v, None, scaling=scaling, packed_segments=segments,
                                        sliding_window=window)[0]
    finally:
        pa.use_cpu_kernel("fused")


PATHS = ["fused", "fused_bf16", "per_sample", "varlen_reference",
         pytest.param("varlen_cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("segments", SEGMENTS.values(), ids=SEGMENTS.keys())
@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
@pytest.mark.parametrize("window", [None, 3], ids=["causal", "sliding_window_3"])  # 3: shorter than most samples
def test_outputs_and_gradients_equal_the_dense_block_mask(path, kv_heads, segments, window):
    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 4, 14, 32  # 32: a head size the fused kernel is compiled for
    device, dtype, tol = {"varlen_cuda": ("cuda", torch.bfloat16, 2e-2), "fused_bf16": ("cpu", torch.bfloat16, 2e-2)
                          }.get(path, ("cpu", torch.float32, 1e-5))
    scaling = 0.3  # not the default 1/sqrt(D): the kernels must apply the model's scale
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(device, dtype).requires_grad_() for h in (H, kv_heads, kv_heads))
    seg = torch.full((B, L), -1)
    for b, lens in enumerate(segments):
        seg[b, :sum(lens)] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    real = seg >= 0
    mask = (seg[:, :, None] == seg[:, None, :]) & band_mask(L, window) & real[:, :, None]
    mask |= ~real[:, :, None] & torch.eye(L, dtype=torch.bool)  # padding rows attend to themselves (no NaN)
    upstream = torch.randn(B, L, H, D, generator=g) * real[:, :, None, None]

    out = run_packed(path, q, k, v, segments, scaling, window)
    assert out.shape == (B, L, H, D) and out.dtype == dtype
    (out.float().cpu() * upstream).sum().backward()
    packed = [out.detach().float().cpu()] + [t.grad.float().cpu() for t in (q, k, v)]
    qf, kf, vf = (t.detach().float().cpu().requires_grad_() for t in (q, k, v))  # the reference in fp32 on CPU
    dense = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask[:, None], scale=scaling,
                                           enable_gqa=kv_heads != H)
    (dense.transpose(1, 2) * upstream).sum().backward()

    assert (packed[0][~real] == 0).all()
    torch.testing.assert_close(packed[0][real], dense.transpose(1, 2).detach()[real], atol=tol, rtol=tol)
    for got, want in zip(packed[1:], [qf.grad, kf.grad, vf.grad]):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_varlen_layout_is_built_once_per_forward_and_covers_every_token():
    segments = pa.packed_segments(torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 2, 3, 4, 5]]))
    assert segments == [[2, 3], [1, 1, 1, 1, 1, 1]]
    cu, max_len, padding = segments.varlen_layout(6, torch.device("cpu"))
    assert cu.tolist() == [0, 2, 5, 6, 7, 8, 9, 10, 11, 12] and max_len == 3
    assert padding.tolist() == [False] * 5 + [True] + [False] * 6
    assert segments.varlen_layout(6, torch.device("cpu"))[0] is cu  # shared by every layer of the forward
    with pytest.raises(ValueError, match="5 tokens in a row of 4"):
        segments.varlen_layout(4, torch.device("cpu"))


def test_varlen_kernel_is_taken_only_where_it_runs():
    x = torch.zeros(1, 2, 4, 64)
    assert not pa.takes_varlen(x, 0.0)  # CPU: per-sample sdpa
    assert pa.torch_varlen_kernel() is not None  # this torch has the kernel (CUDA-only at run time)


@pytest.mark.parametrize("release", ["2.10", "current"])
def test_varlen_kernel_keywords_follow_the_torch_release(monkeypatch, release):
    """torch 2.10's varlen_attn took is_causal and no scale; later ones window_size, scale and enable_gqa. A stand-in
    with each signature (computing what the flash kernel does) must give the model's scaled causal attention."""
    import torch.nn.attention.varlen as varlen

    def flash(q, k, v, cu, max_len, causal, scale=None, window=None):
        assert causal
        return reference_varlen(q, k, v, cu, max_len, scale, window)

    if release == "2.10":
        def stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return flash(query, key, value, cu_seq_q, max_q, is_causal)
    else:
        def stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False):
            assert enable_gqa or key.shape[1] == query.shape[1]
            left, right = window_size
            return flash(query, key, value, cu_seq_q, max_q, right == 0, scale, None if left < 0 else left + 1)

    monkeypatch.setattr(varlen, "varlen_attn", stand_in)
    pa.torch_varlen_kernel.cache_clear()
    try:
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, h, 9, 8, generator=g) for h in (4, 2, 2))
        segments = pa.PackedSegments([[4, 3]])
        got = pa.varlen_attention(q, k, v, segments, scaling=0.3)
        want = pa.per_sample_attention(q, k, v, segments, scaling=0.3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert pa.torch_varlen_kernel().takes_window is (release != "2.10")
        if release != "2.10":  # a sliding window as window_size=(window - 1, 0)
            got = pa.varlen_attention(q, k, v, segments, scaling=0.3, window=2)
            want = pa.per_sample_attention(q, k, v, segments, scaling=0.3, window=2)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(want, pa.per_sample_attention(q, k, v, segments, scaling=0.3), atol=1e-3)
    finally:
        pa.torch_varlen_kernel.cache_clear()


def test_segments_must_cover_every_row():
    q = torch.randn(2, 2, 6, 8)
    with pytest.raises(ValueError, match="1 rows for a batch of 2"):  # zip would have dropped the second row
        pa.packed_sdpa_attention(None, q, q, q, None, packed_segments=[[3, 3]])


def test_attention_soft_capping_is_refused_with_the_way_out():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="soft-capping .* set model.attn_implementation: eager"):
        pa.packed_sdpa_attention(None, q, q, q, None, packed_segments=[[4]], softcap=50.0)


def test_a_sliding_window_model_packed_equals_each_sample_alone():
    """Mistral with a 4-token window: a packed row through packed_sdpa gives each sample the logits it gets alone
    through transformers' own sdpa and sliding-window mask (the window used to be dropped: max |diff| 0.43)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, sliding_window=4)).eval()
    lengths = [9, 6, 3]
    ids = torch.randint(3, 64, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        alone = [model(input_ids=part).logits[0] for part in ids.split(lengths, 1)]
        model.config._attn_implementation = pa.NAME
        packed = model(input_ids=ids, position_ids=pos, packed_segments=pa.PackedSegments([lengths])).logits[0]
    for got, want in zip(packed.split(lengths), alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# The kernel is compiled for the CPU that runs it, its vector width following the target: "native" is this host's
# code (16 lanes on an AVX-512 machine); x86-64-v3 (AVX2: 8 lanes) and x86-64-v2 (SSE4.2: 4 lanes, the width an
# ARM build takes too) run on any x86 host with AVX2.
ARCHES = ["native"] + [pytest.param(arch, marks=pytest.mark.skipif("avx2" not in cpu_flags(),
                                                                   reason="needs an x86 CPU with AVX2"))
                       for arch in ("x86-64-v3", "x86-64-v2")]


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("head_dim", cpu_attention.HEAD_DIMS)
@pytest.mark.parametrize("window", [None, 17], ids=["causal", "sliding_window_17"])
def test_fused_cpu_kernel_on_long_samples_equals_per_sample_sdpa(head_dim, window, arch):
    """Samples spanning several of the kernel's 32-key tiles and 4-query blocks (lengths 1 to 70, a window that
    starts inside a tile), a row without samples, every compiled head size (each has its own loop widths), q, k, v
    as the model hands them over: (B, L, heads, D) storage viewed as (B, heads, L, D)."""
    assert cpu_attention.kernel(arch) is not None
    g = torch.Generator().manual_seed(head_dim)
    B, H, Hkv, L = 3, 6, 2, 160
    segments = pa.PackedSegments([[70, 33, 1, 40, 5], [], [64, 63, 32]])
    q, k, v = (torch.randn(B, L, h, head_dim, generator=g).transpose(1, 2).requires_grad_() for h in (H, Hkv, Hkv))
    upstream = torch.randn(B, L, H, head_dim, generator=g)
    got = cpu_attention.fused_attention(q, k, v, segments.sample_table(), 0.2, window, arch=arch)
    (got * upstream).sum().backward()
    fused = [got.detach()] + [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    want = pa.per_sample_attention(q, k, v, segments, scaling=0.2, window=window)
    (want * upstream).sum().backward()
    for a, b in zip(fused, [want.detach()] + [t.grad for t in (q, k, v)]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # fp32 sums of up to 70 x 256 terms
    assert (fused[0][1] == 0).all() and (fused[0][0, 149:] == 0).all()  # padding: zero output, like sdpa's path


def test_fused_cpu_kernel_refuses_a_sample_outside_its_row():
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(RuntimeError, match="sample 1 .first 5, length 4. does not fit a row of 8"):
        cpu_attention.kernel().forward(q, q, q, torch.tensor([[0, 0, 5], [0, 5, 4]]), 0.2, 0)


def test_without_a_compiler_packed_attention_falls_back_to_sdpa_with_a_warning(tmp_path):
    """A host without a working C++ compiler: kernel() warns and returns None, packed attention runs on sdpa."""
    import os
    import subprocess
    import sys

    code = ("import warnings, torch\n"
            "from pipeline.models import cpu_attention, packed_attention as pa\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    assert cpu_attention.kernel() is None\n"
            "assert any('per-sample sdpa runs instead' in str(x.message) for x in w), [str(x.message) for x in w]\n"
            "q = torch.randn(1, 2, 6, 32)\n"
            "assert not cpu_attention.takes_fused(q, q, 0.0)\n"
            "out = pa.packed_sdpa_attention(None, q, q, q, None, packed_segments=[[4, 2]])[0]\n"
            "ref = pa.per_sample_attention(q, q, q, [[4, 2]])\n"
            "assert torch.equal(out, ref)\n")
    env = dict(os.environ, CXX="/bin/false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_cpu_kernel_choice_is_honoured(monkeypatch, cpu_attention_kernel):
    """`model.cpu_attention: sdpa` (the trainer calls use_cpu_kernel) must not reach the fused kernel; `fused` must."""
    calls = []
    real = cpu_attention.fused_attention
    monkeypatch.setattr(cpu_attention, "fused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = torch.randn(1, 2, 6, 32)
    cpu_attention_kernel("sdpa")
    pa.packed_sdpa_attention(None, q, q, q, None, packed_segments=[[4, 2]])
    assert calls == []
    cpu_attention_kernel("fused")
    pa.packed_sdpa_attention(None, q, q, q, None, packed_segments=[[4, 2]])
    assert calls == [1]
    with pytest.raises(ValueError, match="one of .'fused', 'sdpa'., got 'flash'"):
        pa.use_cpu_kernel("flash")
