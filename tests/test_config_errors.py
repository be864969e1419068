"""Bad configuration input is a `ConfigError` that names the file and line (or the `--set` override), the key and
what was expected; nothing is started or written. Also: data tokenized with another tokenizer than the model's."""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from pipeline.config.base import ConfigError, load_config, parse_overrides
from pipeline.config.prep import PrepConfig
from pipeline.config.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN_YAML = "output_dir: runs/x\nmodel:\n  path: some/model\ndata:\n  dir: data/x\n"
PREP_YAML = """\
output_dir: out
tokenizer: {path: tok}
tasks:
  - name: cola
    source: {type: jsonl, path: data.jsonl}
    template:
      prompt: "{sentence}"
      verbalizer: VERBALIZER
"""


def write(tmp: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------- wrong value types


def test_wrong_value_type_names_file_line_key_and_expected_type(tmp_path):
    path = write(tmp_path, TRAIN_YAML + "optim:\n  warmup_steps: 3\n  lr: fast\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, path)
    assert f"{path}:8: optim.lr: Input should be a valid number" in str(e.value)
    assert "(got 'fast')" in str(e.value)

    path = write(tmp_path, PREP_YAML.replace("VERBALIZER", "null") + "max_seq_len: [1]\n")
    with pytest.raises(ConfigError, match=rf"{path}:9: max_seq_len: Input should be a valid integer \(got \[1\]\)"):
        load_config(PrepConfig, path)


@pytest.mark.parametrize("override, expected", [
    ("data.task_caps={sentiment: 0}", r"data\.task_caps\.sentiment: Input should be greater than 0"),
    ("data.tasks=[]", r"data\.tasks: List should have at least 1 item"),
    ("seed=-1", r"seed: Input should be greater than or equal to 0"),
])
def test_values_that_make_no_sense_name_the_field(tmp_path, override, expected):
    """A cap of 0 silently dropped the task; an empty task list and a negative seed failed only after the process
    group had started, without naming the field."""
    with pytest.raises(ConfigError, match=rf"--set {re.escape(override)}: {expected}"):
        load_config(TrainConfig, write(tmp_path, TRAIN_YAML), [override])


def test_wrong_type_from_an_override_names_the_override(tmp_path):
    path = write(tmp_path, TRAIN_YAML)
    with pytest.raises(ConfigError, match=r"--set optim\.max_steps=many: optim\.max_steps: Input should be a valid "
                                          r"integer"):
        load_config(TrainConfig, path, ["optim.max_steps=many"])


def test_duplicate_key_names_both_lines(tmp_path):
    # PyYAML silently keeps the last of two equal keys; a config that says lr twice is a mistake.
    path = write(tmp_path, TRAIN_YAML + "optim:\n  lr: 1.0e-4\n  max_steps: 5\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError, match=rf"{path}:9: duplicate key 'optim\.lr' \(first at line 7\)"):
        load_config(TrainConfig, path)


# --------------------------------------------------------------------------------------------- YAML syntax


@pytest.mark.parametrize("text, line", [
    ("output_dir: x\nmodel: {path: m\ndata: {dir: d}\n", 3),  # unclosed flow mapping
    ("output_dir: x\nmodel:\n  path: m\n   dtype: bf16\n", 4),  # bad indentation
    ("output_dir: x\n\tmodel: m\n", 2),  # a tab
])
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text, "bad.yaml")
    with pytest.raises(ConfigError, match=rf"^{path}:{line}:\d+: not valid YAML: "):
        load_config(TrainConfig, path)


# --------------------------------------------------------------------------------------------- --set syntax


@pytest.mark.parametrize("item, expected", [
    ("optim.lr", "is not of the form key.path=value"),
    ("=1", "has an empty key"),
    (" =1", "has an empty key"),
    ("optim..lr=1", "key 'optim..lr' has an empty part"),
    (".lr=1", "key '.lr' has an empty part"),
    ("optim.=1", "key 'optim.' has an empty part"),
    ("optim.betas=[0.9", "the value is not valid YAML"),
])
def test_malformed_override_names_the_override(item, expected):
    with pytest.raises(ConfigError) as e:
        parse_overrides([item])
    assert f"override {item!r}" in str(e.value) and expected in str(e.value)


def test_conflicting_overrides_name_both(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'optim=3' conflicts with the earlier override 'optim\.lr=1'"):
        parse_overrides(["optim.lr=1", "optim=3"])
    with pytest.raises(ConfigError, match=r"override 'seed\.x=1' conflicts with the earlier override 'seed=3'"):
        parse_overrides(["seed=3", "seed.x=1"])
    path = write(tmp_path, TRAIN_YAML + "seed: 3\n")
    with pytest.raises(ConfigError, match=r"override seed\.x: seed is 3 in the config, not a mapping"):
        load_config(TrainConfig, path, ["seed.x=1"])


def test_cli_reports_a_malformed_override_and_writes_nothing(tmp_path, capsys):
    from data_prep.__main__ import main

    path = write(tmp_path, PREP_YAML.replace("VERBALIZER", "null").replace("output_dir: out",
                                                                           f"output_dir: {tmp_path / 'out'}"))
    assert main(["--config", str(path), "--set", "max_seq_len..x=3"]) == 2
    err = capsys.readouterr().err
    assert "error: override 'max_seq_len..x=3'" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


# --------------------------------------------------------------------------------------------- YAML booleans


def test_unquoted_yes_no_in_a_verbalizer_is_an_error_that_says_to_quote(tmp_path):
    """`{0: yes, 1: no}` used to become the label words "True"/"False"."""
    path = write(tmp_path, PREP_YAML.replace("VERBALIZER", "{0: yes, 1: no}"))
    with pytest.raises(ConfigError) as e:
        load_config(PrepConfig, path)
    msg = str(e.value)
    assert f"{path}:8: tasks.0.template.verbalizer.0: Input should be a valid string (got True)" in msg
    assert 'YAML reads the unquoted yes as a boolean: write "yes" (in quotes)' in msg
    assert "tasks.0.template.verbalizer.1" in msg and 'write "no"' in msg

    path = write(tmp_path, PREP_YAML.replace("VERBALIZER", "{0: 'yes', 1: \"no\", 2: 7}"))
    assert load_config(PrepConfig, path).tasks[0].template.verbalizer == {"0": "yes", "1": "no", "2": "7"}


def test_boolean_where_a_string_is_meant_in_the_file(tmp_path):
    path = write(tmp_path, PREP_YAML.replace("VERBALIZER", "null").replace('prompt: "{sentence}"', "prompt: off"))
    with pytest.raises(ConfigError, match=rf"{path}:7: tasks\.0\.template\.prompt: .*write \"off\" \(in quotes\)"):
        load_config(PrepConfig, path)


def test_set_of_a_string_field_keeps_the_text_as_typed(tmp_path):
    """`--set` values are YAML scalars, except where the schema wants text: `name=2024`, `prompt=yes` are text."""
    path = write(tmp_path, PREP_YAML.replace("VERBALIZER", "{0: 'a', 1: 'b'}"))
    cfg = load_config(PrepConfig, path, ["tasks.0.template.prompt=yes", "tasks.0.name=2024", "output_dir=0.5",
                                         "tasks.0.template.verbalizer.1=off", "max_seq_len=64", "skip_invalid=yes"])
    task = cfg.tasks[0]
    assert (task.template.prompt, task.name, cfg.output_dir) == ("yes", "2024", "0.5")
    assert task.template.verbalizer == {"0": "a", "1": "off"}
    assert cfg.max_seq_len == 64 and cfg.skip_invalid is True  # non-string fields still get the parsed value
    with pytest.raises(ConfigError, match=r"--set more\.target_modules=\[q_proj, yes\]: .*quote the value"):
        load_config(TrainConfig, write(tmp_path, TRAIN_YAML), ["more.target_modules=[q_proj, yes]"])


# --------------------------------------------------------------------------------------------- data vs model vocab


def _run_train_main(argv):
    sys.path.insert(0, str(ROOT / "launch"))
    try:
        import importlib

        return importlib.import_module("train").main(argv)
    finally:
        sys.path.remove(str(ROOT / "launch"))


def _scan_max_token_id(data: Path) -> int:
    import datasets

    return max(max(max(row) for row in datasets.load_from_disk(str(data / split))["input_ids"])
               for split in ("train", "eval") if (data / split).is_dir())


def _small_vocab_model(tmp: Path, vocab_size: int) -> Path:
    """A model folder whose config.json has a smaller vocabulary than the data's tokenizer (no weights needed:
    the check must fire before anything loads them)."""
    model = tmp / "small-vocab-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": vocab_size}))
    return model


