"""The merge stage behind `launch/merge.py`: per task, write (streaming merge or PEFT export) into a temp folder,
check it (logits against the adapter model; for a full merge also every tensor against base + delta), then rename
it into place; record everything in `<out>/merge_report.json` (written atomically).

Inputs are validated before anything is written, so bad input leaves no output folder. A task whose check fails
raises `CheckError` after its numbers went into the report; its temp folder is removed and nothing is renamed
into `<out>/<task>` (a previous good result there stays).
"""
from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from pipeline.atomic import atomic_write, replace_dir, temp_dir_for
from pipeline.export.check import (CheckError, CheckResult, SampleError, base_spec, check_tensors, describe_prompts,
                                   judge, load_merged, load_peft, logits, random_prompts, reference_logits,
                                   sample_prompts)
from pipeline.export.merge import DTYPES, TARGETS, AdapterDeltas, BasePlan, copy_tokenizer, stream_merge
from pipeline.export.shards import DEFAULT_MAX_SHARD, parse_size
from pipeline.models.base_weights import local_model_dir
from pipeline.more.io import CONFIG_FILE, RANK_MAP_FILE, base_problem, missing_files

REPORT_FILE = "merge_report.json"
FORMATS = ("full", "peft")


class MergeInputError(ValueError):
    """Bad merge input (adapter folder, task, base, option), named in the message; nothing was written."""


@dataclass
class MergeOptions:
    adapter: Path
    out: Path
    base: Optional[str] = None  # default: the base recorded in more_config.json
    tasks: Optional[List[str]] = None  # default: all tasks of the adapter
    dtype: str = "bf16"
    format: str = "full"
    target: str = "trained"
    check_samples: Optional[Path] = None  # prep output dir; None -> random prompts
    check: bool = True
    check_n: int = 4
    check_rtol: Optional[float] = None  # overrides the per-precision default (check.py)
    max_shard_size: str = DEFAULT_MAX_SHARD
    allow_other_base_weights: bool = False  # merge into a base whose weights differ from the trained-on ones
    log: bool = True


def _log(opts: MergeOptions, msg: str) -> None:
    if opts.log:
        print(f"[merge] {msg}", file=sys.stderr, flush=True)


def resolve_base(base: Optional[str], meta: dict, adapter: Path) -> Path:
    """A local HF folder: --base, else the base recorded at training (a path, or a hub id already in the cache)."""
    name = base or meta["base_model"].get("id")
    if not name:
        raise MergeInputError(f"{adapter / CONFIG_FILE} records no base model: pass --base")
    folder = local_model_dir(name)
    if folder is None:
        how = "--base" if base else f"the base recorded in {adapter / CONFIG_FILE}"
        raise MergeInputError(f"base model {name!r} ({how}) is not a local folder nor in the HF cache "
                              f"(no network here): pass --base PATH")
    return folder


def validate(opts: MergeOptions) -> tuple:
    """(meta, tasks, base_dir) or MergeInputError; reads only small files."""
    ad = Path(opts.adapter)
    if not ad.is_dir():
        raise MergeInputError(f"adapter folder {ad} does not exist")
    missing = missing_files(ad)
    if missing:
        raise MergeInputError(f"{ad} is not a MoRE adapter folder: missing {', '.join(missing)}")
    meta, rank_map = (_read_json(ad / f) for f in (CONFIG_FILE, RANK_MAP_FILE))
    known = list(meta["task_names"])
    tasks = opts.tasks or known
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise MergeInputError(f"unknown task(s) {unknown}: the adapter has {known}")
    for t in tasks:
        lacking = sorted(set(meta["targets"]) - set(rank_map.get(t, {})))
        if lacking:
            raise MergeInputError(f"{ad / RANK_MAP_FILE}: task {t!r} has no rank for {len(lacking)} adapted "
                                  f"layer(s), e.g. {lacking[0]!r}")
    if len(set(tasks)) != len(tasks):
        raise MergeInputError(f"--tasks lists a task twice: {tasks}")
    if opts.dtype not in ("bf16", "fp16", "fp32"):
        raise MergeInputError(f"--dtype must be bf16, fp16 or fp32, got {opts.dtype!r}")
    if opts.format not in FORMATS:
        raise MergeInputError(f"--format must be one of {FORMATS}, got {opts.format!r}")
    if opts.target not in TARGETS:
        raise MergeInputError(f"--target must be one of {TARGETS}, got {opts.target!r}")
    try:
        parse_size(opts.max_shard_size)
    except ValueError as e:
        raise MergeInputError(f"--max-shard-size: {e}") from None
    if opts.check and opts.check_n < 1:
        raise MergeInputError(f"--check-n must be at least 1, got {opts.check_n}")
    if opts.check_rtol is not None and not opts.check_rtol > 0:
        raise MergeInputError(f"--check-rtol must be positive, got {opts.check_rtol}")
    if opts.check_samples is not None and not (Path(opts.check_samples) / "manifest.json").is_file():
        raise MergeInputError(f"--check-samples {opts.check_samples} is not a prep output (no manifest.json)")
    if Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise MergeInputError(f"--out {opts.out} exists and is not a folder")
    base = resolve_base(opts.base, meta, ad)
    check_base(base, meta, ad, opts.allow_other_base_weights)
    return meta, tasks, base


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeInputError(f"{path}: not valid JSON ({e})") from None


