"""Save / load a MoRE adapter: adapter_model.safetensors + more_config.json + rank_map.json.

Under ZeRO-3 every rank must call `save_adapter` (parameters are gathered collectively, a layer at a time); rank 0
writes and then re-reads the file and checks tensor count, shapes and non-zero norms, because a save of ungathered
partitions silently writes empty tensors (trl#4416, DeepSpeed#7900). The folder is written under a temporary name
and renamed into place only after that check, so `out_dir` always holds a whole adapter (the old or the new one).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.atomic import replace_dir, temp_dir_for
from pipeline.config.more import MoreConfig
from pipeline.models.base_weights import local_model_dir, weights_fingerprint
from pipeline.more.model import MoreCausalLM, gathered, rank_map

FORMAT_VERSION = 1
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "more_config.json"
RANK_MAP_FILE = "rank_map.json"


def missing_files(adapter_dir) -> list[str]:
    """The files of a saved adapter that `adapter_dir` lacks (all of them: it is no adapter folder)."""
    return [f for f in (CONFIG_FILE, RANK_MAP_FILE, ADAPTER_FILE) if not (Path(adapter_dir) / f).is_file()]


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


_DT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def base_dtype(model: MoreCausalLM) -> str:
    """The dtype the adapted base layers were loaded in (NF4: the dtype their dequantized weights come out in)."""
    layer = next(iter(model.layers.values()))
    w = layer.base_layer.weight
    qs = getattr(w, "quant_state", None)
    return _DT_NAMES.get(qs.dtype if qs is not None else w.dtype, "fp32")


def base_weights_sha256(model: MoreCausalLM) -> Optional[str]:
    """The weights fingerprint of the base checkpoint `model` was loaded from (pipeline/models/base_weights.py), read
    from its files at the first call and kept: the trainer calls this right after loading, so the adapter and the
    checkpoints record the weights that trained, even if the base folder is rewritten later. None where the base is
    not a local safetensors checkpoint, or its files cannot be read (with a warning)."""
    if not hasattr(model, "_base_weights_sha256"):
        folder = local_model_dir(model.base_model_id)
        try:
            model._base_weights_sha256 = weights_fingerprint(folder, base_dtype(model)) if folder else None
        except ValueError as e:  # the files changed since they loaded
            print(f"warning: no base weights fingerprint recorded: {e}", file=sys.stderr, flush=True)
            model._base_weights_sha256 = None
    return model._base_weights_sha256


def base_identity(model: MoreCausalLM) -> Dict:
    cfg = model.hf_config
    return dict(id=model.base_model_id, dtype=base_dtype(model), model_type=getattr(cfg, "model_type", None),
                hidden_size=getattr(cfg, "hidden_size", None), num_hidden_layers=getattr(cfg, "num_hidden_layers", None),
                vocab_size=getattr(cfg, "vocab_size", None), quantized_nf4=model.quantized_base,
                weights_sha256=base_weights_sha256(model))


def base_mismatch(saved: Dict, config) -> Dict:
    """{field: (saved, given)} where an HF `config` differs from the base an adapter recorded (its shape)."""
    fields = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    return {k: (saved.get(k), getattr(config, k, None)) for k in fields if saved.get(k) != getattr(config, k, None)}


def base_weights_mismatch(saved: Dict, base_dir) -> Optional[str]:
    """Why the checkpoint in `base_dir` is not the one whose weights the adapter recorded (`saved`: its base_model
    entry), or None: the same weights, or nothing to compare (an adapter saved without a fingerprint, or a base
    without safetensors files)."""
    want = saved.get("weights_sha256")
    got = weights_fingerprint(base_dir, saved.get("dtype") or "fp32") if want else None
    if got is None or got == want:
        return None
    return (f"its weights are not the ones the adapter was trained on (weights fingerprint {got[:12]}..., "
            f"recorded at training {want[:12]}...)")


def base_problem(adapter_dir, saved: Dict, base_dir, check_weights: bool = True) -> Optional[str]:
    """Why the model folder `base_dir` is not the base the adapter in `adapter_dir` was trained on (`saved`: the
    base_model entry of its more_config.json): another shape, or (`check_weights`) other weights; None if it is.
    Reads only the base's config.json and the first rows of its tensors; ValueError names what cannot be read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(base_dir))
    except (OSError, ValueError) as e:
        raise ValueError(f"{base_dir} is not a model folder ({e})") from None
    shape = base_mismatch(saved, config)
    if shape:
        return (f"adapter {adapter_dir} was trained on a base of another shape than {base_dir}: {shape} (trained on, "
                f"given)")
    why = base_weights_mismatch(saved, base_dir) if check_weights else None
    if why:
        return (f"base {base_dir}: {why}, in {Path(adapter_dir) / CONFIG_FILE}. Pass the base it was trained on, or "
                f"--allow-other-base-weights to use this one anyway")
    return None


