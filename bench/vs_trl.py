"""Training throughput side by side: this project's trainer against TRL's `SFTTrainer` + PEFT LoRA, the tool a user
would otherwise pick for QLoRA fine-tuning, in ONE run on the same machine, model (NF4 base, same compute dtype),
data and number of real training tokens.

    ours_zero3_more   MoRE (max rank 8, all linears), `deepspeed launch/train.py` on 2 ranks under ZeRO-3 (the
                      documented path), --rows-per-step packed rows of 512 per step split over the ranks (4: 2 per
                      rank, as configs/train/smollm2-glue.yaml)
    ours_zero3_lora   the same trainer with plain LoRA rank 8 (`more.expert_ranks=[8]`, no selector, no contrastive
                      loss): MoRE's cost at model level on the same path
    ours_1p_more      MoRE, `python launch/train.py` in 1 process (ZeRO-3 of one), the same rows per step
    ours_1p_lora      plain LoRA rank 8, 1 process
    ours_1p_more_dense_mask   ours_1p_more with sdpa over the dense (B, 1, L, L) block-causal mask instead of
                      per-sample attention (`model.attn_implementation=sdpa`): what that change gained
    ours_1p_more_fp32 ours_1p_more in fp32: what --dtype auto's choice gained on a CPU where it picks bf16
    ours_1p_more_zero2  ours_1p_more under ZeRO-2 (ds_configs/zero2.json): what ZeRO-3's module hooks cost in one
                      process (fp32: the same losses as ZeRO-3; bf16: the same until the first update, then within 2%)
    ours_zero3_more_eager_norms  ours_zero3_more with eager RMSNorms (`model.compile_norms=false`): what the
                      compiled norm (pipeline/models/compiled_norm.py) gains on the documented path
    ours_zero3_more_all_threads  ours_zero3_more with every rank on all of torch's default threads (OMP_NUM_THREADS
                      set to them), as before the ranks of a host split its cores (pipeline/train/distributed.py)
    ours_zero3_more_eager_mlp  ours_zero3_more with the MLPs' silu(gate) * up eager (`model.compile_swiglu=false`):
                      what the compiled one (pipeline/models/compiled_swiglu.py) gains on the documented path
    ours_zero3_more_compiled_rope, ours_1p_more_compiled_rope  ours_zero3_more / ours_1p_more with the rotary
                      embedding and attention's fp32 casts in one compiled kernel (`model.compile_rope=true`, off by
                      default: pipeline/models/compiled_rope.py)
    ours_zero3_more_fresh_dequant, ours_1p_more_fresh_dequant  ours_zero3_more / ours_1p_more with bitsandbytes'
                      own NF4 matmul (`model.nf4_dequant_buffers=false`): a fresh tensor per dequantised weight
                      instead of the reused buffer (pipeline/models/nf4_matmul.py)
    ours_zero3_more_pooled, ours_1p_more_pooled  ours_zero3_more / ours_1p_more with the CPU buffer pool
                      (`model.cpu_buffer_pool=true`): MLP activations, NF4 matmul outputs and their gradients in
                      reused blocks instead of fresh memory (pipeline/models/cpu_buffers.py)
    ours_zero3_more_sharded_base, ours_1p_more_sharded_base  ours_zero3_more / ours_1p_more with the frozen base
                      partitioned by ZeRO-3 too (`model.frozen_base=sharded`) instead of whole on every rank (the
                      default where it fits, pipeline/train/zero3_frozen.py): what not gathering it every step gains
    trl_padded        SFTTrainer + PEFT LoRA rank 8 (all linears), padded micro-batches of 16 samples (~2 rows of
                      real tokens), accumulated to about --rows-per-step rows per optimizer step
    trl_packed        the same with `packing=True` (TRL's best-fit-decreasing packing into rows of 512, padding-free),
                      micro-batches of --trl-micro-rows rows (1: its fastest; its padding-free batch is one sequence,
                      so its attention grows with the batch) accumulated to --rows-per-step rows per optimizer step.
                      On CPU attention TRL cannot isolate the packed samples (no varlen kernel), so this mode is
                      faster than it is correct; it is measured because a user would try it.
    trl_packed_compiled  trl_packed with the Trainer's `torch_compile=True` (TorchDynamo + Inductor over the whole
                      model): its first steps compile for minutes (counted in its time to the target loss, left out
                      of its tokens/s with the other warm-up steps)

Systems run one after another in the order of the table above (--order given: the order of --systems, e.g. TRL
first, to see whether the host drifts over a run); --rounds N runs that list N times (A B A B), so that a drift of the
host's speed during the run reaches every system alike. Every system takes the same real tokens per optimizer step
(--rows-per-step rows of 512), so the held-out curves compare the same number of updates.

Every system computes in --dtype: auto is bf16 on a CPU with AVX512-BF16 or AMX and fp32 elsewhere
(pipeline/models/cpu.py), for TRL too (in bf16 it keeps its defaults, bf16 autocast and bf16 LoRA weights; in fp32
its LoRA is cast to fp32).

Every system: gradient checkpointing off (the model fits easily; each tool at its fastest setting), the loss on the
answer tokens only, the same GLUE samples (configs/prep/glue.yaml through SmolLM2's chat template). MoRE's selector
learns from step 1 (no warm-up), its slower mode. Measured per system: real (non-pad) tokens/s over the steps after
the first --skip, peak memory of a training process (RSS; on a GPU its allocated memory), and the share of the
machine's matmul peak in that dtype (measured in the same run: the best rate of square GEMMs of 512, 1024 and 2048
on CPU, 4096 and 8192 on a GPU, bench/gemm_peak.py; runs before 2026-12-06 10:50 UTC took 2048 alone, 3-7% lower on
a 2-core EPYC) that the model's useful FLOPs reach (on a GPU: the MFU against its measured peak): 4 x (decoder
linear weights) per real token (forward, and backward to the inputs; the base is frozen) plus the head at supervised
positions; attention's few % are left out. And the seconds of training (evaluations not counted) each system takes
to reach one fixed held-out loss, the highest final loss of any system (so every system reaches it): the answer
tokens' CE over the same held-out samples (the prep's eval split), at step 0 and every --eval-every steps (TRL:
after as many real tokens as our --eval-every steps, whatever its batch); TRL's is computed sample by sample in the
same worker, ours is the trainer's eval/loss (packed rows, per-sample attention: the same value).

On a GPU (one is used where torch sees one) every system runs on it; the 2-rank systems need 2 GPUs.

    .venv/bin/python bench/vs_trl.py --model models/smollm2-135m-instruct   # make model first; ~22 min, 2 cores
    .venv/bin/python bench/vs_trl.py --quick --model DIR                    # a few steps (the test)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gemm_peak import peak_gflops, peak_sizes  # noqa: E402
from glue_variants import run  # noqa: E402  (a stage command with its log; a failure raises SystemExit with its tail)
from pipeline.atomic import atomic_write  # noqa: E402
from pipeline.models.cpu import cpu_isa, cpu_model, fastest_dtype, vector_flags  # noqa: E402

TRAIN_CONFIG = "configs/train/smollm2-glue.yaml"
ROW_LEN = 512
LORA = ["more.expert_ranks=[8]", "more.contrastive.weight=0"]
SYSTEMS = {  # name: (kind, ranks (ours) or micro-batch size (TRL; None: --trl-micro-rows), extra overrides)
    "ours_zero3_more": ("ours", 2, []),
    "ours_zero3_lora": ("ours", 2, LORA),
    "ours_1p_more": ("ours", 1, []),
    "ours_1p_lora": ("ours", 1, LORA),
    "ours_1p_more_dense_mask": ("ours", 1, ["model.attn_implementation=sdpa"]),  # before per-sample attention
    "ours_1p_more_fp32": ("ours", 1, ["model.dtype=fp32"]),  # the dtype choice measured (same as ours_1p_more on
                                                              # a CPU where --dtype auto is fp32)
    "ours_1p_more_zero2": ("ours", 1, []),  # ZeRO-2 instead of ZeRO-3 in one process (DS_CONFIGS)
    "ours_zero3_more_eager_norms": ("ours", 2, ["model.compile_norms=false"]),  # before the compiled RMSNorm
    "ours_zero3_more_all_threads": ("ours", 2, []),  # OMP_NUM_THREADS (SYSTEM_ENV): before the cores were split
    "ours_zero3_more_eager_mlp": ("ours", 2, ["model.compile_swiglu=false"]),  # before the compiled MLP product
    "ours_zero3_more_compiled_rope": ("ours", 2, ["model.compile_rope=true"]),  # the compiled rotary embedding
    "ours_1p_more_compiled_rope": ("ours", 1, ["model.compile_rope=true"]),  # (off by default)
    "ours_zero3_more_fresh_dequant": ("ours", 2, ["model.nf4_dequant_buffers=false"]),  # before the NF4 buffers
    "ours_1p_more_fresh_dequant": ("ours", 1, ["model.nf4_dequant_buffers=false"]),
    "ours_zero3_more_pooled": ("ours", 2, ["model.cpu_buffer_pool=true"]),  # the CPU buffer pool (off by default)
    "ours_1p_more_pooled": ("ours", 1, ["model.cpu_buffer_pool=true"]),
    "ours_zero3_more_sdpa_attention": ("ours", 2, ["model.cpu_attention=sdpa"]),  # before the fused CPU kernel
    "ours_1p_more_sdpa_attention": ("ours", 1, ["model.cpu_attention=sdpa"]),
    "ours_zero3_more_sharded_base": ("ours", 2, ["model.frozen_base=sharded"]),  # before the replicated base
    "ours_1p_more_sharded_base": ("ours", 1, ["model.frozen_base=sharded"]),
    "trl_padded": ("trl", 16, []),  # samples per micro-batch
    "trl_packed": ("trl", None, []),  # rows per micro-batch: --trl-micro-rows
    "trl_packed_compiled": ("trl", None, ["torch_compile"]),  # the Trainer's torch_compile=True
}

DS_CONFIGS = {"ours_1p_more_zero2": "ds_configs/zero2.json"}  # every other `ours` system: ds_configs/zero3.json
SYSTEM_ENV = {"ours_zero3_more_all_threads": {"OMP_NUM_THREADS": str(torch.get_num_threads())}}  # torch's default


def useful_flops_per_token(model_dir: Path, supervised_share: float) -> float:
    """Forward (2 x weights) and backward to the inputs (2 x weights) of the decoder's linear layers per real token,
    plus the LM head at the supervised positions only (the frozen base gets no weight gradients)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return 4.0 * body + 4.0 * head.weight.numel() * supervised_share


