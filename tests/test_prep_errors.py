"""Bad input gives a clear error (file/line, task/column, ...) and leaves no output directory behind."""
from __future__ import annotations

import json
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
    assert all(name in ("src.jsonl", "good.jsonl", "empty.jsonl", "cfg.yaml") for name in left), left


def run(cfg: dict):
    return run_prep(load_config(PrepConfig, data=cfg))


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
    with pytest.raises(PrepError, match=r"task 'plus': max_seq_len 8 is smaller than the longest prompt \(\d+ tokens"):
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
    assert "\nerror: task 'plus': max_seq_len 8 is smaller" in err and "Traceback" not in err
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
    import shutil
    shutil.rmtree(out)
    good.write_text('[\n {"q": "a", "a": "b"},\n {"q": }\n]')
    with pytest.raises(PrepError, match=r"good\.jsonl:3: malformed JSON"):
        run(cfg)
    assert_clean(tmp_path)
