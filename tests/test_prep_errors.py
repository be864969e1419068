"""Bad input gives a clear error (file/line, task/column, ...) and leaves no output directory behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config.base import ConfigError, load_config
from pipeline.config.prep import PrepConfig
from pipeline.data.errors import PrepError
from pipeline.data.prep import run_prep

ROWS = [{"q": f"what is {i} plus one", "a": str(i + 1)} for i in range(40)]


def make_cfg(tmp: Path, lines: list[str] | None = None, **top) -> dict:
    src = tmp / "src.jsonl"
    src.write_text("".join(x + "\n" for x in (lines if lines is not None else [json.dumps(r) for r in ROWS])))
    cfg = {"output_dir": str(tmp / "out"), "tokenizer": {"train_sentencepiece": {"vocab_size": 300}},
           "max_seq_len": 64,
           "tasks": [{"name": "plus", "source": {"type": "jsonl", "path": str(src)},
                      "template": {"prompt": "Q: {q}\nA:", "response": "{a}"}}]}
    cfg.update(top)
    return cfg


def assert_clean(tmp: Path):
    """No output folder, no temporary or scratch folder: only the inputs the test wrote."""
    left = sorted(p.name for p in tmp.iterdir())
    assert not (tmp / "out").exists() and not (tmp / "out.shards").exists()
    assert all(name in ("src.jsonl", "good.jsonl", "empty.jsonl", "long.jsonl", "cfg.yaml") for name in left), left


def run(cfg: dict):
    return run_prep(load_config(PrepConfig, data=cfg))


def assert_named_then_skipped(tmp: Path, cfg: dict, error: str) -> None:
    """One bad row: an error matching `error` with nothing written; with skip_invalid, the row left out and
    counted."""
    with pytest.raises(PrepError, match=error):
        run(cfg)
    assert_clean(tmp)
    task = json.loads((run(dict(cfg, skip_invalid=True)) / "manifest.json").read_text())["tasks"]["plus"]
    assert task["invalid"] == 1 and task["examples"] == len(ROWS) - 1


def test_malformed_json_line_names_file_and_line(tmp_path):
    lines = [json.dumps(r) for r in ROWS]
    lines[6] = '{"q": "broken", "a": '
    cfg = make_cfg(tmp_path, lines)
    with pytest.raises(PrepError, match=r"src\.jsonl:7: malformed JSON"):
        run(cfg)
    assert_clean(tmp_path)


def test_skip_invalid_counts_the_bad_lines(tmp_path):
    lines = [json.dumps(r) for r in ROWS]
    lines[6] = '{"q": "broken", "a": '
    lines[9] = "[1, 2]"
    out = run(make_cfg(tmp_path, lines, skip_invalid=True))
    task = json.loads((out / "manifest.json").read_text())["tasks"]["plus"]
    assert task["invalid"] == 2 and task["read"] == len(ROWS) - 2 and task["examples"] == len(ROWS) - 2


def test_template_with_missing_column_names_task_column_and_columns(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg["tasks"][0]["template"]["prompt"] = "Q: {question}\nA:"
    with pytest.raises(PrepError) as e:
        run(cfg)
    msg = str(e.value)
    assert "'plus'" in msg and "question" in msg and "available columns: ['a', 'q']" in msg
    assert_clean(tmp_path)


def test_empty_source(tmp_path):
    cfg = make_cfg(tmp_path, lines=[])
    with pytest.raises(PrepError, match=r"task 'plus'.*src\.jsonl has no examples"):
        run(cfg)
    assert_clean(tmp_path)


def test_unknown_task_in_sampling_weights(tmp_path):
    cfg = make_cfg(tmp_path, sampling={"temperature": 2.0, "weights": {"plsu": 2.0}})
    with pytest.raises(ConfigError, match=r"sampling\.weights names unknown task 'plsu'; tasks are: plus"):
        run(cfg)
    cfg = make_cfg(tmp_path, sampling={"caps": {"nope": 10}})
    with pytest.raises(ConfigError, match=r"sampling\.caps names unknown task 'nope'"):
        run(cfg)
    assert_clean(tmp_path)


def test_max_seq_len_smaller_than_longest_prompt(tmp_path):
    cfg = make_cfg(tmp_path, max_seq_len=8)
    with pytest.raises(PrepError, match=r"task 'plus': .*src\.jsonl:\d+: max_seq_len 8 is smaller than this row's "
                                        r"prompt \(\d+ tokens, the longest\)"):
        run(cfg)
    assert_clean(tmp_path)


def test_unknown_config_key_names_key_and_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("output_dir: x\nmax_seq_lenn: 5\n")
    with pytest.raises(ConfigError, match=r"(?s)cfg\.yaml.*unknown key 'max_seq_lenn'"):
        load_config(PrepConfig, path)


def test_failure_keeps_the_previous_output_intact(tmp_path):
    out = run(make_cfg(tmp_path))
    before = (out / "manifest.json").read_bytes()
    cfg = make_cfg(tmp_path)
    cfg["tasks"].append({"name": "bad", "source": {"type": "jsonl", "path": str(tmp_path / "empty.jsonl")},
                         "template": {"prompt": "{q}", "response": "{a}"}})
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PrepError, match="task 'bad'"):
        run(cfg)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "out", "src.jsonl"]


def test_cli_prints_the_error_without_traceback(tmp_path, capsys):
    import yaml
    from data_prep.__main__ import main

    cfg = make_cfg(tmp_path, max_seq_len=8)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "cfg.yaml")]) == 2
    err = capsys.readouterr().err
    assert "\nerror: task 'plus': " in err and "max_seq_len 8 is smaller" in err and "Traceback" not in err
    assert_clean(tmp_path)


def test_refuses_to_replace_a_folder_that_is_not_prep_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(PrepError, match="not a prepared-data folder"):
        run(make_cfg(tmp_path))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_json_list_source_and_malformed_json_file(tmp_path):
    cfg = make_cfg(tmp_path)
    good = tmp_path / "good.jsonl"  # a JSON list despite the name: `type: json` reads the whole file
    good.write_text(json.dumps(ROWS, indent=1))
    cfg["tasks"][0]["source"] = {"type": "json", "path": str(good)}
    out = run(cfg)
    assert json.loads((out / "manifest.json").read_text())["tasks"]["plus"]["examples"] == len(ROWS)
    shutil.rmtree(out)
    good.write_text('[\n {"q": "a", "a": "b"},\n {"q": }\n]')
    with pytest.raises(PrepError, match=r"good\.jsonl:3: malformed JSON"):
        run(cfg)
    assert_clean(tmp_path)


@pytest.mark.parametrize("bad_row", ['{"a": "13"}', '{"q": null, "a": "13"}'])
def test_one_row_missing_a_template_field_names_file_line_and_field(tmp_path, bad_row):
    """The other rows have the column, so the column check passes; the row used to render as "Q: None"."""
    lines = [json.dumps(r) for r in ROWS]
    lines[12] = bad_row
    assert_named_then_skipped(tmp_path, make_cfg(tmp_path, lines),
                              r"task 'plus': .*src\.jsonl:13: field 'q' is missing or null \(1 such row")


@pytest.mark.parametrize("bad_messages,problem", [
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], "message 0 .* text `role` and `content`"),
    ([{"role": "user", "content": "q"}], "`messages` must end with an assistant message"),
    ([], "`messages` is empty"),
])
def test_one_bad_chat_row_names_file_line_and_problem_or_is_skipped(tmp_path, bad_messages, problem):
    """A null content used to render as the word "None" into the training text."""
    rows = [{"messages": [{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}]}
            for r in ROWS]
    rows[12] = {"messages": bad_messages}
    cfg = make_cfg(tmp_path, [json.dumps(r) for r in rows])
    cfg["tasks"][0] = {"name": "plus", "format": "chat", "source": cfg["tasks"][0]["source"]}
    assert_named_then_skipped(tmp_path, cfg, rf"task 'plus': .*src\.jsonl:13: {problem}")


def test_task_emptied_by_overflow_drop_is_named_and_nothing_written(tmp_path):
    out = run(make_cfg(tmp_path, overflow="drop"))
    before = (out / "manifest.json").read_bytes()
    long_src = tmp_path / "long.jsonl"
    long_src.write_text("".join(json.dumps({"q": " ".join(["seven hundred"] * 60), "a": str(i)}) + "\n"
                                for i in range(10)))
    cfg = make_cfg(tmp_path, overflow="drop")
    cfg["tasks"].append({"name": "long", "source": {"type": "jsonl", "path": str(long_src)},
                         "template": {"prompt": "Q: {q}\nA:", "response": "{a}"}})
    with pytest.raises(PrepError, match=r"task 'long': no training examples left: overflow: drop removed 10 of its "
                                        r"10 samples \(longer than max_seq_len 64\)"):
        run(cfg)
    assert (out / "manifest.json").read_bytes() == before
    shutil.rmtree(out)
    with pytest.raises(PrepError, match="task 'long': no training examples left"):
        run(cfg)
    assert_clean(tmp_path)


def test_merge_with_a_shard_missing_names_it_and_writes_nothing(tmp_path, capsys):
    import yaml
    from data_prep.__main__ import main

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(make_cfg(tmp_path)))
    shards = tmp_path / "out.shards"
    assert main(["--config", str(cfg_file), "--shard", "0/3"]) == 0
    assert main(["--config", str(cfg_file), "--shard", "2/3"]) == 0
    assert main(["--config", str(cfg_file), "--set", "seed=1", "--shard", "1/3"]) == 0  # another config
    capsys.readouterr()
    assert main(["--config", str(cfg_file), "--merge-shards"]) == 2
    err = capsys.readouterr().err
    assert f"error: --merge-shards: shard(s) missing: {shards / '1-of-3'} (was prepared from another config/data)" \
        in err, err
    assert not (tmp_path / "out").exists()

    shutil.rmtree(shards / "1-of-3")
    assert main(["--config", str(cfg_file), "--merge-shards"]) == 2
    assert f"{shards / '1-of-3'} (not found)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in shards.iterdir()) == ["0-of-3", "2-of-3"]


def test_merge_with_an_unreadable_shard_record_names_the_file(tmp_path):
    cfg = load_config(PrepConfig, data=make_cfg(tmp_path))
    for i in range(2):
        run_prep(cfg, shard=(i, 2))
    record = tmp_path / "out.shards" / "1-of-2" / "shard.json"
    record.write_text('{"cache_key": ')
    with pytest.raises(PrepError, match=rf"--merge-shards: {record} is not a readable shard record"):
        run_prep(cfg, merge_shards=True)
    assert not (tmp_path / "out").exists()


def test_unquoted_yes_no_verbalizer_keys_hint_at_quoting(tmp_path):
    """Keys stay label values compared as text (`true:` matches a boolean label), so `{yes: positive}` is the key
    'True'; a text label 'yes' then has no entry, and the error says why."""
    lines = [json.dumps({"q": r["q"], "label": "yes" if i % 2 else "no"}) for i, r in enumerate(ROWS)]
    cfg = make_cfg(tmp_path, lines)
    cfg["tasks"][0]["template"] = {"prompt": "Q: {q}\nA:", "verbalizer": {True: "positive", False: "negative"}}
    with pytest.raises(PrepError, match=r"label 'no' .*keys: \['False', 'True'\]; YAML reads an unquoted "
                                        r"yes/no/on/off/true/false key as a boolean"):
        run(cfg)
    assert_clean(tmp_path)


def test_a_label_without_verbalizer_entry_names_file_and_line_or_is_skipped(tmp_path):
    """Found before the tokenizer trains on the rows (the error used to come back wrapped as a sentencepiece
    failure, naming the example by its 0-based id), and left out with skip_invalid like any other bad row."""
    lines = [json.dumps({"q": r["q"], "label": i % 2}) for i, r in enumerate(ROWS)]
    lines[12] = json.dumps({"q": "odd one", "label": 7})
    cfg = make_cfg(tmp_path, lines)
    cfg["tasks"][0]["template"] = {"prompt": "Q: {q}\nA:", "verbalizer": {0: "no", 1: "yes"}}
    with pytest.raises(PrepError, match=r"^task 'plus': \S*src\.jsonl:13: label 7 has no verbalizer entry \(1 such "
                                        r"row\(s\); fix the data or set skip_invalid: true\); verbalizer keys: "
                                        r"\['0', '1'\]$"):
        run(cfg)
    assert_clean(tmp_path)
    out = run(dict(cfg, skip_invalid=True))
    task = json.loads((out / "manifest.json").read_text())["tasks"]["plus"]
    assert task["invalid"] == 1 and task["examples"] == len(ROWS) - 1


@pytest.mark.parametrize("stage", ["tokenizer_training", "tokenization"])
def test_a_row_the_template_cannot_render_names_file_and_line(tmp_path, stage, request):
    """A template that fails on one row only (here an index past a short text) names the row as file:line in both
    places prep renders rows: the texts a sentencepiece tokenizer learns from, and tokenization."""
    lines = [json.dumps(r) for r in ROWS]
    lines[12] = json.dumps({"q": "short", "a": "1"})
    cfg = make_cfg(tmp_path, lines)
    cfg["tasks"][0]["template"]["prompt"] = "Q: {q[8]}\nA:"
    if stage == "tokenization":  # a ready tokenizer: nothing renders the rows before tokenization
        cfg["tokenizer"] = {"path": str(request.getfixturevalue("tiny_chat_model")), "train_sentencepiece": None}
    with pytest.raises(PrepError, match=r"task 'plus': template could not be rendered for \S*src\.jsonl:13: "
                                        r"IndexError"):
        run(cfg)
    assert_clean(tmp_path)


def test_a_key_missing_from_the_first_row_is_kept_for_the_others(tmp_path):
    """The table's columns come from every row, not the first: an alpaca `input` that line 1 lacks stays in the
    other rows' prompts, and a template field that only line 1 lacks is named by that line."""
    from pipeline.data.render import render
    from pipeline.data.sources import load_task

    rows = [{"instruction": "Sort", "output": "1"}] + [{"instruction": "Sort", "input": f"{i} 1", "output": "1"}
                                                       for i in range(2, 5)]
    cfg = make_cfg(tmp_path, [json.dumps(r) for r in rows])
    task = load_config(PrepConfig, data=dict(cfg, tasks=[{"name": "sort", "format": "alpaca",
                                                          "source": cfg["tasks"][0]["source"]}])).tasks[0]
    ds, _ = load_task(task, None)
    prompts = [render(task, r)[0] for r in ds]
    assert "Input" not in prompts[0] and all(f"Input: {i} 1" in p for i, p in zip(range(2, 5), prompts[1:]))
    lines = [json.dumps({"q": "first"})] + [json.dumps(r) for r in ROWS[1:]]
    with pytest.raises(PrepError, match=r"src\.jsonl:1: field 'a' is missing or null \(1 such row"):
        run(make_cfg(tmp_path, lines))
    assert_clean(tmp_path)


