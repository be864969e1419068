"""Per-task merge: W_t = W + scale * B[:, :r] diag(colscale[:r]) A[:r] for every adapted layer at the task's rank.

The base is loaded as it was trained (NF4 -> merged into dequant(NF4(W)), which reproduces the adapter model; or
`target="original"` to merge into the 16-bit W, adding W - dequant(NF4(W)) the adapter never saw, pitfalls.md).
Merging is done in fp32 and saved in the requested dtype as a plain HF folder (config.json without any
quantization_config + model.safetensors) that `AutoModelForCausalLM.from_pretrained` loads.

Streaming: `iter_merged_tensors` yields one module's tensors at a time from a loaded base and the adapter files
(no injected model), so a later sharded writer can stream layer by layer without holding a merged copy.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from pipeline.export.shards import DEFAULT_MAX_SHARD, ShardWriter, parse_size
from pipeline.more.io import read_adapter
from pipeline.more.layer import base_weight_fp32, is_linear4bit
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


def iter_merged_tensors(base_model: nn.Module, deltas: AdapterDeltas, task: str,
                        dtype: torch.dtype) -> Iterator[Tuple[str, torch.Tensor]]:
    """(state-dict name, tensor) of the merged model, module by module; NF4 linears come out dequantized."""
    targets = set(deltas.targets)
    seen = set()
    for mname, mod in base_model.named_modules():
        prefix = f"{mname}." if mname else ""
        if is_linear4bit(mod) or (mname in targets and isinstance(mod, nn.Linear)):
            W = base_weight_fp32(mod)
            if mname in targets:
                W = W + deltas.delta(task, mname)
            seen.add(mname)
            yield prefix + "weight", W.to(dtype).contiguous()
            if mod.bias is not None:
                yield prefix + "bias", mod.bias.detach().to(dtype).contiguous()
            continue
        if any(mname.startswith(s + ".") for s in seen):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            yield prefix + pname, p.detach().to(dtype if p.is_floating_point() else p.dtype).contiguous()
        for bname, b in mod.named_buffers(recurse=False):
            if bname not in mod._non_persistent_buffers_set:
                yield prefix + bname, b.detach().to(dtype if b.is_floating_point() else b.dtype).contiguous()
    missing = targets - seen
    if missing:
        raise ValueError(f"adapter targets not found in the base model: {sorted(missing)[:3]}")


def write_config(config, out_dir, dtype: torch.dtype) -> None:
    """config.json of a plain (unquantized) model in `dtype`."""
    cfg = config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_pre_quantization_dtype", None)
    cfg["dtype"] = str(dtype).replace("torch.", "")
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))


def copy_tokenizer(src, out_dir) -> List[str]:
    """Copy the tokenizer / generation files that exist in folder `src`; returns the names copied."""
    src = Path(src) if src else None
    if src is None or not src.is_dir():
        return []
    copied = [f for f in _TOKENIZER_FILES if (src / f).is_file()]
    for f in copied:
        shutil.copy(src / f, Path(out_dir) / f)
    return copied


def tied_copies(model: nn.Module) -> set:
    """State-dict keys save_pretrained drops because they are tied to another tensor (e.g. lm_head.weight)."""
    keys = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    if getattr(model.config, "tie_word_embeddings", False):
        keys.add("lm_head.weight")
    return keys


def write_hf_folder(base_model: nn.Module, tensors: Iterator[Tuple[str, torch.Tensor]], out_dir, dtype: torch.dtype,
                    copy_from: Optional[str] = None, max_shard_size=DEFAULT_MAX_SHARD) -> Path:
    """Write tensors as an HF folder (shards above `max_shard_size`); tied copies are left out, as save_pretrained
    does (by name: pointer identity is unreliable once flushed shards free their memory)."""
    out = Path(out_dir)
    writer = ShardWriter(out, parse_size(max_shard_size))
    drop = tied_copies(base_model)
    for name, t in tensors:
        if name not in drop:
            writer.add(name, t)
    writer.close()
    write_config(base_model.config, out, dtype)
    copy_tokenizer(copy_from, out)
    return out


def merge_task_into(base_model: nn.Module, adapter_dir, task: str, out_dir, dtype: str = "bf16",
                    copy_from: Optional[str] = None) -> Path:
    """Merge one task into an already loaded base (plain or NF4) and write the HF folder."""
    deltas = AdapterDeltas(adapter_dir)
    dt = DTYPES[dtype]
    with torch.no_grad():
        return write_hf_folder(base_model, iter_merged_tensors(base_model, deltas, task, dt), out_dir, dt, copy_from)


def merge_task(base_path: str, adapter_dir, task: str, out_dir, dtype: str = "bf16", target: str = "trained",
               base_dtype: Optional[str] = None) -> Path:
    """Load the base from `base_path` and merge `task`.

    target: `trained` = the base as the adapter was trained on it (NF4 -> dequantized NF4, per more_config.json);
    `nf4` / `original` force dequant(NF4(W)) / the stored 16-bit W.
    base_dtype: what the base is loaded in; default the dtype recorded at training (NF4: its compute/storage dtype,
    which fixes the dequantized values), fp32 for `original`.
    """
    from pipeline.models.loading import load_base_model

    meta = json.loads((Path(adapter_dir) / "more_config.json").read_text())
    quant = {"trained": "nf4" if meta["base_model"].get("quantized_nf4") else "none",
             "nf4": "nf4", "original": "none"}[target]
    if base_dtype is None:
        base_dtype = "fp32" if target == "original" else meta["base_model"].get("dtype", "fp32")
    base = load_base_model(base_path, quant, base_dtype)
    return merge_task_into(base, adapter_dir, task, out_dir, dtype, copy_from=base_path)


def merge_all(base_path: str, adapter_dir, out_root, tasks=None, **kw) -> Dict[str, Path]:
    """One merged folder per task under out_root/<task>."""
    names = tasks or json.loads((Path(adapter_dir) / "more_config.json").read_text())["task_names"]
    return {t: merge_task(base_path, adapter_dir, t, Path(out_root) / t, **kw) for t in names}
