"""PackedDataset + PackedCollator: packed logits equal per-sample logits with the collator's mask (sdpa and eager)
and with per-sample attention from the samples' boundaries (packed_sdpa, no mask)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.data.loader import PackedCollator, PackedDataset, block_causal_mask
from pipeline.models.packed_attention import packed_segments
from pipeline.models.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_model_dir(prepared_builtin_data, tmp_path_factory):
    ds = PackedDataset(prepared_builtin_data)
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), vocab_size=ds.manifest["tokenizer"]["vocab_size"], seed=0)


def _rows_with_many_samples(ds: PackedDataset, k: int = 2) -> list[dict]:
    """Rows holding several samples of several tasks, of different lengths (so the batch has padding)."""
    rows = [ds[i] for i in range(len(ds))]
    mixed = [r for r in rows if len(r["seq_lens"]) >= 3 and len(set(r["task_ids"].tolist())) >= 2]
    assert len(mixed) >= k, "the prepared test data should hold mixed-task rows"
    mixed.sort(key=lambda r: len(r["input_ids"]))
    return [mixed[0], mixed[-1]]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "packed_sdpa"])
def test_packed_logits_equal_per_sample_logits(prepared_builtin_data, tiny_model_dir, attn):
    ds = PackedDataset(prepared_builtin_data)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    rows = _rows_with_many_samples(ds)
    dense = attn != "packed_sdpa"
    batch = PackedCollator(dtype=torch.float32, dense_mask=dense)(rows)
    assert len(rows[0]["input_ids"]) < batch["input_ids"].shape[1]  # row 0 is padded
    assert ("attention_mask" in batch) == dense
    isolate = ({"attention_mask": batch["attention_mask"]} if dense
               else {"packed_segments": packed_segments(batch["segment_ids"])})
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **isolate).logits
        # Negative control: position ids alone do not isolate samples (sdpa and eager), so this test can fail.
        leaky = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()(
            input_ids=batch["input_ids"][1:], position_ids=batch["position_ids"][1:]).logits
        n_checked = 0
        for b, row in enumerate(rows):
            start = 0
            for n in row["seq_lens"].tolist():
                ids = row["input_ids"][start:start + n][None]
                alone = model(input_ids=ids, **({} if dense else {"packed_segments": [[n]]})).logits[0]
                torch.testing.assert_close(packed[b, start:start + n], alone, atol=1e-5, rtol=0)
                if b == 1 and start > 0:
                    assert (leaky[0, start:start + n] - alone).abs().max() > 1e-3
                start += n
                n_checked += 1
    assert n_checked >= 6


def test_collator_batch_contract(prepared_builtin_data):
    ds = PackedDataset(prepared_builtin_data)
    rows = _rows_with_many_samples(ds)
    batch = PackedCollator(dtype=torch.bfloat16, pad_token_id=0, pad_to_multiple_of=8)(rows)
    B, L = batch["input_ids"].shape
    assert L % 8 == 0 and L >= max(len(r["input_ids"]) for r in rows)
    for k in ("input_ids", "labels", "position_ids", "task_ids", "segment_ids", "prompt_mask"):
        assert batch[k].shape == (B, L), k
    m = batch["attention_mask"]
    assert m.shape == (B, 1, L, L) and m.dtype == torch.bfloat16
    assert set(m.unique().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}
    # Segment ids are unique across the batch and follow seq_lens; padding is -1 / -100.
    seen = set()
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        segs = batch["segment_ids"][b, :n]
        assert torch.equal(torch.unique_consecutive(segs, return_counts=True)[1], r["seq_lens"])
        assert not (set(segs.tolist()) & seen)
        seen |= set(segs.tolist())
        assert (batch["segment_ids"][b, n:] == -1).all() and (batch["task_ids"][b, n:] == -1).all()
        assert (batch["labels"][b, n:] == -100).all() and not batch["prompt_mask"][b, n:].any()
        assert torch.equal(batch["task_ids"][b, :n], r["task_ids"])
    # Block-diagonal causal: allowed exactly when same segment and not in the future.
    seg = batch["segment_ids"][1]
    allowed = m[1, 0] == 0
    i, j = torch.meshgrid(torch.arange(L), torch.arange(L), indexing="ij")
    expect = ((seg[:, None] == seg[None, :]) & (j <= i) & (seg[:, None] >= 0)) | (i == j)
    assert torch.equal(allowed, expect)


def test_block_causal_mask_small_example():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    allowed = block_causal_mask(seg, torch.float32)[0, 0] == 0
    expect = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(allowed, expect)


def test_dataset_rows_and_lengths(prepared_builtin_data):
    ds = PackedDataset(prepared_builtin_data)
    L = ds.manifest["max_seq_len"]
    lengths = ds.lengths()
    assert len(lengths) == len(ds) == ds.manifest["num_sequences"]
    for i in range(len(ds)):
        r = ds[i]
        assert len(r["input_ids"]) == lengths[i] <= L and int(r["seq_lens"].sum()) == lengths[i]
    assert PackedDataset(prepared_builtin_data, "eval")[0]["input_ids"].dtype == torch.long


def test_row_task_counts(prepared_builtin_data, tmp_path):
    import shutil

    import datasets

    ds = PackedDataset(prepared_builtin_data)
    K, tasks = len(ds.task_names), ds.manifest["tasks"]
    examples, supervised = ds.row_task_counts(), ds.row_task_counts("supervised_tokens")
    assert examples.shape == supervised.shape == (len(ds), K)
    for i in range(len(ds)):
        r = ds[i]
        starts = torch.cumsum(r["seq_lens"], 0) - r["seq_lens"]
        assert examples[i].tolist() == torch.bincount(r["task_ids"][starts], minlength=K).tolist()
        assert supervised[i].tolist() == torch.bincount(r["task_ids"][r["labels"] != -100], minlength=K).tolist()
    assert examples.sum(axis=0).tolist() == [tasks[n]["examples"] for n in ds.task_names]
    assert supervised.sum(axis=0).tolist() == [tasks[n]["supervised_tokens"] for n in ds.task_names]
    assert (ds.row_task_counts(batch_rows=7) == examples).all()  # record batches cut rows anywhere
    with pytest.raises(ValueError, match="unit"):
        ds.row_task_counts("tokens")
    # A per-row `sample_tasks` column (task id of each sample, in row order) is read instead when the data has one.
    copy = tmp_path / "data"
    shutil.copytree(prepared_builtin_data, copy, ignore=shutil.ignore_patterns("train"))
    raw = datasets.load_from_disk(str(prepared_builtin_data / "train"))
    raw.add_column("sample_tasks", [[K - 1] * len(s) for s in raw["seq_lens"]]).save_to_disk(str(copy / "train"))
    marked = PackedDataset(copy).row_task_counts()
    assert marked[:, K - 1].tolist() == examples.sum(axis=1).tolist() and not marked[:, :K - 1].any()
