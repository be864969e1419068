"""The memory planner against exact parameter counts, real bitsandbytes tensors, autograd's saved tensors, a measured
CPU peak, and its verdict/suggestion logic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.plan import (GiB, activation_bytes, format_plan, inventory, meta_model, more_param_count, plan,
                           resolve_config, ZeroSettings)

sys.path.insert(0, str(Path(__file__).parent))
from plan_measure import ALL, saved_bytes_one_layer, tiny_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

KNOWN_PARAMS = {  # published totals of the real checkpoints
    "llama-2-7b": 6_738_415_616, "llama-2-13b": 13_015_864_320, "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496, "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512, "qwen2.5-72b": 72_706_203_648,
}


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_meta_param_counts_of_shipped_configs(name):
    inv = inventory(meta_model(resolve_config(name)), name)
    assert inv.num_params == KNOWN_PARAMS[name]
    assert inv.quantizable_numel + inv.other_numel == inv.num_params


def test_zero3_fetch_unit_is_a_whole_decoder_layer_or_the_embedding():
    """The trainer gathers each decoder layer as one ZeRO-3 unit (train/zero3_units.py): the planner's gathered
    memory starts from the larger of one layer (NF4 weights at 4 per 16-bit element, norms) and the embedding."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=8, num_hidden_layers=2,
                      vocab_size=1000)
    linears, norms = 4 * 1024 * 1024 + 3 * 1024 * 4096, 2 * 1024
    assert inventory(meta_model(cfg)).largest_fetch_unit_numel == linears // 4 + norms
    assert inventory(meta_model(cfg), quant="none").largest_fetch_unit_numel == linears + norms
    assert inventory(meta_model(resolve_config("llama-2-70b"))).largest_fetch_unit_numel == 32000 * 8192


def test_more_param_count_llama2_7b():
    m = meta_model(resolve_config("llama-2-7b"))
    all_lin = more_param_count(m, max_rank=8, targets="all-linear", num_tasks=8)
    assert all_lin.lora == 19_988_480  # PEFT's figure for LoRA r=8 on every linear of Llama-2-7B
    assert all_lin.modules == 224
    assert all_lin.gate == 224 * (16 * 8 + 8) and all_lin.task_embedding == 8 * 16
    qv = more_param_count(m, max_rank=8, targets="q_proj,v_proj")
    assert qv.lora == 4_194_304  # PEFT's figure for LoRA r=8 on q_proj, v_proj
    per = more_param_count(m, max_rank=8, targets=["q_proj"], num_tasks=3, task_embedding="per_layer",
                           task_embedding_dim=None)
    assert per.task_embedding == 32 * 3 * 4096 and per.gate == 32 * (4096 * 8 + 8)
    with pytest.raises(ValueError, match="not in the model"):
        more_param_count(m, targets="c_attn")


