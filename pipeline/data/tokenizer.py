"""Get the tokenizer prep encodes with: an HF tokenizer folder/hub id, or a sentencepiece model trained on the data.

transformers 5.x trap (checked with transformers 5.24): `LlamaTokenizer(vocab_file=...)` ignores the file and encodes to `[]`.
What works is a folder holding `tokenizer.model` + a `tokenizer_config.json` naming `LlamaTokenizer`, loaded with
`AutoTokenizer.from_pretrained`, which converts it to a fast tokenizer with sentencepiece's ids; `save_pretrained`
then writes a `tokenizer.json` any later stage (train, evaluate) loads with no sentencepiece involved.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer

from pipeline.config.prep import SentencePieceConfig
from pipeline.data.errors import PrepError

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_sentencepiece_model(texts: Iterable[str], cfg: SentencePieceConfig, seed: int = 0) -> bytes:
    """Serialized sentencepiece BPE model (ids: 0 <unk>, 1 <s>, 2 </s>), deterministic for a given input and seed.

    Identity normalization and kept whitespace make sentencepiece's ids match the converted HF tokenizer's;
    byte fallback means no text ever becomes <unk>.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    failed: list[PrepError] = []

    def read_texts():  # an error in the data (named with its file and line) is ours, not sentencepiece's
        try:
            yield from texts
        except PrepError as e:
            failed.append(e)
            raise

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=read_texts(), model_writer=buf, vocab_size=cfg.vocab_size, model_type="bpe",
            character_coverage=cfg.character_coverage, byte_fallback=True, split_digits=cfg.split_digits,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, normalization_rule_name="identity",
            remove_extra_whitespaces=False, input_sentence_size=cfg.max_sentences, shuffle_input_sentence=True,
            num_threads=cfg.num_threads, minloglevel=2,
        )
    except RuntimeError as e:
        if failed:
            raise failed[0] from None
        raise PrepError(f"tokenizer.train_sentencepiece: sentencepiece training failed: {e}") from None
    return buf.getvalue()


def wrap_sentencepiece(model_bytes: bytes, out_dir: str | Path):
    """Write an HF tokenizer folder for a sentencepiece model and return the loaded fast tokenizer (pad = <unk>)."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(model_bytes)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(dict(
            SPECIALS, tokenizer_class="LlamaTokenizer", pad_token="<unk>", add_bos_token=True, add_eos_token=False,
            model_max_length=1_000_000)))
        tok = AutoTokenizer.from_pretrained(tmp)
    tok.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def load_tokenizer(path: str | Path):
    """An HF tokenizer (local folder or hub id). A missing pad token is set to EOS (padding never carries loss)."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises many types for a bad path
        raise PrepError(f"tokenizer.path: cannot load a tokenizer from {path!r}: {e}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def hash_files(path: str | Path) -> str:
    """Content hash of a tokenizer folder (or of the name, for a hub id)."""
    p = Path(path)
    h = hashlib.sha256()
    if not p.exists():
        h.update(str(path).encode())
        return h.hexdigest()
    for f in sorted(x for x in (p.rglob("*") if p.is_dir() else [p]) if x.is_file()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()
