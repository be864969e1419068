"""Read the packed data (docs/interfaces.md) for training: a Dataset of packed rows and the collator that marks
each token's sample (`segment_ids`) and, for transformers' own attention, builds the block-diagonal causal mask.

The default attention (`packed_sdpa`, pipeline/models/packed_attention.py) takes the sample boundaries from
`segment_ids` and needs no mask. Why an explicit 4-D mask for the others: transformers does not isolate packed
samples from `position_ids` alone (sdpa or eager; checked with transformers 5.24), and a BOOLEAN 4-D mask is
silently wrong with eager attention. The collator then emits an ADDITIVE float mask in the model's dtype: 0 where a
query may attend (same sample, not in the future), `torch.finfo(dtype).min` elsewhere. Padding queries attend only
to themselves, so no softmax row is all-masked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

IGNORE_INDEX = -100
COLUMNS = ("input_ids", "labels", "position_ids", "task_ids", "prompt_mask", "seq_lens")


class PackedDataset(torch.utils.data.Dataset):
    """Rows of `<data_dir>/<split>` (memory-mapped Arrow) as dicts of int64 tensors (`prompt_mask` bool)."""

    def __init__(self, data_dir: str | Path, split: str = "train"):
        self.data_dir = Path(data_dir)
        manifest = self.data_dir / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} not found: run the prep stage (python -m data_prep) first")
        self.manifest = json.loads(manifest.read_text())
        if not (self.data_dir / split).is_dir():
            raise FileNotFoundError(f"{self.data_dir} has no {split!r} split (splits: {list(self.manifest['splits'])})")
        self.split = split
        self.ds = datasets.load_from_disk(str(self.data_dir / split)).with_format("numpy")
        tasks = self.manifest["tasks"]
        self.task_names = [n for n, _ in sorted(tasks.items(), key=lambda kv: kv[1]["id"])]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.ds[int(i)]
        out = {k: torch.from_numpy(np.asarray(row[k], dtype=np.int64)) for k in COLUMNS}
        out["prompt_mask"] = out["prompt_mask"].bool()
        return out

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.manifest["tokenizer"]["path"]

    def lengths(self) -> np.ndarray:
        """Tokens per row (without reading the rows)."""
        return pc.list_value_length(self.ds.data.column("input_ids")).to_numpy(zero_copy_only=False)

    def row_task_counts(self, unit: str = "examples", batch_rows: int = 4096) -> np.ndarray:
        """(rows, tasks) int64 matrix: per row, its number of samples ("examples") or of supervised tokens
        ("supervised_tokens", labels != -100) of each task.

        Examples come from a per-row `sample_tasks` column (task id of each sample) when the data has one, else from
        `seq_lens` + `task_ids` at each sample's first token: O(samples), only those tokens are read from the
        memory-mapped column. Supervised tokens read `labels` and `task_ids` whole: O(tokens)."""
        if unit not in ("examples", "supervised_tokens"):
            raise ValueError(f"row_task_counts: unit must be 'examples' or 'supervised_tokens', got {unit!r}")
        K, out, row0 = len(self.task_names), np.zeros((len(self), len(self.task_names)), dtype=np.int64), 0
        table = self.ds.data.table
        for batch in table.to_batches(max_chunksize=batch_rows):
            n = batch.num_rows
            names = batch.schema.names

            def offsets_values(name):
                col = batch.column(names.index(name))
                return col.offsets.to_numpy().astype(np.int64), col.values.to_numpy(zero_copy_only=False)

            tok_offs, task_vals = offsets_values("task_ids")
            if unit == "examples" and "sample_tasks" in names:
                offs, vals = offsets_values("sample_tasks")
                rows = np.repeat(np.arange(n), np.diff(offs))
                tasks = vals[offs[0]:offs[-1]].astype(np.int64)
                weights = None
            elif unit == "examples":
                offs, lens = offsets_values("seq_lens")
                lens = lens[offs[0]:offs[-1]].astype(np.int64)
                rows = np.repeat(np.arange(n), np.diff(offs))
                ends = np.cumsum(lens)
                first_token = tok_offs[rows] + (ends - lens) - np.concatenate([[0], ends])[offs[:-1] - offs[0]][rows]
                tasks = task_vals[first_token].astype(np.int64)
                weights = None
            else:
                lab_offs, labels = offsets_values("labels")
                rows = np.repeat(np.arange(n), np.diff(tok_offs))
                tasks = task_vals[tok_offs[0]:tok_offs[-1]].astype(np.int64)
                weights = labels[lab_offs[0]:lab_offs[-1]] != IGNORE_INDEX
            out[row0:row0 + n] = np.bincount(rows * K + tasks, weights=weights, minlength=n * K).reshape(n, K)
            row0 += n
        return out


def split_samples(row: dict) -> list[dict]:
    """One packed row -> its samples, each a one-sample row in the same format (rows are cut at `seq_lens`)."""
    lens = row["seq_lens"].tolist()
    parts = {k: torch.split(row[k], lens) for k in COLUMNS if k != "seq_lens"}
    return [{**{k: v[i] for k, v in parts.items()}, "seq_lens": torch.tensor([n])} for i, n in enumerate(lens)]


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, L) segment ids (-1 = padding) -> (B, 1, L, L) additive mask: 0 where allowed, finfo(dtype).min elsewhere."""
    B, L = segment_ids.shape
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] >= 0)
    allowed |= torch.eye(L, dtype=torch.bool, device=segment_ids.device)  # padding queries see themselves only
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


@dataclass
class PackedCollator:
    """List of `PackedDataset` rows -> a training batch (docs/interfaces.md), padded on the right to the longest row.

    Args:
        dtype: dtype of the additive attention mask (the model's compute dtype).
        dense_mask: build the (B, 1, L, L) mask; off for attention that takes the sample boundaries from
            `segment_ids` instead (attn_implementation="packed_sdpa").
        pad_token_id: id put into padded `input_ids` (never attended to by real tokens, never a label).
        pad_to_multiple_of: round the padded length up (e.g. 8 for tensor cores).
        max_length: if set, every batch is padded to exactly this length (static shapes).
    """

    dtype: torch.dtype = torch.float32
    dense_mask: bool = True
    pad_token_id: int = 0
    pad_to_multiple_of: Optional[int] = None
    max_length: Optional[int] = None

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        B = len(rows)
        L = self.max_length or max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            L = -(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": torch.full((B, L), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((B, L), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.zeros((B, L), dtype=torch.long),
            "task_ids": torch.full((B, L), -1, dtype=torch.long),
            "segment_ids": torch.full((B, L), -1, dtype=torch.long),
            "prompt_mask": torch.zeros((B, L), dtype=torch.bool),
        }
        next_segment = 0
        for b, r in enumerate(rows):
            n = len(r["input_ids"])
            if n > L:
                raise ValueError(f"row of {n} tokens is longer than max_length {L}")
            for k in ("input_ids", "labels", "position_ids", "task_ids"):
                batch[k][b, :n] = torch.as_tensor(r[k])
            batch["prompt_mask"][b, :n] = torch.as_tensor(r["prompt_mask"]).bool()
            lens = torch.as_tensor(r["seq_lens"], dtype=torch.long)
            batch["segment_ids"][b, :n] = torch.repeat_interleave(
                torch.arange(next_segment, next_segment + len(lens)), lens)
            next_segment += len(lens)
        if self.dense_mask:
            batch["attention_mask"] = block_causal_mask(batch["segment_ids"], self.dtype)
        return batch
