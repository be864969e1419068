"""Prep end to end on the small built-in set: round trip, label masking, task ids, overflow, determinism, cache,
sharding, chat templates, and the CLI."""
from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from data_prep.__main__ import main as cli
from pipeline.data.loader import PackedDataset
from pipeline.data.prep import run_prep
from pipeline.data.render import render
from pipeline.data.sources import load_split
from pipeline.data.tokenize import prompt_ids


def expected_samples(cfg, tok):
    """Independent reference: every source example -> (ids, n_prompt), by task name (a multiset)."""
    out = {}
    for task in cfg.tasks:
        ds, _ = load_split(task, task.source.split)
        if task.max_examples:
            ds = ds.select(range(min(task.max_examples, len(ds))))
        exp = collections.Counter()
        for row, eval_prompt in zip(ds, prompt_ids(task, tok, list(ds))):
            prompt, response = render(task, row, tok)
            chat = task.format == "chat" and tok.chat_template
            p = ([] if chat else [tok.bos_token_id]) + tok.encode(prompt, add_special_tokens=False)
            r = tok.encode(response, add_special_tokens=False) + ([] if chat else [tok.eos_token_id])
            exp[(tuple(p + r), len(p))] += 1
            assert eval_prompt == p, "evaluate's prompt ids must be the training sample's prompt"
        out[task.name] = exp
    return out


def packed_samples(data_dir: Path):
    """Split every packed row back into samples; check per-token invariants on the way."""
    got = collections.defaultdict(collections.Counter)
    for split in ("train", "eval"):
        if not (data_dir / split).is_dir():
            continue
        ds = PackedDataset(data_dir, split)
        for i in range(len(ds)):
            r = ds[i]
            start = 0
            for n in r["seq_lens"].tolist():
                sl = slice(start, start + n)
                ids, labels, tasks = r["input_ids"][sl].tolist(), r["labels"][sl].tolist(), r["task_ids"][sl]
                assert r["position_ids"][sl].tolist() == list(range(n))
                assert (tasks == tasks[0]).all(), "every token of a sample carries the sample's task id"
                n_prompt = int(r["prompt_mask"][sl].sum())
                assert r["prompt_mask"][sl].tolist() == [True] * n_prompt + [False] * (n - n_prompt)
                assert labels == [-100] * n_prompt + ids[n_prompt:], "exactly the response tokens carry labels"
                got[ds.task_names[int(tasks[0])]][(tuple(ids), n_prompt)] += 1
                start += n
            assert start == len(r["input_ids"])
    return got


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_round_trip_labels_and_task_ids(prepared_builtin_data, prepared_builtin_config):
    cfg = prepared_builtin_config
    tok = AutoTokenizer.from_pretrained(prepared_builtin_data / "tokenizer")
    manifest = json.loads((prepared_builtin_data / "manifest.json").read_text())
    expected, got = expected_samples(cfg, tok), packed_samples(prepared_builtin_data)
    assert set(got) == set(expected)
    for name, exp in expected.items():
        assert got[name] == exp, f"task {name}: packed samples differ from the source examples"
        t = manifest["tasks"][name]
        assert t["examples"] + t["eval_examples"] + t["dropped"] == t["read"] == sum(exp.values())
    # Mixed-task rows exist (global packing), and the verbalizer word is what the model learns.
    ds = PackedDataset(prepared_builtin_data)
    assert any(len(set(ds[i]["task_ids"].tolist())) > 1 for i in range(len(ds)))
    sid = ds.task_names.index("sentiment")
    words = collections.Counter()
    for i in range(len(ds)):
        r = ds[i]
        start = 0
        for n in r["seq_lens"].tolist():
            if int(r["task_ids"][start]) == sid:
                lab = [t for t in r["labels"][start:start + n].tolist() if t != -100]
                words[tok.decode(lab, skip_special_tokens=True).strip()] += 1
            start += n
    assert set(words) == {"positive", "negative"}
    assert manifest["packing_efficiency"] == pytest.approx(
        manifest["num_tokens"] / (manifest["num_sequences"] * manifest["max_seq_len"]), abs=1e-6)


