"""The training stage for real: DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), NF4 base, MoRE, packed multi-task data.

The multi-process runs are marked slow; they still run in CI. Ranks are started either by the `deepspeed`
launcher (the README's main entry) or one process per rank with RANK/WORLD_SIZE set, as srun does.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "launch" / "train.py"
ZERO3 = ROOT / "ds_configs" / "zero3.json"
ZERO2 = ROOT / "ds_configs" / "zero2.json"


def _env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    return env


def spawn_ranks(world: int, args: list[str], log_dir: Path, env_extra: dict | None = None) -> list[subprocess.Popen]:
    """One process per rank, as srun starts them (RANK / LOCAL_RANK / WORLD_SIZE / MASTER_*)."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, **(env_extra or {}))
        log = open(log_dir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, str(TRAIN), *args], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


def wait_all(procs, timeout=600) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        codes.append(p.wait(timeout=max(1, deadline - time.time())))
    return codes


def term_when_all_paused(procs, log_dir: Path, timeout=600) -> None:
    """Once every rank waits at its `pause` fault point, SIGTERM to each, as SLURM signals every task of a step."""
    deadline = time.time() + timeout
    while not all("[faults] pause on rank" in (log_dir / f"rank{r}.log").read_text() for r in range(len(procs))):
        assert time.time() < deadline and all(p.poll() is None for p in procs), _logs(log_dir)
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGTERM)


def step_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def records(run_dir: Path) -> list[dict]:
    """Every record of metrics.jsonl, in order (a step logged twice appears twice)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of each record that has `key`, in file order."""
    return [(r["step"], r[key]) for r in records(run_dir) if key in r]


def _logs(d: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(d.glob("rank*.log")))


# --------------------------------------------------------------------------------------------- bad configs


def _run_main(argv):
    sys.path.insert(0, str(TRAIN.parent))
    try:
        import importlib

        mod = importlib.import_module("train")
        return mod.main(argv)
    finally:
        sys.path.remove(str(TRAIN.parent))


@pytest.mark.parametrize("override, expected", [
    ("bogus_key=1", "unknown key 'bogus_key'"),
    ("data.dir=/nonexistent/data", "/nonexistent/data/manifest.json not found"),
    ("data.tasks=[sentiment,no_such_task]", "data.tasks: task(s) ['no_such_task']"),
    ("optim.micro_batch_size=0", "optim.micro_batch_size"),
    ("model.path=runs/nonexistent/base", "model.path: runs/nonexistent/base is not a directory"),
    ("model.path=tests/no_such_model", "model.path: tests/no_such_model is not a directory"),
])
def test_bad_config_fails_before_any_process_group(tiny_train_setup, tmp_path, capsys, override, expected):
    import torch.distributed as dist

    out_dir = tmp_path / "run"
    code = _run_main(["--config", str(tiny_train_setup["config"]), "--set", f"output_dir={out_dir}", "--set", override])
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err, err
    assert not dist.is_initialized()
    assert not out_dir.exists()


def test_a_sliding_window_model_with_the_dense_mask_is_refused(tiny_train_setup, tmp_path, capsys):
    """The collator's dense mask has no window: a model attending within fewer tokens than a row holds is refused
    with sdpa/eager before anything starts; packed_sdpa (which applies the window) passes that check."""
    from pipeline.config import ConfigError, load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train.data import check_data

    model = tmp_path / "windowed"
    model.mkdir()
    config = json.loads((tiny_train_setup["base"] / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, sliding_window=4)))
    for attn in ("sdpa", "eager", "packed_sdpa"):
        cfg = load_config(TrainConfig, tiny_train_setup["config"], [f"model.path={model}",
                                                                    f"model.attn_implementation={attn}"])
        if attn == "packed_sdpa":
            check_data(cfg)
            continue
        with pytest.raises(ConfigError, match=rf"model.attn_implementation: {attn} takes the collator's dense mask, "
                                              r"which has no sliding window, .* window of 4 tokens"):
            check_data(cfg)
    (model / "config.json").write_text(json.dumps(dict(config, sliding_window=4, use_sliding_window=False)))
    check_data(load_config(TrainConfig, tiny_train_setup["config"], [f"model.path={model}",
                                                                     "model.attn_implementation=sdpa"]))