def _full_shape(p) -> tuple:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def save_adapter(model, out_dir, dtype: Optional[torch.dtype] = None) -> Path:
    """Write the adapter; `dtype` None keeps each parameter's dtype (16-bit under DeepSpeed bf16)."""
    model = getattr(model, "module", model)
    out = Path(out_dir)
    if _rank() == 0 and out.is_dir() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise ValueError(f"{out} exists and is not an adapter folder (no {CONFIG_FILE}); refusing to replace it")
    rmap = rank_map(model)  # collective under ZeRO-3
    named = list(model.trainable_named_parameters())
    tensors, expected = {}, {}
    # gather one MoRE layer (or the selector) at a time to bound memory
    groups: Dict[str, list] = {}
    for n, p in named:
        groups.setdefault(n.rsplit(".", 2)[0] if ".gate." in n else n.rsplit(".", 1)[0], []).append((n, p))
    for _, items in groups.items():
        with gathered([p for _, p in items]):
            if _rank() == 0:
                for n, p in items:
                    t = p.detach().to("cpu", dtype=dtype or p.dtype).clone().contiguous()
                    tensors[n] = t
                    expected[n] = _full_shape(p)
    if _rank() == 0:
        tmp = temp_dir_for(out)
        try:
            save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt", "more_format": str(FORMAT_VERSION)})
            meta = dict(format_version=FORMAT_VERSION, task_names=model.task_names, expert_ranks=model.config.ranks,
                        targets=list(model.layers.keys()), scale=model.config.scale,
                        base_model=base_identity(model), more_config=model.config.model_dump(mode="json"))
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            (tmp / RANK_MAP_FILE).write_text(json.dumps(rmap, indent=2))
            check_saved(tmp, expected)
            replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    return out


def check_saved(adapter_dir, expected_shapes: Dict[str, tuple]) -> None:
    """Raise if the file lacks tensors, has wrong/empty shapes, or all-zero A matrices / task embeddings."""
    path = Path(adapter_dir) / ADAPTER_FILE
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        if keys != set(expected_shapes):
            raise RuntimeError(f"{path}: {len(keys)} tensors saved, expected {len(expected_shapes)} "
                               f"(missing {sorted(set(expected_shapes) - keys)[:3]}...)")
        for k in keys:
            t = f.get_tensor(k)
            if tuple(t.shape) != tuple(expected_shapes[k]) or t.numel() == 0:
                raise RuntimeError(f"{path}: {k} has shape {tuple(t.shape)}, expected {expected_shapes[k]}")
            if (k.endswith("lora_A") or k.endswith("task_embedding")) and float(t.float().norm()) == 0.0:
                raise RuntimeError(f"{path}: {k} is all zeros (ungathered ZeRO-3 partition?)")


def read_adapter(adapter_dir):
    """(meta dict, rank_map dict, {name: tensor}) from an adapter folder, no model needed."""
    d = Path(adapter_dir)
    meta = json.loads((d / CONFIG_FILE).read_text())
    rmap = json.loads((d / RANK_MAP_FILE).read_text())
    from safetensors.torch import load_file
    return meta, rmap, load_file(str(d / ADAPTER_FILE))


def load_adapter(base_model, adapter_dir, freeze_selection: bool = False, check_base: bool = True) -> MoreCausalLM:
    """Inject a saved adapter into a fresh `base_model` and load its weights (exact).

    `freeze_selection`: fix each layer's per-task rank to the saved rank_map.json (eval/export); otherwise the
    gates choose, which gives the same ranks unless the gate is trained further.
    """
    meta, rmap, tensors = read_adapter(adapter_dir)
    cfg = MoreConfig(**meta["more_config"])
    model = MoreCausalLM(base_model, cfg, meta["task_names"], base_model_id=meta["base_model"].get("id"))
    if check_base:
        bad = base_mismatch(meta["base_model"], model.hf_config)
        if bad:
            raise ValueError(f"adapter {adapter_dir} was trained on a different base: {bad} (saved, given)")
    params = dict(model.trainable_named_parameters())
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise ValueError(f"adapter {adapter_dir} does not fit: missing {missing[:3]}, unexpected {extra[:3]}")
    with gathered(list(params.values()), modifier_rank=0):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[n].to(p.dtype))
    if freeze_selection:
        model.freeze_selection(rmap)
    return model
