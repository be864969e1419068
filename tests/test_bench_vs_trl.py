"""bench/vs_trl.py at its smallest: this project's 1-process trainer and TRL's packed SFTTrainer on a tiny Llama
with SmolLM2's tokenizer; what the JSON says is recomputed from its own per-step log and the model's shape."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models.cpu import cpu_model


ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"


@pytest.mark.slow
@pytest.mark.skipif(not GLUE.is_dir(), reason="needs ../shared/data/glue")
def test_quick_side_by_side_measures_both_tools_on_the_same_budget(tiny_chat_model, tmp_path):
    out = tmp_path / "vs_trl.json"
    cmd = [sys.executable, "bench/vs_trl.py", "--quick", "--model", str(tiny_chat_model), "--tokens", "1000",
           "--skip", "1", "--systems", "trl_packed,ours_1p_more,ours_1p_lora", "--order", "given", "--rounds", "2",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    # the defaults: smollm2-glue.yaml's 4 rows per step, for TRL as 4 micro-batches of 1 row (its fastest)
    assert (r["rows_per_step"], r["trl_micro_rows"]) == (4, 1)
    # run in the order given (TRL first), not the table's, twice
    assert list(r["systems"]) == r["run_order"] == ["trl_packed", "ours_1p_more", "ours_1p_lora"]
    assert "--order given --rounds 2" in r["command"] and r["rounds"] == 2
    assert r["matmul_peak_shapes"] == ["512^3", "1024^3", "2048^3"]
    assert r["gpu"] is None and r["memory"] == "RSS per process"
    assert r["cpu_model"] == cpu_model()  # the machine, by generation (pipeline/models/cpu.py)
    for name, s in r["systems"].items():
        log = s["step_log"]  # the first round's; the rate is over both rounds' steps after the first
        assert len(log) == s["steps"] >= 4 and s["real_tokens"] == sum(n for n, _ in log)
        steady = log[1:]
        first = sum(n for n, _ in steady) / sum(t for _, t in steady)
        assert s["rounds_tokens_per_s"][0] == pytest.approx(first, rel=1e-3) and len(s["rounds_tokens_per_s"]) == 2
        second = s["rounds_tokens_per_s"][1]  # equal steps per round: the pooled rate lies between the two
        assert min(first, second) * 0.999 <= s["tokens_per_s"] <= max(first, second) * 1.001
        assert s["measured_steps"] == 2 * len(steady)
        assert s["matmul_peak_share"] == pytest.approx(
            s["tokens_per_s"] * r["useful_flops_per_token"] / (r["matmul_peak_gflops"] * 1e9))
        assert 0 < s["peak_mem_gb"] < 24
        assert all(0 < n <= 4 * 512 for n, _ in log), (name, log)  # 4 rows of 512 per step, pads not counted
        # [step, training seconds, held-out loss] at 0, every 2 steps (TRL: after as many tokens) and the last step
        every = s["eval_every_steps"]
        assert every == 2, name
        curve = s["eval_curve"]
        assert [c[0] for c in curve] == sorted({*range(0, s["steps"], every), s["steps"]}), (name, curve)
        assert [c[1] for c in curve] == pytest.approx([sum(t for _, t in log[:c[0]]) for c in curve], abs=1e-2)
        assert s["seconds_to_target_loss"] == next(c[1] for c in curve if c[2] <= r["target_loss"])
    assert max(n for n, _ in r["systems"]["trl_packed"]["step_log"]) > 512  # TRL's 1-row micro-batches accumulate
    assert r["target_loss"] == max(s["eval_curve"][-1][2] for s in r["systems"].values())
    # step 0 is the base alone (the adapters start at zero), on the same held-out samples: the same loss (in bf16,
    # on a CPU where --dtype auto picks it, within bf16's error)
    start = [s["eval_curve"][0][2] for s in r["systems"].values()]
    assert max(start) == pytest.approx(min(start), rel=0.05), start
    # 4 x weights of the decoder's linears (hidden 64, 4 heads, 2 KV heads, MLP 128, 2 layers) + the head where
    # supervised: q, o 64x64; k, v 64x32; gate, up, down 64x128
    body = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    vocab = json.loads((tiny_chat_model / "config.json").read_text())["vocab_size"]
    assert r["useful_flops_per_token"] == pytest.approx(4 * body + 4 * vocab * 64 * r["supervised_share"])
    assert 0 < r["supervised_share"] < 0.5
    assert r["ratios"]["more_over_lora_time_1p"] == pytest.approx(
        r["systems"]["ours_1p_lora"]["tokens_per_s"] / r["systems"]["ours_1p_more"]["tokens_per_s"])
    assert r["ratios"]["ours_1p_more_vs_trl_best"] == pytest.approx(
        r["systems"]["ours_1p_more"]["tokens_per_s"] / r["systems"]["trl_packed"]["tokens_per_s"])
    assert r["ratios"]["ours_1p_more_vs_trl_best_by_round"] == pytest.approx(
        [a / b for a, b in zip(r["systems"]["ours_1p_more"]["rounds_tokens_per_s"],
                               r["systems"]["trl_packed"]["rounds_tokens_per_s"])])

    sys.path.insert(0, str(ROOT / "bench"))
    import report

    section = "\n".join(report.vs_trl(r))
    assert "TRL SFTTrainer + PEFT LoRA r8, `packing=True`" in section and "| 1.00 |" in section
    assert "MoRE / plain LoRA step time, 1 process" in section and "s to the target loss" in section
    assert "2 rounds alternated" in section and "this project, MoRE, 1 process, tokens/s by round: " in section


@pytest.mark.slow
@pytest.mark.skipif(not GLUE.is_dir(), reason="needs ../shared/data/glue")
def test_a_failing_system_is_reported_and_the_others_still_run(tiny_chat_model, tmp_path):
    """Our trainer made to fail at load (its fault hook): the run goes on to TRL, keeps TRL's results in the JSON
    (written after every system, so a run cut short keeps what it measured), names the failure and exits non-zero."""
    import os

    out = tmp_path / "vs_trl.json"
    cmd = [sys.executable, "bench/vs_trl.py", "--quick", "--model", str(tiny_chat_model), "--tokens", "600",
           "--skip", "1", "--systems", "ours_1p_lora,trl_packed", "--order", "given", "--work", str(tmp_path / "work"),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PIPELINE_FAULT="raise@0:0:load"))
    assert proc.returncode != 0 and "failed: ours_1p_lora" in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert list(r["systems"]) == ["trl_packed"] and r["systems"]["trl_packed"]["tokens_per_s"] > 0
    assert "injected failure" in r["failed"]["ours_1p_lora"]  # the log's tail: the trainer's own error

    sys.path.insert(0, str(ROOT / "bench"))
    import report

    assert "Failed in this run (its log under the run's --work folder): this project, plain LoRA r8, 1 process" in \
        "\n".join(report.vs_trl(r))


def test_random_like_keeps_the_family_and_tokenizer_at_a_new_shape(smollm2_import, tiny_chat_model):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.tiny import build_random_like

    src, got = AutoConfig.from_pretrained(smollm2_import.folder), AutoConfig.from_pretrained(tiny_chat_model)
    assert (got.hidden_size, got.intermediate_size, got.num_hidden_layers, got.head_dim) == (64, 128, 2, 16)
    assert (got.model_type, got.vocab_size, got.tie_word_embeddings) == (src.model_type, src.vocab_size, True)
    assert AutoTokenizer.from_pretrained(tiny_chat_model).chat_template
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    assert sum(p.numel() for p in model.parameters()) == src.vocab_size * 64 + 2 * (
        2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    with pytest.raises(ValueError, match="no field"):
        build_random_like(smollm2_import.folder, tiny_chat_model.parent / "x", hidden_sizes=64)