def test_token_ids_beyond_the_model_vocab_fail_before_any_process_group(tiny_train_setup, tmp_path, capsys):
    import torch.distributed as dist

    from pipeline.train.data import check_data

    data = tiny_train_setup["data"]
    max_id = _scan_max_token_id(data)
    assert 0 < max_id < json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    # The real base has the data's vocabulary: no error.
    assert check_data(load_config(TrainConfig, tiny_train_setup["config"]))

    model = _small_vocab_model(tmp_path, vocab_size=max_id)  # ids 0..max_id-1: the largest id is one too many
    out_dir = tmp_path / "run"
    code = _run_train_main(["--config", str(tiny_train_setup["config"]), "--set", f"output_dir={out_dir}",
                            "--set", f"model.path={model}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"data.dir: {data} holds token ids up to {max_id}" in err
    assert f"model.path {model} has vocab_size {max_id}" in err
    assert not dist.is_initialized() and not out_dir.exists()
    assert json.loads((data / "manifest.json").read_text())["max_token_id"] == max_id  # prep records it


def test_vocab_check_reads_old_manifests_without_max_token_id(tiny_train_setup, tmp_path):
    from pipeline.train.data import check_data, data_max_token_id
    from pipeline.train.loop import validate

    data = tmp_path / "old-data"
    shutil.copytree(tiny_train_setup["data"], data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.pop("max_token_id", None)
    (data / "manifest.json").write_text(json.dumps(manifest))
    max_id = _scan_max_token_id(data)
    assert data_max_token_id(data, manifest) == max_id

    model = _small_vocab_model(tmp_path, vocab_size=max_id)
    cfg = load_config(TrainConfig, tiny_train_setup["config"], [f"data.dir={data}", f"model.path={model}"])
    with pytest.raises(ConfigError, match=rf"holds token ids up to {max_id}, but model\.path .* vocab_size {max_id}"):
        validate(cfg, str(ROOT / "ds_configs" / "zero3.json"))
    # A hub id (no local folder) skips the check rather than guessing.
    assert check_data(cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": "org/some-model"})}))


@pytest.mark.parametrize("overrides, expected", [
    (["hidden_size=100", "num_heads=3"], "hidden_size 100 is not a multiple of num_heads 3"),
    (["num_kv_heads=3"], "num_heads 4 is not a multiple of num_kv_heads 3"),
])
def test_base_model_heads_that_cannot_split_the_width_are_config_errors(overrides, expected):
    """They used to fail inside transformers (a traceback) or at the first training step."""
    from pipeline.config.base_model import BaseModelConfig

    with pytest.raises(ConfigError, match=expected):
        load_config(BaseModelConfig, data={"data_dir": "d", "output_dir": "o"}, overrides=overrides)
