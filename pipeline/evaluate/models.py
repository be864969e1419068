"""What evaluation runs: "a model that scores a task", over four sources.

- `HFModel(path)`: one plain transformers folder for every task (the untrained base row, or a single checkpoint).
- `MergedModels(root)`: `root/<task>/` per task, as `pipeline.export.merge` writes them; one loaded at a time.
- `AdapterModel(base, adapter)`: the base (loaded as it was trained: NF4 or not, per more_config.json) + the MoRE
  adapter, each prompt run with the task's id; `routing=True` first routes each prompt zero-shot
  (`pipeline.more.routing.route`, no task id given) and runs it with the routed task.

Every model loads lazily (`use_task`) and frees itself (`close`), so the runner holds one model at a time.
The scoring functions call `logits` / `generate` with, per row, the adapter task that runs it (`assign`).
"""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipeline.evaluate.errors import EvalError

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_hf_folder(path: Path, what: str) -> None:
    if not (path / "config.json").is_file():
        raise EvalError(f"{what}: {path} is not a model folder (no config.json)")


def without_generation_defaults(model):
    """The model with the generation settings of its config alone: a checkpoint's generation_config.json (a
    repetition penalty, sampling defaults: Qwen2.5-Instruct ships both) would change what plain greedy decoding
    scores. generate() fills what a call leaves unset from the model's own config, so that config is replaced."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig.from_model_config(model.config)
    return model


def _hf_generate(model, ids, mask, max_new_tokens, pad_id, stop_ids, **kw) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad_id, eos_token_id=list(stop_ids) or None, **kw)
    return out[:, ids.shape[1]:].cpu()


class EvalModel:
    """Interface the runner uses. Subclasses set `kind` and implement loading and the two forward calls."""

    kind = "model"
    routes = False  # True when `assign` predicts the task (zero-shot routing) instead of using the given one

    def identity(self) -> dict:
        raise NotImplementedError

    def use_task(self, task: str) -> dict:
        """Make `task` runnable (load what it needs); returns the identity of what scores it."""
        return self.identity()

    def rank_map(self) -> Optional[tuple[dict, int]]:
        """(each task's chosen rank per adapted layer, max_rank) when this model comes from a MoRE adapter."""
        return None

    def assign(self, task: str, prompts: Sequence[list[int]], batch_size: int = 16, pad_id: int = 0) -> list[str]:
        """The adapter task each prompt runs with (the evaluated task itself unless the model routes)."""
        return [task] * len(prompts)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, tasks: Sequence[str],
               position_ids: Optional[torch.Tensor] = None, keep: Optional[int] = None) -> torch.Tensor:
        """Next-token logits of the last `keep` positions (all when None), (B, keep or L, V)."""
        raise NotImplementedError

    def generate(self, input_ids, attention_mask, tasks: Sequence[str], max_new_tokens: int, pad_id: int,
                 stop_ids: Sequence[int]) -> torch.Tensor:
        """New tokens (B, <= max_new_tokens), greedy; generation of a row may end at any of `stop_ids`."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the weights (the runner calls this before loading the next model)."""


class HFModel(EvalModel):
    """A plain transformers causal LM folder, used for every task."""

    kind = "hf"

    def __init__(self, path, device: Optional[str] = None, dtype: str = "auto", label: str = "model"):
        self.path = Path(path)
        _check_hf_folder(self.path, label)
        self.device = device or default_device()
        self.dtype = dtype
        self._model = None

    def identity(self) -> dict:
        cfg = json.loads((self.path / "config.json").read_text())
        return dict(kind=self.kind, path=str(self.path), model_type=cfg.get("model_type"),
                    dtype=self.dtype if self.dtype != "auto" else cfg.get("dtype", cfg.get("torch_dtype")))

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModelForCausalLM
            dt = "auto" if self.dtype == "auto" else _DTYPES[self.dtype]
            self._model = without_generation_defaults(
                AutoModelForCausalLM.from_pretrained(str(self.path), dtype=dt).to(self.device).eval())
        return self._model

    def use_task(self, task: str) -> dict:
        self.model  # noqa: B018 - load now, so the task's wall time does not hide a load error later
        return self.identity()

    def logits(self, input_ids, attention_mask, tasks, position_ids=None, keep=None):
        d = self.device
        pos = position_ids.to(d) if position_ids is not None else None
        return self.model(input_ids=input_ids.to(d), attention_mask=attention_mask.to(d), position_ids=pos,
                          use_cache=False, logits_to_keep=keep or 0).logits

    def generate(self, input_ids, attention_mask, tasks, max_new_tokens, pad_id, stop_ids):
        return _hf_generate(self.model, input_ids.to(self.device), attention_mask.to(self.device), max_new_tokens,
                            pad_id, stop_ids)

    def close(self) -> None:
        self._model = None
        _free()