def test_a_type_clash_between_rows_names_both_lines_and_the_field(tmp_path):
    lines = [json.dumps(r) for r in ROWS]
    lines[4] = json.dumps({"q": ["a", "list"], "a": "5"})
    with pytest.raises(PrepError, match=r"src\.jsonl:5: field 'q' is list \['a', 'list'\], but .*src\.jsonl:1 has "
                                        r"string 'what is 0 plus one' there"):
        run(make_cfg(tmp_path, lines))
    lines = [json.dumps(dict(r, n=i)) for i, r in enumerate(ROWS)]
    lines[3] = json.dumps(dict(ROWS[3], n=4.5))  # ints and floats mix (read as text): no error
    assert run(make_cfg(tmp_path, lines)).is_dir()


def test_integers_beside_decimals_render_as_the_file_writes_them(tmp_path):
    """A JSON column of 42 and 2.5 is one float column to Arrow; the answer 42 must still train as "42", not
    "42.0". A column of decimals alone stays numeric (3.0 is what that file writes)."""
    from pipeline.data.render import render
    from pipeline.data.sources import load_task

    rows = [{"q": "six times seven", "a": 42, "s": 1.0}, {"q": "five halves", "a": 2.5, "s": 3.0},
            {"q": "nothing", "a": None, "s": 0.25}, {"q": "a million", "a": 1000000, "s": 2.0}]
    cfg = make_cfg(tmp_path, [json.dumps(r) for r in rows])
    task = load_config(PrepConfig, data=dict(cfg, tasks=[dict(cfg["tasks"][0], template={
        "prompt": "Q: {q} ({s})\nA:", "response": " {a}"})])).tasks[0]
    ds, _ = load_task(task, None)
    assert list(ds["a"]) == ["42", "2.5", None, "1000000"] and list(ds["s"]) == [1.0, 3.0, 0.25, 2.0]
    assert [render(task, r)[1] for r in ds.select([0, 1, 3])] == [" 42", " 2.5", " 1000000"]
    assert render(task, ds[0])[0] == "Q: six times seven (1.0)\nA:"