def check_base(base: Path, meta: dict, adapter: Path, other_weights: bool = False) -> None:
    """The base folder holds a model of the shape the adapter was trained on and, unless `other_weights`, the
    weights it recorded, before anything is written."""
    try:
        why = base_problem(adapter, meta["base_model"], base, check_weights=not other_weights)
    except ValueError as e:
        raise MergeInputError(f"base: {e}") from None
    if why:
        raise MergeInputError(why)


def _prompts(opts: MergeOptions, tasks: List[str], vocab: int) -> tuple:
    if opts.check_samples is None:
        p = random_prompts(vocab, n=opts.check_n)
        return {t: p for t in tasks}, "random token prompts (seed 0)"
    try:
        return ({t: sample_prompts(opts.check_samples, t, vocab, n=opts.check_n) for t in tasks},
                f"{opts.check_samples}/eval")
    except SampleError as e:
        raise MergeInputError(str(e)) from None


def _write_report(out: Path, report: dict) -> None:
    path = out / REPORT_FILE
    prev = json.loads(path.read_text()) if path.is_file() else {}
    tasks = {**prev.get("tasks", {}), **report["tasks"]}
    rank_map = {**prev.get("rank_map", {}), **report["rank_map"]}  # earlier runs' tasks into the same folder
    report = {**report, "tasks": tasks, "rank_map": rank_map}
    atomic_write(path, json.dumps(report, indent=2, default=str))


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_merge(opts: MergeOptions) -> dict:
    """Merge/export every requested task; returns the report dict. Raises MergeInputError / CheckError."""
    meta, tasks, base = validate(opts)
    out = Path(opts.out)
    out_dt = DTYPES[opts.dtype]
    spec = base_spec(meta, opts.target)
    trained = base_spec(meta, "trained")
    report = dict(adapter=str(opts.adapter), base=str(base), format=opts.format, dtype=opts.dtype,
                  target=opts.target, base_trained=dict(quantization=trained.quantization, dtype=trained.dtype),
                  max_shard_size=opts.max_shard_size, check=None, tasks={})
    deltas = AdapterDeltas(opts.adapter)
    # Each merged task's rank per layer, for the evaluate report's picture of the merged run.
    report.update(max_rank=int(meta["more_config"]["max_rank"]),
                  rank_map={t: deltas.rank_map[t] for t in tasks})
    plan = None
    if opts.format == "full":
        try:
            plan = BasePlan(base, deltas, opts.target)
        except (ValueError, FileNotFoundError, OSError) as e:
            raise MergeInputError(f"base {base}: {e}") from None
    refs: Dict[str, list] = {}
    vs_trained: Dict[str, list] = {}
    prompts: Dict[str, list] = {}
    if opts.check:
        from transformers import AutoConfig
        vocab = AutoConfig.from_pretrained(str(base)).vocab_size
        prompts, source = _prompts(opts, tasks, vocab)
        report["check"] = describe_prompts(prompts, source)
        t0 = time.perf_counter()
        _log(opts, f"reference logits: adapter on the base as {spec.quantization}/{spec.dtype}")
        refs = reference_logits(base, opts.adapter, spec, prompts, meta["task_names"])
        if spec != trained:  # also measure what the target costs against the adapter as trained
            vs_trained = reference_logits(base, opts.adapter, trained, prompts, meta["task_names"])
        report["check"]["reference_seconds"] = round(time.perf_counter() - t0, 3)
    out.mkdir(parents=True, exist_ok=True)
    tok_src = base if any((base / f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else (
        Path(opts.check_samples) / "tokenizer" if opts.check_samples else None)
    for task in tasks:
        entry = dict(format=opts.format, dtype=opts.dtype, target=opts.target)
        tmp = temp_dir_for(out / task)
        try:
            t0 = time.perf_counter()
            if opts.format == "full":
                st = stream_merge(base, opts.adapter, task, tmp, opts.dtype, opts.target, opts.max_shard_size,
                                  deltas=deltas, plan=plan, tokenizer_from=tok_src)
                entry.update(files=st.files, shards=len(st.files), tensors=st.tensors, bytes=st.bytes)
            else:
                from pipeline.export.peft_export import export_peft
                # the base as named (a hub id stays an id), not the folder it resolved to on this machine
                export_peft(opts.adapter, task, tmp, dtype=opts.dtype,
                            base_model_name_or_path=str(opts.base) if opts.base else meta["base_model"].get("id"))
                if tok_src:
                    copy_tokenizer(tok_src, tmp)
                entry.update(files=sorted(p.name for p in tmp.iterdir()))
            entry["merge_seconds"] = round(time.perf_counter() - t0, 3)
            _log(opts, f"{task}: wrote {opts.format} in {entry['merge_seconds']:.1f}s")
            if opts.check:
                t0 = time.perf_counter()
                tens = None
                if opts.format == "full":
                    tens = check_tensors(tmp, plan, deltas, task, out_dt)
                    _log(opts, f"{task}: tensors: {tens.adapted} adapted layers, max |err| / tolerance "
                               f"{tens.max_err_over_tol:.3g} {'ok' if tens.passed else 'FAILED: ' + tens.summary()}")
                res = _check_task(opts, task, tmp, base, spec, prompts[task], refs[task],
                                  vs_trained.get(task), out_dt)
                entry["check_seconds"] = round(time.perf_counter() - t0, 3)
                entry["check"] = res.as_dict()
                entry["check"]["logits_passed"] = res.passed
                if tens is not None:
                    entry["check"]["tensors"] = tens.as_dict()
                    entry["check"]["passed"] = res.passed and tens.passed
                _log(opts, f"{task}: max |logit err| {res.max_abs_err:.3g} (tolerance {res.tolerance:.3g}) "
                           f"{'ok' if res.passed else 'FAILED'}")
                if not entry["check"]["passed"]:
                    report["tasks"][task] = entry
                    _write_report(out, report)
                    why = []
                    if not res.passed:
                        why.append(f"the {opts.format} export does not reproduce the adapter model: max |logit "
                                   f"error| {res.max_abs_err:.4g} > tolerance {res.tolerance:.4g} ({res.rule})")
                    if tens is not None and not tens.passed:
                        why.append(f"{tens.n_failed} merged tensor(s) are not base + the task's delta "
                                   f"({tens.summary()})")
                    raise CheckError(f"task {task!r}: {'; '.join(why)}; the result was not moved to {out / task}")
            replace_dir(tmp, out / task)
            entry["path"] = str(out / task)
            report["tasks"][task] = entry
            report["peak_rss_mb"] = round(peak_rss_mb(), 1)
            _write_report(out, report)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _check_task(opts, task, folder, base, spec, prompts, ref, ref_trained, out_dt) -> CheckResult:
    """Logits of the written export (no task id: it carries one task) against the adapter model's."""
    ref_dt = DTYPES[spec.dtype]
    model = load_merged(folder) if opts.format == "full" else load_peft(base, folder, spec)
    got = logits(model, prompts)
    layers = int(getattr(model.config, "num_hidden_layers", 1) or 1)
    del model
    res = judge(task, got, ref, out_dt, ref_dt, opts.check_rtol, layers)
    if ref_trained is not None:
        res.vs_trained_max_abs_err = max(float((g - r).abs().max()) for g, r in zip(got, ref_trained))
    return res
