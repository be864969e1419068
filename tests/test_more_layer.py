"""The MoRE linear on its own: mixed-task batches vs per-task loops, forced rank R vs plain LoRA, gradients,
straight-through gate gradient, bf16 and NF4 bases, and a selector that really learns."""
import pytest
import torch
from torch import nn

from more_fixtures import bare_layer, set_tokens
from pipeline.config.more import MoreConfig
from pipeline.more.selector import column_scale

T = 4


def _layer(cfg=None, base=None, seed=0, in_f=32, out_f=24):
    torch.manual_seed(seed)
    base = base if base is not None else nn.Linear(in_f, out_f).requires_grad_(False)
    cfg = cfg or MoreConfig(max_rank=8, gate_init="random", alpha=16.0)
    layer, ctx = bare_layer(base, cfg, T, seed=seed)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)  # B = 0 at init would make every check trivial
    return layer, ctx


def _naive(layer, x, task_ids):
    """Per-token: W x + b + scale * B[:, :r] diag(cs[:r]) A[:r] x at the token's task's rank; 0 for padding."""
    W = layer.base_layer.weight.float()
    b = layer.base_layer.bias
    ranks = layer.chosen_ranks()
    cs = column_scale(layer.max_rank, layer.rank_scaling)
    x2 = x.reshape(-1, x.shape[-1]).float()
    out = x2 @ W.t() + (b.float() if b is not None else 0)
    t = task_ids.reshape(-1)
    for i in range(x2.shape[0]):
        if t[i] < 0:
            continue
        r = int(ranks[t[i]])
        delta = (layer.lora_B.float()[:, :r] * cs[:r] * layer.scale) @ layer.lora_A.float()[:r]
        out[i] += delta @ x2[i]
    return out.view(*x.shape[:-1], -1)


def _tasks(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, shape, generator=g)
    t[..., -2:] = -1  # padding
    return t


@pytest.mark.parametrize("rank_scaling", ["none", "linear"])
@pytest.mark.parametrize("embedding", ["shared", "per_layer"])
def test_mixed_batch_equals_per_task_loop(rank_scaling, embedding):
    cfg = MoreConfig(max_rank=8, gate_init="random", rank_scaling=rank_scaling, task_embedding=embedding)
    layer, ctx = _layer(cfg)
    ranks = layer.chosen_ranks()
    assert len(set(ranks.tolist())) >= 2, f"test needs tasks at different ranks, got {ranks.tolist()}"
    x = torch.randn(3, 10, 32)
    tid = _tasks((3, 10))
    set_tokens(ctx, tid)
    y = layer(x)
    # naive per-task loop: run each task alone on the whole input and keep its tokens
    loop = torch.empty_like(y)
    for t in range(-1, T):
        if t < 0:
            ctx.disabled = True
            yt = layer(x)
            ctx.disabled = False
        else:
            ctx.token_index, ctx.fixed_task = None, t
            yt = layer(x)
        loop[tid == t] = yt[tid == t]
    torch.testing.assert_close(y, loop, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, _naive(layer, x, tid), atol=1e-5, rtol=1e-5)
    # padding tokens get exactly the base output
    torch.testing.assert_close(y[tid < 0], layer.base_layer(x)[tid < 0], atol=0, rtol=0)


def test_forced_max_rank_equals_plain_lora():
    layer, ctx = _layer()
    x = torch.randn(2, 7, 32)
    tid = torch.randint(0, T, (2, 7))
    set_tokens(ctx, tid)
    ctx.forced_rank = 8
    y = layer(x)
    lora = layer.base_layer(x) + layer.scale * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(y, lora, atol=1e-6, rtol=0)


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