def test_a_mixed_number_label_column_still_matches_its_verbalizer(tmp_path):
    """Labels 1, 0.5 and 2.0 in one JSON column are read as the text "1", "0.5", "2.0"; keys written either way
    ("1.0" for 1, "2" for 2.0) must still match, as they did when the column was read as floats."""
    from pipeline.data.render import render, verbalizer_key
    from pipeline.data.sources import load_task

    rows = [{"q": "one", "a": 1}, {"q": "half", "a": 0.5}, {"q": "two", "a": 2.0}]
    cfg = make_cfg(tmp_path, [json.dumps(r) for r in rows])
    task = load_config(PrepConfig, data=dict(cfg, tasks=[dict(cfg["tasks"][0], template={
        "prompt": "Q: {q}\nA:", "response": " {label_text}", "label_column": "a",
        "verbalizer": {"1.0": "one", "0.5": "half", "2": "two"}})])).tasks[0]
    ds, _ = load_task(task, None)
    assert list(ds["a"]) == ["1", "0.5", "2.0"]
    assert [render(task, r)[1] for r in ds] == [" one", " half", " two"]
    assert verbalizer_key({"1": "x"}, "01") is None and verbalizer_key({"1": "x"}, True) is None
    assert verbalizer_key({"12345678901234567890": "x"}, 12345678901234567891) is None  # equal as floats


