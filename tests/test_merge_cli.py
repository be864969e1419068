"""launch/merge.py end to end on tiny Llamas: the after-merge check passes for fp32 and NF4 bases (full and PEFT),
fails on a corrupted merge (logits in fp32; one wrong or missing layer in bf16 through the tensor check), the
streamed shards equal a merge computed in memory from the loaded adapter model tensor for tensor and load in
transformers, the NF4 round trip equals what the adapter saw, and bad input writes nothing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from more_fixtures import TASKS, VOCAB, save_tiny_llama, tiny_llama
from pipeline.config.more import MoreConfig
from pipeline.models.loading import load_base_model
from pipeline.more.io import save_adapter
from test_more_io import trained_like

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("_launch_merge", ROOT / "launch" / "merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def merge_cli(*args) -> int:
    return _cli().main([str(a) for a in args] + ["--quiet"])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="module")
def adapters(base_dir, tmp_path_factory):
    """{"fp32": adapter on an fp32 base, "nf4": adapter on an NF4 base with bf16 compute (QLoRA)}."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, quant, dt in [("fp32", "none", "fp32"), ("nf4", "nf4", "bf16")]:
        m = trained_like(cfg=MoreConfig(gate_init="random", rank_scaling="linear"),
                         base=load_base_model(str(base_dir), quant, dt))
        out[name] = save_adapter(m, root / name)
    return out


def _report(out: Path) -> dict:
    return json.loads((out / "merge_report.json").read_text())


