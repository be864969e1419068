"""The training loop: packed multi-task batches -> MoRE model under a DeepSpeed engine -> checkpoints and adapter.

One optimizer step = `grad_accum` micro-batches on every rank. The LM loss of a step is normalised by the global
number of supervised tokens of that step, so 1 process with accumulation and N ranks without give the same update.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline.config.base import ConfigError
from pipeline.config.train import TrainConfig
from pipeline.train import checkpoint, faults
from pipeline.train.data import TrainData, check_data
from pipeline.train.distributed import (EXIT_REQUEUE, DistInfo, all_reduce_sum, any_rank, init_distributed,
                                        share_cpu_cores, shutdown)
from pipeline.train.ds_config import fill_ds_config
from pipeline.train.loss import token_loss_sums
from pipeline.train.monitor import Monitor
from pipeline.train.preflight import checkpointing_fits_without, preflight, replicated_base_fits
from pipeline.train.schedule import make_scheduler
from pipeline.train.zero3_trace import forget_forward_only_trace
from pipeline.train.zero3_frozen import replicate_frozen_parameters
from pipeline.train.zero3_units import make_zero3_units


class Preempted:
    """SIGTERM sets a flag; the loop finishes its step, checkpoints and exits with EXIT_REQUEUE."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True


def _names_a_local_folder(path: str) -> bool:
    """Whether model.path can only mean a folder here: absolute, ./ or ../, deeper than a hub id's ORG/NAME, or
    under a folder that exists here (runs/x, models/x)."""
    parts = Path(path).parts
    return Path(path).is_absolute() or path.startswith(".") or len(parts) > 2 or (
        len(parts) == 2 and Path(parts[0]).is_dir())