def prepare_data(model_dir: Path, out: Path, per_task: int) -> Path:
    """The GLUE mix rendered through the model's chat template, packed in rows of 512 (prep cache: once)."""
    from pipeline.config.base import load_config
    from pipeline.config.prep import PrepConfig
    from pipeline.data.prep import run_prep

    overrides = [f"output_dir={out}", f"max_seq_len={ROW_LEN}", f"tokenizer.path={model_dir}",
                 "tokenizer.train_sentencepiece=null", "chat_template=true"]
    with contextlib.chdir(ROOT):
        cfg = load_config(PrepConfig, "configs/prep/glue.yaml", overrides)
        cfg = cfg.model_copy(update={"tasks": [t.model_copy(update={"max_examples": per_task}) for t in cfg.tasks]})
        return Path(run_prep(cfg))


def samples_dataset(data_dir: Path, out: Path, split: str = "train") -> Path:
    """The packed rows' samples, one per example (input_ids, labels with -100 on the prompt), saved for TRL."""
    import datasets

    from pipeline.data.loader import PackedDataset, split_samples

    if not (out / "dataset_info.json").is_file():
        ds = PackedDataset(data_dir, split)
        samples = [s for i in range(len(ds)) for s in split_samples(ds[i])]
        datasets.Dataset.from_dict({"input_ids": [s["input_ids"].tolist() for s in samples],
                                    "labels": [s["labels"].tolist() for s in samples]}).save_to_disk(str(out))
    return out


