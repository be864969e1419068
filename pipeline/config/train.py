"""Training-stage schema: base model, data, MoRE adapter, optimisation, checkpoints, logging."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, PositiveInt, field_validator

from pipeline.config.base import StrictModel
from pipeline.config.more import MoreConfig

# The selector's warm-up as a share of the run when `more.selector_warmup_steps` is not set. A fixed 100 steps
# left a 120-step SmolLM2 run on four GLUE tasks with every task at rank 8 in 208-210 of 210 layers (the selector
# never chose); a fifth (30 of 150 steps there, 200 of 1000 in bench/fidelity.py) gave task-dependent ranks in both.
SELECTOR_WARMUP_FRACTION = 0.2


class ModelConfig(StrictModel):
    path: str  # local HF folder, or a hub id for users with network access
    quantization: Literal["nf4", "none"] = "nf4"
    # NF4: compute and storage dtype; none: load dtype. auto: bf16 on GPUs and on CPUs with AVX512-BF16 or AMX,
    # fp32 on other CPUs (pipeline/models/cpu.py), resolved when the config loads.
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = Field(default="auto", validate_default=True)
    # packed_sdpa: each packed sample attends within itself (pipeline/models/packed_attention.py), no L x L mask;
    # on a GPU in 16 bits through torch's varlen flash kernel, elsewhere one sdpa call per run of equal samples;
    # sdpa / eager: the collator's dense block-causal mask.
    attn_implementation: Literal["packed_sdpa", "sdpa", "eager"] = "packed_sdpa"
    # packed_sdpa on CPU: `fused`, a kernel built for this CPU on first use (pipeline/models/cpu_attention.py; needs
    # a C++ compiler, else sdpa with a warning); `sdpa`, torch's kernel per run of equal-length samples, in fp32
    cpu_attention: Literal["fused", "sdpa"] = "fused"
    # auto: recompute activations only when the memory planner says the run does not fit without (decided at
    # launch, pipeline/train/preflight.py: the GPU's memory, or on CPU the host's RAM shared by its processes).
    gradient_checkpointing: Union[bool, Literal["auto"]] = "auto"
    # under ZeRO-3: `replicated` keeps the frozen base whole on every rank and shards only what trains (no gather of
    # the base in any step: pipeline/train/zero3_frozen.py); `sharded` partitions it too (DeepSpeed's default); auto:
    # replicated where the memory planner fits the run that way (decided at launch), else sharded
    frozen_base: Literal["auto", "replicated", "sharded"] = "auto"
    # RMSNorms through torch.compile (pipeline/models/compiled_norm.py); stays eager, with a warning, where
    # torch.compile does not work (a CPU host without a C++ compiler).
    compile_norms: bool = True
    # the MLPs' silu(gate) * up through torch.compile (pipeline/models/compiled_swiglu.py), one loop each way instead
    # of five passes; eager, with a warning, where torch.compile does not work. `cpu_buffer_pool` replaces it with its
    # own eager MLP
    compile_swiglu: bool = True
    # training on CPU with packed_sdpa: each attention's rotary embedding and the fp32 cast of q, k, v in one compiled
    # kernel (pipeline/models/compiled_rope.py); eager, with a warning, where torch.compile does not work. Off: 1.07x
    # in one process (steps alternated), 0.95x, 0.98x and 1.01x on the documented 2-rank path (README, train)
    compile_rope: bool = False
    # NF4 on CPU: dequantise each weight into a reused buffer instead of a fresh tensor per matmul (bit-equal,
    # pipeline/models/nf4_matmul.py)
    nf4_dequant_buffers: bool = True
    # training on CPU: the MLP's element-wise outputs and the NF4 matmuls' outputs and input gradients in reused
    # blocks instead of freshly page-faulted memory (bit-equal, pipeline/models/cpu_buffers.py). Off: faster in short
    # runs of one process, slower in both side-by-side benchmark runs (README, Benchmarks)
    cpu_buffer_pool: bool = False

    @field_validator("dtype")
    @classmethod
    def _resolve_auto_dtype(cls, v: str) -> str:
        if v != "auto":
            return v
        from pipeline.models.cpu import fastest_dtype

        return fastest_dtype()


class DataConfig(StrictModel):
    dir: str  # the prep stage's output (manifest.json + train/ + eval/)
    # Task sampling p_t ∝ w_t · min(n_t, cap_t)^(1/T) (pipeline/data/sampler.py). null: as the prep config's
    # `sampling` set it (recorded in the data's manifest.json, with its per-task weights); a value here overrides it.
    temperature: Optional[float] = Field(default=None, gt=0)
    # T5-style caps: a task counts as at most this many examples in its sampling share; a share, not a hard limit
    task_caps: Optional[dict[str, PositiveInt]] = None
    tasks: Optional[list[str]] = Field(default=None, min_length=1)  # a subset of the manifest's tasks (default: all)


class OptimConfig(StrictModel):
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=0, ge=0)
    max_steps: int = Field(default=100, gt=0)
    micro_batch_size: int = Field(default=4, gt=0)  # packed sequences per rank per micro step
    grad_accum: int = Field(default=1, gt=0)
    clip_grad_norm: float = Field(default=1.0, ge=0)  # 0 disables


class CheckpointConfig(StrictModel):
    every: int = Field(default=50, ge=0)  # steps between checkpoints; 0 = only on SIGTERM and at the end
    keep: int = Field(default=2, gt=0)
    resume: Literal["auto", "never", "must"] = "auto"


class EvalConfig(StrictModel):
    every: int = Field(default=50, ge=0)  # steps between held-out evaluations; 0 = only at the end
    at_start: bool = False  # also evaluate before the first step: the base's loss, where each curve starts
    max_batches: Optional[int] = Field(default=None, gt=0)


class TrainConfig(StrictModel):
    output_dir: str
    seed: int = Field(default=0, ge=0, lt=2**32)  # numpy's seeds are 32-bit
    model: ModelConfig
    data: DataConfig
    more: MoreConfig = Field(default_factory=MoreConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log_every: int = Field(default=1, gt=0)
    dist_timeout_s: int = Field(default=600, gt=0)  # collectives fail (never hang) after this long
    # Refuse to start when the memory planner says the run will not fit (CUDA only).
    preflight: bool = True

    def more_for_run(self) -> MoreConfig:
        """The adapter config the run builds: `more` with an unset selector warm-up made a fraction of max_steps.
        Resolved here, not stored in the config, so that a resume with a longer max_steps is not refused as a
        changed `more.*` setting (its warm-up grows with the run, like the lr schedule)."""
        if self.more.selector_warmup_steps is not None:
            return self.more
        return self.more.model_copy(
            update={"selector_warmup_steps": round(SELECTOR_WARMUP_FRACTION * self.optim.max_steps)})