@pytest.mark.parametrize("bias", [True, False])  # nn.Linear's 3-D output is a view with a bias, not without
@pytest.mark.parametrize("path", ["fused", "wrapped"])
def test_adapter_add_writes_no_view_in_place(path, bias):
    """An in-place add through a reshaped view of the base output makes autograd copy every gradient back through
    CopySlices / AsStrided nodes (measured: ~0.3 s of a SmolLM2 step); the layer must not build them."""
    layer, ctx = _layer(base=nn.Linear(32, 24, bias=bias))
    layer.base_layer.requires_grad_(path == "wrapped")
    x = torch.randn(2, 9, 32, requires_grad=True)
    set_tokens(ctx, _tasks((2, 9)))
    nodes = _graph_nodes(layer(x))
    assert not {n for n in nodes if n.startswith(("CopySlices", "AsStrided"))}, nodes


@pytest.mark.parametrize("path", ["fused", "wrapped"])  # a trainable base weight takes the wrapped path
@pytest.mark.parametrize("ste", ["all_experts", "selected"])
def test_gradients_reach_everything_and_match_autograd(ste, path):
    cfg = MoreConfig(max_rank=8, gate_init="random", ste=ste)
    layer, ctx = _layer(cfg)
    layer.base_layer.requires_grad_(path == "wrapped")
    assert (layer._fused_base(torch.zeros(1, 32)) is not None) == (path == "fused")
    x = torch.randn(2, 9, 32, requires_grad=True)
    tid = _tasks((2, 9), seed=3)
    set_tokens(ctx, tid)
    gy = torch.randn(2, 9, 24)
    (layer(x) * gy).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    got["x"] = x.grad.clone()
    emb = ctx.selector.task_embedding
    got["emb"] = emb.grad.clone()
    for n in ["lora_A", "lora_B", "gate.weight", "gate.bias", "emb"]:
        assert got[n].abs().sum() > 0, f"no gradient reached {n}"
    # the same computation written with plain autograd ops
    layer.zero_grad(); emb.grad = None; x.grad = None
    M = layer.task_mask().index_select(0, ctx.token_index)
    x2 = x.reshape(-1, 32)
    y = layer.base_layer(x2) + ((x2 @ layer.lora_A.t()) * M) @ layer.lora_B.t()
    (y.view(2, 9, 24) * gy).sum().backward()
    ref = {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}
    ref["x"], ref["emb"] = x.grad, emb.grad
    for n in got:
        torch.testing.assert_close(got[n], ref[n], atol=1e-5, rtol=1e-5, msg=n)


def test_gate_gradient_is_the_expert_mixture_derivative():
    """all_experts STE: dL/dp_k = <dL/dy, output of expert k> (summed over the task's tokens)."""
    layer, ctx = _layer(MoreConfig(max_rank=4, gate_init="random"))
    x = torch.randn(12, 32)
    tid = torch.full((12,), 2)
    set_tokens(ctx, tid)
    p = layer.probs()
    p.retain_grad()
    # recompute the forward from this p (same graph as task_mask)
    from pipeline.more.selector import nested_expert_mask, straight_through
    w = straight_through(p)
    M = (w @ nested_expert_mask(layer.expert_ranks, 4)) * layer.scale
    y = layer.base_layer(x) + ((x @ layer.lora_A.t()) * M[2]) @ layer.lora_B.t()
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    for k, r in enumerate(layer.expert_ranks):
        out_k = layer.scale * (x @ layer.lora_A[:r].t()) @ layer.lora_B[:, :r].t()
        assert abs(float(p.grad[2, k]) - float((gy * out_k).sum().detach())) < 1e-4
    assert p.grad[2].abs().sum() > 0


