"""The loop's view of the prep output: sampled, collated micro-batches per rank, and rank-sharded eval batches."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from pipeline.config.base import ConfigError
from pipeline.config.train import TrainConfig
from pipeline.data.loader import PackedCollator, PackedDataset
from pipeline.data.sampler import TaskSampler


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
    return names


class TrainData:
    def __init__(self, cfg: TrainConfig, task_names: list[str], dist_info, dtype: torch.dtype):
        self.cfg, self.dist = cfg, dist_info
        self.train = PackedDataset(cfg.data.dir, "train")
        weights = None
        if cfg.data.tasks is not None:
            weights = {n: (1.0 if n in cfg.data.tasks else 0.0) for n in task_names}
        self.sampler = TaskSampler.from_dataset(
            self.train, sampling={"temperature": cfg.data.temperature, "caps": cfg.data.task_caps, "weights": weights},
            seed=cfg.seed, rank=dist_info.rank, world_size=dist_info.world_size)
        self._stream = iter(self.sampler)
        self.collate = PackedCollator(dtype=dtype)
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
        if self.cfg.eval.max_batches:
            n_batches = min(n_batches, self.cfg.eval.max_batches)
        for b in range(n_batches):
            chunk = [self.eval[i] for i in rows[b * mb:(b + 1) * mb]]
            while len(chunk) < mb:
                filler = dict(self.eval[0])
                filler["labels"] = torch.full_like(filler["labels"], -100)
                chunk.append(filler)
            yield self.collate(chunk)
