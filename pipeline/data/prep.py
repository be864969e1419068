"""The prep stage: sources -> render + tokenize -> mask -> pack -> write, with a content-hash cache and sharding.

`run_prep(cfg)` prepares everything in one process. For scale-out, `run_prep(cfg, shard=(i, N))` does the expensive
part (reading, rendering, tokenizing) for the i-th slice of every source into `<output_dir>.shards/`, and
`run_prep(cfg, merge_shards=True)` packs all slices and writes the one output. Samples are put into a canonical
order (task, source split, example index) before packing, so the merged output is byte-identical to a single run.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
from tqdm.auto import tqdm

from pipeline.config.prep import PrepConfig
from pipeline.config.tasks import TaskConfig
from pipeline.data import builtin
from pipeline.data.errors import PrepError
from pipeline.data.mask import IGNORE_INDEX, build_labels
from pipeline.data.pack import ALGORITHM as PACKING, pack
from pipeline.data.render import check_columns, check_rows, render
from pipeline.data.sampler import task_probabilities
from pipeline.data.sources import EXAMPLE_ID, fingerprint_source, load_task, row_location
from pipeline.data.tokenize import Samples, resolve_add_bos, tokenize_dataset
from pipeline.data.tokenizer import hash_files, load_tokenizer, train_sentencepiece_model, wrap_sentencepiece
from pipeline.data.write import PACKED_FEATURES, atomic_dir, packed_table, save_table, write_json

FORMAT_VERSION = 2  # the manifest's and shards' layout
# bump when the same sources and config give other text or tokens, so earlier caches rebuild
# (2: a JSON field mixing integers and decimals is read as written, sources.py `_as_written`)
RENDER_VERSION = 2
STAT_KEYS = ("read", "invalid", "truncated", "dropped")


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def shards_dir(cfg: PrepConfig) -> Path:
    return Path(cfg.output_dir + ".shards")


def _task_splits(cfg: PrepConfig, task: TaskConfig) -> list[Optional[str]]:
    return [task.source.split] + ([task.eval_split] if cfg.eval.from_task_eval_split else [])


def cache_key(cfg: PrepConfig) -> str:
    """Hash of everything the output depends on: the config, the content of every source file, the tokenizer."""
    parts = {
        "format_version": FORMAT_VERSION,
        "render_version": RENDER_VERSION,
        "packing": PACKING,
        "config": cfg.cache_hash(),
        "sources": {t.name: fingerprint_source(t, _task_splits(cfg, t)) for t in cfg.tasks},
        "tokenizer": hash_files(cfg.tokenizer.path) if cfg.tokenizer.path else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def heldout_mask(seed: int, task: str, example_ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for examples held out for `eval/`: a splitmix64 hash of (seed, task, example index) below `fraction`.

    A function of the example alone, so the split is the same whether or not the data is sharded."""
    base = np.uint64(int.from_bytes(hashlib.sha256(f"{seed}:{task}".encode()).digest()[:8], "little"))
    with np.errstate(over="ignore"):
        x = example_ids.astype(np.uint64) + base
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------

