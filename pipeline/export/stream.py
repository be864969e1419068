"""Streaming per-task merge: base checkpoint tensor by tensor -> merged safetensors shards, never the whole model.

For every tensor of the base checkpoint (read one at a time with `safe_open`, reopened per tensor so no mmap of a
whole shard stays resident): round it to the precision the adapter was trained against, add the task's low-rank
delta in fp32 if the module is adapted, cast to the output dtype and hand it to a `ShardWriter`.

What "the precision the adapter was trained against" means (`target`):
- `trained` (default): as `load_base_model` loaded it for training: every float tensor cast to the recorded base
  dtype, and for an NF4 base each linear transformers quantizes goes through quantize_4bit -> dequantize_4bit with
  the loading parameters (nf4, blocksize 64, no double quant, quant_storage = recorded dtype). Bitwise the weight
  the adapter saw (tests/test_merge_cli.py checks it against a loaded NF4 model), so the merge reproduces the
  adapter model.
- `nf4`: the same NF4 round trip even if the base was not trained quantized.
- `original`: the stored 16/32-bit values; for an NF4-trained adapter this adds W - dequant(NF4(W)), which the
  adapter never saw (docs/pitfalls.md), so the merge report measures it against the adapter model too.

Peak memory, independent of the model size: at most one buffered output shard (`max_shard_size`, default 2 GB;
flushed *before* the next tensor is computed if that tensor would not fit) + one tensor in fp32 with its
output-dtype copy (and, for NF4, its round-trip temporaries) + the adapter's own tensors (r * (in + out) per adapted
layer), on top of the libraries. Bound: ~ one output shard + 1.5-2x the largest tensor in fp32. Measured
(bench/merge.py, Llama d=1024, 8 layers, 673 MB fp32, largest tensor 131 MB fp32, 100 MB shards): ~0.2 GB above
the libraries, vs ~1.1 GB for the in-memory `merge_task`. For a 70B Llama (largest tensors: the 128256 x 8192
embedding / lm_head, 4.2 GB in fp32) with 2 GB shards that bound is ~10 GB, whatever the layer count.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Set

import torch

from pipeline.export.merge import DTYPES, AdapterDeltas, copy_tokenizer, tied_copies, write_config
from pipeline.export.shards import DEFAULT_MAX_SHARD, ShardWriter, checkpoint_files, parse_size, trim_heap

TARGETS = ("trained", "nf4", "original")
NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, what transformers' 4-bit loading uses


@dataclass
class MergeStats:
    task: str
    out_dir: Path
    files: List[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0


def nf4_roundtrip(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dequant(NF4(w)) in fp32, quantized exactly as transformers' bitsandbytes 4-bit loading does (w cast to
    the load dtype first; the quant storage and the dequantized values are in that dtype)."""
    import bitsandbytes as bnb

    q, state = bnb.functional.quantize_4bit(w.to(dtype).contiguous(), blocksize=NF4_BLOCKSIZE,
                                            compress_statistics=False, quant_type="nf4", quant_storage=dtype)
    return bnb.functional.dequantize_4bit(q, state).float()


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def quantized_linears(model) -> Set[str]:
    """Names of the linears that transformers' bitsandbytes 4-bit loading replaces (same skip rules: tied and
    output embeddings, the last module, `_keep_in_fp32_modules`)."""
    from torch import nn
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = list(get_keys_to_not_convert(model)) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return {n for n, m in model.named_modules() if type(m) is nn.Linear and should_convert_module(n, skip)}