class MergedModels(EvalModel):
    """`root/<task>/` holds the merged checkpoint of each task; the current task's one is loaded."""

    kind = "merged"

    def __init__(self, root, device: Optional[str] = None, dtype: str = "auto"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise EvalError(f"--model: folder not found: {self.root}")
        self.device, self.dtype = device or default_device(), dtype
        self._task: Optional[str] = None
        self._current: Optional[HFModel] = None

    def available(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "config.json").is_file())

    def folder(self, task: str) -> Path:
        path = self.root / task
        if not (path / "config.json").is_file():
            raise EvalError(f"no merged model for task {task!r}: {path} is missing or has no config.json "
                            f"(merged tasks in {self.root}: {', '.join(self.available()) or 'none'})")
        return path

    def identity(self) -> dict:
        return dict(kind=self.kind, root=str(self.root), tasks=self.available())

    def rank_map(self) -> Optional[tuple[dict, int]]:
        report = self.root / "merge_report.json"
        info = json.loads(report.read_text()) if report.is_file() else {}
        return (info["rank_map"], info["max_rank"]) if info.get("rank_map") else None

    def use_task(self, task: str) -> dict:
        if task != self._task:
            self.close()
            self._current = HFModel(self.folder(task), self.device, self.dtype)
            self._task = task
        return dict(self._current.use_task(task), kind=self.kind)

    def _model(self) -> HFModel:
        if self._current is None:
            raise RuntimeError("MergedModels: call use_task(task) first")
        return self._current

    def logits(self, *args, **kw):
        return self._model().logits(*args, **kw)

    def generate(self, *args, **kw):
        return self._model().generate(*args, **kw)

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
        self._current, self._task = None, None


def _adapter_meta_for(base: Path, adapter_dir: Path, allow_other_base_weights: bool) -> dict:
    """The adapter's more_config.json, once the folder holds a whole adapter and --base is the model it was trained
    on (its shape; its weights unless allowed otherwise), before anything large loads."""
    from pipeline.more.io import CONFIG_FILE, base_problem, missing_files

    _check_hf_folder(base, "--base")
    missing = missing_files(adapter_dir)
    if missing:
        raise EvalError(f"--adapter: {adapter_dir} is not a MoRE adapter folder (no {', '.join(missing)})")
    cfg_file = adapter_dir / CONFIG_FILE
    try:
        meta = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise EvalError(f"--adapter: {cfg_file} is not valid JSON ({e})") from None
    try:
        why = base_problem(adapter_dir, meta["base_model"], base, check_weights=not allow_other_base_weights)
    except ValueError as e:
        raise EvalError(f"--base: {e}") from None
    if why:
        raise EvalError(why)
    return meta


