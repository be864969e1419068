"""Build the small default base and pretrain it on prompt tokens only (see pipeline/config/base_model.py)."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.config.base_model import BaseModelConfig
from pipeline.data.loader import PackedCollator, PackedDataset
from pipeline.data.sampler import TaskSampler
from pipeline.models.tiny import tiny_llama_config

STAMP = "base_stage.json"


def _prompt_only(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token targets on prompt tokens only, never across packed samples."""
    labels = batch["input_ids"].masked_fill(~batch["prompt_mask"], -100)
    targets = labels[:, 1:].clone()
    targets[batch["position_ids"][:, 1:] == 0] = -100
    return targets


def build_base(cfg: BaseModelConfig, force: bool = False) -> Path:
    """Write the base to `cfg.output_dir` (atomically); reuse it when it was built from the same config."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = Path(cfg.output_dir)
    stamp = {"config_hash": cfg.config_hash(),
             "data": json.loads((Path(cfg.data_dir) / "manifest.json").read_text())["cache_key"]}
    if not force and (out / STAMP).is_file() and json.loads((out / STAMP).read_text()) == stamp:
        print(f"base model up to date: {out}")
        return out
    data = PackedDataset(cfg.data_dir, "train")
    tok = AutoTokenizer.from_pretrained(data.tokenizer_path)
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(tiny_llama_config(
        len(tok), hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size))
    if cfg.pretrain_steps:
        _pretrain(model, data, cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pretrain(model, data: PackedDataset, cfg: BaseModelConfig) -> None:
    sampler = iter(TaskSampler.from_dataset(data, seed=cfg.seed))
    collate = PackedCollator(dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.pretrain_steps)))))
    model.train()
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain base (prompts only)", unit="step")
    for _ in bar:
        batch = collate([data[next(sampler)] for _ in range(cfg.batch_size)])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), _prompt_only(batch).flatten(),
                                                 ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