def test_a_line_that_is_not_utf8_names_file_and_line_or_is_skipped(tmp_path):
    cfg = make_cfg(tmp_path)
    src = Path(cfg["tasks"][0]["source"]["path"])
    data = src.read_bytes().split(b"\n")
    data[7] = b'{"q": "caf\xe9", "a": "1"}'  # latin-1, not UTF-8
    src.write_bytes(b"\n".join(data))
    assert_named_then_skipped(tmp_path, cfg, r"src\.jsonl:8: not UTF-8")


def test_an_eval_split_that_would_reread_the_training_rows_is_refused(tmp_path):
    """eval.from_task_eval_split with a source that has no splits (one file, one save_to_disk dataset) used to read
    the training rows again as the eval split."""
    import datasets

    cfg = make_cfg(tmp_path, eval={"fraction": 0, "from_task_eval_split": True})
    cfg["tasks"][0].update(eval_split="validation")
    cfg["tasks"][0]["source"]["split"] = "train"
    with pytest.raises(PrepError, match=r"split 'validation' would read the same rows as the training split 'train' "
                                        r"from .*src\.jsonl \(no \{split\} in its path\)"):
        run(cfg)
    assert_clean(tmp_path)
    disk = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(disk))
    cfg["tasks"][0]["source"] = {"type": "disk", "path": str(disk), "split": "train"}
    with pytest.raises(PrepError, match=r"split 'validation' would read the same rows .*one dataset, no splits"):
        run(cfg)
    cfg["tasks"][0]["source"]["path"] = str(tmp_path)  # a folder that is not a dataset
    with pytest.raises(PrepError, match=r"task 'plus': .* is not a dataset folder written by save_to_disk"):
        run(cfg)