class AdapterModel(EvalModel):
    """Base + MoRE adapter. Each prompt runs with one task's adapter (given, or routed when `routing`)."""

    kind = "adapter"

    def __init__(self, base, adapter_dir, device: Optional[str] = None, dtype: Optional[str] = None,
                 routing: bool = False, allow_other_base_weights: bool = False):
        self.base, self.adapter_dir = Path(base), Path(adapter_dir)
        self.meta = _adapter_meta_for(self.base, self.adapter_dir, allow_other_base_weights)
        self.task_names: list[str] = list(self.meta["task_names"])
        self.device = device or default_device()
        self.dtype = dtype or self.meta["base_model"].get("dtype", "fp32")
        self.quantization = "nf4" if self.meta["base_model"].get("quantized_nf4") else "none"
        self.routes = routing
        self.kind = "adapter+routing" if routing else "adapter"
        self._model = None

    def identity(self) -> dict:
        return dict(kind=self.kind, base=str(self.base), adapter=str(self.adapter_dir), dtype=self.dtype,
                    quantization=self.quantization, adapter_tasks=self.task_names)

    def rank_map(self) -> Optional[tuple[dict, int]]:
        return (json.loads((self.adapter_dir / "rank_map.json").read_text()),
                int(self.meta["more_config"]["max_rank"]))

    @property
    def model(self):
        if self._model is None:
            from pipeline.models import load_base_model
            from pipeline.more import load_adapter
            base = load_base_model(str(self.base), self.quantization, self.dtype,
                                   device_map=self.device if self.quantization == "nf4" else None)
            if self.quantization != "nf4":
                base = base.to(self.device)
            self._model = load_adapter(without_generation_defaults(base), self.adapter_dir,
                                       freeze_selection=True).eval()
        return self._model

    def task_id(self, task: str) -> int:
        if task not in self.task_names:
            raise EvalError(f"task {task!r} is not in the adapter {self.adapter_dir} "
                            f"(its tasks: {', '.join(self.task_names)}); use --routing to route it zero-shot")
        return self.task_names.index(task)

    def use_task(self, task: str) -> dict:
        if not self.routes:
            self.task_id(task)
        self.model  # noqa: B018
        return self.identity()

    def _device(self):
        return next(self.model.parameters()).device

    def assign(self, task, prompts, batch_size=16, pad_id=0):
        if not self.routes:
            return [task] * len(prompts)
        from pipeline.more.routing import route
        from pipeline.evaluate.scoring import pad_batch
        names: list[str] = []
        d = self._device()
        for i in range(0, len(prompts), batch_size):
            ids, mask = pad_batch([list(p) for p in prompts[i:i + batch_size]], pad_id, left=False)
            pred = route(self.model, ids.to(d), mask.to(d))
            names += [self.task_names[int(p)] if int(p) >= 0 else self.task_names[0] for p in pred.tolist()]
        return names

    def logits(self, input_ids, attention_mask, tasks, position_ids=None, keep=None):
        d = self._device()
        ids, mask = input_ids.to(d), attention_mask.to(d)
        pos = position_ids.to(d) if position_ids is not None else None
        if len(set(tasks)) == 1:  # an int task id: every token runs that task (forward resets task_context)
            task_ids = self.task_id(tasks[0])
        else:  # a mixed-task batch, one pass with per-token task ids
            task_ids = torch.tensor([self.task_id(t) for t in tasks], device=d)[:, None].expand_as(ids)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, task_ids=task_ids).logits
        return logits[:, -keep:] if keep else logits

    def generate(self, input_ids, attention_mask, tasks, max_new_tokens, pad_id, stop_ids):
        d = self._device()
        out = torch.full((len(tasks), max_new_tokens), stop_ids[0] if stop_ids else pad_id, dtype=torch.long)
        for t in dict.fromkeys(tasks):  # rows of one task generate together (the task context is per call)
            rows = [i for i, x in enumerate(tasks) if x == t]
            new = _hf_generate(self.model, input_ids[rows].to(d), attention_mask[rows].to(d), max_new_tokens,
                               pad_id, stop_ids, task=self.task_id(t))
            out[rows, :new.shape[1]] = new
        return out

    def close(self) -> None:
        self._model = None
        _free()


def open_model(path, device: Optional[str] = None, dtype: str = "auto") -> EvalModel:
    """`path` with a config.json: one model for every task; otherwise a folder of per-task merged models."""
    p = Path(path)
    if not p.exists():
        raise EvalError(f"--model: folder not found: {p}")
    return HFModel(p, device, dtype) if (p / "config.json").is_file() else MergedModels(p, device, dtype)
