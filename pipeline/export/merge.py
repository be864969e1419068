"""THE per-task merge (behind launch/merge.py): W_t = W + scale * B[:, :r] diag(colscale[:r]) A[:r] for every adapted
layer at the task's chosen rank r, streamed from the base checkpoint tensor by tensor into merged safetensors
shards, never the whole model.

For every tensor of the base checkpoint (read one at a time with `safe_open`, reopened per tensor so no mmap of a
whole shard stays resident): round it to the precision the adapter was trained against, add the task's low-rank
delta in fp32 if the module is adapted, cast to the output dtype and hand it to a `ShardWriter`. The result is a
plain HF folder (config.json without any quantization_config, model.safetensors or shards + index, the base's
tokenizer files) that `AutoModelForCausalLM.from_pretrained` loads.

What "the precision the adapter was trained against" means (`target`):
- `trained` (default): as `load_base_model` loaded it for training: every float tensor cast to the recorded base
  dtype, and for an NF4 base each linear transformers quantizes goes through quantize_4bit -> dequantize_4bit with
  the loading parameters (nf4, blocksize 64, no double quant, quant_storage = recorded dtype). Bitwise the weight
  the adapter saw (tests/test_merge_cli.py checks it against a loaded NF4 model), so the merge reproduces the
  adapter model.
- `nf4`: the same NF4 round trip even if the base was not trained quantized.
- `original`: the stored 16/32-bit values; for an NF4-trained adapter this adds the quantization error
  W - dequant(NF4(W)), which the adapter never saw during training (its updates were fitted to the dequantized
  weights), so the merge report measures that merge against the adapter model as trained too.

Peak memory, independent of the model size: at most one buffered output shard (`max_shard_size`, default 2 GB;
flushed *before* the next tensor is computed if that tensor would not fit) + one tensor in fp32 with its
output-dtype copy (and, for NF4, its round-trip temporaries) + the adapter's own tensors (r * (in + out) per adapted
layer), on top of the libraries. Bound: ~ one output shard + 1.5-2x the largest tensor in fp32. Measured
(bench/merge.py, Llama d=1024, 8 layers, 673 MB fp32, largest tensor 131 MB fp32, 100 MB shards): ~0.2 GB above
the libraries, vs ~1.1 GB for a merge that loads the whole model first (the in-memory merge this replaced). For a
70B Llama (largest tensors: the 128256 x 8192 embedding / lm_head, 4.2 GB in fp32) with 2 GB shards that bound is
~10 GB, whatever the layer count.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Set, Tuple

import torch

from pipeline.atomic import atomic_write
from pipeline.export.shards import DEFAULT_MAX_SHARD, ShardWriter, parse_size, trim_heap
from pipeline.models.base_weights import checkpoint_files
from pipeline.more.io import read_adapter
from pipeline.more.selector import column_scale

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja"]


class AdapterDeltas:
    """The adapter's per-task low-rank deltas, read from the saved folder."""

    def __init__(self, adapter_dir):
        self.meta, self.rank_map, self.tensors = read_adapter(adapter_dir)
        cfg = self.meta["more_config"]
        self.scale = float(self.meta["scale"])
        self.max_rank = int(cfg["max_rank"])
        self.colscale = column_scale(self.max_rank, cfg["rank_scaling"])
        self.targets = list(self.meta["targets"])
        self.task_names = list(self.meta["task_names"])

    def rank(self, task: str, name: str) -> int:
        return int(self.rank_map[task][name])

    def factors(self, task: str, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B_r * colscale * scale (out x r), A_r (r x in)) in fp32: delta = B_r @ A_r."""
        if task not in self.rank_map:
            raise KeyError(f"task {task!r} not in adapter (tasks: {self.task_names})")
        r = self.rank(task, name)
        A = self.tensors[f"base_model.{name}.lora_A"].float()[:r]
        B = self.tensors[f"base_model.{name}.lora_B"].float()[:, :r] * (self.colscale[:r] * self.scale)
        return B, A

    def delta(self, task: str, name: str) -> torch.Tensor:
        B, A = self.factors(task, name)
        return B @ A


def write_config(config, out_dir, dtype: torch.dtype) -> None:
    """config.json of a plain (unquantized) model in `dtype`."""
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_pre_quantization_dtype", None)
    cfg["dtype"] = str(dtype).replace("torch.", "")
    atomic_write(Path(out_dir) / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str))


def copy_tokenizer(src, out_dir) -> List[str]:
    """Copy the tokenizer / generation files that exist in folder `src`; returns the names copied."""
    src = Path(src) if src else None
    if src is None or not src.is_dir():
        return []
    copied = [f for f in _TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copy(src / f, Path(out_dir) / f)
    return copied


def tied_copies(model) -> set:
    """State-dict keys save_pretrained drops because they are tied to another tensor (e.g. lm_head.weight)."""
    keys = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    if getattr(model.config, "tie_word_embeddings", False):
        keys.add("lm_head.weight")
    return keys


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
        tied = tied_copies(model)
        self.dropped = tied & set(self.files)
        self.targets = set(deltas.targets)
        # before the missing check: a tied copy (lm_head of a tied-embedding model) is usually not stored at all
        tied_adapted = sorted(t for t in self.targets if f"{t}.weight" in tied)
        if tied_adapted:
            raise ValueError(f"adapted layers {tied_adapted} are tied to another weight; merging would untie them "
                             f"(export the task with --format peft instead)")
        missing = sorted(t for t in self.targets if f"{t}.weight" not in self.files)
        if missing:
            raise ValueError(f"adapted layers have no weight in {self.base_dir}: {missing[:3]} (the checkpoint's "
                             f"names differ from the model's module names?)")

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

    def base(self, name: str) -> torch.Tensor:
        """The base tensor as the adapter saw it (target precision, NF4 round trip), before any delta."""
        t = self.read(name)
        if not t.is_floating_point():
            return t
        if self.source_dtype is not None:
            t = t.to(self.source_dtype)
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in self.quantized:
            t = nf4_roundtrip(t, self.source_dtype)
        return t

    def adapted(self, name: str) -> Optional[str]:
        """The adapted module whose weight `name` is, else None."""
        module, _, leaf = name.rpartition(".")
        return module if leaf == "weight" and module in self.targets else None

    def merged(self, name: str, deltas: AdapterDeltas, task: str, dtype: torch.dtype) -> torch.Tensor:
        t = self.base(name)
        if not t.is_floating_point():
            return t
        module = self.adapted(name)
        if module is not None:
            t = t.float()
            t += deltas.delta(task, module)
        return t.to(dtype).contiguous()


def stream_merge(base_dir, adapter_dir, task: str, out_dir, dtype: str = "bf16", target: str = "trained",
                 max_shard_size=DEFAULT_MAX_SHARD, deltas: Optional[AdapterDeltas] = None,
                 plan: Optional[BasePlan] = None, tokenizer_from=None) -> MergeStats:
    """Write the merged HF folder for `task` into `out_dir` (should be a fresh temp folder: launch/merge.py
    (export/run.py) checks it and renames it into place). Tokenizer files are copied from `tokenizer_from` (default:
    the base folder)."""
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