def _folder_tensors(folder: Path) -> dict:
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_fp32_base_full_merge_check_passes(tmp_path, base_dir, adapters):
    out = tmp_path / "merged"
    assert merge_cli("--adapter", adapters["fp32"], "--out", out, "--base", base_dir, "--dtype", "fp32") == 0
    rep = _report(out)
    assert set(rep["tasks"]) == set(TASKS) and rep["dtype"] == "fp32" and rep["target"] == "trained"
    saved = json.loads((Path(adapters["fp32"]) / "rank_map.json").read_text())
    assert rep["rank_map"] == {t: saved[t] for t in TASKS} and rep["max_rank"] >= 1  # the evaluate report's picture
    for task in TASKS:
        e = rep["tasks"][task]
        assert e["check"]["passed"] and e["check"]["tolerance"] <= 1e-4
        assert e["check"]["max_abs_err"] <= e["check"]["tolerance"] and e["shards"] == 1
        assert (out / task / "model.safetensors").is_file() and (out / task / "config.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_nf4_base_full_and_original_targets(tmp_path, base_dir, adapters):
    """NF4/bf16: the trained target passes its stated tolerance; the original target is exact against the adapter
    on the 16-bit W, and the report measures its distance from the adapter as trained."""
    out = tmp_path / "merged"
    assert merge_cli("--adapter", adapters["nf4"], "--out", out, "--base", base_dir, "--tasks", "beta") == 0
    e = _report(out)["tasks"]["beta"]
    assert e["check"]["passed"] and 0 < e["check"]["max_abs_err"] <= e["check"]["tolerance"]
    assert "bf16" in e["check"]["rule"]
    out_o = tmp_path / "orig"
    assert merge_cli("--adapter", adapters["nf4"], "--out", out_o, "--base", base_dir, "--tasks", "beta",
                     "--target", "original", "--dtype", "fp32") == 0
    o = _report(out_o)["tasks"]["beta"]["check"]
    assert o["passed"] and o["max_abs_err"] <= 1e-4
    assert o["vs_trained_max_abs_err"] > e["check"]["max_abs_err"]  # W - dequant(NF4(W)) costs more than bf16
    out_t = tmp_path / "tight"  # a tolerance below bf16 round-off fails: the bf16 check is not vacuous
    assert merge_cli("--adapter", adapters["nf4"], "--out", out_t, "--base", base_dir, "--tasks", "beta",
                     "--check-rtol", "1e-5") == 1
    t = _report(out_t)["tasks"]["beta"]["check"]
    assert not t["passed"] and "--check-rtol" in t["rule"] and not (out_t / "beta").exists()


def test_peft_export_loads_in_peft(tmp_path, base_dir, adapters):
    out = tmp_path / "peft"
    for task in ("alpha", "gamma"):  # two runs into one folder: the report keeps both
        assert merge_cli("--adapter", adapters["nf4"], "--out", out, "--base", base_dir, "--format", "peft",
                         "--tasks", task, "--dtype", "fp32") == 0
    rep = _report(out)
    assert set(rep["tasks"]) == set(rep["rank_map"]) == {"alpha", "gamma"}
    for task in ("alpha", "gamma"):
        assert rep["tasks"][task]["check"]["passed"]
        cfg = json.loads((out / task / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["rank_pattern"]
        assert (out / task / "adapter_model.safetensors").is_file()


def test_peft_export_names_a_hub_base_by_its_id(tmp_path, base_dir, adapters, monkeypatch):
    """A base found in the HF cache by its hub id is recorded as that id in adapter_config.json, not as this
    machine's snapshot folder (which PEFT could not load anywhere else)."""
    import shutil

    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(base_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "peft"
    assert merge_cli("--adapter", adapters["nf4"], "--out", out, "--base", "org/tiny", "--format", "peft",
                     "--tasks", "alpha", "--dtype", "fp32") == 0
    assert _report(out)["base"] == str(repo / "snapshots" / "abc123")  # what it loaded
    assert json.loads((out / "alpha" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"


def _in_memory_merge(base_dir, adapter_dir, task, dtype) -> dict:
    """The merge computed here without the streaming code: the base loaded as the adapter was trained on it
    (transformers + bitsandbytes, NF4 weights dequantized by bitsandbytes) plus each layer's delta taken from the
    loaded adapter model's own parameters at its frozen rank, in fp32, cast to `dtype`; tied copies left out."""
    from pipeline.export.check import base_spec
    from pipeline.export.merge import DTYPES
    from pipeline.more.io import load_adapter
    from pipeline.more.layer import base_weight_fp32, is_linear4bit
    from pipeline.more.selector import column_scale

    dt = DTYPES[dtype]
    meta = json.loads((Path(adapter_dir) / "more_config.json").read_text())
    base = base_spec(meta, "trained").load(base_dir)
    out = {}
    for name, mod in base.named_modules():
        prefix = f"{name}." if name else ""
        for pname, p in mod.named_parameters(recurse=False):
            w = base_weight_fp32(mod) if is_linear4bit(mod) and pname == "weight" else p.detach()
            out[prefix + pname] = w
    if base.config.tie_word_embeddings:
        out.pop("lm_head.weight")
    model = load_adapter(base, adapter_dir, freeze_selection=True)
    t = model.task_names.index(task)
    for name, layer in model.layers.items():
        r = int(layer.frozen_ranks[t])
        cs = column_scale(layer.max_rank, meta["more_config"]["rank_scaling"])
        B = layer.lora_B.detach().float()[:, :r] * (cs[:r] * layer.scale)
        out[f"{name}.weight"] = out[f"{name}.weight"].float() + B @ layer.lora_A.detach().float()[:r]
    return {k: v.to(dt) for k, v in out.items()}


def test_streamed_shards_equal_an_in_memory_merge_and_load(tmp_path, base_dir, adapters):
    from transformers import AutoModelForCausalLM

    for name, dtype in [("fp32", "fp32"), ("nf4", "bf16")]:
        want = _in_memory_merge(base_dir, adapters[name], "gamma", dtype)
        out = tmp_path / f"stream_{name}"
        assert merge_cli("--adapter", adapters[name], "--out", out, "--base", base_dir, "--tasks", "gamma",
                         "--dtype", dtype, "--max-shard-size", "40KB", "--no-check") == 0
        folder = out / "gamma"
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(folder.glob("model-*-of-*.safetensors"))
        assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
        for p in shards:  # each shard within the limit unless it holds one larger tensor
            t = load_file(str(p))
            assert len(t) == 1 or sum(x.numel() * x.element_size() for x in t.values()) <= 40_000
        got = _folder_tensors(folder)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
        assert _report(out)["tasks"]["gamma"]["shards"] == len(shards)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)  # the sharded folder loads
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(merged(input_ids=ids).logits).all()


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_nf4_roundtrip_equals_the_loaded_nf4_weights(base_dir, dtype):
    """The streaming merge's per-tensor quantize/dequantize is bitwise the weight the NF4-loaded model uses, and
    it picks the same linears transformers quantizes (lm_head stays unquantized)."""
    from pipeline.export.merge import DTYPES, _meta_model, nf4_roundtrip, quantized_linears
    from pipeline.more.layer import base_weight_fp32, is_linear4bit

    model = load_base_model(str(base_dir), "nf4", dtype)
    loaded = {n: m for n, m in model.named_modules() if is_linear4bit(m)}
    assert set(loaded) == quantized_linears(_meta_model(model.config)) and "lm_head" not in loaded
    stored = load_file(str(base_dir / "model.safetensors"))
    for name, mod in loaded.items():
        assert torch.equal(nf4_roundtrip(stored[f"{name}.weight"], DTYPES[dtype]), base_weight_fp32(mod)), name


@pytest.mark.parametrize("corruption", ["drop_one_delta", "scale_one_tensor"])
def test_check_fails_on_corrupted_merge(tmp_path, base_dir, adapters, monkeypatch, capsys, corruption):
    from pipeline.export import merge

    victim = "model.layers.1.mlp.down_proj"
    real = merge.BasePlan.merged

    def corrupted(self, name, deltas, task, dtype):
        t = real(self, name, deltas, task, dtype)
        if name == f"{victim}.weight":
            if corruption == "drop_one_delta":  # a merge that forgot one layer's delta
                return (t.float() - deltas.delta(task, victim)).to(dtype)
            return (t.float() * 1.001).to(dtype)  # a 0.1 % error in one tensor
        return t

    monkeypatch.setattr(merge.BasePlan, "merged", corrupted)
    out = tmp_path / "merged"
    assert merge_cli("--adapter", adapters["fp32"], "--out", out, "--base", base_dir, "--dtype", "fp32",
                     "--tasks", "alpha") == 1
    err = capsys.readouterr().err
    assert "merge check failed" in err and "'alpha'" in err and "tolerance" in err
    e = _report(out)["tasks"]["alpha"]
    assert e["check"]["passed"] is False and e["check"]["max_abs_err"] > e["check"]["tolerance"]
    assert not (out / "alpha").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("corruption", ["drop_one_delta", "wrong_rank", "missing_layer"])
def test_tensor_check_sees_one_wrong_or_missing_layer_in_a_bf16_merge(tmp_path, base_dir, adapters, monkeypatch,
                                                                      capsys, corruption):
    """NF4/bf16 adapter merged to bf16: one layer without its delta, at another rank, or left out of the folder.
    The logits move less than the bf16 tolerance (the logits check alone passes the first two), the tensor check
    names the layer and fails the task."""
    from pipeline.export import merge

    victim = "model.layers.1.self_attn.k_proj"  # its delta moves the logits by ~0.005, under bf16 tolerance 0.03
    real_merged, real_add = merge.BasePlan.merged, merge.ShardWriter.add

    def corrupted(self, name, deltas, task, dtype):
        if name != f"{victim}.weight" or corruption == "missing_layer":
            return real_merged(self, name, deltas, task, dtype)
        base = self.base(name).float()
        if corruption == "drop_one_delta":
            return base.to(dtype)
        r = deltas.rank(task, victim)
        other = r - 1 if r > 1 else r + 1
        A = deltas.tensors[f"base_model.{victim}.lora_A"].float()[:other]
        B = deltas.tensors[f"base_model.{victim}.lora_B"].float()[:, :other] * (deltas.colscale[:other] * deltas.scale)
        return (base + B @ A).to(dtype)

    def add(self, name, tensor):
        if corruption == "missing_layer" and name == f"{victim}.weight":
            return None
        return real_add(self, name, tensor)

    monkeypatch.setattr(merge.BasePlan, "merged", corrupted)
    monkeypatch.setattr(merge.ShardWriter, "add", add)
    out = tmp_path / "merged"
    assert merge_cli("--adapter", adapters["nf4"], "--out", out, "--base", base_dir, "--tasks", "beta") == 1
    err = capsys.readouterr().err
    assert "merge check failed" in err and "'beta'" in err and victim in err
    c = _report(out)["tasks"]["beta"]["check"]
    assert c["passed"] is False and c["tensors"]["passed"] is False
    assert list(c["tensors"]["failed"]) == [f"{victim}.weight"] and c["tensors"]["n_failed"] == 1
    if corruption != "missing_layer":
        assert c["logits_passed"] and c["max_abs_err"] <= c["tolerance"]  # invisible to the logits check
        assert c["tensors"]["worst_layer"] == victim and c["tensors"]["max_err_over_tol"] > 1
    else:
        assert "missing" in c["tensors"]["failed"][f"{victim}.weight"]
    assert not (out / "beta").exists() and not [p for p in out.iterdir() if p.name.startswith(".")]


def test_check_uses_prepared_eval_samples(tmp_path, base_dir, adapters):
    """--check-samples: whole eval samples of each task from a prep output (only this task's samples)."""
    import datasets

    data = tmp_path / "prep"
    rows = {"input_ids": [list(range(3, 23)), list(range(40, 52))], "seq_lens": [[8, 12], [12]],
            "task_ids": [[1] * 8 + [0] * 12, [1] * 12]}
    for k in ("labels", "position_ids", "prompt_mask"):
        rows[k] = [[0] * len(r) for r in rows["input_ids"]]
    datasets.Dataset.from_dict(rows).save_to_disk(str(data / "eval"))
    (data / "manifest.json").write_text(json.dumps({"tasks": {"alpha": {"id": 0}, "beta": {"id": 1}},
                                                   "splits": {"eval": {}}, "tokenizer": {"path": "tokenizer"}}))
    out = tmp_path / "merged"
    assert merge_cli("--adapter", adapters["fp32"], "--out", out, "--base", base_dir, "--dtype", "fp32",
                     "--tasks", "beta", "--check-samples", data) == 0
    rep = _report(out)
    assert rep["check"]["tokens"] == {"beta": [8, 12]} and rep["tasks"]["beta"]["check"]["passed"]
    assert merge_cli("--adapter", adapters["fp32"], "--out", tmp_path / "x", "--base", base_dir,
                     "--tasks", "gamma", "--check-samples", data) == 2  # task not in the data
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("case", ["missing_adapter", "not_an_adapter", "unknown_task", "missing_base", "bad_json",
                                  "rank_map_gap", "check_n_zero", "other_base_shape", "other_base_weights",
                                  "truncated_base", "empty_base_peft"])
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, base_dir, adapters, capsys, case):
    import shutil

    adapter, extra, base = adapters["fp32"], [], base_dir
    if case == "missing_adapter":
        adapter = tmp_path / "nope"
    elif case == "not_an_adapter":
        adapter = tmp_path / "empty"
        adapter.mkdir()
    elif case == "unknown_task":
        extra = ["--tasks", "alpha,zeta"]
    elif case == "missing_base":
        base = tmp_path / "no_base"
    elif case in ("bad_json", "rank_map_gap"):
        adapter = Path(shutil.copytree(adapter, tmp_path / "adapter"))
        if case == "bad_json":
            cfg = adapter / "more_config.json"
            cfg.write_text(cfg.read_text()[:40])
        else:
            rmap = json.loads((adapter / "rank_map.json").read_text())
            rmap["beta"].pop("model.layers.1.mlp.down_proj")
            (adapter / "rank_map.json").write_text(json.dumps(rmap))
    elif case == "check_n_zero":
        extra = ["--check-n", "0"]
    elif case == "other_base_shape":
        base = tmp_path / "wide"
        tiny_llama(hidden_size=48).save_pretrained(base)
    elif case == "other_base_weights":  # same shape, other values: only the recorded fingerprint tells
        base = save_tiny_llama(tmp_path / "seed1", seed=1)
    elif case == "truncated_base":
        base = Path(shutil.copytree(base_dir, tmp_path / "cut"))
        (base / "model.safetensors").write_bytes((base / "model.safetensors").read_bytes()[:1000])
    elif case == "empty_base_peft":
        base = tmp_path / "empty_base"
        base.mkdir()
        extra = ["--format", "peft"]
    out = tmp_path / "merged"
    capsys.readouterr()  # the set-up's own output
    assert merge_cli("--adapter", adapter, "--out", out, "--base", base, *extra) == 2
    err = capsys.readouterr().err
    want = {"missing_adapter": "does not exist", "not_an_adapter": "not a MoRE adapter folder",
            "unknown_task": "unknown task(s) ['zeta']", "missing_base": "not a local folder",
            "bad_json": "more_config.json: not valid JSON",
            "rank_map_gap": "rank_map.json: task 'beta' has no rank for 1 adapted layer(s), e.g. "
                            "'model.layers.1.mlp.down_proj'",
            "check_n_zero": "--check-n must be at least 1", "other_base_shape": "'hidden_size': (",
            "other_base_weights": "weights are not the ones the adapter was trained on",
            "truncated_base": "cannot list the checkpoint's tensors",
            "empty_base_peft": "is not a model folder"}[case]
    assert err.startswith("error: ") and want in err
    assert not out.exists()


def test_base_weights_recorded_and_compared(tmp_path, base_dir, adapters, capsys):
    """The adapter records its base's weights fingerprint; a bf16 copy of the fp32 base is the same base for the
    adapter trained in bf16 (NF4, bf16 storage) and not for the fp32 one; --allow-other-base-weights merges into a
    base of other weights, and the merge check then holds against the adapter on that base."""
    from safetensors.torch import save_file

    for name, dtype in [("fp32", "fp32"), ("nf4", "bf16")]:
        recorded = json.loads((adapters[name] / "more_config.json").read_text())["base_model"]
        assert recorded["dtype"] == dtype and len(recorded["weights_sha256"]) == 64
    half = tmp_path / "bf16_copy"
    half.mkdir()
    (half / "config.json").write_text((base_dir / "config.json").read_text())
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(base_dir / "model.safetensors")).items()},
              str(half / "model.safetensors"), metadata={"format": "pt"})
    assert merge_cli("--adapter", adapters["nf4"], "--out", tmp_path / "nf4", "--base", half, "--tasks", "alpha",
                     "--dtype", "fp32", "--no-check") == 0
    capsys.readouterr()
    assert merge_cli("--adapter", adapters["fp32"], "--out", tmp_path / "fp32", "--base", half, "--no-check") == 2
    assert "weights are not the ones" in capsys.readouterr().err and not (tmp_path / "fp32").exists()
    other = save_tiny_llama(tmp_path / "seed1", seed=1)
    assert merge_cli("--adapter", adapters["fp32"], "--out", tmp_path / "other", "--base", other, "--tasks", "alpha",
                     "--allow-other-base-weights") == 0
    assert _report(tmp_path / "other")["tasks"]["alpha"]["check"]["passed"]
