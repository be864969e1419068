"""DeepSpeed checkpoints with everything exact resume needs: step, sampler position and every RNG state.

Layout: `<output_dir>/checkpoints/step_<N>/` holds DeepSpeed's files, one `rng_rank<r>.pt` per rank and, written
last, `meta.json`; `checkpoints/latest` names the newest complete tag (for DeepSpeed's own tools).

A checkpoint is complete or it is not a checkpoint:
- `save` has DeepSpeed write without moving `latest`, every rank writes its RNG file (temp name + rename), all ranks
  meet at a barrier, and only then rank 0 writes `meta.json` (the run's resolved config, the run id, and the name
  and size of every file of the checkpoint) and then `latest`, each atomically. A save killed at any point leaves
  a folder without `meta.json`, which no resume uses.
- `load` resumes from the newest checkpoint with a `meta.json`, decided on rank 0 and broadcast, so every rank loads
  the same one. Newer folders without one (saves that did not finish) are skipped and named. A checkpoint whose
  `meta.json` lists a file that is now missing or has another size (deleted, truncated, half copied) is an error
  that names the files: it was complete once, so falling back silently would hide lost work. So is one DeepSpeed
  cannot read.
- `load` compares the checkpoint's config with this run's: another base model, dtype, seed, data (tasks, caps,
  temperature, the prepared data's cache key, the task list) or any `more.*` setting, or another world size, is
  refused with the differing fields named; anything else (lr, max_steps, schedule, eval and checkpoint settings,
  ...) is allowed and printed on rank 0.
- Pruning (rank 0, after a save is complete) deletes only older complete checkpoints of this run (same run id) beyond
  `keep`, and folders of unfinished saves older than the new checkpoint; never the checkpoint just written, never
  another run's. `checkpoint.resume: never` (`--no-resume`) is refused up front when the folder already holds
  checkpoints (see `existing`): starting step 1 next to another run's step 300 would mix two runs.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipeline.atomic import atomic_path, atomic_write
from pipeline.train.distributed import all_gather, barrier, broadcast_from_rank0, world_size

TAG_RE = re.compile(r"^step_(\d+)$")
META = "meta.json"
FORMAT = 1

# Fields of the saved config (dotted, as in the YAML) that a resume must not change; `run.*` are not config keys
# but facts of the run (world size, the data's task list and cache key). Everything else may change and is said.
# `model.frozen_base` (as resolved at launch): a replicated base is not in DeepSpeed's module state, a sharded one is.
REFUSED = ("run.", "seed", "model.path", "model.quantization", "model.dtype", "model.frozen_base", "data.tasks",
           "data.task_caps", "data.temperature", "more.")
IGNORED = ("output_dir",)  # a moved run folder is the same run
RECORDED_SINCE = ("run.base_weights_sha256",)  # facts older checkpoints lack: not compared when they do


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from, with the folder and what is wrong in the message."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank}.pt"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


# --- what is on disk ------------------------------------------------------------------------------------------------


def tags(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Every `step_<N>` folder, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name)))


def existing(ckpt_dir: Path) -> list[str]:
    """Names of what a fresh run would be mixed with: checkpoint folders and a `latest` file."""
    names = [p.name for _, p in tags(ckpt_dir)]
    return names + (["latest"] if (ckpt_dir / "latest").exists() else [])


def read_meta(tag_dir: Path) -> Optional[dict[str, Any]]:
    """The checkpoint's meta.json, or None when the save did not finish. An unreadable one is an error: it is only
    ever written whole (temp file + rename), so it was damaged afterwards."""
    path = tag_dir / META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or "files" not in meta or "step" not in meta:
            raise ValueError("not a checkpoint meta.json")
        return meta
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged: {path} cannot be read ({e}); delete {tag_dir} to "
                              f"resume from an earlier checkpoint") from None


def damage(tag_dir: Path, meta: dict[str, Any]) -> list[str]:
    """Files meta.json lists that are missing now or have another size."""
    problems = []
    for name, size in sorted(meta["files"].items()):
        path = tag_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{path} has {path.stat().st_size} bytes, {size} when it was saved")
    return problems


@dataclass
class Choice:
    """Rank 0's decision about what to resume from; broadcast so that every rank takes the same one."""
    tag: Optional[str] = None
    meta: Optional[dict[str, Any]] = None
    notes: list[str] = field(default_factory=list)  # said on rank 0: skipped folders, allowed config changes
    error: Optional[str] = None


def choose(ckpt_dir: Path, identity: Optional[dict[str, Any]] = None) -> Choice:
    """The newest complete checkpoint, or an error that says what is wrong with it and what to do.

    `identity`: this run's `run_identity`; when given, a checkpoint of a run with other fixed settings is refused.
    """
    choice = Choice()
    try:
        found = tags(ckpt_dir)
        latest = ckpt_dir / "latest"
        named = latest.read_text().strip() if latest.is_file() else None
        for step, path in reversed(found):
            meta = read_meta(path)
            if meta is None:
                if path.name == named:  # this code moves `latest` only after meta.json exists
                    raise CheckpointError(
                        f"{latest} names {path}, which has no {META}: a checkpoint written by an earlier version "
                        f"of this pipeline (before checkpoints were marked complete) or a damaged one; it cannot be "
                        f"checked. Delete {path} to resume from an earlier checkpoint, or {ckpt_dir} to start over")
                choice.notes.append(f"ignoring {path}: its save did not finish (no {META})")
                continue
            problems = damage(path, meta)
            if problems:
                earlier = [p.name for s, p in found if s < step and (p / META).is_file()]
                raise CheckpointError(
                    f"checkpoint {path} is damaged: {'; '.join(problems)}. Restore the file(s), or delete {path} "
                    + (f"to resume from an earlier checkpoint ({', '.join(earlier)})" if earlier else
                       "to start over"))
            if identity is not None:
                refused, changed = compare(meta.get("identity", {}), identity)
                if refused:
                    raise CheckpointError(
                        f"checkpoint {path} was written by a run with other settings; resuming it would not continue "
                        f"that run: {'; '.join(refused)}. Restore these settings, or start this run in another "
                        f"output_dir (or delete {ckpt_dir})")
                if changed:
                    choice.notes.append(f"resuming {path} with changed settings: {'; '.join(changed)}")
            choice.tag, choice.meta = path.name, meta
            return choice
    except CheckpointError as e:
        choice.error = str(e)
    return choice