def test_train_on_prompt_and_pack_per_task(small_prep_config):
    cfg = small_prep_config(train_on_prompt=True, pack_per_task=True)
    out = run_prep(cfg)
    ds = PackedDataset(out)
    for i in range(len(ds)):
        r = ds[i]
        assert len(set(r["task_ids"].tolist())) == 1
        first = r["position_ids"] == 0
        assert (r["labels"][first] == -100).all(), "no label across a sample boundary"
        assert (r["labels"][~first] == r["input_ids"][~first]).all()


def test_empty_prompt_without_bos_labels_no_sample_start(tmp_path):
    """An empty prompt and no BOS: the sample's first token is an answer token, and still gets no label (the
    previous sample's last token would predict it); the manifest counts only what the loss trains on."""
    from pipeline.config.base import load_config
    from pipeline.config.prep import PrepConfig
    from pipeline.data.mask import next_token_targets

    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps({"q": f"what is {i} plus one", "a": f"the answer is {i + 1}"}) + "\n"
                           for i in range(40)))
    cfg = load_config(PrepConfig, data={
        "output_dir": str(tmp_path / "out"), "max_seq_len": 64, "tokenizer": {
            "add_bos": False, "train_sentencepiece": {"vocab_size": 300}},
        "tasks": [{"name": "t", "source": {"type": "jsonl", "path": str(src)},
                   "template": {"prompt": "", "response": "{q} = {a}"}}]})
    out = run_prep(cfg)
    ds = PackedDataset(out)
    trained = packed = 0
    for i in range(len(ds)):
        r = ds[i]
        starts = r["position_ids"] == 0
        assert (r["labels"][starts] == -100).all()
        packed += int(starts.sum()) > 1
        trained += int((next_token_targets(r["labels"][None], r["position_ids"][None]) != -100).sum())
    manifest = json.loads((out / "manifest.json").read_text())
    assert packed and manifest["tasks"]["t"]["supervised_tokens"] == trained


def test_packed_rows_are_written_in_chunks_within_arrow_offsets(small_prep_config, tmp_path, monkeypatch):
    """One Arrow list array holds fewer than 2^31 values (int32 offsets): a split of more tokens is written in
    chunks of at most CHUNK_TOKENS. With a chunk of 2,000 tokens the output is the same rows as in one chunk."""
    from pipeline.data import write

    whole = run_prep(small_prep_config(output_dir=str(tmp_path / "whole")))
    calls = []
    chunk = write._packed_rows
    monkeypatch.setattr(write, "CHUNK_TOKENS", 2000)
    monkeypatch.setattr(write, "_packed_rows", lambda *a: calls.append(len(a[1]) - 1) or chunk(*a))  # rows
    chunked = run_prep(small_prep_config(output_dir=str(tmp_path / "chunked")))
    a, b = PackedDataset(whole), PackedDataset(chunked)
    assert len(calls) > 2 and sum(calls) >= len(b)
    assert len(a) == len(b) and all(
        all((a[i][k] == b[i][k]).all() for k in a[i]) for i in range(len(a)))