def validate(cfg: TrainConfig, ds_config: str) -> list[str]:
    """Everything checkable before a process group starts; returns the task names in id order."""
    task_names = check_data(cfg)
    if _names_a_local_folder(cfg.model.path) and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path: {cfg.model.path} is not a directory (a hub id is NAME or ORG/NAME; "
                          f"`make base` writes the default config's base, `make model` SmolLM2)")
    fill_ds_config(ds_config, cfg, world_size=1)
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    if cfg.checkpoint.resume == "never" and (found := checkpoint.existing(ckpt_dir)):
        raise ConfigError(
            f"checkpoint.resume=never (--no-resume), but {ckpt_dir} holds checkpoints of an earlier run "
            f"({', '.join(found)}): a fresh run there would mix the two runs' checkpoints and logs. To start over, "
            f"delete {cfg.output_dir} (or set output_dir to a new folder); to continue that run, drop --no-resume")
    return task_names


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, task_names: list[str], dist_info: DistInfo):
    from pipeline.models import cpu_attention, packed_attention
    from pipeline.models.compiled_norm import compile_rms_norms
    from pipeline.models.compiled_rope import compile_rope
    from pipeline.models.compiled_swiglu import compile_swiglus
    from pipeline.models.loading import load_base_model
    from pipeline.models.nf4_matmul import pool_outputs as pool_nf4_outputs
    from pipeline.models.packed_attention import NAME as PACKED_ATTENTION
    from pipeline.models.pooled_swiglu import pool_swiglu_mlps
    from pipeline.more import inject
    from pipeline.more.io import base_weights_sha256

    packed_attention.use_cpu_kernel(cfg.model.cpu_attention)
    if (cfg.model.cpu_attention == "fused" and dist_info.device.type == "cpu"
            and cfg.model.attn_implementation == PACKED_ATTENTION):
        cpu_attention.kernel()  # built (or found in the cache) now, not inside the first step
    device_map = {"": dist_info.device} if cfg.model.quantization == "nf4" else None
    base = load_base_model(cfg.model.path, cfg.model.quantization, cfg.model.dtype,
                           cfg.model.attn_implementation, device_map=device_map,
                           nf4_dequant_buffers=cfg.model.nf4_dequant_buffers)
    faults.point("load", dist_info.rank, 0)
    base.config.use_cache = False
    model = inject(base, cfg.more_for_run(), task_names, base_model_id=cfg.model.path)
    base_weights_sha256(model)  # now, from the files that loaded: checkpoints and the adapter record it
    if cfg.model.compile_norms:
        n = compile_rms_norms(model.base_model)
        if dist_info.is_main:
            print(f"compile_norms: {n} RMSNorms compiled", flush=True)
    pooled = cfg.model.cpu_buffer_pool and dist_info.device.type == "cpu"
    if cfg.model.compile_swiglu and not pooled:  # the pool routes the MLPs through its own eager product
        n = compile_swiglus(model.base_model)
        if dist_info.is_main:
            print(f"compile_swiglu: {n} MLPs' silu(gate) * up compiled", flush=True)
    if (cfg.model.compile_rope and dist_info.device.type == "cpu"
            and cfg.model.attn_implementation == PACKED_ATTENTION):
        n = compile_rope(model.base_model)
        if dist_info.is_main:
            print(f"compile_rope: {n} attentions' rotary embeddings compiled", flush=True)
    if pooled:
        pool_nf4_outputs(model.base_model)
        pool_swiglu_mlps(model.base_model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(use_reentrant=False)
    return model


class Trainer:
    def __init__(self, cfg: TrainConfig, ds_config: str, task_names: list[str], dist_info: DistInfo):
        self.cfg, self.task_names, self.dist = cfg, task_names, dist_info
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if dist_info.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(cfg.seed)
        import deepspeed

        from pipeline.more.io import base_weights_sha256

        model = build_model(cfg, task_names, dist_info)
        ds = fill_ds_config(ds_config, cfg, dist_info.world_size)
        if ds.get("zero_optimization", {}).get("stage") == 3:
            if cfg.model.frozen_base == "replicated":
                n = replicate_frozen_parameters(model)
                if dist_info.is_main:
                    print(f"frozen_base: {n} frozen tensors whole on every rank (only trainable ones sharded)",
                          flush=True)
            make_zero3_units(model)
        o = cfg.optim
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=model.param_groups(o.lr, o.weight_decay), config=ds,
            lr_scheduler=lambda opt: make_scheduler(opt, o.warmup_steps, o.max_steps, o.schedule))
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.model.dtype]
        self.data = TrainData(cfg, task_names, dist_info, self.dtype)
        if dist_info.is_main:
            mix = ", ".join(f"{n} {p:.3f}" for n, p in zip(task_names, self.data.sampler.probabilities))
            print(f"task mix (share of examples drawn, temperature {self.data.sampling['temperature']:g}): {mix}",
                  flush=True)
        self.step = 0
        self.steps_this_process = 0  # ZeRO-3 records its module order in this process's first training step
        self.tokens_seen = 0
        self.preempt = Preempted()
        self.last_eval: dict[str, float] = {}
        self.last_values: dict[str, float] = {}  # the last step's train values (the summary's final loss)
        self.saved_step: Optional[int] = None  # the step of the checkpoint on disk this process wrote or loaded
        self.eval_pending = False  # a resumed run owes the eval of the step it was preempted at
        self.run_id = checkpoint.new_run_id()  # a resumed run takes its checkpoint's: pruning keeps to one run
        self.identity = checkpoint.run_identity(_with_applied_mix(cfg, self.data.sampling), dist_info.world_size,
                                                task_names, self.data.train.manifest.get("cache_key"),
                                                base_weights_sha256(model))
        # This config's optimizer settings: a checkpoint's optimizer and scheduler states carry the saved run's,
        # and a resume with a changed lr (allowed, and said) must train with the new one.
        self._hparams = [{k: g[k] for k in ("lr", "weight_decay", "betas", "eps") if k in g}
                         for g in self.scheduler.optimizer.param_groups]
        self._base_lrs = list(self.scheduler.base_lrs)

    # --- resume -------------------------------------------------------------------------------------------------
    def maybe_resume(self) -> None:
        mode = self.cfg.checkpoint.resume
        if mode == "never":
            return
        loaded = checkpoint.load(self.engine, self.ckpt_dir, self.dist.rank, self.identity)
        if loaded is None:
            if mode == "must":
                raise RuntimeError(f"checkpoint.resume=must but no checkpoint in {self.ckpt_dir}")
            return
        state, meta = loaded
        self.step = state["step"]
        self.tokens_seen = state["tokens_seen"]
        self.data.load_state_dict(state["data"])
        self.eval_pending = bool(state.get("eval_pending", False))
        self.last_values = dict(state.get("last_values", {}))
        self.saved_step = self.step
        self.run_id = meta["run_id"]
        self._restore_hparams()
        if self.dist.is_main:
            print(f"resumed from {self.ckpt_dir / meta['tag']} at step {self.step}", flush=True)

    def _restore_hparams(self) -> None:
        """This config's lr, weight decay, betas and eps over the loaded ones (equal unless the config changed)."""
        sched = self.scheduler
        sched.base_lrs = list(self._base_lrs)
        for group, hp, base, fn in zip(sched.optimizer.param_groups, self._hparams, self._base_lrs, sched.lr_lambdas):
            group.update({k: v for k, v in hp.items() if k != "lr"})
            group["initial_lr"] = base
            group["lr"] = base * fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]

    def save_checkpoint(self, eval_pending: bool = False) -> None:
        """Collective. Refuses (on every rank) to write non-finite trainable parameters."""
        bad = any(not bool(torch.isfinite(t).all()) for t in _trainable_partitions(self.engine))
        if any_rank(bad, self.dist.device):
            raise FloatingPointError(f"step {self.step}: trainable parameters are not finite; no checkpoint written "
                                     f"(the last one in {self.ckpt_dir} is from before)")
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.data.state_dict(),
                 "eval_pending": eval_pending, "last_values": self.last_values}
        with faults.during_writes("checkpoint", self.dist.rank, self.step):
            checkpoint.save(self.engine, self.ckpt_dir, self.step, state, self.cfg.checkpoint.keep, self.dist.rank,
                            self.run_id, self.identity)
        self.saved_step = self.step

    # --- one optimizer step -------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        faults.point("step", self.dist.rank, self.step + 1)
        micro_batches = [self.data.next_train_batch() for _ in range(self.cfg.optim.grad_accum)]
        dev = self.dist.device
        samples = [_contrastive_samples(b) for b in micro_batches]
        counts = torch.tensor([float(sum(_supervised(b) for b in micro_batches)),
                               float(sum(int((b["segment_ids"] >= 0).sum()) for b in micro_batches)),
                               float(sum(samples))], device=dev)
        global_tokens, global_real, global_samples = all_reduce_sum(counts).tolist()
        if global_tokens == 0:
            raise RuntimeError(f"step {self.step + 1}: no supervised tokens in the global batch")
        # DeepSpeed divides by grad_accum and averages over ranks; undo both so that each loss is a sum over the
        # global batch divided by its global count, whatever the split of that batch.
        layout = self.dist.world_size * self.cfg.optim.grad_accum
        scale = layout / global_tokens
        n_tasks = len(self.task_names)
        stats = torch.zeros(2 + 2 * n_tasks, device=dev)  # ce_sum, contrastive_sum, per-task sums, per-task tokens
        weight = self.cfg.more.contrastive.weight
        self.engine.module.set_training_step(self.step)  # the selector's warm-up counts optimizer steps
        local_loss = torch.zeros((), device=dev)  # this rank's share of the step's total (LM + contrastive) loss
        for i, (batch, n_samples) in enumerate(zip(micro_batches, samples)):
            batch = {k: v.to(dev) for k, v in batch.items()}
            out = self.engine(**batch, supervised_loss=True)
            sums = token_loss_sums(out.token_loss, out.token_index, batch["task_ids"], n_tasks)
            loss = sums.total * scale
            if out.contrastive_loss is not None and weight > 0:
                cl_sum = out.contrastive_loss * n_samples  # the model returns a per-sample mean
                loss = loss + weight * cl_sum * layout / max(global_samples, 1.0)
                stats[1] += cl_sum.detach().float()
            if _injected_nan(self.dist.rank, self.step + 1):
                loss = loss * float("nan")
            local_loss += loss.detach().float()
            faults.point("backward", self.dist.rank, self.step + 1)
            self.engine.backward(loss)
            if i + 1 < len(micro_batches):
                self.engine.step()  # not the accumulation boundary: DeepSpeed only counts the micro-batch
            stats[0] += sums.total.detach()
            stats[2:2 + n_tasks] += sums.per_task
            stats[2 + n_tasks:] += sums.per_task_tokens
        self._check_finite_before_update(local_loss)
        faults.point("optimizer", self.dist.rank, self.step + 1)
        lr = self.scheduler.get_last_lr()[0]  # the rate this update applies (engine.step advances the schedule)
        self.engine.step()  # the accumulation boundary: the optimizer applies the step here
        if not self.engine.was_step_applied() and not self.engine.fp16_enabled():
            # DeepSpeed skips an update whose gradient norm is not finite; outside fp16 loss scaling that is a NaN
            # the check above could not see (gradients it cannot read, e.g. with optimizer offload).
            raise FloatingPointError(f"step {self.step + 1}: DeepSpeed skipped the update (non-finite gradients); "
                                     f"stopping (lower optim.lr or check the data)")
        all_reduce_sum(stats)
        self.step += 1
        self.steps_this_process += 1
        self.tokens_seen += int(global_real)
        lm = stats[0].item() / global_tokens
        values = {"loss": lm, "contrastive": stats[1].item() / max(global_samples, 1.0),
                  "lr": lr, "tokens": global_real}
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        for t, name in enumerate(self.task_names):
            if stats[2 + n_tasks + t] > 0:
                values[f"loss/{name}"] = (stats[2 + t] / stats[2 + n_tasks + t]).item()
        return values

    def _check_finite_before_update(self, local_loss: torch.Tensor) -> None:
        """Collective, between the step's last backward and the optimizer update: every rank stops at the same step
        when any rank's loss (LM + contrastive) or the global gradient norm is not finite, so a NaN never reaches
        the parameters, the optimizer state or a checkpoint."""
        world, rank = self.dist.world_size, self.dist.rank
        flags = torch.zeros(world + 1, device=self.dist.device)
        flags[rank] = 0.0 if bool(torch.isfinite(local_loss)) else 1.0
        grad_sq = None if self.engine.fp16_enabled() else _local_grad_sq_sum(self.engine)  # fp16: the loss scaler's
        if grad_sq is not None:
            flags[world] = grad_sq
        all_reduce_sum(flags)
        step = self.step + 1
        bad_ranks = [r for r in range(world) if flags[r] > 0]
        if bad_ranks:
            raise FloatingPointError(
                f"step {step}: the loss (LM + contrastive) is not finite on rank(s) {bad_ranks}; stopping before the "
                f"optimizer applies the step (lower optim.lr or check the data; checkpoints in {self.ckpt_dir} are "
                f"from earlier steps)")
        if grad_sq is not None and not math.isfinite(flags[world].item()):
            raise FloatingPointError(
                f"step {step}: the gradient norm is {math.sqrt(flags[world].item())}; stopping before the optimizer "
                f"applies the step (lower optim.lr or check the data; checkpoints in {self.ckpt_dir} are from "
                f"earlier steps)")

    # --- held-out evaluation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        from pipeline.train.evaluation import eval_loss

        result = eval_loss(self.engine, self.data.eval_batches(), len(self.task_names), self.task_names,
                           self.dist.device, reduce=all_reduce_sum)
        # ZeRO-3 prefetches parameters along the training step's recorded order; a forward-only pass leaves some
        # of those all-gathers in flight, and the next gather outside a step (rank_map, save_adapter) then
        # asserts "Cannot partition a param in flight". Wait for them and release every gathered parameter.
        self.engine.empty_partition_cache()
        if self.steps_this_process == 0:  # the order recorded so far is this forward-only pass (zero3_trace.py)
            forget_forward_only_trace(self.engine)
        self.engine.train()
        return result

    # --- the run ------------------------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        self.maybe_resume()
        if self.step >= cfg.optim.max_steps and (self.out / "train_summary.json").is_file():
            if self.dist.is_main:
                print(f"{self.out} already trained to step {self.step} (optim.max_steps); nothing to do", flush=True)
            return 0
        # this run evaluates its start step again: an eval the checkpoint owes, the step-0 eval, or the final one
        redo = self.eval_pending or (cfg.eval.at_start and self.step == 0) or self.step >= cfg.optim.max_steps
        redo = redo and (self.step == 0 or bool(self.last_values))  # a checkpoint without them: keep its step's log
        monitor = Monitor(self.out, cfg.optim.max_steps, self.step, self.dist.is_main, redo_start=redo)
        if redo and self.last_values and self._logs_train_at(self.step):
            monitor.scalars(self.step, self.last_values, prefix="train/")  # dropped with the start step's records
        self.engine.train()
        t_start, tokens_start = time.time(), self.tokens_seen
        try:
            if self.eval_pending or (cfg.eval.at_start and self.step == 0):  # step 0, or the eval of the step
                self._eval_and_log(monitor)                                  # a preempted run was stopped at
                self.eval_pending = False
            while self.step < cfg.optim.max_steps:
                t0 = time.time()
                values = self.train_step()
                dt = time.time() - t0
                values["tokens_per_s"] = values["tokens"] / max(dt, 1e-9)
                values.update(_peak_memory_gb(self.dist.device))
                self.last_values = values
                if self._logs_train_at(self.step):
                    monitor.scalars(self.step, values, prefix="train/")
                monitor.progress(self.step, values["loss"], values["tokens_per_s"])
                eval_now = bool(cfg.eval.every) and self.step % cfg.eval.every == 0 and self.step < cfg.optim.max_steps
                if any_rank(self.preempt.flag, self.dist.device):
                    # Checkpoint first (the grace period is short); the checkpoint says this step's eval is owed,
                    # and the resumed run does it before its first step, so its logs equal an uninterrupted run's.
                    self.save_checkpoint(eval_pending=eval_now)
                    if self.dist.is_main:
                        print(f"SIGTERM: checkpoint saved at step {self.step}; exiting {EXIT_REQUEUE} to requeue",
                              flush=True)
                    return EXIT_REQUEUE
                if eval_now:
                    self._eval_and_log(monitor)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()  # after the step's eval: a resume from it owes nothing
            self._eval_and_log(monitor)
            if self.saved_step != self.step:  # not saved at this step yet (checkpoint.every 0: only here, SIGTERM)
                self.save_checkpoint()
            self._finish(self.last_values, time.time() - t_start, self.tokens_seen - tokens_start)
        finally:
            monitor.close()
        return 0

    def _logs_train_at(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.optim.max_steps

    def _eval_and_log(self, monitor: Monitor) -> None:
        from pipeline.more import rank_map

        if self.data.eval is not None:  # without an eval split there is no held-out loss to report (not 0)
            self.last_eval = self.evaluate()
            monitor.scalars(self.step, self.last_eval, prefix="eval/")
        monitor.rank_map(self.step, rank_map(self.engine.module), self.cfg.more.max_rank)

    def _finish(self, final: dict[str, float], wall_s: float, tokens: int) -> None:
        from pipeline.more import save_adapter

        save_adapter(self.engine.module, self.out / "adapter")
        if not self.dist.is_main:
            return
        summary = {
            "steps": self.step,
            "tokens": self.tokens_seen,
            "world_size": self.dist.world_size,
            "final_train_loss": final.get("loss"),
            "final_train_loss_per_task": {k[len("loss/"):]: v for k, v in final.items() if k.startswith("loss/")},
            "eval": self.last_eval,
            "wall_time_s": wall_s,
            "tokens_per_s": tokens / max(wall_s, 1e-9) if tokens else None,  # this process's (None: resumed at the end)
        }
        tmp = self.out / "train_summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, self.out / "train_summary.json")


def _with_applied_mix(cfg: TrainConfig, spec: dict) -> dict:
    """The config as a checkpoint records it, with the task mix's temperature and caps as applied (`spec`:
    sampling_spec's; data.* where set, else the prep config's): a resume that would draw another mix is refused
    whichever file changed it."""
    config = cfg.model_dump(mode="json")
    config["data"].update(temperature=spec["temperature"], task_caps=spec["caps"] or None)
    return config


def _supervised(batch: dict[str, torch.Tensor]) -> int:
    from pipeline.data.mask import next_token_targets

    return int((next_token_targets(batch["labels"], batch["position_ids"]) != -100).sum())


def _injected_nan(rank: int, step: int) -> bool:
    """Test hook: `PIPELINE_NAN_AT=RANK:STEP` makes that rank's loss NaN at that step (how the tests check that a
    NaN stops every rank before the update and never reaches a checkpoint)."""
    return os.environ.get("PIPELINE_NAN_AT") == f"{rank}:{step}"


def _local_grad_sq_sum(engine) -> Optional[float]:
    """Sum of squares of this rank's reduced gradients before the update (ranks hold disjoint ZeRO-3 partitions,
    so the sum over ranks is the global norm squared); None where they cannot be read before `step()` (ZeRO-1/2
    reduce there, offload keeps them elsewhere), which leaves DeepSpeed's own check and `was_step_applied`."""
    opt = engine.optimizer
    stage = engine.zero_optimization_stage()
    if stage == 3 and not getattr(opt, "offload_optimizer", False) and isinstance(
            getattr(opt, "averaged_gradients", None), dict):
        grads = [g for group in opt.averaged_gradients.values() for g in (group or []) if g is not None]
    elif stage == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    else:
        return None
    if not grads:
        return 0.0
    # one foreach kernel per device and dtype, not three kernels per tensor (hundreds of tensors: on a GPU their
    # launches alone cost a visible part of a step)
    return float(torch.nn.utils.get_total_norm([g.detach().float() for g in grads])) ** 2


def _trainable_partitions(engine) -> list[torch.Tensor]:
    """This rank's share of the trainable parameters: its ZeRO-3 partition without the padding (DeepSpeed pads the
    last rank's partition with uninitialised memory, which held NaNs in one run), else the full tensor."""
    out = []
    for p in engine.module.parameters():
        if not p.requires_grad:
            continue
        part = getattr(p, "ds_tensor", None)
        if part is None:
            out.append(p.detach())
            continue
        start = part.numel() * p.ds_zero_partition_rank
        out.append(part.detach()[:max(0, min(part.numel(), p.ds_numel - start))])
    return out


def _contrastive_samples(batch: dict[str, torch.Tensor]) -> int:
    """Samples the contrastive loss averages over: those with a task and at least one prompt token."""
    keep = batch["prompt_mask"] & (batch["segment_ids"] >= 0) & (batch["task_ids"] >= 0)
    return int(batch["segment_ids"][keep].unique().numel())


def _peak_memory_gb(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def _every_rank_fits(fits, what: str, dist_info: DistInfo) -> tuple[bool, str]:
    """(whether the planner fits `what` on every rank, why): a collective, since ranks must choose alike. A model
    the planner cannot read counts as not fitting (the caller then takes the setting that needs the least memory)."""
    try:
        ok = fits()
        why = f"the memory planner {'fits' if ok else 'does not fit'} {what}"
    except Exception as e:
        ok, why = False, f"the memory planner could not plan this model: {type(e).__name__}: {e}"
    return not any_rank(not ok, dist_info.device), why


def decide_checkpointing(cfg: TrainConfig, ds_config: str, num_tasks: int, dist_info: DistInfo) -> TrainConfig:
    """`gradient_checkpointing: auto` -> on where any rank's memory needs it (a collective: ZeRO-3 ranks must all
    recompute or none, or their parameter gathers would differ), off where the planner fits the run without."""
    if cfg.model.gradient_checkpointing != "auto":
        return cfg
    fits, why = _every_rank_fits(lambda: checkpointing_fits_without(cfg, ds_config, num_tasks),
                                 "the run without recomputation", dist_info)
    if dist_info.is_main:
        print(f"gradient_checkpointing auto: {'off' if fits else 'on'} ({why})", flush=True)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"gradient_checkpointing": not fits})})


