"""DeepSpeed checkpoints with everything exact resume needs: step, sampler position and every RNG state.

Layout: `<output_dir>/checkpoints/step_<N>/` (DeepSpeed's files + `rng_rank<r>.pt`) and DeepSpeed's `latest`
file naming the newest complete tag. Only rank 0 prunes old checkpoints.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

TAG_RE = re.compile(r"^step_(\d+)$")


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


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], keep: int, rank: int) -> str:
    """Collective: every rank must call it."""
    tag = f"step_{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        _prune(ckpt_dir, keep)
    return tag


def load(engine, ckpt_dir: Path, rank: int) -> Optional[dict[str, Any]]:
    """Restore the newest checkpoint into `engine`; returns its client state, or None when there is none."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    # Not strict: bitsandbytes serialises its quantisation state as extra keys the frozen 4-bit base does not
    # load back; the base comes from the model folder, and the trained parameters from ZeRO's partitions.
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True, load_module_strict=False)
    if client_state is None:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} could not be loaded")
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def _prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name)))
    for _, path in tags[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
