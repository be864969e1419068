"""Checkpoints are complete or absent, resume takes the newest complete one or says why not, pruning stays inside
this run, and a resumed run's config is checked against its checkpoint's. One process, a stand-in engine that
writes files the way DeepSpeed's `save_checkpoint` does (including `latest` unless `save_latest=False`)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"


class FakeEngine:
    """DeepSpeed's checkpoint calls, as files: the client state in mp_rank_00_model_states.pt, `latest` moved by
    save_checkpoint unless save_latest=False, load_checkpoint reading the tag it is given."""

    def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, **_):
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"client_state": client_state, "weights": torch.arange(1000.0)}, d / "mp_rank_00_model_states.pt")
        torch.save({"optim": torch.ones(500)}, d / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
        if save_latest:
            (Path(save_dir) / "latest").write_text(tag)
        return True

    def load_checkpoint(self, load_dir, tag=None, **_):
        tag = tag or (Path(load_dir) / "latest").read_text().strip()
        state = torch.load(Path(load_dir) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        return str(Path(load_dir) / tag), state["client_state"]


# What `checkpoint.run_identity` makes of a config: the resolved config plus `run` facts.
IDENTITY = {"output_dir": "/runs/a", "seed": 0, "model": {"path": "/m", "quantization": "nf4", "dtype": "fp32"},
            "data": {"dir": "/d", "tasks": None, "task_caps": None, "temperature": 2.0},
            "more": {"max_rank": 4, "target_modules": ["q_proj", "v_proj"]},
            "optim": {"lr": 0.01, "max_steps": 6}, "eval": {"every": 0},
            "run": {"world_size": 1, "task_names": ["a", "b"], "data_cache_key": "k1", "base_weights_sha256": "w1"}}


def _save(ckpt, step, keep=5, **run):
    """`run`: run_id / identity (new in the format; left out, the call is the one older code took too)."""
    return checkpoint.save(FakeEngine(), ckpt, step, {"step": step}, keep, 0, **run)


def _changed(identity, **dotted):
    out = json.loads(json.dumps(identity))
    for key, value in dotted.items():
        node = out
        *parents, last = key.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return out


# --------------------------------------------------------------------------------------------- save


def test_latest_moves_only_after_every_file_of_the_checkpoint(tmp_path, monkeypatch):
    """DeepSpeed writes `latest` inside save_checkpoint; the RNG files come after. A save that dies in between must
    not leave `latest` naming a checkpoint without them."""
    ckpt = tmp_path / "checkpoints"
    checkpoint.save(FakeEngine(), ckpt, 1, {"step": 1}, 5, 0)
    real_save = torch.save

    def dies_on_rng(obj, f, *a, **k):
        if "rng_rank" in str(f):
            raise KeyboardInterrupt("killed while writing the RNG state")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dies_on_rng)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(), ckpt, 2, {"step": 2}, 5, 0)
    monkeypatch.setattr(torch, "save", real_save)
    assert (ckpt / "latest").read_text() == "step_1"
    loaded = checkpoint.load(FakeEngine(), ckpt, 0)  # resumes from the complete one
    assert loaded[0]["step"] == 1 and loaded[1]["tag"] == "step_1"


def test_meta_lists_every_file_with_its_size_and_the_run(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 3, run_id="run1", identity=IDENTITY)
    meta = json.loads((ckpt / "step_3" / checkpoint.META).read_text())
    assert meta["step"] == 3 and meta["run_id"] == "run1" and meta["identity"] == IDENTITY
    assert set(meta["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "rng_rank0.pt"}
    assert all(meta["files"][n] == (ckpt / "step_3" / n).stat().st_size for n in meta["files"])
    assert (ckpt / "latest").read_text() == "step_3"
    assert not [p for p in (ckpt / "step_3").iterdir() if p.name.startswith(".")]  # no temp files left


def test_prune_never_deletes_the_new_checkpoint_nor_another_runs(tmp_path):
    """The reported bug: an earlier run's step_200 and step_300 in the folder, a new run saves step_10 with keep=2,
    and pruning by step number deleted step_10 (then `latest` named nothing and a resume restarted at 0)."""
    ckpt = tmp_path / "checkpoints"
    for step in (200, 300):
        checkpoint.save(FakeEngine(), ckpt, step, {"step": step}, 2, 0)
    checkpoint.save(FakeEngine(), ckpt, 10, {"step": 10}, 2, 0)
    assert (ckpt / "step_10").is_dir()
    assert (ckpt / "latest").read_text() == "step_10"
    assert (ckpt / "step_10" / "meta.json").is_file()
    assert (ckpt / "step_200").is_dir() and (ckpt / "step_300").is_dir()


def test_prune_leaves_another_runs_older_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2):
        _save(ckpt, step, run_id="earlier")
    for step in (3, 4, 5):
        _save(ckpt, step, keep=2, run_id="now")
    assert [p.name for _, p in checkpoint.tags(ckpt)] == ["step_1", "step_2", "step_4", "step_5"]


def test_prune_keeps_this_runs_newest_and_drops_unfinished_older_saves(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(ckpt, step, keep=2)
    assert [p.name for _, p in checkpoint.tags(ckpt)] == ["step_2", "step_3"]
    (ckpt / "step_4").mkdir()  # a save killed before meta.json
    (ckpt / "step_4" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    _save(ckpt, 5, keep=2)
    assert [p.name for _, p in checkpoint.tags(ckpt)] == ["step_3", "step_5"]


def test_resaving_a_step_replaces_an_unfinished_save_of_it(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_2").mkdir(parents=True)
    (ckpt / "step_2" / "stale_from_a_killed_save.pt").write_bytes(b"x")
    _save(ckpt, 2)
    assert not (ckpt / "step_2" / "stale_from_a_killed_save.pt").exists()
    assert "stale_from_a_killed_save.pt" not in json.loads((ckpt / "step_2" / checkpoint.META).read_text())["files"]


# --------------------------------------------------------------------------------------------- load


def test_resume_skips_an_unfinished_newest_save_and_says_so(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1)
    _save(ckpt, 2)
    (ckpt / "step_2" / "meta.json").unlink()  # as if killed before the save finished
    (ckpt / "latest").write_text("step_1")
    state, meta = checkpoint.load(FakeEngine(), ckpt, 0)
    assert state["step"] == 1
    assert f"ignoring {ckpt / 'step_2'}: its save did not finish" in capsys.readouterr().out


def test_resume_with_a_missing_rng_file_names_it(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1)
    (ckpt / "step_1" / "rng_rank0.pt").unlink()
    with pytest.raises(RuntimeError, match=r"step_1/rng_rank0\.pt is missing"):
        checkpoint.load(FakeEngine(), ckpt, 0)


def test_resume_from_a_truncated_checkpoint_names_the_file_and_what_to_do(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1)
    _save(ckpt, 2)
    f = ckpt / "step_2" / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(RuntimeError, match=r"step_2/mp_rank_00_model_states\.pt has 100 bytes") as err:
        checkpoint.load(FakeEngine(), ckpt, 0)
    assert "delete" in str(err.value) and "step_1" in str(err.value)


def test_resume_from_an_unreadable_checkpoint_names_it(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 1)
    f = ckpt / "step_1" / "mp_rank_00_model_states.pt"
    f.write_bytes(b"\0" * f.stat().st_size)  # same size, garbage
    with pytest.raises(RuntimeError, match=r"checkpoint .*step_1 could not be loaded"):
        checkpoint.load(FakeEngine(), ckpt, 0)


def test_latest_naming_a_checkpoint_without_meta_is_an_error(tmp_path):
    """A checkpoint from before meta.json (or a damaged one) cannot be checked: say so instead of starting over."""
    ckpt = tmp_path / "checkpoints"
    FakeEngine().save_checkpoint(str(ckpt), tag="step_50", client_state={"step": 50})
    torch.save({}, ckpt / "step_50" / "rng_rank0.pt")
    choice = checkpoint.choose(ckpt)
    assert choice.tag is None and "names" in choice.error and "step_50" in choice.error


def test_no_checkpoint_is_none(tmp_path):
    assert checkpoint.load(FakeEngine(), tmp_path / "checkpoints", 0) is None


# --------------------------------------------------------------------------------------------- config check


def test_resume_refuses_other_model_data_tasks_ranks_and_names_the_fields(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 4, identity=IDENTITY)
    for dotted, field in [({"more__max_rank": 2}, "more.max_rank: 4 -> 2"),
                          ({"more__target_modules": ["q_proj"]}, "more.target_modules"),
                          ({"model__path": "/other"}, 'model.path: "/m" -> "/other"'),
                          ({"data__tasks": ["a"]}, "data.tasks"),
                          ({"run__task_names": ["a", "b", "c"]}, "run.task_names"),
                          ({"run__data_cache_key": "k2"}, "run.data_cache_key"),
                          ({"run__world_size": 2}, "run.world_size: 1 -> 2"),
                          ({"run__base_weights_sha256": "w2"}, 'run.base_weights_sha256: "w1" -> "w2"')]:
        with pytest.raises(RuntimeError, match="other settings") as err:
            checkpoint.load(FakeEngine(), ckpt, 0, _changed(IDENTITY, **dotted))
        assert field in str(err.value), (dotted, str(err.value))


def test_resume_from_a_checkpoint_without_a_base_weights_fingerprint(tmp_path):
    """Checkpoints written before the fingerprint was recorded resume; the fingerprint is compared where both have
    one (above)."""
    ckpt = tmp_path / "checkpoints"
    older = _changed(IDENTITY)
    del older["run"]["base_weights_sha256"]
    _save(ckpt, 4, identity=older)
    assert checkpoint.load(FakeEngine(), ckpt, 0, IDENTITY)[0]["step"] == 4


def test_resume_allows_and_says_a_changed_lr_or_max_steps(tmp_path, capsys):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 4, identity=IDENTITY)
    state, _ = checkpoint.load(FakeEngine(), ckpt, 0,
                               _changed(IDENTITY, optim__lr=0.005, optim__max_steps=10, output_dir="/moved"))
    assert state["step"] == 4
    out = capsys.readouterr().out
    assert "optim.lr: 0.01 -> 0.005" in out and "optim.max_steps: 6 -> 10" in out and "output_dir" not in out


def test_no_resume_over_existing_checkpoints_is_refused_before_training(tiny_train_setup, tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train.loop import validate

    run = tmp_path / "run"
    for step in (200, 300):
        (run / "checkpoints" / f"step_{step}").mkdir(parents=True)
    cfg = load_config(TrainConfig, tiny_train_setup["config"], [f"output_dir={run}", "checkpoint.resume=never"])
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run") as err:
        validate(cfg, str(ROOT / "ds_configs" / "zero3.json"))
    assert "step_200" in str(err.value) and "delete" in str(err.value)
    fresh = load_config(TrainConfig, tiny_train_setup["config"], [f"output_dir={tmp_path / 'new'}",
                                                                   "checkpoint.resume=never"])
    validate(fresh, str(ROOT / "ds_configs" / "zero3.json"))  # an empty folder is fine


# --------------------------------------------------------------------------------------------- logs


def test_a_resumed_run_drops_metrics_logged_after_its_checkpoint(tmp_path):
    from pipeline.train.monitor import Monitor

    lines = [json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 6, "train/lo')  # a killed run's last line
    Monitor(tmp_path, 10, 3, True).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:3])


# --------------------------------------------------------------------------------------------- a NaN


def test_non_finite_loss_stops_before_the_update_and_no_checkpoint_has_that_step(tiny_train_setup, tmp_path):
    """A contrastive temperature that overflows the similarities gives a NaN contrastive loss while the LM loss is
    finite: DeepSpeed skipped such updates silently (non-finite gradient norm) and the run went on, checkpointing
    steps whose update never happened. Now the step is named and nothing is written for it."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(tiny_train_setup["config"]),
                           "--set", f"output_dir={run}", "--set", "more.contrastive.temperature=1e-45",
                           "--set", "checkpoint.every=1", "--set", "optim.max_steps=2"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step 1: the loss (LM + contrastive) is not finite on rank(s) [0]" in proc.stderr, proc.stderr[-3000:]
    assert not checkpoint.tags(run / "checkpoints") and not (run / "adapter").exists()