def decide_frozen_base(cfg: TrainConfig, ds_config: str, num_tasks: int, dist_info: DistInfo) -> TrainConfig:
    """`frozen_base: auto` -> replicated where every rank's memory fits the whole frozen base (ranks must agree on
    what ZeRO-3 partitions), else sharded."""
    if cfg.model.frozen_base != "auto":
        return cfg
    fits, why = _every_rank_fits(lambda: replicated_base_fits(cfg, ds_config, num_tasks),
                                 "the whole frozen base on every rank", dist_info)
    choice = "replicated" if fits else "sharded"
    if dist_info.is_main:
        print(f"frozen_base auto: {choice} ({why})", flush=True)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"frozen_base": choice})})


def build_trainer(cfg: TrainConfig, ds_config: str, local_rank: Optional[int] = None) -> Trainer:
    """Validate, check the memory, start the process group, build the engine and data (bench/step_profile.py
    drives the same trainer step by step)."""
    task_names = validate(cfg, ds_config)
    preflight(cfg, ds_config, len(task_names))
    dist_info = init_distributed(cfg.dist_timeout_s, local_rank)
    threads = share_cpu_cores(dist_info)
    if threads is not None and dist_info.is_main:
        print(f"cpu threads: {threads} per rank (this host's cores over its ranks; OMP_NUM_THREADS overrides)",
              flush=True)
    cfg = decide_checkpointing(cfg, ds_config, len(task_names), dist_info)
    cfg = decide_frozen_base(cfg, ds_config, len(task_names), dist_info)
    return Trainer(cfg, ds_config, task_names, dist_info)


def train(cfg: TrainConfig, ds_config: str, local_rank: Optional[int] = None) -> int:
    """Build the trainer, train. Returns the process exit code."""
    trainer = build_trainer(cfg, ds_config, local_rank)
    code = trainer.run()
    shutdown(trainer.engine)
    return code
