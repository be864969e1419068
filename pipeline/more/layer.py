"""The MoRE linear: one LoRA pair (A: R x in, B: out x R) whose nested rank prefixes are the experts.

Per token the adapter adds  scale * ((x @ A.T) * M) @ B.T  where M (tokens x R) is the token's task row of
M_task = (w @ C) * colscale, w = straight-through one-hot over experts (selector.py), C = nested prefix mask.
Padding tokens (task id -1) index an all-zero row. One matmul pair for the whole mixed-task batch.

Two execution paths, same numbers:
- fused (frozen `torch.nn.Linear` base, or an NF4 base on CPU that dequantises into a reused buffer; not
  ZeRO-partitioned, or inside a ZeRO-3 leaf that gathers it): one autograd Function computes addmm(bias, x, W.T)
  and adds the adapter's up-projection into that output in place (`addmm_`); in backward the adapter's input
  gradient is added into gy @ W in place. No extra pass over activations for the adds.
- wrapped (bitsandbytes' own Linear4bit path, e.g. on GPU; ZeRO-3 weights only the base layer's hooks gather;
  trainable base): y = base_layer(x), then one autograd Function adds the adapter into y (in place unless y is a
  view).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import cpu_buffers
from pipeline.more.selector import Gate, column_scale, nested_expert_mask, straight_through


def _grad_M(gv: torch.Tensor, u: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    gM = gv * u
    if M.shape[0] != gM.shape[0]:
        gM = gM.sum(0, keepdim=True)
    return gM


class _FusedMoreLinear(torch.autograd.Function):
    """y = x W^T + b + ((xa A^T) * M) B^T with W, b frozen. x, xa: (N, in); M: (N, R) or (1, R), scale folded in.
    `dense`: None where W is the weight itself, else what makes it from W, in forward and again in backward (an NF4
    weight dequantised into a reused buffer, pipeline/models/nf4_matmul.py). `pooled`: y and x's gradient in blocks
    of the CPU buffer pool (pipeline/models/cpu_buffers.py)."""

    @staticmethod
    def forward(ctx, x, xa, W, bias, A, B, M, dense, pooled):
        u = xa @ A.t()
        v = u * M
        y = cpu_buffers.matmul(x, (dense(W) if dense else W).t(), bias, pooled)
        y.addmm_(v, B.t())
        ctx.save_for_backward(xa, A, B, M, u, v)
        ctx.W, ctx.dense, ctx.pooled = W, dense, pooled  # the parameter, not its data: ZeRO-3 may swap that
        ctx.same_input = xa is x
        return y

    @staticmethod
    def backward(ctx, gy):
        xa, A, B, M, u, v = ctx.saved_tensors
        need_x, need_xa, _, _, need_A, need_B, need_M, _, _ = ctx.needs_input_grad
        gv = gy @ B
        gu = gv * M
        gx = gxa = None
        if need_x:
            gx = cpu_buffers.matmul(gy, ctx.dense(ctx.W) if ctx.dense else ctx.W, None, ctx.pooled)
            if ctx.same_input:  # the adapter's input gradient lands in gy @ W in place
                gx.addmm_(gu, A)
        if need_xa and not ctx.same_input:
            gxa = gu @ A
        gA = gu.t() @ xa if need_A else None
        gB = gy.t() @ v if need_B else None
        gM = _grad_M(gv, u, M) if need_M else None
        return gx, gxa, None, None, gA, gB, gM, None, None


class _AdapterAdd(torch.autograd.Function):
    """y + ((xa A^T) * M) B^T, written into y in place when y (..., out), the base layer's output, is not a view.

    Writing through a view (nn.Linear's output for 3-D input with a bias is one) makes autograd copy the whole gradient
    back through CopySlices/AsStrided nodes in backward, which costs more than the copy the in-place add saves.
    """

    @staticmethod
    def forward(ctx, y, xa, A, B, M):
        xa2 = xa.reshape(-1, xa.shape[-1])
        u = xa2 @ A.t()
        v = u * M
        if y._is_view():
            out = torch.addmm(y.reshape(-1, y.shape[-1]), v, B.t()).view(y.shape)
        else:
            out = y
            y.view(-1, y.shape[-1]).addmm_(v, B.t())
            ctx.mark_dirty(y)
        ctx.save_for_backward(xa2, A, B, M, u, v)
        ctx.xa_shape = xa.shape
        return out

    @staticmethod
    def backward(ctx, gy):
        xa, A, B, M, u, v = ctx.saved_tensors
        _, need_xa, need_A, need_B, need_M = ctx.needs_input_grad
        gy2 = gy.reshape(-1, gy.shape[-1])
        gv = gy2 @ B
        gu = gv * M
        # not a view: autograd then adds the base layer's input gradient into this one in place
        gxa = torch.matmul(gu.view(*ctx.xa_shape[:-1], gu.shape[-1]), A) if need_xa else None
        gA = gu.t() @ xa if need_A else None
        gB = gy2.t() @ v if need_B else None
        gM = _grad_M(gv, u, M) if need_M else None
        return gy, gxa, gA, gB, gM


def is_linear4bit(module: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception:  # pragma: no cover - bitsandbytes is a requirement
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def base_weight_fp32(base_layer: nn.Module) -> torch.Tensor:
    """The weight the base layer really multiplies by, in fp32 (NF4 dequantized exactly as its forward does)."""
    if is_linear4bit(base_layer):
        import bitsandbytes as bnb
        w = base_layer.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return base_layer.weight.detach().float()


class MoreContext:
    """Per-forward state shared by every MoRE layer of one model (plain object, not a module).

    `token_index` (N,) long: the task row of each token (num_tasks for padding); or `fixed_task` (int) for every
    token (generation). `disabled`: run the base only. `forced_rank`: every task uses this rank (tests, routing).
    The layers read it again when reentrant checkpointing recomputes them in backward, so each backward must
    follow its own forward (the usual training loop).
    """

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.token_index: Optional[torch.Tensor] = None
        self.fixed_task: Optional[int] = None
        self.disabled = False
        self.forced_rank: Optional[int] = None
        self.selector_detached = False  # selector warm-up: hard choice without gradient to gates / embeddings
        self.selector = None  # MoreSelector in the shared layout


class MoreLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, config, num_tasks: int, context: MoreContext,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.max_rank = R = config.max_rank
        self.expert_ranks = list(config.ranks)
        self.rank_scaling = config.rank_scaling
        self.scale = config.scale
        self.ste = config.ste
        self.num_tasks = num_tasks
        # initialised on CPU from the CPU generator (a CUDA tensor takes only a CUDA generator), then moved to the
        # base's device: the same initial values wherever the base lives
        dev = base_layer.weight.device
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear / PEFT
        self.lora_A = nn.Parameter(torch.empty(R, self.in_features).uniform_(-bound, bound, generator=generator)
                                   .to(dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, R, device=dev))
        K = len(self.expert_ranks)
        if config.task_embedding == "per_layer":
            self.task_embedding = nn.Parameter(torch.empty(num_tasks, self.in_features)
                                               .normal_(0.0, 0.01, generator=generator).to(dev))
            self.gate = Gate(self.in_features, K, config.gate_temperature, config.gate_init, config.gate_init_margin,
                             generator=generator)
        else:
            self.task_embedding = None
            self.gate = Gate(config.task_embedding_dim, K, config.gate_temperature, config.gate_init,
                             config.gate_init_margin, generator=generator,
                             weight_std=0.02 if config.gate_init == "max_rank" else None)
        self.gate.to(dev)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.frozen_ranks: Optional[torch.Tensor] = None  # (T,) ranks when the selection is frozen
        object.__setattr__(self, "_ctx", context)
        self._consts = {}
        self._fixed_mask = None  # (device, forced rank, frozen ranks, mask): _fixed_task_mask's last result

    # ---------------------------------------------------------------- selection
    def _constants(self, device):
        if device not in self._consts:
            self._consts[device] = (nested_expert_mask(self.expert_ranks, self.max_rank, device),
                                    column_scale(self.max_rank, self.rank_scaling, device))
        return self._consts[device]

    def _embeddings(self) -> torch.Tensor:
        if self.task_embedding is not None:
            return self.task_embedding
        return self._ctx.selector.task_embedding

    def probs(self) -> torch.Tensor:
        """p (T x K) over experts for every task."""
        return self.gate.probs(self._embeddings())

    def chosen_ranks(self) -> torch.Tensor:
        """(T,) long: the rank each task uses now (frozen map if set, else argmax of the gate)."""
        if self.frozen_ranks is not None:
            return self.frozen_ranks.clone()
        with torch.no_grad():
            k = self.probs().argmax(-1).cpu()
        return torch.tensor(self.expert_ranks)[k]

    def task_mask(self) -> torch.Tensor:
        """(T+1) x R float32: per-task rank mask x straight-through weight x column scale x scale; last row 0."""
        device = self.lora_A.device
        ctx = self._ctx
        if ctx.forced_rank is not None or self.frozen_ranks is not None:
            return self._fixed_task_mask(device)
        C, cs = self._constants(device)
        p = self.probs()
        w = straight_through(p.detach() if ctx.selector_detached else p, self.ste)
        M = (w @ C) * (cs * self.scale)
        return torch.cat([M, M.new_zeros(1, self.max_rank)], 0)

    def _fixed_task_mask(self, device) -> torch.Tensor:
        """task_mask() for fixed ranks (a forced rank, or the frozen selection of evaluation and generation): a
        constant, built on the CPU and copied to `device` once per setting, not in every forward (on a GPU that copy
        would wait for the device in each of the model's MoRE layers)."""
        forced = self._ctx.forced_rank
        hit = self._fixed_mask
        if hit is None or hit[0] != device or hit[1] != forced or hit[2] is not self.frozen_ranks:
            ranks = [int(forced)] * self.num_tasks if forced is not None else self.frozen_ranks.tolist()
            M = nested_expert_mask(ranks, self.max_rank) * column_scale(self.max_rank, self.rank_scaling) * self.scale
            mask = torch.cat([M, M.new_zeros(1, self.max_rank)], 0).to(device)
            self._fixed_mask = hit = (device, forced, self.frozen_ranks, mask)
        return hit[3]

    # ---------------------------------------------------------------- forward
    def _fused_base(self, x2: torch.Tensor):
        """(dense, pooled) for _FusedMoreLinear where it can multiply by the frozen base weight itself, else None.
        Not for a ZeRO-3 parameter that only the base layer's own hooks gather; one inside a ZeRO-3 leaf (a decoder
        layer, pipeline/train/zero3_units.py) is gathered by the leaf for forward and again for backward."""
        b = self.base_layer
        w = b.weight
        if w.requires_grad or (b.bias is not None and b.bias.requires_grad):
            return None
        if hasattr(w, "ds_id") and not hasattr(w, "ds_z3_leaf_module"):
            return None
        if type(b) is nn.Linear:
            return (None, False) if w.dtype == x2.dtype else None
        dequantizer_for = getattr(b, "dequantizer_for", None)  # NF4 on CPU: pipeline/models/nf4_matmul.py
        dense = dequantizer_for(x2) if dequantizer_for is not None else None
        return (dense, b.pooled_outputs) if dense is not None else None

    def forward(self, x: torch.Tensor, *, task_similarity: bool = False) -> torch.Tensor:
        if task_similarity:  # per_layer contrastive / routing: cos(x, own task embeddings), x (S, in)
            return F.normalize(x.float(), dim=-1) @ F.normalize(self.task_embedding.float(), dim=-1).t()
        ctx = self._ctx
        if ctx.disabled:
            return self.base_layer(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        Mt = self.task_mask()
        if ctx.fixed_task is not None:
            M = Mt[int(ctx.fixed_task)].unsqueeze(0)
        elif ctx.token_index is not None:
            if ctx.token_index.numel() != x2.shape[0]:
                raise RuntimeError(f"MoRE layer got {x2.shape[0]} tokens but task ids for {ctx.token_index.numel()}")
            M = Mt.index_select(0, ctx.token_index.to(Mt.device))
        else:
            raise RuntimeError("MoRE layer called without task ids: call MoreCausalLM.forward(task_ids=...), "
                               "use model.task_context(t), or model.disable_adapters()")
        dropout = self.dropout is not None and self.training
        fused = self._fused_base(x2)
        if fused is not None:
            dt = x2.dtype
            b = self.base_layer
            xa = self.dropout(x2) if dropout else x2
            y = _FusedMoreLinear.apply(x2, xa, b.weight, b.bias, self.lora_A.to(dt), self.lora_B.to(dt), M.to(dt),
                                       *fused)
            return y.view(*shape[:-1], self.out_features)
        y = self.base_layer(x)
        dt = y.dtype
        xa = self.dropout(x) if dropout else x
        return _AdapterAdd.apply(y, xa.to(dt), self.lora_A.to(dt), self.lora_B.to(dt), M.to(dt))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, max_rank={self.max_rank}, "
                f"experts={self.expert_ranks}, scaling={self.rank_scaling}")