def test_a_format_spec_that_does_not_fit_the_value_names_file_and_line(tmp_path):
    cfg = make_cfg(tmp_path, [json.dumps({"q": [r["q"]], "a": r["a"]}) for r in ROWS])
    cfg["tasks"][0]["template"]["prompt"] = "Q: {q:>8}\nA:"
    with pytest.raises(PrepError, match=r"could not be rendered for .*src\.jsonl:1: TypeError"):
        run(cfg)
    assert_clean(tmp_path)


def test_a_row_with_no_tokens_names_file_and_line_or_is_skipped(tmp_path):
    """An empty prompt and response with no BOS/EOS used to pack as an empty sample, which broke the sampler."""
    lines = [json.dumps(r) for r in ROWS]
    lines[9] = json.dumps({"q": "", "a": ""})
    cfg = make_cfg(tmp_path, lines, tokenizer={"train_sentencepiece": {"vocab_size": 300}, "add_bos": False,
                                               "add_eos": False})
    cfg["tasks"][0]["template"] = {"prompt": "{q}", "response": "{a}"}
    assert_named_then_skipped(tmp_path, cfg, r"src\.jsonl:10: the row renders to no tokens")


def test_a_row_the_chat_template_refuses_names_the_row(prepared_builtin_data):
    from pipeline.config.tasks import TaskConfig
    from pipeline.data.render import render
    from pipeline.data.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared_builtin_data / "tokenizer")
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first turn must be the "
                         "user\\'s') }}{% endif %}{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    task = TaskConfig(name="c", format="chat", source={"type": "jsonl", "path": "x.jsonl"})
    row = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "again"}]}
    with pytest.raises(PrepError, match=r"task 'c': x\.jsonl:3: the tokenizer's chat template cannot render this row "
                                        r"\(TemplateError: the first turn must be the user's\)"):
        render(task, row, tok, where="x.jsonl:3")
