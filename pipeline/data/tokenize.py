"""Render and tokenize a task's rows in batches (`datasets.map`, `num_proc` workers), and apply the overflow rule.

A sample is `[BOS] + prompt ids + response ids + [EOS]`; prompt and response are encoded separately, so the
prompt/response boundary is exact (no merge across it) and `evaluate` gets the same prompt ids by encoding the
prompt alone. Each output row keeps `n_prompt` (tokens before the response); labels are derived from it (mask.py).
"""
from __future__ import annotations

from typing import Any, Optional

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config.tasks import TaskConfig
from pipeline.data.render import render, uses_chat_template
from pipeline.data.sources import EXAMPLE_ID, row_location

FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "n_prompt": datasets.Value("int32"),
    EXAMPLE_ID: datasets.Value("int64"),
})


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Ids without special tokens. Fast tokenizers go straight to the Rust `encode_batch_fast` (no offsets, no
    attention masks: about 1.6x faster than `tokenizer(texts)`, same ids)."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def tokenizer_adds_bos(tokenizer) -> bool:
    """The tokenizer's own convention: does `tokenizer(text)` start with its BOS token? (What HF's `add_bos_token`
    and a fast tokenizer's post-processor decide, read off their output instead of their many spellings.)"""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def resolve_add_bos(tokenizer, add_bos: Optional[bool]) -> bool:
    """`tokenizer.add_bos` of a config: None follows the tokenizer (`tokenizer_adds_bos`), a bool forces it."""
    return tokenizer_adds_bos(tokenizer) if add_bos is None else bool(add_bos)


def encode_prompts(tokenizer, prompts: list[str], add_bos: Optional[bool]) -> list[list[int]]:
    """Prompt ids exactly as training saw them (evaluate calls this to build generation inputs)."""
    ids = encode_texts(tokenizer, prompts)
    if resolve_add_bos(tokenizer, add_bos) and tokenizer.bos_token_id is not None:
        ids = [[tokenizer.bos_token_id] + x for x in ids]
    return ids


def prompt_ids(task: TaskConfig, tokenizer, rows: list[dict], add_bos: Optional[bool] = None) -> list[list[int]]:
    """Generation inputs for `evaluate`: exactly the ids a training sample of each row starts with (its prompt).
    `add_bos` is the manifest's `tokenizer.add_bos`; chat-template text brings its own special tokens."""
    prompts = [render(task, r, tokenizer)[0] for r in rows]
    return encode_prompts(tokenizer, prompts, False if uses_chat_template(task, tokenizer) else add_bos)


def _tokenize_batch(batch: dict[str, list], task: TaskConfig, tokenizer, add_bos: bool, add_eos: bool,
                    split: Optional[str] = None) -> dict:
    n = len(batch[EXAMPLE_ID])
    rows = [{k: batch[k][i] for k in batch} for i in range(n)]
    pairs = [render(task, r, tokenizer, row_location(task, split, r[EXAMPLE_ID])) for r in rows]
    chat = uses_chat_template(task, tokenizer)
    prompts = encode_prompts(tokenizer, [p for p, _ in pairs], False if chat else add_bos)
    responses = encode_texts(tokenizer, [r for _, r in pairs])
    eos = [tokenizer.eos_token_id] if add_eos and not chat and tokenizer.eos_token_id is not None else []
    return {
        "input_ids": [p + r + eos for p, r in zip(prompts, responses)],
        "n_prompt": [len(p) for p in prompts],
        EXAMPLE_ID: batch[EXAMPLE_ID],
    }


def tokenize_dataset(ds: datasets.Dataset, task: TaskConfig, tokenizer, *, add_bos: bool, add_eos: bool,
                     num_proc: int, batch_size: int, cache_file: str, fingerprint: str,
                     split: Optional[str] = None) -> datasets.Dataset:
    """`ds` rows -> (input_ids, n_prompt, _example_id). Cache files go to `cache_file` (a scratch folder), never
    next to the source data (the shared GLUE folder is read-only)."""
    return ds.map(
        _tokenize_batch, batched=True, batch_size=batch_size, num_proc=num_proc if num_proc > 1 and len(ds) > batch_size else None,
        remove_columns=ds.column_names, features=FEATURES, cache_file_name=cache_file, new_fingerprint=fingerprint,
        fn_kwargs=dict(task=task, tokenizer=tokenizer, add_bos=add_bos, add_eos=add_eos, split=split),
        desc=f"tokenize {task.name}",
    )


class Samples:
    """Tokenized samples as flat numpy arrays (fast to split, pack and write): ids of sample i are
    `ids[offsets[i]:offsets[i+1]]`."""

    FIELDS = ("n_prompt", "task_id", "example_id", "truncated", "is_eval")

    def __init__(self, ids: np.ndarray, lengths: np.ndarray, **cols: Any):
        self.ids = ids.astype(np.int32, copy=False)
        self.lengths = lengths.astype(np.int64, copy=False)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        for f in self.FIELDS:
            setattr(self, f, np.asarray(cols[f]))

    def __len__(self) -> int:
        return len(self.lengths)

    @classmethod
    def from_dataset(cls, ds: datasets.Dataset, task_id: int) -> "Samples":
        col = ds.data.column("input_ids").combine_chunks()
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        n = len(ds)
        return cls(col.flatten().to_numpy(zero_copy_only=False), lengths,
                   n_prompt=ds.data.column("n_prompt").to_numpy(), task_id=np.full(n, task_id, np.int32),
                   example_id=ds.data.column(EXAMPLE_ID).to_numpy(), truncated=np.zeros(n, bool),
                   is_eval=np.zeros(n, bool))

    def select(self, idx: np.ndarray) -> "Samples":
        idx = np.asarray(idx, dtype=np.int64)
        lens = self.lengths[idx]
        starts = self.offsets[idx]
        flat = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(lens.sum())
        return Samples(self.ids[flat], lens, **{f: getattr(self, f)[idx] for f in self.FIELDS})

    def truncate_to(self, max_len: int) -> "Samples":
        """Cut every sample to `max_len` tokens (the response end goes; prompts were checked to fit)."""
        new_lens = np.minimum(self.lengths, max_len)
        flat = np.repeat(self.offsets[:-1], new_lens) + (np.arange(new_lens.sum()) - np.repeat(
            np.concatenate([[0], np.cumsum(new_lens)[:-1]]), new_lens))
        cols = {f: getattr(self, f) for f in self.FIELDS}
        cols["truncated"] = self.truncated | (self.lengths > max_len)
        return Samples(self.ids[flat], new_lens, **cols)

    @staticmethod
    def concat(parts: list["Samples"]) -> "Samples":
        parts = [p for p in parts if len(p)] or parts[:1]
        return Samples(np.concatenate([p.ids for p in parts]), np.concatenate([p.lengths for p in parts]),
                       **{f: np.concatenate([getattr(p, f) for p in parts]) for f in Samples.FIELDS})

    def to_table(self) -> pa.Table:
        """For shard files: one row per sample."""
        return pa.table({
            "input_ids": pa.LargeListArray.from_arrays(pa.array(self.offsets), pa.array(self.ids)),
            **{f: pa.array(getattr(self, f)) for f in self.FIELDS},
        })

    @classmethod
    def from_table(cls, table: pa.Table) -> "Samples":
        col = table.column("input_ids").combine_chunks()
        return cls(col.flatten().to_numpy(zero_copy_only=False),
                   pc.list_value_length(col).to_numpy(zero_copy_only=False),
                   **{f: table.column(f).to_numpy(zero_copy_only=False) for f in cls.FIELDS})