@pytest.mark.parametrize("kind", ["bf16", "nf4"])
def test_low_precision_bases(kind):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=False)
    if kind == "bf16":
        base = lin.to(torch.bfloat16).requires_grad_(False)
        W = base.weight.float()
        dt = torch.bfloat16
    else:
        import bitsandbytes as bnb
        base = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                 quant_storage=torch.bfloat16)
        base.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                        quant_storage=torch.bfloat16)
        base = base.to("cpu")  # quantizes to NF4
        assert base.weight.bnb_quantized
        from pipeline.more.layer import base_weight_fp32
        W = base_weight_fp32(base)
        dt = torch.bfloat16
    layer, ctx = _layer(MoreConfig(max_rank=4, gate_init="random"), base=base)
    x = torch.randn(2, 5, 64, dtype=dt, requires_grad=True)
    tid = _tasks((2, 5), seed=1)
    set_tokens(ctx, tid)
    y = layer(x)
    assert y.dtype == dt
    y.float().pow(2).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    ref = _naive_w(layer, W, x.detach().float(), tid)
    err = (y.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pooled", [False, True])
def test_nf4_base_on_cpu_takes_the_fused_path(dtype, pooled):
    """A MoRE layer over the buffered NF4 Linear multiplies by the dequantised weight in its own Function (the
    adapter's adds in place, forward and backward): forward bit-equal to the wrapped path over bitsandbytes' own
    Linear4bit, gradients equal up to the order of one addition."""
    import copy

    from pipeline.models import cpu_buffers
    from pipeline.models.nf4_matmul import pool_outputs, use_dequant_buffers
    from test_nf4_matmul import linear4bit

    cpu_buffers.release()
    wrapped, ctx = _layer(MoreConfig(max_rank=8, gate_init="random"), base=linear4bit(64, 96, dtype, bias=True))
    wrapped.to(dtype)
    set_tokens(ctx, _tasks((2, 4096), seed=2))
    fused = copy.deepcopy(wrapped)  # its own copy of the task context too
    use_dequant_buffers(fused)
    if pooled:
        pool_outputs(fused)
    x = torch.randn(2, 4096, 64).to(dtype)  # outputs of >= 1 MiB: the pool takes them
    gy = torch.randn(2, 4096, 96).to(dtype)
    out = {}
    for name, layer in (("wrapped", wrapped), ("fused", fused)):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        (y * gy).sum().backward()
        out[name] = {"y": y.detach(), "x": xi.grad, **{n: p.grad for n, p in layer.named_parameters() if p.requires_grad}}
        assert ("_FusedMoreLinearBackward" in _graph_nodes(y)) == (name == "fused")
    assert (cpu_buffers.held_bytes() > 0) == pooled
    assert torch.equal(out["fused"]["y"], out["wrapped"]["y"])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)
    for n in out["wrapped"]:
        assert out["wrapped"][n] is not None and out["wrapped"][n].abs().sum() > 0, n
        torch.testing.assert_close(out["fused"][n], out["wrapped"][n], **tol, msg=n)


def _naive_w(layer, W, x, tid):
    out = x.reshape(-1, x.shape[-1]) @ W.t()
    ranks = layer.chosen_ranks()
    t = tid.reshape(-1)
    for i in range(out.shape[0]):
        if t[i] >= 0:
            r = int(ranks[t[i]])
            out[i] += layer.scale * (layer.lora_B.float()[:, :r] @ (layer.lora_A.float()[:r] @ x.reshape(-1, x.shape[-1])[i]))
    return out.view(*x.shape[:-1], -1)


def test_dropout_only_in_training():
    layer, ctx = _layer(MoreConfig(max_rank=4, dropout=0.5, gate_init="random"))
    x = torch.randn(4, 32)
    set_tokens(ctx, torch.tensor([0, 1, 2, 3]))
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, _naive(layer, x, torch.tensor([0, 1, 2, 3])), atol=1e-5, rtol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), y_eval)


