"""Atomic writes for every file or folder a user reads (adapter, merged models and shards, reports): written under
a temporary name in the same folder, flushed to disk, then renamed into place, so a reader never sees a half-written
file and a crash leaves the previous version (or nothing) where the final name is."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Union


def _tmp_name(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path next to `path` for a writer that takes a file name (safetensors, torch.save); on
    success it is fsynced and renamed onto `path`, on any error removed (and `path` left as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path, "tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path, data: Union[str, bytes]) -> Path:
    """Write text (utf-8) or bytes to `path` atomically; returns `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:  # open(): umask permissions, as a plain write would have
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def replace_dir(tmp, final) -> Path:
    """Move the finished folder `tmp` to `final` (same file system); an existing `final` is renamed aside first and
    removed after, so `final` is at every moment either the old or the new folder, never a mix."""
    tmp, final = Path(tmp), Path(final)
    old = None
    if final.exists():
        old = _tmp_name(final, "old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def temp_dir_for(final) -> Path:
    """A fresh empty folder next to `final`, to be filled and then handed to `replace_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final, "tmp")
    tmp.mkdir()
    return tmp
