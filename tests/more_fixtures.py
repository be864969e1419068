"""Shared helpers for the MoRE / export tests: tiny Llamas, packed mixed-task batches, a bare MoRE layer."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config.more import MoreConfig
from pipeline.models.tiny import build_tiny_llama, tiny_llama_config
from pipeline.more.layer import MoreContext, MoreLinear
from pipeline.more.selector import MoreSelector

VOCAB = 128
TASKS = ["alpha", "beta", "gamma"]


def tiny_llama(seed: int = 0, **shape):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_llama_config(VOCAB, **shape)
    cfg._attn_implementation = "sdpa"
    m = LlamaForCausalLM(cfg)
    return m.eval()


def save_tiny_llama(out_dir, seed: int = 0):
    return build_tiny_llama(out_dir, VOCAB, seed=seed)


def additive_mask(segment_ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, L, L) block-diagonal causal additive mask; padding rows attend to themselves only."""
    B, L = segment_ids.shape
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    allowed = same & causal & (segment_ids[:, :, None] >= 0)
    allowed = allowed | torch.eye(L, dtype=torch.bool)
    m = torch.zeros(B, 1, L, L, dtype=dtype)
    m.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return m


def packed_batch(samples, rows: int, length: int, dtype=torch.float32):
    """samples: list of (row, task, prompt_len, total_len, token_fn or None); returns the training batch dict."""
    ids = torch.zeros(rows, length, dtype=torch.long)
    task = torch.full((rows, length), -1, dtype=torch.long)
    seg = torch.full((rows, length), -1, dtype=torch.long)
    pos = torch.zeros(rows, length, dtype=torch.long)
    pm = torch.zeros(rows, length, dtype=torch.bool)
    labels = torch.full((rows, length), -100, dtype=torch.long)
    fill = [0] * rows
    g = torch.Generator().manual_seed(1234)
    for s, (r, t, plen, n, tok) in enumerate(samples):
        a = fill[r]
        toks = tok(n) if tok is not None else torch.randint(3, VOCAB, (n,), generator=g)
        ids[r, a:a + n] = toks
        task[r, a:a + n] = t
        seg[r, a:a + n] = s
        pos[r, a:a + n] = torch.arange(n)
        pm[r, a:a + plen] = True
        labels[r, a + plen:a + n] = toks[plen:]
        fill[r] = a + n
        assert fill[r] <= length
    return dict(input_ids=ids, labels=labels, position_ids=pos, task_ids=task, segment_ids=seg, prompt_mask=pm,
                attention_mask=additive_mask(seg, dtype))


def mixed_batch():
    """2 rows, 3 tasks mixed within rows, padding at the end of row 1."""
    return packed_batch([(0, 0, 3, 7, None), (0, 1, 4, 9, None), (1, 2, 2, 6, None), (1, 0, 3, 8, None)],
                        rows=2, length=16)


def bare_layer(base: nn.Module, config: MoreConfig, num_tasks: int, seed: int = 0):
    """A MoRE layer outside any model, with its context (and shared selector)."""
    ctx = MoreContext(num_tasks)
    g = torch.Generator().manual_seed(seed)
    ctx.selector = MoreSelector(num_tasks, config.task_embedding_dim, base.in_features,
                                config.task_embedding == "shared", generator=g)
    layer = MoreLinear(base, config, num_tasks, ctx, generator=g)
    return layer, ctx


def set_tokens(ctx, task_ids: torch.Tensor):
    t = task_ids.reshape(-1)
    ctx.fixed_task = None
    ctx.token_index = torch.where(t < 0, torch.full_like(t, ctx.num_tasks), t)