def test_ds_config_auto_values_filled_and_conflicts_named(tiny_train_setup, tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train.ds_config import fill_ds_config

    cfg = load_config(TrainConfig, tiny_train_setup["config"], ["optim.grad_accum=3", "model.dtype=bf16"])
    ds = fill_ds_config(ZERO3, cfg, world_size=4)
    assert ds["train_batch_size"] == 2 * 3 * 4
    assert ds["gradient_accumulation_steps"] == 3 and ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    assert "auto" not in json.dumps(ds)
    bad = json.loads(ZERO3.read_text())
    bad["train_micro_batch_size_per_gpu"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu = 7 disagrees"):
        fill_ds_config(tmp_path / "bad.json", cfg, world_size=1)


def test_ds_config_precision_sections_follow_model_dtype(tiny_train_setup, tmp_path):
    """bf16 / fp16 mode follow model.dtype, also for a JSON without those sections (an fp16 run outside DeepSpeed's
    fp16 mode would have no loss scaling); fp16 on a device DeepSpeed has no fp16 for is refused at config time."""
    from deepspeed.accelerator import get_accelerator

    from pipeline.config import ConfigError, load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train.ds_config import fill_ds_config

    bare = json.loads(ZERO3.read_text())
    bare.pop("bf16"), bare.pop("fp16")
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    for dtype in ("fp32", "bf16", "fp16"):
        cfg = load_config(TrainConfig, tiny_train_setup["config"], [f"model.dtype={dtype}"])
        for path in (ZERO3, ZERO2, tmp_path / "bare.json"):
            if dtype == "fp16" and not get_accelerator().is_fp16_supported():
                with pytest.raises(ConfigError, match="model.dtype: fp16 trains in DeepSpeed's fp16 mode"):
                    fill_ds_config(path, cfg, world_size=2)
                continue
            ds = fill_ds_config(path, cfg, world_size=2)
            assert ds["bf16"]["enabled"] is (dtype == "bf16") and ds["fp16"]["enabled"] is (dtype == "fp16")


# --------------------------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_zero3_two_ranks_nf4_learns_and_adapter_reproduces_eval_loss(tiny_train_setup, tmp_path, bnb_cpu_path):
    """The README's main entry: `deepspeed launch/train.py --deepspeed ds_configs/zero3.json --config ...`, on both
    bitsandbytes CPU branches, with an in-training eval followed by a checkpoint (where the AVX512-BF16 repack
    killed runs), and the compiled RMSNorms and MLPs (under ZeRO-3 and recomputation; the adapter is then checked
    on eager ones)."""
    run = tmp_path / "run"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    port = free_port()
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(port), str(TRAIN), "--deepspeed", str(ZERO3),
           "--config", str(tiny_train_setup["config"]), "--set", f"output_dir={run}", "--set", "model.dtype=bf16",
           "--set", "model.compile_norms=true", "--set", "model.compile_swiglu=true", "--set", "optim.max_steps=24",
           "--set", "eval.max_batches=null", "--set", "eval.every=12", "--set", "checkpoint.every=12"]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "compile_norms: 5 RMSNorms compiled" in proc.stdout  # 2 per decoder layer, the final norm
    assert "compile_swiglu: 2 MLPs' silu(gate) * up compiled" in proc.stdout
    # DeepSpeed's CPU all-reduce buffers (one /dev/shm file per rank, RAM) are gone with the run
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))

    # Learning, judged on the whole eval split (the same rows each time) and on the train loss, which is noisy
    # per step at this size: over 12 steps the drop was 0.18, over 24 about twice that.
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (22, 23, 24)) / 3
    assert last < first - 0.2, losses
    evals = dict(logged(run, "eval/loss"))
    assert sorted(evals) == [12, 24] and evals[24] < evals[12] - 0.05, evals

    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 24 and summary["world_size"] == 2 and summary["tokens"] > 0
    assert set(summary["eval"]) >= {"loss", "tokens"}
    for f in ("adapter_model.safetensors", "more_config.json", "rank_map.json"):
        assert (run / "adapter" / f).is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Images("rank_map")] == [12, 24]  # the tasks x layers picture at each eval
    assert {f"train/loss/{t}" for t in summary["final_train_loss_per_task"]} <= set(events.Tags()["scalars"]), events.Tags()["scalars"]

    # The adapter on a fresh base gives the logged eval loss (whole eval split, one process, no ZeRO).
    from pipeline.data.loader import PackedCollator, PackedDataset
    from pipeline.models import load_base_model
    from pipeline.more import load_adapter
    from pipeline.train.evaluation import eval_loss

    base = load_base_model(str(tiny_train_setup["base"]), "nf4", "bf16")
    model = load_adapter(base, run / "adapter").eval()
    ds = PackedDataset(tiny_train_setup["data"], "eval")
    collate = PackedCollator(dtype=torch.bfloat16)
    batches = (collate([ds[i] for i in range(j, min(j + 2, len(ds)))]) for j in range(0, len(ds), 2))
    result = eval_loss(model, batches, len(ds.task_names), ds.task_names, torch.device("cpu"))
    assert result["tokens"] == summary["eval"]["tokens"]
    assert result["loss"] == pytest.approx(summary["eval"]["loss"], rel=5e-3)


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_train_setup):
    """2 ranks (srun-style), fp32, 6 steps, an eval after every step: the reference that resume and 1-process runs
    must reproduce."""
    run = tiny_train_setup["root"] / "uninterrupted"
    run.mkdir()
    procs = spawn_ranks(2, ["--config", str(tiny_train_setup["config"]), "--set", f"output_dir={run}",
                            "--set", "eval.every=1"], run)
    codes = wait_all(procs)
    assert codes == [0, 0], _logs(run)
    return run