@pytest.mark.parametrize("overflow", ["drop", "truncate"])
def test_overflow_is_counted(small_prep_config, overflow):
    cfg = small_prep_config(max_seq_len=80, overflow=overflow)
    out = run_prep(cfg)
    m = json.loads((out / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    expected, got = expected_samples(cfg, tok), packed_samples(out)
    n_over = 0
    for name, exp in expected.items():
        t = m["tasks"][name]
        over = collections.Counter({k: v for k, v in exp.items() if len(k[0]) > 80})
        n_over += sum(over.values())
        if overflow == "drop":
            assert t["dropped"] == sum(over.values()) and t["truncated"] == 0
            assert got[name] == exp - over
        else:
            assert t["truncated"] == sum(over.values()) and t["dropped"] == 0
            cut = collections.Counter()
            for (ids, n_p), c in exp.items():
                cut[(ids[:80], n_p)] += c
            assert got[name] == cut
        assert t["examples"] + t["eval_examples"] + t["dropped"] == t["read"]
    assert n_over > 0, "the test needs some over-long samples"


def _write_cfg(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def test_determinism_cache_and_shards(small_prep_config, tmp_path, capsys):
    base = small_prep_config(pack_per_task=False)
    a = run_prep(base.model_copy(update={"output_dir": str(tmp_path / "a")}))
    b = run_prep(base.model_copy(update={"output_dir": str(tmp_path / "b")}))
    ref = tree_bytes(a)
    assert any(k.startswith("train/") and k.endswith(".arrow") for k in ref) and "eval/state.json" in ref
    assert tree_bytes(b) == ref, "two runs must give byte-identical output"

    # Cache: same config -> reused untouched; --force -> rebuilt (same bytes); a changed config -> rebuilt.
    cfg_file = _write_cfg(base.model_copy(update={"output_dir": str(tmp_path / "a")}), tmp_path / "a.yaml")
    mtime = (a / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert cli(["--config", str(cfg_file)]) == 0
    assert "cache hit" in capsys.readouterr().err and (a / "manifest.json").stat().st_mtime_ns == mtime
    assert cli(["--config", str(cfg_file), "--force"]) == 0
    assert (a / "manifest.json").stat().st_mtime_ns != mtime and tree_bytes(a) == ref
    assert cli(["--config", str(cfg_file), "--set", "max_seq_len=100"]) == 0
    assert json.loads((a / "manifest.json").read_text())["max_seq_len"] == 100

    # --shard i/N + --merge-shards == one run (byte for byte, manifest included).
    shard_cfg = _write_cfg(base.model_copy(update={"output_dir": str(tmp_path / "c")}), tmp_path / "c.yaml")
    for i in range(3):
        assert cli(["--config", str(shard_cfg), "--shard", f"{i}/3"]) == 0
    assert not (tmp_path / "c").exists()
    assert cli(["--config", str(shard_cfg), "--merge-shards"]) == 0
    assert tree_bytes(tmp_path / "c") == ref
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".prep-scratch" in p.name]


def test_cache_follows_source_content(small_prep_config):
    cfg = small_prep_config()
    out = run_prep(cfg)
    key = json.loads((out / "manifest.json").read_text())["cache_key"]
    cfg = cfg.model_copy(update={"builtin": None})  # keep our edit of the source below
    src = Path(cfg.tasks[0].source.path.replace("{split}", "train"))
    lines = src.read_text().splitlines(keepends=True)
    src.write_text("".join(lines[:-1]))
    run_prep(cfg)
    m = json.loads((out / "manifest.json").read_text())
    assert m["cache_key"] != key and m["tasks"][cfg.tasks[0].name]["read"] == len(lines) - 1


def chat_tokenizer_config(prepared_builtin_data, base, tmp_path, keep):
    """`base` with the tasks `keep` selects and the prepared tokenizer given a small chat template."""
    tok = AutoTokenizer.from_pretrained(prepared_builtin_data / "tokenizer")
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(tmp_path / "chat_tok")
    return base.model_copy(update={"tasks": [t for t in base.tasks if keep(t)],
                                   "tokenizer": base.tokenizer.model_copy(update={
                                       "path": str(tmp_path / "chat_tok"), "train_sentencepiece": None})})


def test_chat_template_is_used_when_the_tokenizer_has_one(prepared_builtin_data, small_prep_config, tmp_path):
    cfg = chat_tokenizer_config(prepared_builtin_data, small_prep_config(), tmp_path, lambda t: t.format == "chat")
    out = run_prep(cfg)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tok.chat_template
    assert packed_samples(out)["reverse"] == expected_samples(cfg, tok)["reverse"]
    r = PackedDataset(out)[0]
    n = int(r["seq_lens"][0])
    text = tok.decode(r["input_ids"][:n].tolist())
    assert text.startswith("<|user|>Reverse the words:") and text.rstrip().endswith("<|end|>")
    response = tok.decode([t for t in r["labels"][:n].tolist() if t != -100])
    assert "<|user|>" not in response and response.rstrip().endswith("<|end|>")


def test_chat_template_whose_generation_prompt_is_no_prefix_keeps_the_end_of_turn(prepared_builtin_data):
    """DeepSeek-R1's template: the generation prompt opens "<think>\n", the rendered assistant turn does not. The
    reply still carries the template's end of turn (here EOS), so the model learns to stop."""
    from pipeline.config.tasks import TaskConfig

    tok = AutoTokenizer.from_pretrained(prepared_builtin_data / "tokenizer")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}{% else %}"
                         "<|Assistant|>{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")
    task = TaskConfig(name="t", format="chat", source={"type": "jsonl", "path": "unused.jsonl"})
    for answer in ("b a", "s"):  # "s" also occurs in the EOS token's text
        row = {"messages": [{"role": "user", "content": "reverse: a b"}, {"role": "assistant", "content": answer}]}
        assert render(task, row, tok) == ("<|User|>reverse: a b<|Assistant|><think>\n", answer + tok.eos_token)


@pytest.mark.parametrize("add_bos, expected", [(None, False), (True, True)])
def test_bos_follows_the_tokenizers_convention_unless_forced(prepared_builtin_data, small_prep_config, tmp_path,
                                                            add_bos, expected):
    """A tokenizer whose `tokenizer(text)` adds no BOS (SmolLM2's, GPT-2's) gets none by default, in the packed
    samples, the manifest and evaluate's prompts alike; `tokenizer.add_bos: true` forces it."""
    from pipeline.evaluate.tasks import encode, eval_rows, from_data

    no_bos = AutoTokenizer.from_pretrained(prepared_builtin_data / "tokenizer", add_bos_token=False)
    no_bos.save_pretrained(tmp_path / "no_bos_tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "no_bos_tok")("a")["input_ids"][0] != no_bos.bos_token_id
    base = small_prep_config()
    cfg = base.model_copy(update={"tasks": [t for t in base.tasks if t.name == "sentiment"],
                                  "tokenizer": base.tokenizer.model_copy(update={
                                      "path": str(tmp_path / "no_bos_tok"), "train_sentencepiece": None,
                                      "add_bos": add_bos})})
    out = run_prep(cfg)
    assert json.loads((out / "manifest.json").read_text())["tokenizer"]["add_bos"] is expected
    r = PackedDataset(out)[0]
    lens = r["seq_lens"].tolist()
    firsts = {int(r["input_ids"][sum(lens[:i])]) for i, n in enumerate(lens) if n > 0}
    assert (firsts == {no_bos.bos_token_id}) is expected, firsts
    taskset = from_data(out)
    task = taskset.tasks[0]
    prompts = encode(task, eval_rows(task, 4)[0], no_bos, taskset.add_bos, taskset.add_eos).prompts
    assert all((p[0] == no_bos.bos_token_id) is expected for p in prompts)


def test_template_task_through_the_chat_template(prepared_builtin_data, small_prep_config, tmp_path):
    """`chat_template: true` (prep-wide here): prompt = user turn, response = assistant turn, the loss on the reply
    only; evaluate's prompts are the same ids, and its reference is the plain answer."""
    from pipeline.evaluate.tasks import encode, eval_rows, from_data

    cfg = chat_tokenizer_config(prepared_builtin_data, small_prep_config(), tmp_path, lambda t: t.name == "sentiment")
    cfg = type(cfg).model_validate({**cfg.model_dump(), "chat_template": True,
                                    "tasks": [{**t.model_dump(), "chat_template": None} for t in cfg.tasks]})
    assert cfg.tasks[0].chat_template is True
    out = run_prep(cfg)
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    r = PackedDataset(out)[0]
    n = int(r["seq_lens"][0])
    text = tok.decode(r["input_ids"][:n].tolist())
    assert text.startswith("<|user|>Review:") and "<|assistant|>" in text and text.rstrip().endswith("<|end|>")
    reply = tok.decode([t for t in r["labels"][:n].tolist() if t != -100])
    assert reply.replace(" ", "").rstrip() in ("negative<|end|>", "positive<|end|>"), reply
    taskset = from_data(out)
    task = taskset.tasks[0]
    assert task.chat_template is True
    rows = eval_rows(task, 3)[0]
    enc = encode(task, rows, tok, taskset.add_bos, taskset.add_eos)
    assert tok.decode(enc.prompts[0]).startswith("<|user|>Review:") and tok.decode(enc.prompts[0]).endswith(
        "<|assistant|>")
    assert enc.ref_texts[0] in ("negative", "positive")
    assert all(tok.decode(c).rstrip().endswith("<|end|>") for c in enc.candidates[0])
