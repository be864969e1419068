"""After-merge check: the exported model (plain transformers, or base + peft) must give the adapter model's logits.

The reference is the adapter model itself: the base loaded as the merge target describes (`base_spec`) plus
`load_adapter(..., freeze_selection=True)` with the task id, so a wrong rank, a missed layer, a wrong scale or a
corrupted tensor shows up as a logit error. Inputs are a few prepared eval samples of the task (prep output) or,
without data, random token prompts.

Tolerance (`tolerance`): max |logit error| <= rel * max(1, max |reference logit|), with rel set by the lowest
precision on either side (output dtype, reference compute dtype):
- fp32 on both sides: rel 1e-5. The two sides compute x (W + BA) vs x W + (x A) B: the same maths in another
  summation order, so only fp32 round-off (unit 6e-8, grown over a few thousand-term dot products and the
  layers) separates them: ~1e-6 relative measured; a wrong rank or a corrupted tensor is orders above 1e-5.
- fp16 anywhere: rel 1e-2; bf16 anywhere: rel 3e-2, both times sqrt(layers / 4) beyond 4 layers. Each 16-bit
  matmul input/output and the merged weight itself is rounded (unit 4.9e-4 fp16, 3.9e-3 bf16); the roundings
  differ between the two sides and grow through the residual stream: measured 0.5% of the max logit on the
  2-layer test Llamas, 1.7% on a d=1024, 8-layer one (NF4 bf16 base, bf16 output; bound 4.2%) and 4.2-5.7% over
  the five demo tasks on the 30-layer SmolLM2-135M (trained on NF4 in bf16, merged to fp32; bound 8.2%), but 13%
  after a 3-step bf16 run (every tensor exact): on that model a bf16 logits check is not yet a reliable test.
  `--check-rtol` overrides rel (recorded in the report). The bound still catches a missing delta or a corrupted
  tensor (tests/test_merge_cli.py), and the tensor check below sees every layer whatever the depth.

The logits check alone cannot see one wrong layer in a 16-bit merge: a layer's delta can move the logits by less
than the bf16 tolerance. So a full merge is also checked tensor by tensor (`check_tensors`), in fp32, without any
model: every adapted layer's merged W minus the base W (as the adapter saw it, `BasePlan.base`) must equal the
task's delta B[:, :r] A[:r] * scale at the chosen rank, element by element within the output dtype's rounding of
the merged value (|err| <= u * |W_merged| + 4 u32 (|W| + |delta|) + the subnormal spacing; u = 2^-8 bf16, 2^-11
fp16, 2^-24 fp32); every other tensor must equal the base tensor cast to the output dtype exactly, and the folder
must hold exactly the expected tensors. Where the base weight is small (NF4's exact zeros, weights near 0) the
tolerance is small too, so a missing or wrong delta shows even when it is below bf16 resolution elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
_ORDER = [torch.float32, torch.float16, torch.bfloat16]  # increasing round-off


class CheckError(RuntimeError):
    """The exported model does not reproduce the adapter model (message names the task and the error)."""


class SampleError(ValueError):
    """The --check-samples data cannot provide prompts for a task (missing split/task, other tokenizer)."""


@dataclass
class BaseSpec:
    """How to load the base for a reference / a PEFT check: `quantization` none|nf4 and the load dtype."""
    quantization: str
    dtype: str

    def load(self, base_dir):
        """On the CPU, like the merged model and the prompts it is compared with (on a GPU host bitsandbytes would
        otherwise place an NF4 base on the GPU)."""
        from pipeline.models.loading import load_base_model
        return load_base_model(str(base_dir), self.quantization, self.dtype, device_map="cpu").eval()


def base_spec(meta: dict, target: str) -> BaseSpec:
    """The base the adapter model is compared against for a merge `target` (see merge.py)."""
    bm = meta["base_model"]
    trained = BaseSpec("nf4" if bm.get("quantized_nf4") else "none", bm.get("dtype", "fp32"))
    if target == "trained":
        return trained
    if target == "nf4":
        return BaseSpec("nf4", trained.dtype)
    if target == "original":
        return BaseSpec("none", "fp32")
    raise ValueError(f"unknown target {target!r}")


def tolerance(out_dtype: torch.dtype, ref_dtype: torch.dtype, rel: Optional[float] = None,
              layers: int = 1) -> Tuple[float, str]:
    """(rel, rule text) for comparing a model of `layers` decoder layers in `out_dtype` with a reference computed in
    `ref_dtype`; `rel` overrides the default for that precision."""
    worst = max(out_dtype, ref_dtype, key=_ORDER.index)
    short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[worst]
    if rel is not None:
        return float(rel), f"max|err| <= {float(rel):g} * max(1, max|ref logit|) (set by --check-rtol)"
    rel = REL_TOL[worst]
    why = f"{short} round-off"
    if worst != torch.float32 and layers > 4:  # 16-bit round-off grows through the residual stream
        rel *= math.sqrt(layers / 4)
        why += f", {layers} layers"
    return rel, f"max|err| <= {rel:.3g} * max(1, max|ref logit|) ({why})"


def random_prompts(vocab_size: int, n: int = 4, length: int = 32, seed: int = 0) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low = 3 if vocab_size > 8 else 0  # skip pad/bos/eos ids of the usual layouts
    return list(torch.randint(low, vocab_size, (n, length), generator=g))


def sample_prompts(data_dir, task: str, vocab_size: int, n: int = 4, max_len: int = 64) -> List[torch.Tensor]:
    """Up to `n` whole eval samples (prompt + answer tokens) of `task` from a prep output's eval split."""
    from pipeline.data.loader import PackedDataset

    try:
        ds = PackedDataset(data_dir, "eval")
    except FileNotFoundError as e:
        raise SampleError(f"--check-samples: {e}") from None
    tasks = ds.manifest["tasks"]
    if task not in tasks:
        raise SampleError(f"--check-samples: task {task!r} is not in {data_dir} (tasks: {sorted(tasks)})")
    tid = int(tasks[task]["id"])
    out: List[torch.Tensor] = []
    for i in range(len(ds)):
        row = ds[i]
        start = 0
        for length in row["seq_lens"].tolist():
            if int(row["task_ids"][start]) == tid:
                out.append(row["input_ids"][start:start + min(length, max_len)].clone())
                if len(out) == n:
                    break
            start += length
        if len(out) == n:
            break
    if not out:
        raise SampleError(f"--check-samples: no eval samples of task {task!r} in {data_dir}")
    top = max(int(p.max()) for p in out)
    if top >= vocab_size:
        raise SampleError(f"--check-samples: token id {top} >= the model's vocab size {vocab_size}: {data_dir} was "
                         f"prepared with another tokenizer")
    return out