@pytest.mark.slow
def test_sigterm_checkpoint_and_resume_reproduce_uninterrupted_losses(tiny_train_setup, uninterrupted_run, tmp_path):
    """The resumed run continues the preempted one (its logs are kept, it starts after the checkpoint's step, logs
    no step twice) and together they log what the uninterrupted run logs, evals included: with an eval after every
    step the signal always lands on an eval step, whose eval the resumed run owes. The ranks wait at the start of
    step 3 for the signal (PIPELINE_FAULT=pause), so it lands mid-run however fast the steps are."""
    run = tmp_path / "preempted"
    run.mkdir()
    args = ["--config", str(tiny_train_setup["config"]), "--set", f"output_dir={run}", "--set", "eval.every=1"]
    procs = spawn_ranks(2, args, run, {"PIPELINE_FAULT": "pause@*:3"})
    term_when_all_paused(procs, run)
    codes = wait_all(procs)
    assert codes == [75, 75], _logs(run)
    stopped_at = max(step_losses(run))
    assert stopped_at == 3, _logs(run)
    assert (run / "checkpoints" / f"step_{stopped_at}" / "meta.json").is_file()
    before = (run / "metrics.jsonl").read_text()

    procs = spawn_ranks(2, args, run)
    assert wait_all(procs) == [0, 0], _logs(run)
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped_at}'} at step {stopped_at}" in \
        (run / "rank0.log").read_text(), _logs(run)
    assert (run / "metrics.jsonl").read_text().startswith(before), "the resumed run rewrote the preempted run's logs"
    for key in ("train/loss", "eval/loss"):
        resumed, reference = logged(run, key), logged(uninterrupted_run, key)
        assert [s for s, _ in resumed] == [s for s, _ in reference] == list(range(1, 7)), (key, resumed, reference)
        for (step, value), (_, expected) in zip(resumed, reference):
            assert value == pytest.approx(expected, rel=1e-6), (key, step, resumed, reference)


@pytest.mark.slow
def test_preempted_at_the_last_step_the_resumed_summary_keeps_the_final_loss(tiny_train_setup, uninterrupted_run,
                                                                             tmp_path):
    """SIGTERM during the last step: the step finishes and is checkpointed; the resumed run only owes its eval and
    the summary, whose final train loss (per task too) is the uninterrupted run's, not None."""
    run = tmp_path / "late"
    run.mkdir()
    args = ["--config", str(tiny_train_setup["config"]), "--set", f"output_dir={run}", "--set", "eval.every=1"]
    assert wait_all(spawn_ranks(2, args, run, {"PIPELINE_FAULT": "term@*:6"})) == [75, 75], _logs(run)
    assert (run / "checkpoints" / "step_6" / "meta.json").is_file() and not (run / "train_summary.json").exists()
    saved_at = (run / "checkpoints" / "step_6" / "meta.json").stat().st_mtime_ns
    assert wait_all(spawn_ranks(2, args, run)) == [0, 0], _logs(run)
    got = json.loads((run / "train_summary.json").read_text())
    want = json.loads((uninterrupted_run / "train_summary.json").read_text())
    assert got["final_train_loss"] == pytest.approx(want["final_train_loss"], rel=1e-6)
    assert got["final_train_loss_per_task"] == pytest.approx(want["final_train_loss_per_task"], rel=1e-6)
    assert got["final_train_loss_per_task"] and got["tokens_per_s"] is None  # no step ran in the resumed process
    # the resumed run neither rewrote the complete step-6 checkpoint it resumed from (it used to delete it first)
    # nor logged step 6 twice: metrics.jsonl and TensorBoard hold each step's train and eval values once
    assert (run / "checkpoints" / "step_6" / "meta.json").stat().st_mtime_ns == saved_at
    for key in ("train/loss", "eval/loss"):
        assert [s for s, _ in logged(run, key)] == [s for s, _ in logged(uninterrupted_run, key)] == list(range(1, 7))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    for key in ("train/loss", "eval/loss", "rank/sentiment/mean"):
        assert [e.step for e in events.Scalars(key)] == list(range(1, 7)), key


