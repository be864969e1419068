"""Evaluate stage: score merged checkpoints, base + MoRE adapter (given task id or zero-shot routing) and the
untrained base on each task's eval split, with the task definitions prep used; write results.json + report.md.

Public API: `evaluate` (api: one call from paths, what the CLI runs), `run_evaluation` (runner), `open_model`, `HFModel`, `MergedModels`, `AdapterModel` (models),
`from_config`, `from_data` (tasks), `label_logprobs`, `greedy_generate` (scoring), `pipeline.evaluate.metrics`.
"""
from pipeline.evaluate.api import evaluate
from pipeline.evaluate.errors import EvalError
from pipeline.evaluate.models import AdapterModel, EvalModel, HFModel, MergedModels, open_model
from pipeline.evaluate.runner import run_evaluation, score_task
from pipeline.evaluate.scoring import greedy_generate, label_logprobs, parse_number
from pipeline.evaluate.tasks import TaskSet, from_config, from_data

__all__ = ["AdapterModel", "EvalError", "EvalModel", "HFModel", "evaluate", "MergedModels", "TaskSet", "from_config",
           "from_data", "greedy_generate", "label_logprobs", "open_model", "parse_number", "run_evaluation",
           "score_task"]
