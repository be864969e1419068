"""One call that assembles an evaluation from paths (what the CLI and the end-to-end demo use).

Task definitions: a prep config (`config`) or a prepared data folder (`data`). Trained model: `model` (RUN/merged
with per-task folders, or one HF folder) or `adapter` + `base` (+ `routing`). `baseline` adds the untrained/base
row, scored on the same examples and shown first in the report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from pipeline.evaluate.errors import EvalError
from pipeline.evaluate.models import AdapterModel, HFModel, open_model
from pipeline.evaluate.runner import run_evaluation
from pipeline.evaluate.tasks import TaskSet, from_config, from_data


def _has_tokenizer(p: Path) -> bool:
    return (p / "tokenizer_config.json").is_file() or (p / "tokenizer.json").is_file()


def resolve_tokenizer(taskset: TaskSet, tokenizer=None, model=None, base=None):
    """`tokenizer` if given, else the prepared data's (what prep encoded with), else the config's tokenizer.path,
    else the one in the model/base folder (merged folders carry the base's)."""
    from pipeline.data.errors import PrepError
    from pipeline.data.tokenizer import load_tokenizer

    path = tokenizer or taskset.tokenizer_path
    if path is None:
        root = Path(base or model)
        if not root.is_dir():
            raise EvalError(f"{'--base' if base else '--model'}: folder not found: {root}")
        cands = [root] + sorted(p for p in root.iterdir() if p.is_dir())
        found = [p for p in cands if _has_tokenizer(p)]
        if not found:
            raise EvalError(f"no tokenizer found in {root}; pass a tokenizer folder (--tokenizer) or --data")
        path = found[0]
    try:
        return load_tokenizer(path)
    except PrepError as e:
        raise EvalError(str(e)) from None


def _check_device(device: Optional[str]) -> None:
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise EvalError(f"--device {device!r} is not a device (cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {device}: no CUDA GPU on this machine (torch {torch.__version__}); use cpu")
    if kind not in ("cpu", "cuda"):
        raise EvalError(f"--device {device}: evaluate runs on cpu or cuda")


def evaluate(out, *, model=None, adapter=None, base=None, routing: bool = False, config=None, data=None,
             overrides: Sequence[str] = (), tasks: Optional[Sequence[str]] = None, max_examples: Optional[int] = None,
             seed: int = 0, batch_size: int = 16, baseline=None, tokenizer=None,
             eval_splits: Optional[Mapping[str, str]] = None, device: Optional[str] = None, dtype: str = "auto",
             progress: bool = True, allow_other_base_weights: bool = False) -> dict:
    """Evaluate and write `out/results.json` + `out/report.md`; returns the results dict (see runner)."""
    if (model is None) == (adapter is None):
        raise EvalError("give exactly one of a model folder (--model) or an adapter (--adapter)")
    if adapter is not None and base is None:
        raise EvalError("--adapter needs --base (the base model folder it was trained on)")
    if adapter is None and (base is not None or routing or allow_other_base_weights):
        raise EvalError("--base/--routing/--allow-other-base-weights go with --adapter")
    if (config is None) == (data is None):
        raise EvalError("give exactly one of a prep config (--config) or a prepared data folder (--data)")
    if overrides and config is None:
        raise EvalError("--set overrides values of --config; with --data the tasks are the prepared data's as prep "
                        "wrote them")
    if max_examples is not None and max_examples <= 0:
        raise EvalError("--max-examples must be positive")
    if batch_size <= 0:
        raise EvalError("--batch-size must be positive")
    _check_device(device)
    taskset = from_data(data) if data is not None else from_config(config, overrides)
    selected = taskset.select(tasks)
    tok = resolve_tokenizer(taskset, tokenizer, model, base)
    runs = {}
    if baseline is not None:
        runs["baseline"] = HFModel(baseline, device, dtype, label="--baseline")
    if adapter is not None:
        runs["trained"] = AdapterModel(base, adapter, device, None if dtype == "auto" else dtype, routing=routing,
                                       allow_other_base_weights=allow_other_base_weights)
    else:
        runs["trained"] = open_model(model, device, dtype)
    return run_evaluation(runs, selected, taskset, tok, out, max_examples, seed, batch_size, eval_splits, progress)