@pytest.mark.slow
def test_one_process_with_accumulation_matches_two_ranks(tiny_train_setup, uninterrupted_run, tmp_path):
    """Same global batch (2 ranks x 2 rows vs 1 process x 2 micro-batches of 2 rows): same losses."""
    run = tmp_path / "single"
    proc = subprocess.run([sys.executable, str(TRAIN), "--config", str(tiny_train_setup["config"]),
                           "--set", f"output_dir={run}", "--set", "optim.grad_accum=2", "--set", "eval.every=1"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single, reference = step_losses(run), step_losses(uninterrupted_run)
    assert sorted(single) == sorted(reference) == list(range(1, 7))
    for step in range(1, 7):
        # fp32; the two layouts reduce gradients in a different order, so allow float rounding.
        assert single[step] == pytest.approx(reference[step], rel=1e-4), (step, single, reference)


@pytest.mark.slow
@pytest.mark.parametrize("layout,frozen_base", [("shared", "replicated"), ("per_layer", "replicated"),
                                                ("shared", "sharded")])
def test_zero3_units_reduce_every_gradient_as_zero2_in_one_process(tiny_train_setup, tmp_path, layout, frozen_base):
    """2 ZeRO-3 ranks, each decoder layer one fetch unit (train/zero3_units.py), against 1 process under ZeRO-2 (no
    units, no partitioning) with the same global batch: the same losses and, after 3 updates with the selector
    learning from step 1, the same value of every trained tensor; with the frozen base whole on each rank (the
    default where it fits, train/zero3_frozen.py) and partitioned by ZeRO-3. per_layer is the reference's layout,
    whose task embeddings the contrastive loss reads again outside the layer's forward (one unit per MoRE linear
    made DeepSpeed reduce them twice and assert)."""
    args = ["--config", str(tiny_train_setup["config"]), "--set", f"more.task_embedding={layout}",
            "--set", f"model.frozen_base={frozen_base}",
            "--set", "more.selector_warmup_steps=0", "--set", "optim.max_steps=3",
            "--set", "model.gradient_checkpointing=false",
            # Adam moves an element by lr * g / (|g| + eps): where a gradient is as small as eps, its rounding error
            # (~1e-10 here, reduced in another order) moved a lora_B element by 0.2% of lr with eps 1e-8
            "--set", "optim.eps=1e-5"]
    two = tmp_path / "two"
    two.mkdir()
    codes = wait_all(spawn_ranks(2, [*args, "--set", f"output_dir={two}"], two))
    assert codes == [0, 0], _logs(two)
    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed", str(ZERO2), *args,
                           "--set", f"output_dir={one}", "--set", "optim.grad_accum=2"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single, reference = step_losses(one), step_losses(two)
    assert sorted(single) == sorted(reference) == [1, 2, 3]
    for step in (1, 2, 3):
        assert single[step] == pytest.approx(reference[step], rel=1e-4), (step, single, reference)
    from pipeline.more.io import read_adapter
    _, _, got = read_adapter(two / "adapter")
    _, _, want = read_adapter(one / "adapter")
    assert sorted(got) == sorted(want)
    assert any("task_embedding" in k for k in got)
    # fp32, gradients reduced in another order: equal to float rounding, relative to each tensor's scale
    rel = {k: float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-12)) for k in want}
    assert max(rel.values()) < 1e-4, {k: v for k, v in rel.items() if v >= 1e-4}