@torch.no_grad()
def logits(model, prompts: List[torch.Tensor], task: Optional[int] = None) -> List[torch.Tensor]:
    """fp32 logits per prompt; equal-length prompts run as one batch. `task` = MoRE task id (adapter model)."""
    kw = {} if task is None else {"task_ids": int(task)}
    if len({len(p) for p in prompts}) == 1:
        return list(model(input_ids=torch.stack(prompts), **kw).logits.float())
    return [model(input_ids=p[None], **kw).logits.float()[0] for p in prompts]


def reference_logits(base_dir, adapter_dir, spec: BaseSpec, task_prompts: Dict[str, List[torch.Tensor]],
                     task_names: List[str]) -> Dict[str, List[torch.Tensor]]:
    """The adapter model's logits for each task's prompts (one model load for all tasks)."""
    from pipeline.more.io import load_adapter

    model = load_adapter(spec.load(base_dir), adapter_dir, freeze_selection=True).eval()
    out = {t: logits(model, p, task_names.index(t)) for t, p in task_prompts.items()}
    del model
    return out


def max_abs_err(got: List[torch.Tensor], ref: List[torch.Tensor]) -> float:
    return max(float((g - r).abs().max()) for g, r in zip(got, ref))


@dataclass
class CheckResult:
    task: str
    tolerance: float
    rule: str
    max_abs_err: float
    mean_abs_err: float
    ref_max_abs_logit: float
    passed: bool
    vs_trained_max_abs_err: Optional[float] = None  # target original/nf4: error against the adapter as trained

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "task"}


def judge(task: str, got: List[torch.Tensor], ref: List[torch.Tensor], out_dtype: torch.dtype,
          ref_dtype: torch.dtype, rel: Optional[float] = None, layers: int = 1) -> CheckResult:
    rel, rule = tolerance(out_dtype, ref_dtype, rel, layers)
    scale = max(float(r.abs().max()) for r in ref)
    err = max_abs_err(got, ref)
    mean = float(torch.cat([(g - r).abs().flatten() for g, r in zip(got, ref)]).mean())
    tol = rel * max(1.0, scale)
    return CheckResult(task, tol, rule, err, mean, scale, bool(err <= tol))  # NaN fails