def _injected(targets, task_embedding="shared", expert_ranks=None, num_tasks=3, max_rank=4):
    """The real MoRE adapter (pipeline.more.inject) on a tiny Llama, and the same shape on the meta device."""
    from transformers import LlamaForCausalLM

    from pipeline.config.more import MoreConfig
    from pipeline.models.tiny import tiny_llama_config
    from pipeline.more import inject

    cfg = tiny_llama_config(100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
    more = MoreConfig(max_rank=max_rank, expert_ranks=expert_ranks, target_modules=targets,
                      task_embedding=task_embedding)
    model = inject(LlamaForCausalLM(cfg), more, [f"t{i}" for i in range(num_tasks)])
    return model, more, meta_model(cfg)


def _real(model) -> dict:
    layers = model.layers.values()
    emb = [l.task_embedding for l in layers if l.task_embedding is not None]
    head = list(model.selector.proj.parameters()) if model.selector.shared else []
    if model.selector.shared:
        emb.append(model.selector.task_embedding)
    n = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
    return dict(lora=n(model.adapter_parameters()), gate=n(p for l in layers for p in l.gate.parameters()),
                task_embedding=n(emb), head=n(head), modules=len(model.layers),
                trainable=n(p for _, p in model.trainable_named_parameters()),
                numels=sorted(p.numel() for _, p in model.trainable_named_parameters()))


@pytest.mark.parametrize("targets,expert_ranks", [("all-linear", None), (["q_proj", "v_proj"], [1, 2, 4])])
def test_more_param_count_matches_the_injected_more_model(targets, expert_ranks):
    """The planner's count against the real MoreLinear layers and selector `inject` builds (shared layout)."""
    model, more, meta = _injected(targets, expert_ranks=expert_ranks)
    real = _real(model)
    c = more_param_count(meta, max_rank=more.max_rank, targets=targets, num_tasks=len(model.task_names),
                         task_embedding="shared", task_embedding_dim=more.task_embedding_dim,
                         num_experts=len(more.ranks))
    assert (c.lora, c.gate, c.task_embedding, c.modules) == (real["lora"], real["gate"], real["task_embedding"],
                                                             real["modules"])


def test_more_param_count_per_layer_with_input_wide_embeddings_matches_the_injected_model():
    model, more, meta = _injected("all-linear", task_embedding="per_layer")
    real = _real(model)
    c = more_param_count(meta, max_rank=more.max_rank, targets="all-linear", num_tasks=len(model.task_names),
                         task_embedding="per_layer", task_embedding_dim=None, num_experts=len(more.ranks))
    assert (c.lora, c.gate, c.task_embedding, c.modules, c.total) == (
        real["lora"], real["gate"], real["task_embedding"], real["modules"], real["trainable"])
    assert sorted(c.tensor_numels) == real["numels"]


def test_more_param_count_total_includes_the_contrastive_head():
    model, more, meta = _injected("all-linear")
    real = _real(model)
    assert real["head"] > 0
    c = more_param_count(meta, max_rank=more.max_rank, targets="all-linear", num_tasks=len(model.task_names),
                         num_experts=len(more.ranks))
    assert c.total == real["trainable"] and sorted(c.tensor_numels) == real["numels"]


def test_more_param_count_per_layer_with_the_trainers_dim():
    model, more, meta = _injected("all-linear", task_embedding="per_layer")
    c = more_param_count(meta, max_rank=more.max_rank, targets="all-linear", num_tasks=len(model.task_names),
                         task_embedding="per_layer", task_embedding_dim=more.task_embedding_dim,
                         num_experts=len(more.ranks))
    assert c.total == _real(model)["trainable"]


def test_nf4_bytes_equal_bitsandbytes_tensors(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from pipeline.models.loading import load_base_model
    from pipeline.models.tiny import build_tiny_llama

    # 100 000 and 130 000-element weights: not multiples of 64, so the last absmax block is partial
    d = build_tiny_llama(tmp_path / "m", vocab_size=300, hidden_size=200, num_layers=2, num_heads=4,
                         num_kv_heads=2, intermediate_size=650)
    model = load_base_model(str(d), quantization="nf4", dtype="bf16")
    packed = consts = other = 0
    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if isinstance(mod, bnb.nn.Linear4bit) and name == "weight":
                packed += p.numel() * p.element_size()
                consts += p.quant_state.absmax.nbytes + p.quant_state.code.nbytes
            else:
                other += p.numel() * p.element_size()
    assert packed > 0
    p = plan(str(d), nodes=1, gpus_per_node=1, gpu_mem_gb=80, quant="nf4", seq_len=64, micro_batch=1)
    assert p.line("base_packed") == packed
    assert p.line("quant_consts") == consts
    adapter_persist = sum(n for n in p.adapter.tensor_numels if n < p.zero.param_persistence_threshold) * 2
    assert p.line("base_16bit") + p.line("persistent") - adapter_persist == other


@pytest.mark.parametrize("attn,targets,cpu_kernel", [
    ("sdpa", ALL, None), ("eager", ALL, None), ("sdpa", ("q_proj", "v_proj"), None),
    ("packed_sdpa", ALL, "fused"), ("packed_sdpa", ("q_proj", "v_proj"), "fused"),
    ("packed_sdpa", ALL, "sdpa"), ("packed_sdpa", ("q_proj", "v_proj"), "sdpa")])
def test_per_layer_activations_equal_saved_tensors(attn, targets, cpu_kernel, cpu_attention_kernel):
    """bf16 on CPU; packed_sdpa (the trainer's default) runs the fused kernel on the bf16 tensors there (with
    `cpu_attention: sdpa`, or where the kernel cannot be built, it attends in fp32: the sdpa case below)."""
    from pipeline.models.packed_attention import cpu_attends_in_fp32
    from pipeline.train.preflight import PLANNER_ATTENTION

    shape = dict(vocab_size=1000, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=352)
    model, cfg = tiny_model(shape, attn, targets, rank=4)
    cpu_attention_kernel(cpu_kernel or "fused")
    measured = saved_bytes_one_layer(model, batch=2, seq=64)
    est = activation_bytes(batch=2, seq=64, hidden=128, intermediate=352, heads=4, kv_heads=2, head_dim=32,
                           vocab=1000, layers=2, act_bytes=2, adapted=targets, rank=4,
                           attn_impl=PLANNER_ATTENTION[attn],
                           attention_fp32=attn == "packed_sdpa" and cpu_attends_in_fp32(32, torch.bfloat16, cpu_kernel))
    assert measured == est.per_layer


@pytest.mark.slow
@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_peak_rss_of_tiny_cpu_step_vs_prediction(grad_ckpt, record_property):
    """Reported, loosely asserted: RSS is a process-wide figure (allocator, kernels' scratch)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # big blocks via mmap, so freeing shows in RSS
    cmd = [sys.executable, str(ROOT / "tests" / "plan_measure.py"), "--dtype", "fp32"] + (["--grad-ckpt"] * grad_ckpt)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    record_property("peak_rss", r)
    print(f"\ntiny CPU step (grad_ckpt={grad_ckpt}): measured {r['measured_bytes'] / 2**20:.1f} MiB, "
          f"predicted {r['predicted_bytes'] / 2**20:.1f} MiB, ratio {r['ratio']}")
    assert 0.7 < r["ratio"] < 1.3


def _70b(**kw):
    args = dict(nodes=2, gpus_per_node=8, gpu_mem_gb=80, quant="nf4", seq_len=4096, micro_batch=1, max_rank=8,
                targets="all-linear")
    args.update(kw)
    return plan("llama-2-70b", **args)


def test_llama2_70b_reference_case():
    p = _70b()
    assert p.fits and p.load_fits and p.suggestion is None
    assert p.line("base_packed") == pytest.approx(p.model.quantizable_numel / 2 / 16, rel=1e-6)
    assert p.line("quant_consts") == pytest.approx(p.model.quantizable_numel / 64 * 4, rel=1e-3)
    assert 10 * GiB < p.total_bytes < 40 * GiB
    assert p.activations.no_ckpt > 80 * GiB  # without checkpointing it would not fit
    assert sum(l.bytes for l in p.lines) == p.total_bytes
    text = format_plan(p)
    assert "verdict: FITS" in text and "host RAM per node" in text


def test_suggests_grad_ckpt_first():
    p = plan("llama-2-7b", nodes=1, gpus_per_node=1, gpu_mem_gb=80, seq_len=4096, micro_batch=4, grad_ckpt=False)
    assert not p.fits and p.suggestion.startswith("enable gradient checkpointing")


def test_suggests_largest_micro_batch_that_fits():
    p = plan("llama-2-7b", nodes=1, gpus_per_node=1, gpu_mem_gb=24, seq_len=4096, micro_batch=16)
    assert not p.fits and p.suggestion.startswith("micro batch")
    mb = int(p.suggestion.split()[2])
    kw = dict(nodes=1, gpus_per_node=1, gpu_mem_gb=24, seq_len=4096)
    assert plan("llama-2-7b", micro_batch=mb, **kw).fits
    assert not plan("llama-2-7b", micro_batch=mb + 1, **kw).fits


def test_suggests_more_nodes_then_offload():
    """NF4 70B on one 40 GB GPU: its load fits (the NF4 copy), its step does not; sharding over more GPUs or
    offloading does. (Unquantized, the whole 16-bit model is on each GPU at load: no change of nodes helps there.)"""
    p = _70b(nodes=1, gpus_per_node=1, gpu_mem_gb=40)
    assert not p.fits and p.load_fits
    assert p.suggestion.startswith("2 nodes")
    assert any("offload" in a for a in p.alternatives)
    off = _70b(nodes=1, gpus_per_node=1, gpu_mem_gb=40, offload=True)
    assert off.fits and off.line("base_packed") == 0 and off.line("optimizer") == 0
    assert any(l.key == "offload_param" for l in off.host_lines)
    assert _70b(nodes=1, gpus_per_node=2, quant="none").suggestion.startswith("nothing tried fits")


def test_load_time_and_host_ram():
    p = _70b(gpu_mem_gb=24)
    assert not p.load_fits and any("full NF4 copy" in w for w in p.warnings)
    h = _70b(host_mem_gb=256)
    per_rank = h.load_bytes
    assert 30 * GiB < per_rank < 45 * GiB  # ~35 GB of NF4 + absmax + 16-bit embeddings
    assert h.host_bytes >= 8 * per_rank and h.host_fits is False


def test_ds_config_auto_and_single_rank():
    z = ZeroSettings.from_ds_config({"zero_optimization": {"reduce_bucket_size": "auto",
                                                           "stage3_prefetch_bucket_size": "auto",
                                                           "offload_optimizer": {"device": "cpu"}}}, hidden=1000)
    assert z.reduce_bucket_size == 1_000_000 and z.prefetch_bucket_size == 900_000
    assert z.offload_optimizer and not z.offload_param
    one = plan("llama-2-7b", nodes=1, gpus_per_node=1, gpu_mem_gb=80, seq_len=512)
    assert one.line("gathered") == 0  # one rank holds every parameter whole: nothing to gather


def test_cli(capsys):
    sys.path.insert(0, str(ROOT / "launch"))
    import plan as cli  # launch/plan.py

    assert cli.main(["--model", "llama-2-70b", "--nodes", "2", "--gpus-per-node", "8", "--gpu-mem-gb", "80",
                     "--quant", "nf4", "--seq-len", "4096", "--micro-batch", "1", "--check"]) == 0
    assert "verdict: FITS" in capsys.readouterr().out
    assert cli.main(["--model", "llama-2-70b", "--nodes", "2", "--gpus-per-node", "8", "--gpu-mem-gb", "40",
                     "--replicate-frozen", "--check"]) == 3  # 2 x 8 x 40 GB fits it sharded (README), not whole
    out = capsys.readouterr().out
    assert "base weights (NF4), replicated" in out and "the trainable tensors, all at once" in out
    assert cli.main(["--model", "llama-2-70b", "--gpus-per-node", "1", "--gpu-mem-gb", "16", "--check"]) == 3
    assert cli.main(["--model", "no-such-model"]) == 2
    assert "shipped" in capsys.readouterr().err


def test_cli_offload_flag_overrides_the_ds_config_and_config_file_merges_with_flags(tmp_path, capsys):
    """--no-offload turns the DeepSpeed JSON's offload off (it used to keep it); a plan file without model: takes
    --model; --set without --config is an error, not ignored."""
    sys.path.insert(0, str(ROOT / "launch"))
    import plan as cli  # launch/plan.py

    offload_json = str(ROOT / "ds_configs" / "zero3_offload.json")
    args = ["--model", "llama-2-70b", "--nodes", "1", "--gpus-per-node", "8", "--ds-config", offload_json]
    assert cli.main(args) == 0
    assert "offload=on" in capsys.readouterr().out
    assert cli.main(args + ["--no-offload"]) == 0
    out = capsys.readouterr().out
    assert "offload=off" in out and "offloaded" not in out
    request = tmp_path / "plan.yaml"
    request.write_text("nodes: 2\n")
    assert cli.main(["--config", str(request), "--model", "llama-2-7b", "--gpus-per-node", "1"]) == 0
    assert "run: 2 node(s) x 1 GPU(s)" in capsys.readouterr().out
    assert cli.main(["--model", "llama-2-7b", "--set", "nodes=4"]) == 2
    assert "--set overrides keys of --config" in capsys.readouterr().err
    assert cli.main(["--config", str(request)]) == 2
    assert "no model" in capsys.readouterr().err


def test_a_base_that_does_not_fit_at_load_is_no_fit():
    """Unquantized, DeepSpeed moves the whole loaded model onto each GPU before ZeRO-3 partitions it: a run whose
    step fits but whose load does not is reported as not fitting, with the load line, as --check exits."""
    p = plan("llama-2-13b", nodes=1, gpus_per_node=8, gpu_mem_gb=24, seq_len=1024, quant="none")
    assert p.fits and not p.load_fits and p.verdict == "DOES NOT FIT"
    text = format_plan(p)
    assert "verdict: DOES NOT FIT" in text and "the whole bf16 base" in text and "DOES NOT FIT" in text.split(
        "load time:")[1]
    # a suggestion must fit at load too: no single change shrinks a 70B 16-bit base's load below 80 GiB
    big = plan("llama-2-70b", nodes=2, gpus_per_node=8, gpu_mem_gb=80, seq_len=8192, micro_batch=4, quant="none",
               grad_ckpt=False)
    assert not big.load_fits and big.suggestion.startswith("nothing tried fits")


def test_loss_peak_counts_the_positions_the_lm_head_runs_at():
    """The trainer's LM head runs at supervised positions only, LOSS_CHUNK at a time: the planner counts at most that
    many positions' logits and loss tensors, not every token's (which made long micro-batches look like they need
    recomputation)."""
    from pipeline.more.model import LOSS_CHUNK

    shape = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=32000, layers=2)
    every = activation_bytes(batch=4, seq=4096, **shape)
    bounded = activation_bytes(batch=4, seq=4096, loss_positions=LOSS_CHUNK, **shape)
    assert every.logits_peak == 4 * 4096 * 32000 * (2 + 12) and bounded.logits_peak == LOSS_CHUNK * 32000 * 14
    assert every.no_ckpt - bounded.no_ckpt == every.logits_peak - bounded.logits_peak
    short = activation_bytes(batch=1, seq=512, loss_positions=LOSS_CHUNK, **shape)  # fewer tokens than a chunk
    assert short.logits_peak == 512 * 32000 * 14
    p = _70b(seq_len=8192, grad_ckpt=False)
    assert p.activations.logits_peak == LOSS_CHUNK * 32000 * 14