@pytest.mark.slow
def test_evals_between_zero3_steps_leave_no_parameter_in_flight(tiny_train_setup, tmp_path):
    """After training steps ZeRO-3 prefetches along the step's recorded order; an eval (forward only) left some of
    those all-gathers in flight and the rank map's gather after it asserted. A prefetch bucket smaller than a
    decoder layer shows it on the tiny model, as the default bucket does on a ~1B one."""
    ds = json.loads(ZERO3.read_text())
    ds["zero_optimization"]["stage3_prefetch_bucket_size"] = 1000
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(TRAIN), "--deepspeed", str(tmp_path / "zero3.json"),
                           "--config", str(tiny_train_setup["config"]), "--set", f"output_dir={run}",
                           "--set", "optim.max_steps=4", "--set", "eval.every=2", "--set", "eval.at_start=true"],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s for s, _ in logged(run, "eval/loss")] == [0, 2, 4] and sorted(step_losses(run)) == [1, 2, 3, 4]


_LAYER_RELEASES_PER_STEP = """
import sys
from collections import Counter
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as Coordinator
from pipeline.config.base import load_config
from pipeline.config.train import TrainConfig
from pipeline.train.loop import build_trainer

released = Counter()  # (forward?, module class) -> parameters a module's release call partitioned
release = Coordinator.release_sub_module
def counting_release(self, module, forward=False):
    params = list(module.parameters())
    before = sum(p.ds_status == ZeroParamStatus.AVAILABLE for p in params)
    release(self, module, forward)
    released[forward, type(module).__name__] += before - sum(p.ds_status == ZeroParamStatus.AVAILABLE for p in params)
Coordinator.release_sub_module = counting_release
config, ds_config, steps, eval_first, *overrides = sys.argv[1:]
trainer = build_trainer(load_config(TrainConfig, config, overrides), ds_config)
if eval_first == "1":
    trainer.evaluate()
for _ in range(int(steps)):
    released.clear()
    trainer.train_step()
print("LAYER_RELEASES", released[True, "LlamaDecoderLayer"], released[False, "LlamaDecoderLayer"])
"""


@pytest.mark.slow
@pytest.mark.parametrize("case", ["eval_at_start", "plain", "selector_warmup"])
def test_zero3_keeps_each_layer_from_forward_to_backward(tiny_train_setup, tmp_path, case):
    """ZeRO-3 keeps a layer's parameters gathered from its forward to its backward (reuse distance 1e9) and caches
    that decision per (module, step) for good. An evaluation before the first training step recorded a forward-only
    order whose answer, release everything after the forward, stayed cached: every later step gathered every layer
    again in backward (train/zero3_trace.py). The end of the selector's warm-up (step 3 here), where its gradients
    start to flow, must not bring that back either. In the last step of each case no layer releases a parameter in
    its forward, and the backward releases all of them (50 parameters gathered twice per step on the tiny model
    without the fix)."""
    script = tmp_path / "count_releases.py"
    script.write_text(_LAYER_RELEASES_PER_STEP)
    steps, eval_first, extra = {"eval_at_start": (3, "1", []), "plain": (3, "0", []),
                                "selector_warmup": (6, "0", ["more.selector_warmup_steps=2"])}[case]
    proc = subprocess.run([sys.executable, str(script), str(tiny_train_setup["config"]), str(ZERO3), str(steps),
                           eval_first, f"output_dir={tmp_path / 'run'}", "model.gradient_checkpointing=false", *extra],
                          env=dict(_env(), PYTHONPATH=str(ROOT)), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("LAYER_RELEASES")][-1]
    in_forward, in_backward = map(int, line.split()[1:])
    assert in_forward == 0 and in_backward > 0, line


@pytest.mark.slow
def test_nan_on_one_rank_stops_every_rank_before_the_update_and_is_never_checkpointed(tiny_train_setup, tmp_path,
                                                                                     monkeypatch):
    run = tmp_path / "nan"
    run.mkdir()
    monkeypatch.setenv("PIPELINE_NAN_AT", "1:3")  # rank 1's loss is NaN at step 3
    procs = spawn_ranks(2, ["--config", str(tiny_train_setup["config"]), "--set", f"output_dir={run}",
                            "--set", "checkpoint.every=1", "--set", "dist_timeout_s=120"], run)
    codes = wait_all(procs, timeout=400)
    assert all(c != 0 for c in codes), (codes, _logs(run))
    for rank in (0, 1):  # the same decision at the same step on every rank
        assert "step 3: the loss (LM + contrastive) is not finite on rank(s) [1]" in \
            (run / f"rank{rank}.log").read_text(), _logs(run)
    assert [s for s, _ in logged(run, "train/loss")] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_1", "step_2"]
    assert (run / "checkpoints" / "latest").read_text() == "step_2"
    assert not (run / "adapter").exists()