_FLOAT_TYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_ITEMSIZE = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _shapes(base_dir: Path, files) -> dict:
    """{tensor name: (shape, safetensors dtype string)} from the checkpoint headers (no tensor data read)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(files):
        with safe_open(str(base_dir / f), "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


class BasePlan:
    """How each tensor of a base checkpoint becomes a merged tensor; reads only config and headers."""

    def __init__(self, base_dir, deltas: AdapterDeltas, target: str = "trained"):
        from transformers import AutoConfig

        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.base_dir = Path(base_dir)
        self.config = AutoConfig.from_pretrained(str(self.base_dir))
        if getattr(self.config, "quantization_config", None):
            raise ValueError(f"{self.base_dir} is a pre-quantized checkpoint; merge needs the 16/32-bit base it was "
                             f"quantized from")
        self.files = checkpoint_files(self.base_dir)
        self.shapes = _shapes(self.base_dir, set(self.files.values()))
        bm = deltas.meta["base_model"]
        trained_nf4 = bool(bm.get("quantized_nf4"))
        self.quantize = target == "nf4" or (target == "trained" and trained_nf4)
        # trained/nf4: the precision the base had while training; original: the stored values
        self.source_dtype: Optional[torch.dtype] = None if target == "original" else DTYPES[bm.get("dtype", "fp32")]
        model = _meta_model(self.config)
        self.quantized = quantized_linears(model) if self.quantize else set()
        self.dropped = tied_copies(model) & set(self.files)
        self.targets = set(deltas.targets)
        missing = sorted(t for t in self.targets if f"{t}.weight" not in self.files)
        if missing:
            raise ValueError(f"adapted layers have no weight in {self.base_dir}: {missing[:3]} (the checkpoint's "
                             f"names differ from the model's module names?)")
        tied_adapted = sorted(t for t in self.targets if f"{t}.weight" in self.dropped)
        if tied_adapted:
            raise ValueError(f"adapted layers {tied_adapted} are tied to another weight; merging would untie them")

    def names(self) -> List[str]:
        """Output tensor names, grouped by base file so each file is read front to back."""
        return [n for n in sorted(self.files, key=lambda k: (self.files[k], k)) if n not in self.dropped]

    def out_bytes(self, name: str, dtype: torch.dtype) -> int:
        """Size of the merged tensor in `dtype` (float tensors) or as stored, from the header alone."""
        shape, stored = self.shapes[name]
        size = dtype.itemsize if stored in _FLOAT_TYPES else _ITEMSIZE.get(stored, 8)
        return math.prod(shape) * size

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        # reopened per tensor, so no mapping of a whole base shard stays open during the merge
        with safe_open(str(self.base_dir / self.files[name]), "pt") as f:
            return f.get_tensor(name)

    def merged(self, name: str, deltas: AdapterDeltas, task: str, dtype: torch.dtype) -> torch.Tensor:
        t = self.read(name)
        if not t.is_floating_point():
            return t
        module, _, leaf = name.rpartition(".")
        if self.source_dtype is not None:
            t = t.to(self.source_dtype)
        if leaf == "weight" and module in self.quantized:
            t = nf4_roundtrip(t, self.source_dtype)
        if leaf == "weight" and module in self.targets:
            t = t.float()
            t += deltas.delta(task, module)
        return t.to(dtype).contiguous()


def stream_merge(base_dir, adapter_dir, task: str, out_dir, dtype: str = "bf16", target: str = "trained",
                 max_shard_size=DEFAULT_MAX_SHARD, deltas: Optional[AdapterDeltas] = None,
                 plan: Optional[BasePlan] = None, tokenizer_from=None) -> MergeStats:
    """Write the merged HF folder for `task` into `out_dir` (should be a fresh temp folder; the caller renames it
    into place). Tokenizer files are copied from `tokenizer_from` (default: the base folder)."""
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    deltas = deltas or AdapterDeltas(adapter_dir)
    plan = plan or BasePlan(base_dir, deltas, target)
    dt = DTYPES[dtype]
    if task not in deltas.rank_map:
        raise KeyError(f"task {task!r} not in the adapter (tasks: {deltas.task_names})")
    writer = ShardWriter(out_dir, parse_size(max_shard_size), metadata={"more_task": task, "more_target": target})
    stats = MergeStats(task, Path(out_dir))
    with torch.no_grad():
        for name in plan.names():
            writer.make_room(plan.out_bytes(name, dt))  # flush before computing, not after
            writer.add(name, plan.merged(name, deltas, task, dt))
            if name.rpartition(".")[0] in plan.quantized:
                trim_heap()  # bitsandbytes' round-trip temporaries: measured +15-90 MB creep between flushes
            stats.tensors += 1
    stats.files = writer.close()
    stats.bytes = writer.total_bytes
    write_config(plan.config, out_dir, dt)
    copy_tokenizer(tokenizer_from or base_dir, out_dir)
    stats.seconds = time.perf_counter() - t0
    return stats