def _rank_task_data(seed=0, d=16, n=64):
    """Two tasks over the same frozen W: task 0's delta is rank 1, task 1's is rank 4 sharing that component."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    V = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    s = torch.tensor([3.0, 2.5, 2.0, 1.5])
    deltas = [U[:, :1] @ (s[:1, None] * V[:1]), U[:, :4] @ (s[:, None] * V[:4])]
    return deltas, g


def _train_selector(cfg, steps=400, lr=0.02, seed=0):
    d = 16
    deltas, g = _rank_task_data(seed, d)
    base = nn.Linear(d, d, bias=False).requires_grad_(False)
    layer, ctx = bare_layer(base, cfg, 2, seed=seed)
    start = layer.chosen_ranks().tolist()
    params = [layer.lora_A, layer.lora_B]
    sel = list(layer.gate.parameters()) + [ctx.selector.task_embedding]
    opt = torch.optim.Adam([dict(params=params, lr=lr),
                            dict(params=sel, lr=lr * cfg.selector_lr_multiplier)])
    history = []
    for step in range(steps):
        x = torch.randn(64, d, generator=g)
        tid = torch.randint(0, 2, (64,), generator=g)  # mixed-task batch
        target = base(x) + torch.stack([x @ deltas[0].t(), x @ deltas[1].t()])[tid, torch.arange(64)]
        set_tokens(ctx, tid)
        ctx.selector_detached = step < cfg.selector_warmup_steps
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(layer.chosen_ranks().tolist())
    return start, layer.chosen_ranks().tolist(), float(loss.detach()), history


def test_selector_learns_different_ranks_for_different_tasks():
    """Both tasks start on rank 4 (gate_init max_rank); task 0 only needs the first component, which task 1
    shares, so its gate must move it down while task 1 keeps >= 4 components. The reference's selection (fixed
    at the first forward) would keep [4, 4]. Selector warm-up: 150 steps without gate gradient."""
    cfg = MoreConfig(max_rank=4, alpha=4.0, gate_temperature=0.5, selector_lr_multiplier=1.0,
                     selector_warmup_steps=150)
    start, end, loss, hist = _train_selector(cfg)
    assert start == [4, 4]
    assert end[1] == 4 and end[0] < 4, (start, end, hist[::30])
    assert end[0] != end[1]
    assert loss < 0.01  # with the learnt ranks both tasks are fitted


def test_without_warmup_the_gates_saturate_at_max_rank():
    """Why the warm-up exists: from step 0 'more rank' helps every task while the adapter is underfit."""
    cfg = MoreConfig(max_rank=4, alpha=4.0, gate_temperature=0.5, selector_lr_multiplier=1.0,
                     selector_warmup_steps=0)
    start, end, loss, _ = _train_selector(cfg, steps=200)
    assert start == end == [4, 4]


@pytest.mark.parametrize("rank_scaling", ["none", "linear"])
def test_fixed_ranks_mask_follows_every_change_of_setting(rank_scaling):
    """Frozen selection and forced ranks build their constant mask once per setting (not per forward), and a new
    frozen map, a forced rank and its end each give the mask of what is set now."""
    layer, ctx = _layer(MoreConfig(max_rank=8, expert_ranks=[2, 4, 8], gate_init="random", rank_scaling=rank_scaling))
    cs = column_scale(8, rank_scaling) * layer.scale

    def expected(ranks):
        M = (torch.arange(8)[None, :] < torch.tensor(ranks)[:, None]).float() * cs
        return torch.cat([M, torch.zeros(1, 8)])

    layer.frozen_ranks = torch.tensor([2, 8, 4, 2])
    first = layer.task_mask()
    assert torch.equal(first, expected([2, 8, 4, 2])) and layer.task_mask() is first  # built once
    layer.frozen_ranks = torch.tensor([8, 8, 2, 4])  # what freeze_selection does with a new map
    assert torch.equal(layer.task_mask(), expected([8, 8, 2, 4]))
    ctx.forced_rank = 4
    assert torch.equal(layer.task_mask(), expected([4] * T))
    ctx.forced_rank = None
    assert torch.equal(layer.task_mask(), expected([8, 8, 2, 4]))
    layer.frozen_ranks = None  # unfrozen: the gates choose again, with gradient
    assert layer.task_mask().requires_grad