@pytest.mark.slow
def test_failed_rank_ends_every_rank_with_an_error_not_a_hang(tiny_train_setup, tmp_path, monkeypatch):
    run = tmp_path / "failing"
    run.mkdir()
    monkeypatch.setenv("PIPELINE_FAIL_AT", "1:2")
    procs = spawn_ranks(2, ["--config", str(tiny_train_setup["config"]), "--set", f"output_dir={run}",
                            "--set", "dist_timeout_s=60"], run)
    t0 = time.time()
    codes = wait_all(procs, timeout=400)
    assert all(c != 0 for c in codes), (codes, _logs(run))
    assert "injected failure on rank 1 at step 2" in (run / "rank1.log").read_text()
    assert time.time() - t0 < 300
    assert not (run / "adapter").exists()


def test_preflight_refuses_a_run_that_does_not_fit(tiny_train_setup):
    from pipeline.config import ConfigError, load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train.preflight import check_fits

    cfg = load_config(TrainConfig, tiny_train_setup["config"])
    assert check_fits(cfg, str(ZERO3), 5, nodes=1, gpus_per_node=1, gpu_mem_gb=80).fits  # the tiny model fits
    big = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": "llama-2-70b"})})
    with pytest.raises(ConfigError, match="will not fit") as err:
        check_fits(big, str(ZERO3), 5, nodes=1, gpus_per_node=1, gpu_mem_gb=24)
    assert "GiB" in str(err.value)


def test_preflight_plans_the_adapter_as_configured(tiny_train_setup):
    """The launch-time plan (preflight, checkpointing and frozen-base auto) counts the adapter's dropout (it keeps
    each adapted input's dropped copy) and its number of experts (the gates' size)."""
    from pipeline.config import load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train.preflight import plan_run

    def planned(*overrides):
        cfg = load_config(TrainConfig, tiny_train_setup["config"], ["model.path=llama-2-7b", *overrides])
        return plan_run(cfg, str(ZERO3), 5, nodes=1, gpus_per_node=8, gpu_mem_gb=80, grad_ckpt=False)

    plain, dropout = planned("more.dropout=0.0"), planned("more.dropout=0.1")
    assert dropout.activations.no_ckpt > plain.activations.no_ckpt
    assert planned("more.expert_ranks=[2,4]").adapter.gate < plain.adapter.gate  # 2 experts, not max_rank's 4


def test_capped_eval_reads_rows_spread_over_the_split(tiny_train_setup):
    """eval.max_batches takes rows evenly over the eval split (packed per task, its first rows are one task's)."""
    from pipeline.config import load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train.data import TrainData
    from pipeline.train.distributed import DistInfo

    cfg = load_config(TrainConfig, tiny_train_setup["config"], ["eval.max_batches=2"])
    data = TrainData(cfg, [], DistInfo(0, 0, 1, torch.device("cpu")), torch.float32)
    n = len(data.eval)
    assert n > 4
    seen = [b["input_ids"] for b in data.eval_batches()]
    assert len(seen) == 2
    rows = [data.eval[i]["input_ids"] for i in range(n)]
    read = [any(torch.equal(r, b[j, :len(r)]) for b in seen for j in range(b.shape[0])) for r in (rows[0], rows[-1])]
    assert read == [True, True], "the first and the last row of the split are both read"