def test_resume_trains_with_a_changed_lr_and_refuses_a_changed_rank(tiny_train_setup, tmp_path):
    """End to end, one process: the allowed change is said and takes effect (the loaded optimizer and scheduler
    states carry the old lr); the refused ones (a rank; the base's weights rewritten under the same model.path) name
    the field and train nothing."""
    import shutil

    run, model = tmp_path / "run", Path(shutil.copytree(tiny_train_setup["base"], tmp_path / "base"))
    base = [sys.executable, str(TRAIN), "--config", str(tiny_train_setup["config"]), "--set", f"output_dir={run}",
            "--set", "checkpoint.every=2", "--set", f"model.path={model}"]
    first = subprocess.run(base + ["--set", "optim.max_steps=2"], env=_env(), cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    more = subprocess.run(base + ["--set", "optim.max_steps=3", "--set", "optim.lr=0.005"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-3000:]
    assert "optim.lr: 0.01 -> 0.005" in more.stdout and "optim.max_steps: 2 -> 3" in more.stdout, more.stdout
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in more.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["train/lr"] for r in records if "train/lr" in r}
    assert lrs == {1: 0.01, 2: 0.01, 3: 0.005}
    refused = subprocess.run(base + ["--set", "optim.max_steps=4", "--set", "more.max_rank=2"], env=_env(), cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0
    assert "more.max_rank: 4 -> 2" in refused.stderr, refused.stderr[-3000:]
    assert max(r["step"] for r in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())) == 3
    from transformers import AutoTokenizer

    from pipeline.models import build_tiny_llama
    from pipeline.models.base_weights import weights_fingerprint

    trained_on = weights_fingerprint(model, "fp32")
    assert json.loads((run / "adapter" / "more_config.json").read_text())["base_model"]["weights_sha256"] == trained_on
    tok = AutoTokenizer.from_pretrained(model)
    build_tiny_llama(model, vocab_size=len(tok), tokenizer=tok, hidden_size=64, num_layers=2, seed=1)
    refused = subprocess.run(base + ["--set", "optim.max_steps=4"], env=_env(), cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert refused.returncode != 0
    assert f'run.base_weights_sha256: "{trained_on}" -> "{weights_fingerprint(model, "fp32")}"' in refused.stderr, \
        refused.stderr[-3000:]


def _env() -> dict:
    import os

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "PIPELINE_NAN_AT"):
        env.pop(k, None)
    return env


def test_every_0_checkpoints_at_the_end_lr_is_the_applied_one_and_no_eval_split_logs_no_eval_loss(
        tiny_train_setup, tmp_path):
    """One process, 3 steps, `checkpoint.every: 0`, 2 warm-up steps, data without an eval split:
    - the end checkpoint is written ("0 = only on SIGTERM and at the end"), so the same command again has nothing
      to do and a larger max_steps resumes;
    - `train/lr` is the rate each step applied (warm-up: lr/2 at step 1), not the next step's;
    - without held-out data no `eval/loss` is logged (it used to log 0.0, a perfect loss)."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_train_setup["data"], data, ignore=lambda d, names: ["eval"] if Path(d) == Path(
        tiny_train_setup["data"]) else [])
    run = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN), "--config", str(tiny_train_setup["config"]), "--set", f"output_dir={run}",
           "--set", f"data.dir={data}", "--set", "optim.warmup_steps=2", "--set", "eval.every=1"]

    def train(*extra):
        proc = subprocess.run(cmd + list(extra), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    train("--set", "optim.max_steps=3")
    assert (run / "checkpoints" / "step_3").is_dir()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["train/lr"] for r in records if "train/lr" in r} == {1: 0.005, 2: 0.01, 3: 0.01}
    assert not any(k.startswith("eval/") for r in records for k in r), records
    assert "already trained to step 3" in train("--set", "optim.max_steps=3")
    assert f"resumed from {run / 'checkpoints' / 'step_3'} at step 3" in train("--set", "optim.max_steps=4")


def test_a_complete_checkpoint_is_never_written_again(tmp_path):
    """Saving a step whose checkpoint is complete would delete it first (a kill then leaves `latest` on nothing):
    refused, the checkpoint untouched. An unfinished folder of that step is replaced as before."""
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 4)
    before = {p: p.stat().st_mtime_ns for p in (ckpt / "step_4").rglob("*")}
    with pytest.raises(checkpoint.CheckpointError, match="step_4 is complete already"):
        _save(ckpt, 4)
    assert {p: p.stat().st_mtime_ns for p in (ckpt / "step_4").rglob("*")} == before
    (ckpt / "step_5").mkdir()
    (ckpt / "step_5" / "partial").write_text("x")
    _save(ckpt, 5)
    assert not (ckpt / "step_5" / "partial").exists() and (ckpt / "step_5" / "meta.json").is_file()