def _training_texts(cfg: PrepConfig):
    """Rendered text the sentencepiece model learns from: the first rows of every task's training split."""
    per_task = max(1, cfg.tokenizer.train_sentencepiece.max_sentences // len(cfg.tasks))
    for task in cfg.tasks:
        ds, _ = load_task(task, task.source.split, cfg.skip_invalid)
        check_columns(task, ds.column_names, f"{task.source.path} (split {task.source.split})")
        ds, _ = check_rows(task, ds, task.source.split, cfg.skip_invalid)
        for row in ds.select(range(min(per_task, len(ds)))):
            prompt, response = render(task, row, where=row_location(task, task.source.split, row[EXAMPLE_ID]))
            yield prompt + " " + response


def make_tokenizer(cfg: PrepConfig, out_dir: Path):
    """Load or train the tokenizer and save it to `out_dir` (the prepared data carries its own tokenizer)."""
    if cfg.tokenizer.path:
        tok = load_tokenizer(cfg.tokenizer.path)
        tok.save_pretrained(out_dir)
        return tok
    _log("training a sentencepiece tokenizer on the task data")
    model = train_sentencepiece_model(_training_texts(cfg), cfg.tokenizer.train_sentencepiece, cfg.seed)
    return wrap_sentencepiece(model, out_dir)


# ---------------------------------------------------------------------------------------------------------------
# Read + tokenize
# ---------------------------------------------------------------------------------------------------------------

def _tokenize_split(cfg, task, tid, tok, split, max_examples, shard, work: Path, key: str):
    ds, invalid = load_task(task, split, cfg.skip_invalid, shard, max_examples=max_examples)
    check_columns(task, ds.column_names, f"{task.source.path} (split {split})")
    ds, skipped = check_rows(task, ds, split, cfg.skip_invalid)
    invalid += skipped
    if len(ds) == 0:  # an empty slice of a small source under --shard
        return None, invalid, 0
    tokd = tokenize_dataset(
        ds, task, tok, add_bos=resolve_add_bos(tok, cfg.tokenizer.add_bos), add_eos=cfg.tokenizer.add_eos,
        num_proc=cfg.num_proc, batch_size=cfg.batch_size, cache_file=str(work / f"{tid}-{split}.arrow"),
        fingerprint=hashlib.sha256(f"{key}:{task.name}:{split}:{shard}".encode()).hexdigest()[:16], split=split)
    return Samples.from_dataset(tokd, tid), invalid, len(ds)


def _drop_empty(cfg: PrepConfig, task: TaskConfig, s: Samples, split: Optional[str], stats: dict) -> Samples:
    """A row that renders to no token at all (empty prompt and response, no BOS/EOS) would pack as an empty sample,
    which the loader cannot place in any row: an error naming the row, or with `skip_invalid` left out and counted."""
    empty = s.lengths == 0
    if not empty.any():
        return s
    if not cfg.skip_invalid:
        ex = int(s.example_id[int(np.flatnonzero(empty)[0])])
        raise PrepError(f"task {task.name!r}: {row_location(task, split, ex)}: the row renders to no tokens (empty "
                        f"prompt and response, no BOS/EOS added; {int(empty.sum())} such row(s)). Fix the data or "
                        f"set skip_invalid: true")
    stats["invalid"] += int(empty.sum())
    return s.select(np.flatnonzero(~empty))


def _apply_overflow(cfg: PrepConfig, task: TaskConfig, s: Samples, split: Optional[str], stats: dict) -> Samples:
    L = cfg.max_seq_len
    long_prompt = s.n_prompt >= L
    if cfg.overflow == "truncate" and long_prompt.any():
        i = int(np.argmax(s.n_prompt))
        raise PrepError(f"task {task.name!r}: {row_location(task, split, int(s.example_id[i]))}: max_seq_len {L} is "
                        f"smaller than this row's prompt ({int(s.n_prompt[i])} tokens, the longest): no response "
                        f"token would fit. Raise max_seq_len, shorten the template, or set overflow: drop")
    over = s.lengths > L
    if cfg.overflow == "drop":
        stats["dropped"] += int(over.sum())
        return s.select(np.flatnonzero(~over))
    stats["truncated"] += int(over.sum())
    return s.truncate_to(L) if over.any() else s


def tokenize_tasks(cfg: PrepConfig, tok, shard: Optional[tuple[int, int]], work: Path,
                   key: str) -> tuple[Samples, dict[str, dict]]:
    """All tasks' samples (train and held-out eval, flagged by `is_eval`) and per-task read/drop counts."""
    parts, stats = [], {}
    for tid, task in enumerate(tqdm(cfg.tasks, desc="tokenize", unit="task", file=sys.stderr)):
        st = stats[task.name] = dict.fromkeys(STAT_KEYS, 0)
        jobs = [(task.source.split, -1, False)]
        if cfg.eval.from_task_eval_split:
            jobs.append((task.eval_split, cfg.eval.max_examples, True))
        for split, max_ex, is_eval in jobs:
            s, invalid, n = _tokenize_split(cfg, task, tid, tok, split, max_ex, shard, work, key)
            st["invalid"] += invalid
            st["read"] += n
            if s is None:
                continue
            if is_eval:
                s.is_eval[:] = True
            elif cfg.eval.fraction > 0:
                s.is_eval = heldout_mask(cfg.seed, task.name, s.example_id, cfg.eval.fraction)
            parts.append(_apply_overflow(cfg, task, _drop_empty(cfg, task, s, split, st), split, st))
    if not parts:
        raise PrepError("no examples to prepare (every source slice is empty)")
    return Samples.concat(parts), stats


# ---------------------------------------------------------------------------------------------------------------
# Pack + write
# ---------------------------------------------------------------------------------------------------------------

def _canonical(s: Samples) -> Samples:
    return s.select(np.lexsort((s.example_id, s.is_eval, s.task_id)))


def check_every_task_has_training_data(cfg: PrepConfig, samples: Samples, stats: dict[str, dict]) -> None:
    """A task with no training sample left would be written as a task the sampler can never draw (and training
    would report it as trained); refuse, naming the task and why its samples went."""
    n_train = np.bincount(samples.task_id[~samples.is_eval], minlength=len(cfg.tasks))
    for tid, task in enumerate(cfg.tasks):
        if n_train[tid]:
            continue
        st, n_eval = stats[task.name], int((samples.task_id == tid).sum())
        held = f", the other {n_eval} are held out for eval" if n_eval else ""
        if st["dropped"]:
            why = (f"overflow: drop removed {st['dropped']} of its {st['read']} samples (longer than max_seq_len "
                   f"{cfg.max_seq_len}){held}; raise max_seq_len or set overflow: truncate")
        else:
            why = f"all {n_eval} of its samples are held out for eval"
        raise PrepError(f"task {task.name!r}: no training examples left: {why}")


def write_packed(cfg: PrepConfig, samples: Samples, stats: dict[str, dict], tok, out: Path, key: str) -> dict:
    """Pack train and eval samples, save both splits and `manifest.json` into `out`; returns the manifest."""
    check_every_task_has_training_data(cfg, samples, stats)
    samples = _canonical(samples)
    L = cfg.max_seq_len
    tasks = {t.name: {"id": i, **stats[t.name]} for i, t in enumerate(cfg.tasks)}
    splits = {}
    for split, sel in (("train", ~samples.is_eval), ("eval", samples.is_eval)):
        s = samples.select(np.flatnonzero(sel))
        if split == "eval" and len(s) == 0:
            continue
        rows = pack(s.lengths, L, s.task_id if cfg.pack_per_task else None)
        _log(f"packing {split}: {len(s)} samples -> {len(rows)} rows")
        save_table(packed_table(s, rows, cfg.train_on_prompt), out / split, PACKED_FEATURES,
                   fingerprint=hashlib.sha256(f"{key}:{split}".encode()).hexdigest()[:16])
        n_tok = int(s.lengths.sum())
        splits[split] = {"num_sequences": len(rows), "num_samples": len(s), "num_tokens": n_tok,
                         "packing_efficiency": round(n_tok / max(1, len(rows) * L), 6)}
        prefix = "" if split == "train" else "eval_"
        sup_start = np.repeat(s.offsets[:-1], s.lengths)
        pos = np.arange(len(s.ids)) - sup_start
        n_prompt = np.repeat(s.n_prompt, s.lengths)
        supervised = build_labels(s.ids, pos, n_prompt, cfg.train_on_prompt) != IGNORE_INDEX
        tok_task = np.repeat(s.task_id, s.lengths)
        for name, info in tasks.items():
            m = s.task_id == info["id"]
            info[f"{prefix}examples"] = int(m.sum())
            info[f"{prefix}tokens"] = int(s.lengths[m].sum())
            if split == "train":
                info["supervised_tokens"] = int((supervised & (tok_task == info["id"])).sum())
    for t in cfg.tasks:
        tasks[t.name].setdefault("eval_examples", 0)
        tasks[t.name].setdefault("eval_tokens", 0)
        tasks[t.name].update(kind=t.kind, metrics=list(t.metrics), config=t.model_dump(mode="json"))
    n_train = {name: info["examples"] for name, info in tasks.items()}
    probs = task_probabilities([n_train[t.name] for t in cfg.tasks], cfg.sampling.temperature,
                               caps=[cfg.sampling.caps.get(t.name) for t in cfg.tasks],
                               weights=[cfg.sampling.weights.get(t.name, 1.0) for t in cfg.tasks])
    manifest = {
        "format_version": FORMAT_VERSION,
        "cache_key": key,
        "config_hash": cfg.cache_hash(),
        "max_seq_len": L,
        "overflow": cfg.overflow,
        "train_on_prompt": cfg.train_on_prompt,
        "pack_per_task": cfg.pack_per_task,
        "seed": cfg.seed,
        # Largest token id in either split: training checks it against the model's vocab_size before starting.
        "max_token_id": int(samples.ids.max()),
        "tokenizer": {
            "path": "tokenizer",
            "source": cfg.tokenizer.path or "sentencepiece (trained on the task data)",
            "hash": hash_files(out / "tokenizer"),
            "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            # as resolved for this tokenizer (the config's null = the tokenizer's convention)
            "add_bos": resolve_add_bos(tok, cfg.tokenizer.add_bos), "add_eos": cfg.tokenizer.add_eos,
        },
        "tasks": tasks,
        "splits": splits,
        "num_sequences": splits["train"]["num_sequences"],
        "num_tokens": splits["train"]["num_tokens"],
        "packing_efficiency": splits["train"]["packing_efficiency"],
        "sampling": {**cfg.sampling.model_dump(mode="json"),
                     "probabilities": {t.name: round(float(p), 6) for t, p in zip(cfg.tasks, probs)}},
    }
    write_json(out / "manifest.json", manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------

def _cached(path: Path, key: str, name: str) -> bool:
    f = path / name
    if f.is_file():
        try:
            return json.loads(f.read_text()).get("cache_key") == key
        except json.JSONDecodeError:
            return False
    return False


def _scratch(parent: Path) -> tempfile.TemporaryDirectory:
    parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=parent, prefix=".prep-scratch-")


def _prepare_one(cfg: PrepConfig, key: str, force: bool) -> Path:
    out = Path(cfg.output_dir)
    if not force and _cached(out, key, "manifest.json"):
        _log(f"cache hit: {out} already holds this data (cache key {key}); use --force to rebuild")
        return out
    with _scratch(out.parent) as work, atomic_dir(out) as tmp:
        tok = make_tokenizer(cfg, tmp / "tokenizer")
        samples, stats = tokenize_tasks(cfg, tok, None, Path(work), key)
        manifest = write_packed(cfg, samples, stats, tok, tmp, key)
    _summary(manifest, out)
    return out


def _prepare_shard(cfg: PrepConfig, key: str, shard: tuple[int, int], force: bool) -> Path:
    i, n = shard
    out = shards_dir(cfg) / f"{i}-of-{n}"
    if not force and _cached(out, key, "shard.json"):
        _log(f"cache hit: shard {i}/{n} at {out}")
        return out
    with _scratch(out.parent) as work, atomic_dir(out, marker="shard.json") as tmp:
        tok = make_tokenizer(cfg, tmp / "tokenizer")
        samples, stats = tokenize_tasks(cfg, tok, shard, Path(work), key)
        save_table(samples.to_table(), tmp / "samples", None, fingerprint=f"{key[:8]}{i:04d}{n:04d}")
        write_json(tmp / "shard.json", {"cache_key": key, "index": i, "num_shards": n, "stats": stats,
                                        "tokenizer_hash": hash_files(tmp / "tokenizer")})
    _log(f"wrote shard {i}/{n}: {len(samples)} samples -> {out}")
    return out


def _read_shard_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
        if not all(k in meta for k in ("cache_key", "index", "num_shards", "stats", "tokenizer_hash")):
            raise ValueError("keys missing")
        return meta
    except (ValueError, OSError) as e:
        raise PrepError(f"--merge-shards: {path} is not a readable shard record ({e}); prepare that shard again "
                        f"with --shard i/N --force") from None


def find_shards(cfg: PrepConfig, key: str) -> tuple[int, dict[int, tuple[dict, Path]]]:
    """The complete set of this config's shards (N, {index: (shard.json, folder)}), or an error that names every
    missing or stale shard folder. Shards of another N (an earlier split of the same work) are ignored when one N
    is complete."""
    root = shards_dir(cfg)
    metas = [(_read_shard_meta(p), p.parent) for p in sorted(root.glob("*-of-*/shard.json"))] if root.is_dir() else []
    ours = [(m, d) for m, d in metas if m["cache_key"] == key]
    if not ours:
        stale = f" ({len(metas)} shard(s) there were prepared from another config/data)" if metas else ""
        raise PrepError(f"--merge-shards: no shard of this config/data in {root}{stale}; run --shard i/N first")
    by_n: dict[int, dict[int, tuple[dict, Path]]] = {}
    for m, d in ours:
        by_n.setdefault(m["num_shards"], {})[m["index"]] = (m, d)
    complete = [n for n, got in by_n.items() if len(got) == n]
    if len(complete) == 1:
        return complete[0], by_n[complete[0]]
    if len(complete) > 1:
        raise PrepError(f"--merge-shards: {root} holds complete sets of this config for N = {sorted(complete)}; "
                        f"remove the folders of the split you do not want")
    problems = []
    for n, got in sorted(by_n.items()):
        for i in range(n):
            if i in got:
                continue
            d = root / f"{i}-of-{n}"
            state = "was prepared from another config/data" if (d / "shard.json").is_file() else "not found"
            problems.append(f"{d} ({state})")
    raise PrepError(f"--merge-shards: shard(s) missing: {'; '.join(problems)}. Run --shard i/N for each "
                    f"(the same config), then --merge-shards again")


def _merge(cfg: PrepConfig, key: str, force: bool) -> Path:
    out = Path(cfg.output_dir)
    n, by_index = find_shards(cfg, key)
    if len({by_index[i][0]["tokenizer_hash"] for i in range(n)}) != 1:
        raise PrepError("--merge-shards: the shards were tokenized with different tokenizers")
    if not force and _cached(out, key, "manifest.json"):
        _log(f"cache hit: {out} already holds this data (cache key {key})")
        return out
    parts, stats = [], {t.name: dict.fromkeys(STAT_KEYS, 0) for t in cfg.tasks}
    for i in tqdm(range(n), desc="merge", unit="shard", file=sys.stderr):
        meta, d = by_index[i]
        try:
            parts.append(Samples.from_table(datasets.load_from_disk(str(d / "samples")).data.table))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise PrepError(f"--merge-shards: shard {i}/{n}: {d / 'samples'} cannot be read ({e}); prepare it again "
                            f"with --shard {i}/{n} --force") from None
        for name, st in meta["stats"].items():
            for k in STAT_KEYS:
                stats[name][k] += st[k]
    with atomic_dir(out) as tmp:
        shutil.copytree(by_index[0][1] / "tokenizer", tmp / "tokenizer")
        tok = load_tokenizer(tmp / "tokenizer")
        manifest = write_packed(cfg, Samples.concat(parts), stats, tok, tmp, key)
    _summary(manifest, out)
    return out


def run_prep(cfg: PrepConfig, force: bool = False, shard: Optional[tuple[int, int]] = None,
             merge_shards: bool = False) -> Path:
    """Prepare `cfg.output_dir` (or one shard of it); returns the folder written or reused."""
    datasets.disable_progress_bars()
    if shard is not None and merge_shards:
        raise PrepError("use either --shard i/N or --merge-shards, not both")
    if shard is not None and not (0 <= shard[0] < shard[1]):
        raise PrepError(f"--shard {shard[0]}/{shard[1]}: need 0 <= i < N")
    if cfg.builtin is not None:
        builtin.write_builtin(cfg.builtin.dir, scale=cfg.builtin.scale, seed=cfg.builtin.seed)
    key = cache_key(cfg)
    if merge_shards:
        return _merge(cfg, key, force)
    if shard is not None:
        return _prepare_shard(cfg, key, shard, force)
    return _prepare_one(cfg, key, force)


def _summary(manifest: dict, out: Path) -> None:
    lines = [f"wrote {out}: {manifest['num_sequences']} sequences, {manifest['num_tokens']} tokens, "
             f"packing efficiency {manifest['packing_efficiency']:.4f}",
             f"  {'task':<16}{'id':>4}{'examples':>10}{'eval':>7}{'tokens':>10}{'trunc':>7}{'drop':>6}{'invalid':>8}"
             f"{'p(sample)':>10}"]
    for name, t in manifest["tasks"].items():
        lines.append(f"  {name:<16}{t['id']:>4}{t['examples']:>10}{t['eval_examples']:>7}{t['tokens']:>10}"
                     f"{t['truncated']:>7}{t['dropped']:>6}{t['invalid']:>8}"
                     f"{manifest['sampling']['probabilities'][name]:>10.3f}")
    _log("\n".join(lines))