def test_task_mix_is_the_prep_configs_unless_the_train_config_sets_it(tiny_train_setup, tmp_path):
    """data.temperature / data.task_caps unset: the sampler draws the mix prep recorded in the manifest (its
    temperature, caps and weights); set, they replace prep's values; data.tasks zeroes the other tasks."""
    import shutil

    import numpy as np

    from pipeline.config import load_config
    from pipeline.config.train import TrainConfig
    from pipeline.data.sampler import task_probabilities
    from pipeline.train.data import TrainData
    from pipeline.train.distributed import DistInfo

    data = Path(shutil.copytree(tiny_train_setup["data"], tmp_path / "data"))
    manifest = json.loads((data / "manifest.json").read_text())
    names = [n for n, _ in sorted(manifest["tasks"].items(), key=lambda kv: kv[1]["id"])]
    manifest["sampling"] = {"temperature": 5.0, "caps": {names[0]: 3}, "weights": {names[1]: 4.0}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    sizes = [manifest["tasks"][n]["examples"] for n in names]

    def mix(*overrides):
        cfg = load_config(TrainConfig, tiny_train_setup["config"], [f"data.dir={data}", *overrides])
        return TrainData(cfg, names, DistInfo(0, 0, 1, torch.device("cpu")), torch.float32).sampler.probabilities

    caps, weights = [3] + [None] * (len(names) - 1), [1.0, 4.0] + [1.0] * (len(names) - 2)
    np.testing.assert_allclose(mix("data.temperature=null"), task_probabilities(sizes, 5.0, caps=caps,
                                                                                  weights=weights))
    np.testing.assert_allclose(mix("data.temperature=2.0"), task_probabilities(sizes, 2.0, caps=caps,
                                                                                 weights=weights))
    np.testing.assert_allclose(mix("data.temperature=null", f"data.task_caps={{{names[1]}: 2}}"),
                               task_probabilities(sizes, 5.0, caps=[None, 2] + [None] * (len(names) - 2),
                                                  weights=weights))
    subset = mix("data.temperature=null", f"data.tasks=[{names[0]},{names[1]}]")
    assert subset[2:].sum() == 0 and subset[0] > 0 and subset[1] > 0


def test_checkpoint_identity_records_the_task_mix_as_applied(tiny_train_setup):
    """data.temperature unset takes the prep config's: the checkpoint records the temperature and caps applied, so
    a checkpoint of an earlier version (which recorded its default, 2.0) resumes when the mix is the same, and any
    change of the mix is refused whichever file made it."""
    from pipeline.config import load_config
    from pipeline.config.train import TrainConfig
    from pipeline.train import checkpoint
    from pipeline.train.data import sampling_spec
    from pipeline.train.loop import _with_applied_mix

    manifest = json.loads((Path(tiny_train_setup["data"]) / "manifest.json").read_text())
    assert manifest["sampling"]["temperature"] == 2.0
    unset = load_config(TrainConfig, tiny_train_setup["config"], ["data.temperature=null"])
    older = load_config(TrainConfig, tiny_train_setup["config"], ["data.temperature=2.0"]).model_dump(mode="json")
    assert checkpoint.compare(older, _with_applied_mix(unset, sampling_spec(unset, manifest)))[0] == []
    other = dict(manifest, sampling=dict(manifest["sampling"], temperature=1.0))
    refused, _ = checkpoint.compare(older, _with_applied_mix(unset, sampling_spec(unset, other)))
    assert refused == ["data.temperature: 2.0 -> 1.0"]


@pytest.mark.parametrize("stage", [0, 3])
def test_local_gradient_square_sum_reads_every_gradient_and_keeps_non_finite(stage):
    """The pre-update check's sum of squares: every gradient this rank holds (ZeRO-3: its reduced partitions),
    bf16 ones summed in fp32, and a NaN or inf anywhere comes through."""
    from types import SimpleNamespace

    from pipeline.train.loop import _local_grad_sq_sum

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, generator=g), torch.randn(7, 5, generator=g).bfloat16(), torch.randn(1, generator=g)]

    def engine(gs):
        params = [torch.nn.Parameter(torch.zeros_like(x)) for x in gs]
        for p, x in zip(params, gs):
            p.grad = x
        opt = SimpleNamespace(averaged_gradients={0: gs[:2], 1: gs[2:]})
        return SimpleNamespace(optimizer=opt, zero_optimization_stage=lambda: stage,
                               module=SimpleNamespace(parameters=lambda: iter(params)))

    want = sum(float(x.float().pow(2).sum()) for x in grads)
    assert _local_grad_sq_sum(engine(grads)) == pytest.approx(want, rel=1e-5)
    assert math.isinf(_local_grad_sq_sum(engine(grads[:2] + [torch.tensor([float("inf")])])))
    assert math.isnan(_local_grad_sq_sum(engine([grads[0], torch.tensor([1.0, float("nan")])])))
