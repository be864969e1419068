"""The memory plan: a pure function of the model config and the run's shape, returning a `MemoryPlan`.

Per GPU under ZeRO-3 (W = nodes x GPUs): the frozen base is partitioned 1/W (NF4 packed bytes = numel/2, held in a
16-bit container), but bitsandbytes' quant constants (absmax per 64-block) live on the `quant_state`, not in the
parameter, so ZeRO does not partition them: every GPU holds all of them. Tensors smaller than the persistence
threshold (norms, most LoRA A matrices) stay whole on every GPU. With `replicate_frozen` the whole frozen base is
on every GPU and only the trainable tensors are gathered (pipeline/train/zero3_frozen.py). Trainable parameters cost
2 (bf16) + 2 (grad partition) + 12 (fp32 master, Adam m, v) + 4 (fp32 grad at the step) bytes, partitioned 1/W.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache

from .activations import ActivationEstimate, activation_bytes
from .adapter import AdapterCount, more_param_count, target_linears
from .model import ModelInventory, inventory, meta_model, resolve_config
from .zero import ZeroSettings
from pipeline.data.mask import LOSS_CHUNK  # the trainer's LM head: supervised positions, this many at a time

GiB = 1024 ** 3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PROCESS_HOST_GIB = 3.0  # python + torch + CUDA/NCCL host side, per rank
FRAGMENTATION = 0.05  # caching-allocator slack on top of everything else


@dataclass(frozen=True)
class PlanInputs:
    model: str
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0  # GiB of device memory per GPU
    quant: str = "nf4"  # nf4 | none
    seq_len: int = 4096
    micro_batch: int = 1
    offload: bool | None = None  # ZeRO-3 optimizer + parameter offload to CPU; None: as the DeepSpeed JSON says
    grad_ckpt: bool = True
    max_rank: int = 8
    targets: str = "all-linear"
    num_tasks: int = 8
    task_embedding: str = "shared"
    task_embedding_dim: int | None = 16
    num_experts: int | None = None
    attn_impl: str = "flash"  # flash (varlen, no mask) | sdpa (with the packed 4-D mask) | eager
    dtype: str = "bf16"
    adapter_dropout: float = 0.0
    attention_fp32: bool = False  # attention in fp32 copies of 16-bit activations (packed_sdpa on CPU via sdpa)
    double_quant: bool = False
    overhead_gb: float = 1.5  # CUDA context, cuBLAS workspace, NCCL buffers
    host_mem_gb: float | None = None  # host RAM per node, for the host verdict
    replicate_frozen: bool = False  # the frozen base whole on every GPU, only what trains sharded (train/zero3_frozen)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class MemLine:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    inputs: PlanInputs
    model: ModelInventory
    adapter: AdapterCount
    zero: ZeroSettings
    lines: tuple[MemLine, ...]  # per GPU; they sum to total_bytes
    activations: ActivationEstimate
    total_bytes: int
    gpu_bytes: int
    load_bytes: int  # one rank's full base copy at load (transformers skips zero.Init for quantized models)
    host_lines: tuple[MemLine, ...]
    host_bytes: int  # per node
    suggestion: str | None = None  # the smallest single change that fits (None when it fits already)
    alternatives: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    zero_source: str = "DeepSpeed defaults"  # where the ZeRO-3 settings came from

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_bytes

    @property
    def load_fits(self) -> bool:
        return self.load_bytes + self.inputs.overhead_gb * GiB <= self.gpu_bytes

    @property
    def host_fits(self) -> bool | None:
        h = self.inputs.host_mem_gb
        return None if h is None else self.host_bytes <= h * GiB

    @property
    def runs(self) -> bool:
        """Both the training step and the load (each rank's full base copy before ZeRO-3 partitions it) fit."""
        return self.fits and self.load_fits

    @property
    def verdict(self) -> str:
        return "FITS" if self.runs else "DOES NOT FIT"

    def line(self, key: str) -> int:
        return next(l.bytes for l in self.lines if l.key == key)


def nf4_bytes(numel: int, double_quant: bool = False) -> tuple[int, int]:
    """(packed weight bytes, quant-constant bytes) of one NF4 tensor, as bitsandbytes stores it."""
    packed = (numel + 1) // 2
    blocks = math.ceil(numel / 64)
    if double_quant:  # uint8 absmax + fp32 absmax per 256 blocks + fp32 offset + 256-entry fp32 code
        consts = blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4
    else:
        consts = 4 * blocks
    return packed, consts + 16 * 4  # + the 16-value NF4 code


@lru_cache(maxsize=16)
def _model_and_adapter(model: str, quant: str, max_rank: int, targets: str, num_tasks: int, task_embedding: str,
                       task_embedding_dim, num_experts):
    meta = meta_model(resolve_config(model))
    inv = inventory(meta, name=str(model), quant=quant)
    adapter = more_param_count(meta, max_rank, targets, num_tasks, task_embedding, task_embedding_dim, num_experts)
    adapted = tuple(sorted({n.rsplit(".", 1)[-1] for n, _ in target_linears(meta, targets)}))
    return inv, adapter, adapted


def _evaluate(inp: PlanInputs, inv: ModelInventory, adapter: AdapterCount, adapted: tuple[str, ...],
              ds_config) -> MemoryPlan:
    W = inp.world_size
    if W < 1:
        raise ValueError("nodes x gpus_per_node must be >= 1")
    if inp.quant not in ("nf4", "none"):
        raise ValueError(f"quant must be nf4 or none, got {inp.quant!r}")
    if inp.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {inp.dtype!r}")
    d = DTYPE_BYTES[inp.dtype]
    z = ZeroSettings.from_ds_config(ds_config, inv.hidden, offload=inp.offload)
    thr = z.param_persistence_threshold
    Wb = 1 if inp.replicate_frozen else W  # what the frozen base is divided by
    shard = "replicated" if inp.replicate_frozen else f"1/{W} shard"

    packed = consts = base16_shard = persistent = container_total = 0
    for p in inv.params:
        if p.quantized:
            pk, qc = nf4_bytes(p.numel, inp.double_quant)
            packed += pk
            consts += qc
            container_total += pk // d
        elif p.numel < thr:
            persistent += p.numel * d
        else:
            base16_shard += p.numel * d
            container_total += p.numel
    on_gpu = 0 if z.offload_param and not inp.replicate_frozen else 1  # a replicated base is not DeepSpeed's
    t_numels = adapter.tensor_numels
    t_total = sum(t_numels)
    t_persist = sum(n for n in t_numels if n < thr)
    opt_on_gpu = 0 if z.offload_optimizer else 1

    act = activation_bytes(batch=inp.micro_batch, seq=inp.seq_len, hidden=inv.hidden,
                           intermediate=inv.intermediate, heads=inv.heads, kv_heads=inv.kv_heads,
                           head_dim=inv.head_dim, vocab=inv.vocab, layers=inv.num_layers, act_bytes=d,
                           adapted=adapted, rank=inp.max_rank, attn_impl=inp.attn_impl,
                           dropout=inp.adapter_dropout, loss_positions=LOSS_CHUNK,
                           attention_fp32=inp.attention_fp32)
    gathered = (inv.largest_fetch_unit_numel + z.prefetch_bucket_size
                + min(z.max_reuse_distance, z.max_live_parameters, container_total)) * d
    gathered = min(gathered, (container_total + inv.largest_fetch_unit_numel) * d) if W > 1 else 0  # 1 rank: no gather
    if inp.replicate_frozen:  # only the trainable tensors are gathered, at most all of them at once
        gathered = (t_total - t_persist) * d if W > 1 else 0
    reduce_bucket = (z.reduce_bucket_size if z.contiguous_gradients else min(z.reduce_bucket_size, t_total)) * d
    scratch = inv.largest_linear_numel * d if inp.quant == "nf4" else 0
    wq = "NF4" if inp.quant == "nf4" else inp.dtype
    lines = [
        MemLine("base_packed", f"base weights ({wq}), {shard}", on_gpu * (packed if inp.quant == "nf4" else 0) // Wb,
                f"{inv.quantizable_numel / 1e9:.2f}B quantizable params" + (", offloaded to CPU" if not on_gpu else "")),
        MemLine("quant_consts", "NF4 quant constants (not sharded)", consts,
                "absmax fp32 per 64-block on every GPU" if not inp.double_quant else "double-quantized absmax"),
        MemLine("base_16bit", f"base 16-bit (embed, lm_head{', linears' if inp.quant == 'none' else ''}), {shard}",
                on_gpu * base16_shard // Wb, f"{(base16_shard // d) / 1e9:.2f}B params"),
        MemLine("persistent", "persistent small tensors (whole)", persistent + t_persist * d,
                f"< {thr:,} elements: norms, biases, small adapter tensors"),
        MemLine("adapter_params", f"adapter+gate+task-emb params, 1/{W}", (t_total - t_persist) * d // W,
                f"{adapter.total / 1e6:.1f}M trainable"),
        MemLine("adapter_grads", f"their grads ({inp.dtype} partition)", opt_on_gpu * t_total * d // W),
        MemLine("optimizer", "fp32 master + Adam m,v + fp32 grad", opt_on_gpu * t_total * 16 // W,
                "offloaded to CPU" if not opt_on_gpu else ""),
        MemLine("activations", f"activations ({'grad ckpt' if inp.grad_ckpt else 'no ckpt'})",
                act.ckpt if inp.grad_ckpt else act.no_ckpt,
                f"no ckpt {act.no_ckpt / GiB:.1f} GiB / ckpt {act.ckpt / GiB:.1f} GiB; logits+loss "
                f"{act.logits_peak / GiB:.2f} GiB"),
        MemLine("gathered", "ZeRO-3 gathered params", gathered,
                "the trainable tensors, all at once at most" if inp.replicate_frozen else
                f"largest fetch unit (a decoder layer or the embedding) "
                f"{inv.largest_fetch_unit_numel * d / GiB:.2f} GiB + prefetch bucket + reuse window"),
        MemLine("reduce_bucket", "ZeRO-3 reduce bucket", reduce_bucket, f"{z.reduce_bucket_size:,} elements"),
        MemLine("dequant", "NF4 dequantization scratch", scratch, "largest Linear in 16-bit"),
        MemLine("overhead", "CUDA context + NCCL", int(inp.overhead_gb * GiB)),
    ]
    subtotal = sum(l.bytes for l in lines)
    lines.append(MemLine("fragmentation", f"allocator slack ({FRAGMENTATION:.0%})", int(subtotal * FRAGMENTATION)))
    total = sum(l.bytes for l in lines)

    load = packed + consts + (inv.other_numel if inp.quant == "nf4" else inv.num_params) * d
    G = inp.gpus_per_node
    host = [MemLine("load_copy", f"full base copy per rank at load x {G}", load * G,
                    "worst case (loaded on CPU): transformers skips zero.Init for quantized models"),
            MemLine("process", f"process baseline x {G}", int(PROCESS_HOST_GIB * GiB) * G)]
    if z.offload_param and not inp.replicate_frozen:
        host.append(MemLine("offload_param", f"offloaded base shards x {G}", (packed + base16_shard) // W * G))
    if z.offload_optimizer:
        host.append(MemLine("offload_opt", f"offloaded optimizer x {G}", t_total * 18 // W * G))
    warnings = []
    if inp.quant == "nf4" and load + inp.overhead_gb * GiB > inp.gpu_mem_gb * GiB:
        warnings.append(f"the full NF4 copy ({load / GiB:.1f} GiB) is loaded on each GPU before ZeRO-3 partitions "
                        f"it and does not fit: load on CPU (device_map='cpu'), staggered across local ranks")
    if z.offload_param and inp.quant == "nf4":
        warnings.append("parameter offload of NF4 weights under ZeRO-3 is not verified in this project")
    return MemoryPlan(inp, inv, adapter, z, tuple(lines), act, total, int(inp.gpu_mem_gb * GiB), load, tuple(host),
                      sum(l.bytes for l in host), warnings=tuple(warnings))


def _candidates(inp: PlanInputs):
    """Single changes, cheapest first (label, new inputs)."""
    if not inp.grad_ckpt:
        yield "enable gradient checkpointing (--grad-ckpt)", replace(inp, grad_ckpt=True)
    if inp.attn_impl != "flash":
        yield "use flash attention (varlen, no S^2 mask)", replace(inp, attn_impl="flash")
    for mb in range(inp.micro_batch - 1, 0, -1):
        yield (f"micro batch {mb} (raise gradient accumulation x{inp.micro_batch / mb:g} to keep the global batch)",
               replace(inp, micro_batch=mb))
    for n in range(inp.nodes + 1, max(2 * inp.nodes, inp.nodes + 8) + 1):
        yield f"{n} nodes ({n * inp.gpus_per_node} GPUs)", replace(inp, nodes=n)
    if not inp.offload:
        yield "ZeRO-3 CPU offload of optimizer and parameters (--offload)", replace(inp, offload=True)


def _combination(inp: PlanInputs, fits) -> str | None:
    """Apply changes cumulatively, cheapest first, until the run fits; None if even all of them do not."""
    steps, cur = [], inp
    if not cur.grad_ckpt:
        cur = replace(cur, grad_ckpt=True); steps.append("grad ckpt")  # noqa: E702
    if not fits(cur) and cur.attn_impl != "flash":
        cur = replace(cur, attn_impl="flash"); steps.append("flash attention")  # noqa: E702
    if not fits(cur) and cur.micro_batch > 1:
        mb = next((m for m in range(cur.micro_batch - 1, 0, -1) if fits(replace(cur, micro_batch=m))), 1)
        cur = replace(cur, micro_batch=mb); steps.append(f"micro batch {mb}")  # noqa: E702
    for offload in ((False, True) if not cur.offload else (True,)):
        if fits(cur):
            break
        if offload and not cur.offload:
            cur = replace(cur, offload=True); steps.append("--offload")  # noqa: E702
        n = next((n for n in range(cur.nodes, 8 * cur.nodes + 65) if fits(replace(cur, nodes=n))), None)
        if n is not None and n != cur.nodes:
            cur = replace(cur, nodes=n); steps.append(f"{n} nodes ({n * cur.gpus_per_node} GPUs)")  # noqa: E702
    return "together: " + " + ".join(steps) if fits(cur) else None


def plan(model, *, ds_config: dict | str | None = None, suggest: bool = True, **kwargs) -> MemoryPlan:
    """Plan per-GPU and per-node memory for training `model` (HF folder, config.json, shipped name or a
    PretrainedConfig) with MoRE on a ZeRO-3 (optionally NF4) base. Keyword arguments are `PlanInputs` fields."""
    name = model if isinstance(model, str) else getattr(model, "_name_or_path", "") or "config"
    inp = PlanInputs(model=str(name), **kwargs)
    if isinstance(model, str):
        inv, adapter, adapted = _model_and_adapter(model, inp.quant, inp.max_rank, inp.targets, inp.num_tasks,
                                                   inp.task_embedding, inp.task_embedding_dim, inp.num_experts)
    else:
        meta = meta_model(resolve_config(model))
        inv = inventory(meta, name=inp.model, quant=inp.quant)
        adapter = more_param_count(meta, inp.max_rank, inp.targets, inp.num_tasks, inp.task_embedding,
                                   inp.task_embedding_dim, inp.num_experts)
        adapted = tuple(sorted({n.rsplit(".", 1)[-1] for n, _ in target_linears(meta, inp.targets)}))
    result = _evaluate(inp, inv, adapter, adapted, ds_config)
    if ds_config is not None:
        result = replace(result, zero_source=str(ds_config) if isinstance(ds_config, (str, os.PathLike)) else "dict")
    if result.runs or not suggest:
        return result
    fits = lambda cand: _evaluate(cand, inv, adapter, adapted, ds_config).runs  # noqa: E731
    fitting = [label for label, cand in _candidates(inp) if fits(cand)]
    if not fitting:
        combo = _combination(inp, fits)
        fitting = [combo] if combo else []
    suggestion = fitting[0] if fitting else "nothing tried fits: use a GPU with more memory or a shorter sequence"
    return replace(result, suggestion=suggestion, alternatives=tuple(fitting[1:]))
