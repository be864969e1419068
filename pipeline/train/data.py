"""The loop's view of the prep output: sampled, collated micro-batches per rank, and rank-sharded eval batches."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pipeline.config.base import ConfigError
from pipeline.config.train import TrainConfig
from pipeline.data.loader import PackedCollator, PackedDataset
from pipeline.data.sampler import TaskSampler
from pipeline.models.packed_attention import NAME as PACKED_ATTENTION


def check_data(cfg: TrainConfig) -> list[str]:
    """Fail before any process starts when the data does not match the config; returns task names by id."""
    manifest_path = Path(cfg.data.dir) / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"data.dir: {manifest_path} not found (run the prep stage: python -m data_prep)")
    manifest = json.loads(manifest_path.read_text())
    names = [n for n, _ in sorted(manifest["tasks"].items(), key=lambda kv: kv[1]["id"])]
    for field, values in (("data.tasks", cfg.data.tasks or []), ("data.task_caps", cfg.data.task_caps or {})):
        unknown = [t for t in values if t not in names]
        if unknown:
            raise ConfigError(f"{field}: task(s) {unknown} are not in {manifest_path} (tasks: {', '.join(names)})")
    if not (Path(cfg.data.dir) / "train").is_dir():
        raise ConfigError(f"data.dir: {cfg.data.dir} has no train/ split")
    _check_vocab(cfg, manifest)
    _check_window(cfg, manifest)
    return names


def _model_config_field(model_path: str, field: str):
    """`field` from a local model folder's config.json (or its `text_config`), with the section it came from; (None,
    None) for a hub id or a folder that does not say, where a check is skipped rather than guessed."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        return None, None
    try:
        data = json.loads(config.read_text())
    except (ValueError, OSError) as e:
        raise ConfigError(f"model.path: {config} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        return None, None
    for section in (data, data.get("text_config") or {}):
        if isinstance(section, dict) and section.get(field) is not None:
            return section[field], section
    return None, None


def model_vocab_size(model_path: str) -> int | None:
    vocab, _ = _model_config_field(model_path, "vocab_size")
    return vocab if isinstance(vocab, int) else None


def model_attention_window(model_path: str) -> int | None:
    """The sliding attention window of a local model (Mistral v0.1, Gemma 2/3's local layers; Qwen2 only with
    use_sliding_window), or None."""
    window, section = _model_config_field(model_path, "sliding_window")
    if not isinstance(window, int) or section.get("use_sliding_window") is False:
        return None
    return window


def data_max_token_id(data_dir: Path, manifest: dict) -> int:
    """The largest token id in the prepared data: the manifest's `max_token_id`, or (data prepared before the
    manifest recorded it) a scan of the memory-mapped `input_ids` of every split."""
    if "max_token_id" in manifest:
        return int(manifest["max_token_id"])
    import datasets
    import pyarrow.compute as pc

    best = -1
    for split in ("train", "eval"):
        if (data_dir / split).is_dir():
            col = datasets.load_from_disk(str(data_dir / split)).data.column("input_ids")
            top = pc.max(pc.list_flatten(col)).as_py()
            best = max(best, -1 if top is None else int(top))
    return best


def _check_vocab(cfg: TrainConfig, manifest: dict) -> None:
    """Token ids past the model's embedding table (data prepared with another tokenizer) fail deep inside the first
    forward (an index error on CPU, a device-side assert on CUDA), after every rank has loaded the model; this
    names the mismatch before any process group starts."""
    vocab = model_vocab_size(cfg.model.path)
    if vocab is None:
        return
    data_dir = Path(cfg.data.dir)
    max_id = data_max_token_id(data_dir, manifest)
    if max_id >= vocab:
        source = (manifest.get("tokenizer") or {}).get("source", "?")
        raise ConfigError(f"data.dir: {data_dir} holds token ids up to {max_id}, but model.path {cfg.model.path} has "
                          f"vocab_size {vocab} (ids 0..{vocab - 1}): the data was tokenized with another tokenizer "
                          f"({source}). Prepare the data with the model's tokenizer (prep `tokenizer.path`) or train "
                          f"a model with this data's vocabulary")


def sampling_spec(cfg: TrainConfig, manifest: dict) -> dict:
    """The task mix training draws: the prep config's `sampling` (the manifest's), with `data.temperature` and
    `data.task_caps` replacing its values where set, and the tasks outside `data.tasks` at weight 0."""
    prep = manifest.get("sampling") or {}
    spec = {"temperature": prep.get("temperature", 1.0), "caps": dict(prep.get("caps") or {}),
            "weights": dict(prep.get("weights") or {})}
    if cfg.data.temperature is not None:
        spec["temperature"] = cfg.data.temperature
    if cfg.data.task_caps is not None:
        spec["caps"] = dict(cfg.data.task_caps)
    if cfg.data.tasks is not None:
        spec["weights"] = {n: (spec["weights"].get(n, 1.0) if n in cfg.data.tasks else 0.0) for n in manifest["tasks"]}
    return spec


def _check_window(cfg: TrainConfig, manifest: dict) -> None:
    """The collator's dense block mask (attn_implementation sdpa / eager) is causal within each sample, with no
    sliding window: a model whose window is shorter than the rows would train with attention it never uses."""
    window = model_attention_window(cfg.model.path)
    rows = int(manifest.get("max_seq_len", 0))
    if window and rows > window and cfg.model.attn_implementation != PACKED_ATTENTION:
        raise ConfigError(f"model.attn_implementation: {cfg.model.attn_implementation} takes the collator's dense mask, "
                          f"which has no sliding window, but model.path {cfg.model.path} attends within a window of "
                          f"{window} tokens and the data's rows hold {rows}: use {PACKED_ATTENTION} (the default; it "
                          f"applies the window within each sample), or prepare rows of at most {window} tokens "
                          f"(prep max_seq_len)")


class TrainData:
    def __init__(self, cfg: TrainConfig, task_names: list[str], dist_info, dtype: torch.dtype):
        self.cfg, self.dist = cfg, dist_info
        self.train = PackedDataset(cfg.data.dir, "train")
        self.sampling = sampling_spec(cfg, self.train.manifest)
        self.sampler = TaskSampler.from_dataset(self.train, sampling=self.sampling, seed=cfg.seed,
                                                rank=dist_info.rank, world_size=dist_info.world_size)
        self._stream = iter(self.sampler)
        self.collate = PackedCollator(dtype=dtype, dense_mask=cfg.model.attn_implementation != PACKED_ATTENTION)
        eval_dir = Path(cfg.data.dir) / "eval"
        self.eval = PackedDataset(cfg.data.dir, "eval") if eval_dir.is_dir() else None

    def next_train_batch(self) -> dict[str, torch.Tensor]:
        return self.collate([self.train[next(self._stream)] for _ in range(self.cfg.optim.micro_batch_size)])

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._stream = iter(self.sampler)

    def eval_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's slice of the eval split. Every rank yields the same number of batches (ZeRO-3 forwards are
        collective); a rank that runs out repeats a row with its labels removed, which adds no loss."""
        if self.eval is None:
            return
        mb, rank, world = self.cfg.optim.micro_batch_size, self.dist.rank, self.dist.world_size
        rows = list(range(rank, len(self.eval), world))
        n_batches = -(-(-(-len(self.eval) // world)) // mb)
        if self.cfg.eval.max_batches and self.cfg.eval.max_batches < n_batches:
            # rows spread evenly over the split, not its first rows (packed per task, those are one task's)
            n_batches = self.cfg.eval.max_batches
            rows = [rows[i] for i in np.linspace(0, len(rows) - 1, n_batches * mb).round().astype(int)]
        for b in range(n_batches):
            chunk = [self.eval[i] for i in rows[b * mb:(b + 1) * mb]]
            while len(chunk) < mb:
                filler = dict(self.eval[0])
                filler["labels"] = torch.full_like(filler["labels"], -100)
                chunk.append(filler)
            yield self.collate(chunk)