def load_merged(folder) -> torch.nn.Module:
    """The merged folder through plain transformers, in its saved dtype."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto").eval()


def load_peft(base_dir, folder, spec: BaseSpec) -> torch.nn.Module:
    """The exported PEFT adapter on the base (loaded per `spec`) through plain peft."""
    from peft import PeftModel
    return PeftModel.from_pretrained(spec.load(base_dir), str(folder)).eval()


def describe_prompts(prompts: Dict[str, List[torch.Tensor]], source: str) -> dict:
    return {"source": source, "per_task": {t: len(p) for t, p in prompts.items()},
            "tokens": {t: [len(x) for x in p] for t, p in prompts.items()}}


# tensor check: unit round-off of each output dtype (round to nearest: |fl(x) - x| <= u |fl(x)|)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
_U32 = 2.0 ** -24
MAX_LISTED = 10


def tensor_rule(out_dtype: torch.dtype) -> str:
    u = UNIT_ROUNDOFF[out_dtype]
    return (f"adapted layers: |W_merged - W_base - delta| <= {u:.3g} * |W_merged| + 4 * {_U32:.3g} * (|W_base| + "
            f"|delta|) elementwise (fp32; delta = B[:, :r] A[:r] * scale at the task's rank); other tensors: "
            f"equal to the base in {str(out_dtype).replace('torch.', '')}")


@dataclass
class TensorCheck:
    rule: str
    tensors: int = 0  # tensors compared
    adapted: int = 0  # adapted layers compared with their delta
    max_err_over_tol: float = 0.0  # over the adapted layers (<= 1 passes)
    worst_layer: Optional[str] = None
    failed: Dict[str, str] = field(default_factory=dict)  # first MAX_LISTED failures: tensor -> why
    n_failed: int = 0
    passed: bool = True

    def fail(self, name: str, why: str) -> None:
        self.n_failed += 1
        self.passed = False
        if len(self.failed) < MAX_LISTED:
            self.failed[name] = why

    def summary(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in self.failed.items())

    def as_dict(self) -> dict:
        return asdict(self)


def check_tensors(folder, plan, deltas, task: str, out_dtype: torch.dtype) -> TensorCheck:
    """Every tensor of the merged folder against the base (`plan`: a merge.BasePlan) and the task's deltas, one
    tensor at a time (memory: a few fp32 copies of the largest adapted weight)."""
    from safetensors import safe_open

    from pipeline.models.base_weights import checkpoint_files

    res = TensorCheck(tensor_rule(out_dtype))
    folder = Path(folder)
    try:
        files = checkpoint_files(folder)
    except FileNotFoundError as e:
        res.fail("<folder>", str(e))
        return res
    want = plan.names()
    for name in sorted(set(files) - set(want)):
        res.fail(name, "unexpected tensor (not in the base checkpoint)")
    u = UNIT_ROUNDOFF[out_dtype]
    tiny = torch.finfo(out_dtype).tiny * torch.finfo(out_dtype).eps  # subnormal spacing
    with torch.no_grad():
        for name in want:
            if name not in files:
                res.fail(name, "missing from the merged folder")
                continue
            with safe_open(str(folder / files[name]), "pt") as f:
                got = f.get_tensor(name)
            res.tensors += 1
            base = plan.base(name)
            want_dtype = out_dtype if base.is_floating_point() else base.dtype
            if got.dtype != want_dtype or got.shape != base.shape:
                res.fail(name, f"{got.dtype} {tuple(got.shape)}, expected {want_dtype} {tuple(base.shape)}")
                continue
            module = plan.adapted(name)
            if module is None:
                if not torch.equal(got, base.to(want_dtype)):
                    res.fail(name, "differs from the base tensor (not adapted: must equal it)")
                continue
            res.adapted += 1
            got, base = got.float(), base.float()
            delta = deltas.delta(task, module)
            err = (got - base - delta).abs()
            tol = u * got.abs() + 4 * _U32 * (base.abs() + delta.abs()) + tiny
            bad = int((~(err <= tol)).sum())  # NaN counts as bad
            ratio = float((err / tol).max()) if err.numel() else 0.0
            ratio = ratio if ratio == ratio else float("inf")  # NaN -> inf (JSON has no NaN)
            if ratio > res.max_err_over_tol or res.worst_layer is None:
                res.max_err_over_tol, res.worst_layer = ratio, module
            if bad:
                res.fail(name, f"merged - base != delta at rank {deltas.rank(task, module)} in {bad} of "
                               f"{err.numel()} elements (max |err| {float(err.max()):.3g}, {ratio:.3g} x tolerance)")
    return res
