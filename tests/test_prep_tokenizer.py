"""The trained sentencepiece model, wrapped as an HF tokenizer folder, gives sentencepiece's own ids."""
from __future__ import annotations

import sentencepiece as spm
from transformers import AutoTokenizer

from pipeline.config.prep import SentencePieceConfig
from pipeline.data.builtin import write_builtin
from pipeline.data.tokenizer import train_sentencepiece_model, wrap_sentencepiece

SENTENCES = ["Review: the film was not truly wonderful\nSentiment: positive", "Compute: 23 + 58 = 81",
             "héllo wörld ☃ 中文 — unseen characters fall back to bytes", "tabs\tand  two spaces\n\nlines"]


def _texts(tmp_path):
    root = write_builtin(tmp_path / "builtin", scale=0.1)
    return [line for f in sorted(root.rglob("train.jsonl")) for line in f.read_text().splitlines()]


def test_hf_ids_equal_sentencepiece_ids(tmp_path):
    cfg = SentencePieceConfig(vocab_size=400)
    model = train_sentencepiece_model(_texts(tmp_path), cfg, seed=0)
    assert model == train_sentencepiece_model(_texts(tmp_path), cfg, seed=0), "training must be deterministic"
    wrap_sentencepiece(model, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")  # a plain folder with tokenizer.json, no sentencepiece
    sp = spm.SentencePieceProcessor(model_proto=model)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0) and len(tok) == sp.get_piece_size()
    for s in SENTENCES:
        ids = tok(s)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(s), s
        assert len(ids) > 3 and sp.unk_id() not in ids
        assert tok.decode(ids, skip_special_tokens=True) == s