def ours_overrides(out: Path, model: Path, data: Path, steps: int, ranks: int, dtype: str,
                   rows_per_step: int = 4) -> list[str]:
    """Our trainer's settings here (over TRAIN_CONFIG): `rows_per_step` packed rows per step split over 1 or 2 ranks
    (main() checks that they split), no checkpoints, the selector learning from step 1."""
    return [f"output_dir={out}", f"model.path={model}", f"data.dir={data}", f"optim.max_steps={steps}",
            f"optim.micro_batch_size={rows_per_step // ranks}", "optim.grad_accum=1", "optim.warmup_steps=1",
            "checkpoint.every=0", "log_every=1", "more.selector_warmup_steps=0", f"model.dtype={dtype}"]


def run_ours(name: str, ranks: int, extra: list[str], model: Path, data: Path, tokens: int, work: Path,
             port: int, dtype: str, eval_every: int, rows_per_step: int) -> dict:
    """Train through the project's own command; tokens/s from its per-step metrics, memory from rank 0's, the held-out
    loss (the whole eval split) at step 0 and every `eval_every` steps from its eval rows."""
    from pipeline.data.loader import PackedDataset

    ds = PackedDataset(data, "train")
    row_tokens = sum(ds.lengths()) / len(ds)
    steps = max(4, round(tokens / (rows_per_step * row_tokens)))  # the same rows per step on either layout
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # a run stopped earlier leaves a checkpoint that --no-resume refuses
    sets = [*ours_overrides(out, model, data, steps, ranks, dtype, rows_per_step), f"eval.every={eval_every}",
            "eval.at_start=true", *extra]
    launch = ([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port)]
              if ranks > 1 else [sys.executable])
    cmd = [*launch, "launch/train.py", "--deepspeed", DS_CONFIGS.get(name, "ds_configs/zero3.json"),
           "--config", TRAIN_CONFIG, "--no-resume", *[a for s in sets for a in ("--set", s)]]
    run(cmd, work / f"{name}.log", SYSTEM_ENV.get(name))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    rows = [r for r in rows if "train/tokens" in r]
    return {"steps": [(r["train/tokens"], r["train/tokens"] / r["train/tokens_per_s"]) for r in rows],
            "peak_mem_gb": max(r.get("train/peak_rss_gb", r.get("train/peak_mem_gb", 0.0)) for r in rows),
            "eval": sorted(evals.items()),
            "eval_every_steps": eval_every}


