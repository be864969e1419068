"""Where a base checkpoint's weights are (a local HF folder, or a hub id already in the HF cache), which safetensors
file holds each tensor, and a fingerprint of the weights.

Why a fingerprint: an adapter fits the exact weights it was trained against. A base of the same shape with other
weights (another fine-tune, another revision) loads, merges and evaluates without any error and gives wrong outputs;
the config-shape check cannot see it. The adapter records the fingerprint when it is saved; merge and evaluate
compare it before they read anything large.

The fingerprint is sha256 over every tensor's name, shape and first values (at least `SLICE_VALUES`, whole rows):
milliseconds for a 70B checkpoint through safetensors' mmap, and two different checkpoints differ in the first
values of nearly every tensor. Float tensors are hashed as cast to the dtype training loaded them in, so a 16-bit
copy of a 32-bit checkpoint matches when training ran in that 16-bit dtype (it saw exactly those values).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Dict, Optional

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SLICE_VALUES = 4096
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def checkpoint_files(model_dir) -> Dict[str, str]:
    """{tensor name: safetensors file name} of an HF folder (single file or sharded with an index)."""
    d = Path(model_dir)
    if (d / INDEX_FILE).is_file():
        return dict(json.loads((d / INDEX_FILE).read_text())["weight_map"])
    if (d / SINGLE_FILE).is_file():
        from safetensors import safe_open
        with safe_open(str(d / SINGLE_FILE), "pt") as f:
            return {k: SINGLE_FILE for k in f.keys()}
    bins = sorted(p.name for p in d.glob("*.bin"))
    hint = f" (found {bins[:2]}: convert the checkpoint to safetensors first)" if bins else ""
    raise FileNotFoundError(f"{d} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def local_model_dir(name) -> Optional[Path]:
    """The folder holding model `name` on this machine: itself if a folder, else its HF cache snapshot; None if
    neither (nothing is downloaded)."""
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(name), local_files_only=True))
    except Exception:
        return None


def _tensor_digest(f, name: str, cast: torch.dtype) -> bytes:
    part = f.get_slice(name)
    shape = list(part.get_shape())
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    head = part[: max(1, math.ceil(SLICE_VALUES / max(row, 1)))] if shape else f.get_tensor(name)
    if head.is_floating_point():
        head = head.to(cast)
    data = head.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(f"{name}|{shape}|{head.dtype}|".encode() + data).digest()


def weights_fingerprint(model_dir, dtype: str) -> Optional[str]:
    """sha256 hex of the checkpoint's tensors (names, shapes, first values; floats cast to `dtype`, the dtype training
    loaded them in); None when the folder has no safetensors checkpoint; ValueError naming a file it cannot read."""
    try:
        files = checkpoint_files(model_dir)
    except FileNotFoundError:
        return None
    except Exception as e:  # an unreadable index or single file
        raise ValueError(f"{model_dir}: cannot list the checkpoint's tensors ({e})") from None
    from safetensors import safe_open

    cast = _DTYPES[dtype]
    per_tensor: Dict[str, bytes] = {}
    for file in sorted(set(files.values())):
        path = Path(model_dir) / file
        try:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    if files.get(name) == file:
                        per_tensor[name] = _tensor_digest(f, name, cast)
        except Exception as e:  # a missing, truncated or corrupt shard (safetensors raises its own error type)
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    total = hashlib.sha256()
    for name in sorted(per_tensor):
        total.update(per_tensor[name])
    return total.hexdigest()