def run_identity(config: dict[str, Any], world_size: int, task_names: list[str],
                 data_key: Optional[str], base_weights: Optional[str] = None) -> dict[str, Any]:
    """What a checkpoint records about its run: the resolved config plus the facts a config does not say (the
    base's weights fingerprint: a base folder rewritten between runs keeps its model.path)."""
    return {**config, "run": {"world_size": world_size, "task_names": list(task_names), "data_cache_key": data_key,
                              "base_weights_sha256": base_weights}}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return out


_MISSING = "<unset>"


def compare(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, allowed) differences between a checkpoint's identity and this run's, as `key: old -> new`."""
    a, b = _flatten(saved), _flatten(current)
    refused, changed = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, _MISSING), b.get(key, _MISSING)
        if old == new or key.startswith(IGNORED) or (old is _MISSING and key in RECORDED_SINCE):
            continue
        line = f"{key}: {json.dumps(old)} -> {json.dumps(new)}"
        (refused if key.startswith(REFUSED) else changed).append(line)
    return refused, changed


# --- save / load --------------------------------------------------------------------------------------------------


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep: int, rank: int,
         run_id: str = "", identity: Optional[dict[str, Any]] = None) -> str:
    """Collective: every rank must call it. Returns the tag; the checkpoint is complete when it returns."""
    tag = f"step_{step}"
    tag_dir = ckpt_dir / tag
    if (tag_dir / META).is_file():  # every rank sees it (one shared folder): all refuse, nobody deletes it
        raise CheckpointError(f"checkpoint {tag_dir} is complete already; not written again (the save would delete "
                              f"it first)")
    if rank == 0 and tag_dir.exists():  # an unfinished save of this step (a resumed run passes it again)
        shutil.rmtree(tag_dir)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    target = rng_file(tag_dir, rank)
    with atomic_path(target) as tmp:
        torch.save(rng_state(), tmp)
    barrier()  # every rank's files are on disk
    if rank == 0:
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
                 if p.is_file() and not p.name.startswith(".") and p.name != META}
        missing = [rng_file(tag_dir, r).name for r in range(world_size()) if rng_file(tag_dir, r).name not in files]
        if missing:
            raise CheckpointError(f"checkpoint {tag_dir}: {', '.join(missing)} not written; the save is incomplete")
        meta = {"format": FORMAT, "tag": tag, "step": step, "run_id": run_id, "world_size": world_size(),
                "saved_at": time.time(), "identity": identity, "files": files}
        atomic_write(tag_dir / META, json.dumps(meta, indent=1, sort_keys=True))
        atomic_write(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep, run_id, step)
    barrier()
    return tag


def load(engine, ckpt_dir: Path, rank: int, identity: Optional[dict[str, Any]] = None
         ) -> Optional[tuple[dict[str, Any], dict[str, Any]]]:
    """Collective. Restore the newest complete checkpoint into `engine`: (client state, meta), or None when there is
    none. Raises CheckpointError (the same on every rank) when it cannot be resumed from."""
    choice: Choice = broadcast_from_rank0(choose(ckpt_dir, identity) if rank == 0 else None)
    if rank == 0:
        for note in choice.notes:
            print(note, flush=True)
    if choice.error:
        raise CheckpointError(choice.error)
    if choice.tag is None:
        return None
    tag_dir = ckpt_dir / choice.tag
    mine = rng_file(tag_dir, rank)
    missing = [m for m in all_gather(None if mine.is_file() else str(mine)) if m]
    if missing:  # rank 0 saw every listed file; this covers ranks that see another file system
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {', '.join(missing)} missing; delete {tag_dir} "
                              f"to resume from an earlier checkpoint")
    # Not strict: bitsandbytes serialises its quantisation state as extra keys the frozen 4-bit base does not
    # load back; the base comes from the model folder, and the trained parameters from ZeRO's partitions.
    try:
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=choice.tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True, load_module_strict=False)
        state = torch.load(mine, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {tag_dir} could not be loaded ({type(e).__name__}: {e}); delete it to "
                              f"resume from an earlier checkpoint") from e
    if load_path is None or client_state is None:
        raise CheckpointError(f"checkpoint {tag_dir} could not be loaded (DeepSpeed found no checkpoint there)")
    set_rng_state(state)
    return client_state, choice.meta


def prune(ckpt_dir: Path, keep: int, run_id: str, current_step: int) -> list[str]:
    """Delete this run's complete checkpoints older than the newest `keep` (the one at `current_step` counts and
    stays) and unfinished saves older than it; returns the deleted tags. Other runs' checkpoints stay."""
    ours, deleted = [], []
    for step, path in tags(ckpt_dir):
        if step >= current_step:
            continue
        try:
            meta = read_meta(path)
        except CheckpointError:
            continue  # damaged: leave it for a person to look at
        if meta is None:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path.name)
        elif meta.get("run_id") == run_id:
            ours.append(path)
    for path in ours[:max(0, len(ours) - (keep - 1))]:
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path.name)
    return deleted