def trl_batches(samples_per_micro_batch: int | None, rows_per_step: int, micro_rows: int) -> tuple[int, int]:
    """(micro-batch, accumulation) that give TRL about `rows_per_step` rows per optimizer step: packed, micro-batches
    of `micro_rows` rows; padded, of `samples_per_micro_batch` samples (16 samples hold about 2 rows' real tokens)."""
    if samples_per_micro_batch is None:
        return micro_rows, rows_per_step // micro_rows
    return samples_per_micro_batch, max(1, rows_per_step // 2)


def run_trl(name: str, extra: list[str], micro_batch: int, accum: int, model: Path, samples: Path,
            eval_samples: Path, tokens: int, work: Path, dtype: str, eval_tokens: float) -> dict:
    """TRL in its own process (its own threads and RSS): `--trl-worker` below; `micro_batch` rows (packed) or
    samples, `accum` of them per optimizer step. It evaluates after about every `eval_tokens` training tokens (our
    systems' --eval-every steps)."""
    spec = {"name": name, "model": str(model), "samples": str(samples), "eval_samples": str(eval_samples),
            "eval_tokens": eval_tokens, "tokens": tokens, "dtype": dtype,
            "batch": micro_batch, "accum": accum, "packed": name.startswith("trl_packed"),
            "torch_compile": "torch_compile" in extra, "out": str(work / f"{name}.json")}
    run([sys.executable, __file__, "--trl-worker", json.dumps(spec)], work / f"{name}.log")
    return json.loads(Path(spec["out"]).read_text())


def trl_worker(spec: dict) -> None:
    """SFTTrainer + PEFT LoRA on an NF4 base, set up as TRL's docs show; real tokens counted per step."""
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from pipeline.models.loading import keep_nf4_layout

    samples = datasets.load_from_disk(spec["samples"])
    mean_len = sum(len(x) for x in samples["input_ids"]) / len(samples)
    per_step = spec["batch"] * spec["accum"] * (ROW_LEN * 0.97 if spec["packed"] else mean_len)
    steps = max(4, round(spec["tokens"] / per_step))
    eval_every = max(1, round(spec["eval_tokens"] / per_step))
    bf16 = spec["dtype"] == "bf16"
    dt = torch.bfloat16 if bf16 else torch.float32
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=dt, device_map={"": 0} if cuda else "cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=dt))
    # On a CPU with AVX512-BF16, bitsandbytes repacks an NF4 weight in place at its first eval-mode forward; the
    # forward stays right, but the gradients of a later training step are not (measured: after one held-out eval,
    # the same batch's LoRA gradient norm fell from 5.79 to 0.59; TRL's held-out loss barely moved). Our loader
    # switches the repack off (pipeline/models/loading.py); the held-out evaluations here need the same for TRL.
    keep_nf4_layout(model)
    args = SFTConfig(output_dir=str(Path(spec["out"]).parent / spec["name"]), max_steps=steps,
                     per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=spec["accum"],
                     learning_rate=1e-3, warmup_steps=1,
                     gradient_checkpointing=False, packing=spec["packed"], max_length=ROW_LEN, logging_steps=1,
                     report_to="none", save_strategy="no", use_cpu=not cuda, dataloader_num_workers=0, seed=0,
                     torch_compile=spec["torch_compile"],
                     bf16=bf16)  # SFTConfig's default is bf16 autocast; in fp32 like ours where fp32 is faster
    log: list[tuple[float, float]] = []  # per optimizer step: (real tokens, seconds)
    held_out = datasets.load_from_disk(spec["eval_samples"])
    evals: list[tuple[int, float]] = []  # (step, held-out loss)

    class Trainer(SFTTrainer):
        real = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            Trainer.real += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0, self.n0 = time.perf_counter(), Trainer.real

        def on_train_begin(self, args, state, control, model=None, **k):
            evals.append((0, held_out_loss(model, held_out)))

        def on_step_end(self, args, state, control, model=None, **k):
            log.append((Trainer.real - self.n0, time.perf_counter() - self.t0))  # the clock stops before the eval
            if state.global_step % eval_every == 0 or state.global_step == state.max_steps:
                evals.append((state.global_step, held_out_loss(model, held_out)))

    trainer = Trainer(model=model, args=args, train_dataset=samples,
                      processing_class=AutoTokenizer.from_pretrained(spec["model"]),
                      peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
                      callbacks=[Clock()])
    # TRL casts a quantized model's LoRA weights to bf16 (the QLoRA paper's choice) and autocasts to bf16 by default.
    # On a CPU without fast bf16 matmuls (AVX2) that made a step of 16 padded samples take over 4 minutes: there
    # both tools compute in fp32; on a CPU with bf16 instructions both keep TRL's bf16.
    for p in trainer.model.parameters():
        if p.requires_grad and not bf16:
            p.data = p.data.float()
    trainer.train()
    repacked = [n for n, m in trainer.model.named_modules()
                if getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)]
    if repacked:
        raise RuntimeError(f"{len(repacked)} NF4 layers were repacked for CPU inference during training, e.g. "
                           f"{repacked[0]}: their gradients are wrong")
    peak = (torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    Path(spec["out"]).write_text(json.dumps(
        {"steps": log, "peak_mem_gb": peak / 2**30, "eval": evals,
         "eval_every_steps": eval_every}))


@torch.no_grad()
def held_out_loss(model, samples) -> float:
    """Token-weighted CE of the answer tokens over the held-out samples, each sample alone: what our trainer's
    eval/loss computes on the same samples (packed, with per-sample attention)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for ids, labels in zip(samples["input_ids"], samples["labels"]):
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :-1].float()
        target = torch.tensor(labels[1:], device=logits.device)
        total += float(torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    model.train(was)
    return total / max(count, 1)


def peak_share(rate: float, flops_per_token: float, peak: float) -> float:
    """The share of the measured matmul peak (GFLOP/s) that `rate` real tokens/s of useful work reach."""
    return rate * flops_per_token / (peak * 1e9)


def summarise(rec: dict, skip: int, flops_per_token: float, peak: float) -> dict:
    steady = rec["steps"][skip:] or rec["steps"]
    tokens, seconds = sum(n for n, _ in steady), sum(s for _, s in steady)
    rate = tokens / seconds
    elapsed = [0.0]  # training seconds after each step (evaluations not counted)
    for _, t in rec["steps"]:
        elapsed.append(elapsed[-1] + t)
    return {"steps": len(rec["steps"]), "real_tokens": int(sum(n for n, _ in rec["steps"])),
            "measured_steps": len(steady), "tokens_per_s": rate, "peak_mem_gb": rec["peak_mem_gb"],
            "matmul_peak_share": peak_share(rate, flops_per_token, peak),
            "step_log": [[n, round(t, 4)] for n, t in rec["steps"]],  # per step: real tokens, seconds
            "eval_every_steps": rec["eval_every_steps"],
            "eval_curve": [[step, round(elapsed[step], 3), loss] for step, loss in rec["eval"]]}  # step, s, loss


def pool_rounds(rounds: list[dict], flops_per_token: float, peak: float) -> dict:
    """One system over its --rounds runs: the rate over every round's measured steps together (the host's speed
    drifts while the systems run one after another; alternating them spreads that drift over all), the largest peak
    memory, the first round's step log and held-out curve (the same training again), and each round's own rate."""
    if len(rounds) == 1:
        return rounds[0]
    steady = [step for r in rounds for step in r["step_log"][len(r["step_log"]) - r["measured_steps"]:]]
    rate = sum(n for n, _ in steady) / sum(t for _, t in steady)
    return {**rounds[0], "measured_steps": len(steady), "tokens_per_s": rate,
            "matmul_peak_share": peak_share(rate, flops_per_token, peak),
            "peak_mem_gb": max(r["peak_mem_gb"] for r in rounds),
            "wall_s": round(sum(r["wall_s"] for r in rounds), 1),
            "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds]}


def seconds_to_loss(curve: list, target: float):
    """Training seconds until the first held-out evaluation at or below `target` (None: never reached)."""
    return next((s for _, s, loss in curve if loss <= target), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/smollm2-135m-instruct", help="HF model folder (`make model`)")
    ap.add_argument("--quick", action="store_true", help="a few steps on a few samples (the test; any --model)")
    ap.add_argument("--tokens", type=int, default=None, help="real training tokens per system (24k; quick 1.5k)")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the rate (warm-up)")
    ap.add_argument("--rows-per-step", type=int, default=4,
                    help="packed rows of 512 per optimizer step, every system (ours on 2 ranks: half per rank)")
    ap.add_argument("--trl-micro-rows", type=int, default=1,
                    help="trl_packed's rows per micro-batch (1: its fastest; measured 1/2/4 rows per step: "
                         "280/264/243 real tokens/s on SmolLM2-135M, 110/106/93 on the ~1B model)")
    ap.add_argument("--eval-every", type=int, default=2,
                    help="held-out loss every N of our optimizer steps and at 0 (TRL: after as many real tokens)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset")
    ap.add_argument("--order", choices=["table", "given"], default="table",
                    help="run the systems in the table's order (default) or in the order of --systems")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the list of systems this many times, alternated (A B A B), each system's rate over "
                         "its steps of every round")
    ap.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="compute dtype of every system (auto: bf16 on AVX512-BF16/AMX CPUs, fp32 elsewhere)")
    ap.add_argument("--work", default="runs/bench-vs-trl")
    ap.add_argument("--out", default=None, help="default bench/results/vs_trl[_quick].json")
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker:
        trl_worker(json.loads(a.trl_worker))
        return 0
    chosen = a.systems.split(",")
    if a.rows_per_step % (2 * a.trl_micro_rows):
        sys.exit(f"--rows-per-step {a.rows_per_step}: must split over 2 ranks and into TRL micro-batches of "
                 f"--trl-micro-rows {a.trl_micro_rows}")
    if a.rounds < 1:
        sys.exit(f"--rounds {a.rounds}: must be at least 1")
    unknown = sorted(set(chosen) - set(SYSTEMS))
    if unknown:
        sys.exit(f"--systems: unknown {unknown} (known: {', '.join(SYSTEMS)})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    two_ranks = [n for n in chosen if SYSTEMS[n][0] == "ours" and SYSTEMS[n][1] > 1]
    if device == "cuda" and torch.cuda.device_count() < 2 and two_ranks:
        sys.exit(f"--systems: {', '.join(two_ranks)} need 2 GPUs, this machine has 1 (take the 1-process systems)")
    model = Path(a.model).resolve()
    if not (model / "config.json").is_file():
        sys.exit(f"--model {model}: not a model folder (run `make model` first)")
    work = (ROOT / a.work / ("quick" if a.quick else "full")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tokens = a.tokens or (1500 if a.quick else 24_000)
    print(f"[vs_trl] data, model {model}", flush=True)
    data = prepare_data(model, work / "data", per_task=40 if a.quick else 400)
    samples = samples_dataset(data, work / "samples")
    eval_samples = samples_dataset(data, work / "eval_samples", "eval")
    import datasets

    n_eval = len(datasets.load_from_disk(str(eval_samples)))
    from pipeline.data.loader import PackedDataset

    ds = PackedDataset(data, "train")
    supervised_share = float(ds.row_task_counts("supervised_tokens").sum() / ds.lengths().sum())
    flops = useful_flops_per_token(model, supervised_share)
    dtype = fastest_dtype() if a.dtype == "auto" else a.dtype
    peak = peak_gflops(torch.bfloat16 if dtype == "bf16" else torch.float32, device=device)
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    print(f"[vs_trl] {dtype} matmul peak {peak:.1f} GFLOP/s ({gpu or cpu_isa()}); {flops / 1e6:.0f} MFLOP per real "
          f"token", flush=True)
    import peft
    import transformers
    import trl

    order = list(dict.fromkeys(chosen)) if a.order == "given" else [n for n in SYSTEMS if n in chosen]
    run_info = {"command": f"python bench/vs_trl.py --model {a.model}" + (" --quick" if a.quick else "")
                           + (f" --tokens {a.tokens}" if a.tokens else "")
                           + (f" --dtype {a.dtype}" if a.dtype != "auto" else "")
                           + (f" --systems {a.systems}" if chosen != list(SYSTEMS) else "")
                           + (f" --order {a.order}" if a.order != "table" else "")
                           + (f" --rounds {a.rounds}" if a.rounds != 1 else "")
                           + (f" --rows-per-step {a.rows_per_step}" if a.rows_per_step != 4 else "")
                           + (f" --trl-micro-rows {a.trl_micro_rows}" if a.trl_micro_rows != 1 else "")
                           + (f" --eval-every {a.eval_every}" if a.eval_every != 2 else "")
                           + (f" --work {a.work}" if a.work != "runs/bench-vs-trl" else "")
                           + (f" --out {a.out}" if a.out else ""),
                "model": a.model, "tokens_per_system": tokens, "rows_per_step": a.rows_per_step,
                "trl_micro_rows": a.trl_micro_rows,
                "row_len": ROW_LEN, "supervised_share": supervised_share, "useful_flops_per_token": flops,
                "matmul_peak_gflops": peak, "matmul_peak_shapes": [f"{n}^3" for n in peak_sizes(device)],
                "run_order": order, "rounds": a.rounds, "gpu": gpu,
                "memory": "GPU memory allocated" if gpu else "RSS per process",
                "skip_steps": a.skip, "eval_every": a.eval_every, "eval_samples": n_eval,
                "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "cpu_isa": cpu_isa(),
                "dtype": dtype,
                "cpu_flags": vector_flags(), "cores": os.cpu_count(),
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                             "trl": trl.__version__, "peft": peft.__version__}}
    out_path = Path(a.out or ROOT / "bench" / "results" / f"vs_trl{'_quick' if a.quick else ''}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results, failed, rounds = {}, {}, {}
    for i, name in ((i, name) for _ in range(a.rounds) for i, name in enumerate(order)):
        if name in failed:
            continue
        kind, size, extra = SYSTEMS[name]
        print(f"[vs_trl] {name}" + (f", round {len(rounds.get(name, [])) + 1}" if a.rounds > 1 else ""), flush=True)
        t0 = time.perf_counter()
        try:
            rec = (run_ours(name, size, extra, model, data, tokens, work, 29600 + i, dtype, a.eval_every,
                            a.rows_per_step)
                   if kind == "ours" else run_trl(name, extra, *trl_batches(size, a.rows_per_step, a.trl_micro_rows),
                                                  model, samples, eval_samples, tokens, work, dtype,
                                                  a.eval_every * a.rows_per_step * ROW_LEN * 0.97))
        except (SystemExit, Exception) as e:  # one system failing: said and kept, the others still run
            failed[name] = str(e)[-3000:]
            results.pop(name, None)
            print(f"[vs_trl] {name} FAILED: {failed[name]}", flush=True)
            continue
        rounds.setdefault(name, []).append({**summarise(rec, a.skip, flops, peak),
                                            "wall_s": round(time.perf_counter() - t0, 1)})
        results[name] = pool_rounds(rounds[name], flops, peak)
        print(f"[vs_trl] {name}: {rounds[name][-1]['tokens_per_s']:.1f} real tokens/s, peak memory "
              f"{rounds[name][-1]['peak_mem_gb']:.2f} GB, {rounds[name][-1]['matmul_peak_share']:.1%} of matmul peak",
              flush=True)
        # after every system, so that a run cut short keeps what it measured
        target, ratios = compare(results)
        atomic_write(out_path, json.dumps({**run_info, "systems": results, "failed": failed, "ratios": ratios,
                                           "target_loss": target}, indent=1))
    if failed:
        sys.exit(f"[vs_trl] failed: {', '.join(failed)} (the others are in {out_path})")
    print(json.dumps(ratios, indent=1))
    return 0


def compare(results: dict) -> tuple[float, dict]:
    """(target loss, ratios) over the systems measured so far; sets each one's seconds to the target loss."""
    # The fixed loss every system reached: the highest of their final held-out losses.
    target = max(r["eval_curve"][-1][2] for r in results.values())
    for r in results.values():
        r["seconds_to_target_loss"] = seconds_to_loss(r["eval_curve"], target)
    trl_best = max((r["tokens_per_s"] for n, r in results.items() if n.startswith("trl")), default=None)
    trl_fastest = min((r["seconds_to_target_loss"] for n, r in results.items() if n.startswith("trl")),
                      default=None)
    ratios = {}
    if trl_best:
        ratios.update({f"{n}_vs_trl_best": r["tokens_per_s"] / trl_best for n, r in results.items()
                       if n.startswith("ours")})
    trl_rounds = [r.get("rounds_tokens_per_s", [r["tokens_per_s"]]) for n, r in results.items() if n.startswith("trl")]
    for n, r in results.items():  # with --rounds: against TRL's best of the same round, round by round
        if n.startswith("ours") and "rounds_tokens_per_s" in r:
            ratios[f"{n}_vs_trl_best_by_round"] = [rate / max(t[k] for t in trl_rounds if k < len(t))
                                                   for k, rate in enumerate(r["rounds_tokens_per_s"])
                                                   if any(k < len(t) for t in trl_rounds)]
    if trl_fastest:
        ratios.update({f"{n}_time_to_loss_speedup_vs_trl_best": trl_fastest / r["seconds_to_target_loss"]
                       for n, r in results.items() if n.startswith("ours") and r["seconds_to_target_loss"]})
    for path in ("zero3", "1p"):
        m, l = results.get(f"ours_{path}_more"), results.get(f"ours_{path}_lora")
        if m and l:
            ratios[f"more_over_lora_time_{path}"] = l["tokens_per_s"] / m["tokens_per_s"]
    for ratio, system, base in (("packed_attention_speedup_1p", "ours_1p_more", "ours_1p_more_dense_mask"),
                               ("dtype_auto_speedup_1p", "ours_1p_more", "ours_1p_more_fp32"),
                               ("zero2_over_zero3_1p_tokens_per_s", "ours_1p_more_zero2", "ours_1p_more"),
                               ("compiled_norms_speedup_zero3", "ours_zero3_more", "ours_zero3_more_eager_norms"),
                               ("compiled_rope_speedup_zero3", "ours_zero3_more_compiled_rope", "ours_zero3_more"),
                               ("compiled_rope_speedup_1p", "ours_1p_more_compiled_rope", "ours_1p_more"),
                               ("dequant_buffers_speedup_zero3", "ours_zero3_more", "ours_zero3_more_fresh_dequant"),
                               ("dequant_buffers_speedup_1p", "ours_1p_more", "ours_1p_more_fresh_dequant"),
                               ("buffer_pool_speedup_zero3", "ours_zero3_more_pooled", "ours_zero3_more"),
                               ("buffer_pool_speedup_1p", "ours_1p_more_pooled", "ours_1p_more"),
                               ("zero3_2ranks_over_1p_tokens_per_s", "ours_zero3_more", "ours_1p_more")):
        if system in results and base in results:  # tokens/s of `system` over `base`
            ratios[ratio] = results[system]["tokens_per_s"] / results[base]["tokens_per_s"]
    return target, ratios


if __name__ == "__main__":
    sys.exit(main())
