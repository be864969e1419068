"""Write packed rows as `datasets` Arrow folders, atomically, with a manifest.

Why Arrow via `datasets` (not memory-mapped numpy or Parquet): each split is one `save_to_disk` folder that
training opens with `load_from_disk` memory-mapped (no copy into RAM, no parse step, random access to any row,
so a sampler can index rows freely), variable-length rows are stored without padding as list columns, the schema
(column names and int widths) travels with the data, and any tool in the HF ecosystem can read it. Parquet would
need a decode pass on every open; raw numpy would need our own offsets/index format and schema.

Everything is first written to a temporary sibling folder and renamed into place, so a failure at any point
leaves no (half-written) output, and readers never see a partial directory.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator

import datasets
import numpy as np
import pyarrow as pa

from pipeline.atomic import replace_dir, temp_dir_for
from pipeline.data.errors import PrepError
from pipeline.data.mask import build_labels
from pipeline.data.tokenize import Samples

PACKED_FEATURES = datasets.Features({
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "labels": datasets.Sequence(datasets.Value("int32")),
    "position_ids": datasets.Sequence(datasets.Value("int32")),
    "task_ids": datasets.Sequence(datasets.Value("int16")),
    "prompt_mask": datasets.Sequence(datasets.Value("int8")),
    "seq_lens": datasets.Sequence(datasets.Value("int32")),
})


CHUNK_TOKENS = 1 << 30  # Arrow list offsets are int32: each chunk of rows holds fewer tokens than 2^31


def packed_table(samples: Samples, rows: list[list[int]], train_on_prompt: bool) -> pa.Table:
    """One Arrow row per packed sequence, built with vectorised numpy from the flat sample arrays, in chunks of at
    most CHUNK_TOKENS tokens (a split of more than 2^31 tokens would overflow one list array's offsets)."""
    per_row = np.array([len(r) for r in rows], dtype=np.int64)
    s = samples.select(np.fromiter((i for row in rows for i in row), dtype=np.int64, count=int(per_row.sum())))
    sample_row_start = np.concatenate([[0], np.cumsum(per_row)])
    tokens_before = s.offsets[sample_row_start]  # per row boundary
    if tokens_before[-1] <= CHUNK_TOKENS:
        return _packed_rows(s, sample_row_start, train_on_prompt)
    cuts = np.searchsorted(tokens_before, np.arange(CHUNK_TOKENS, tokens_before[-1], CHUNK_TOKENS), side="right") - 1
    bounds = [0, *sorted(set(cuts.tolist()) - {0}), len(rows)]
    return pa.concat_tables([
        _packed_rows(s.select(np.arange(sample_row_start[a], sample_row_start[b])),
                     sample_row_start[a:b + 1] - sample_row_start[a], train_on_prompt)
        for a, b in zip(bounds, bounds[1:])])


def _packed_rows(s: Samples, sample_row_start: np.ndarray, train_on_prompt: bool) -> pa.Table:
    """`s`: the samples in row order; row r holds samples sample_row_start[r] .. sample_row_start[r + 1] - 1."""
    n_tok = len(s.ids)
    sample_start = np.repeat(s.offsets[:-1], s.lengths)
    positions = (np.arange(n_tok) - sample_start).astype(np.int32)
    labels = build_labels(s.ids, positions, np.repeat(s.n_prompt, s.lengths), train_on_prompt)
    token_row_start = s.offsets[sample_row_start].astype(np.int32)

    def lst(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))

    return pa.table({
        "input_ids": lst(s.ids.astype(np.int32), token_row_start),
        "labels": lst(labels, token_row_start),
        "position_ids": lst(positions, token_row_start),
        "task_ids": lst(np.repeat(s.task_id, s.lengths).astype(np.int16), token_row_start),
        "prompt_mask": lst((positions < np.repeat(s.n_prompt, s.lengths)).astype(np.int8), token_row_start),
        "seq_lens": lst(s.lengths.astype(np.int32), sample_row_start.astype(np.int32)),
    })


def save_table(table: pa.Table, out_dir: Path, features: datasets.Features | None, fingerprint: str) -> None:
    """`save_to_disk` with a content-derived fingerprint, so two runs write byte-identical folders."""
    info = datasets.DatasetInfo(features=features) if features is not None else None
    ds = datasets.Dataset(table.cast(features.arrow_schema) if features is not None else table, info=info,
                          fingerprint=fingerprint)
    ds.save_to_disk(str(out_dir), max_shard_size="500MB")


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(final: Path, marker: str = "manifest.json") -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` (old copy removed), on any error it
    is deleted and `final` is left as it was. An existing `final` is only replaced if it holds `marker` (an earlier
    output of ours) or is empty, so a mistyped output_dir never deletes someone's folder."""
    final = Path(final)
    if final.exists() and not (final / marker).is_file() and any(final.iterdir()):
        raise PrepError(f"output folder {final} exists and is not a prepared-data folder (no {marker}); "
                        f"refusing to replace it: choose another output_dir or remove it yourself")
    tmp = temp_dir_for(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)
