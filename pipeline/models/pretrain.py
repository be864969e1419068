"""Build the small default base and pretrain it as a plain language model on a skills corpus or on unpaired
prompts and responses (why: pipeline/config/base_model.py)."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline.atomic import replace_dir, temp_dir_for
from pipeline.config import ConfigError
from pipeline.config.base_model import BaseModelConfig
from pipeline.data.loader import PackedDataset, split_samples
from pipeline.models.tiny import tiny_llama_config

STAMP = "base_stage.json"


def unpaired_texts(data: PackedDataset) -> list[torch.Tensor]:
    """Every training sample's prompt and its response as two separate texts: never one after the other."""
    texts = []
    for row in range(len(data)):
        for sample in split_samples(data[row]):
            ids, pm = sample["input_ids"], sample["prompt_mask"]
            texts.append(ids[pm])
            texts.append(torch.cat([ids[:1], ids[~pm]]))  # the sample's first token (BOS) + the response
    return texts


def skill_corpus(tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """BOS + tokens + EOS: each skill text is a whole document, like a pretraining sample."""
    bos, eos = [tokenizer.bos_token_id], [tokenizer.eos_token_id]
    return [torch.tensor(bos + ids + eos) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _skill_texts_for(cfg: BaseModelConfig, manifest: dict) -> list[str]:
    """The skills corpus, refused for data that is not the built-in tasks (it would teach unrelated skills)."""
    from pipeline.data.builtin import GENERATORS, skill_texts

    if set(manifest["tasks"]) != set(GENERATORS):
        raise ConfigError(f"{cfg.data_dir}: corpus=skills is the built-in tasks' corpus ({', '.join(GENERATORS)}), "
                          f"but this data has tasks {sorted(manifest['tasks'])}: use corpus=unpaired")
    return skill_texts(cfg.skill_examples_per_task, cfg.seed)


def build_base(cfg: BaseModelConfig, force: bool = False) -> Path:
    """Write the base to `cfg.output_dir` (atomically); reuse it when it was built from the same config."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = Path(cfg.output_dir)
    manifest = json.loads((Path(cfg.data_dir) / "manifest.json").read_text())
    skills = _skill_texts_for(cfg, manifest) if cfg.corpus == "skills" else None
    stamp = {"config_hash": cfg.config_hash(), "data": manifest["cache_key"],  # + the corpus, which code defines
             "corpus": hashlib.sha256("\n".join(skills).encode()).hexdigest() if skills else cfg.corpus}
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
        texts = skill_corpus(tok, skills) if skills else unpaired_texts(data)
        _pretrain(model, texts, cfg)
    tmp = temp_dir_for(out)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pretrain(model, samples: list[torch.Tensor], cfg: BaseModelConfig) -> None:
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.pretrain_steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.pretrain_steps)))))
    model.train()
    bar = tqdm(range(cfg.pretrain_steps), desc=f"pretrain base ({cfg.corpus})", unit="step")
    for _ in bar:
        batch = [samples[i] for i in torch.randint(len(samples), (cfg.batch_size,), generator=g).tolist()]
        ids = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=0)
        lengths = torch.tensor([len(b) for b in batch])
        valid = torch.arange(ids.shape[1])[None] < lengths[:, None]
        logits = model(input_ids=ids, attention_mask=valid.long()).logits
        targets = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
