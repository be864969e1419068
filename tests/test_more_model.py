"""MoRE injected into a tiny Llama: report, packed mixed-task batch vs per-sample runs, forced rank R vs PEFT LoRA,
gradients (incl. the contrastive one) under reentrant and non-reentrant checkpointing, per_layer layout, routing."""
import copy

import pytest
import torch

from more_fixtures import TASKS, VOCAB, mixed_batch, packed_batch, tiny_llama
from pipeline.config.more import MoreConfig
from pipeline.more import inject, rank_map
from pipeline.more.routing import routing_accuracy

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(cfg=None, seed=0, randomize_B=True):
    base = tiny_llama(seed)
    m = inject(base, cfg or MoreConfig(gate_init="random"), TASKS)
    if randomize_B:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in m.layers.values():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
    return m.eval()


def test_inject_report_and_freezing():
    m = _model()
    assert len(m.layers) == 2 * 7
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.trainable_named_parameters()}
    assert all(("lora_" in n or ".gate." in n or n.startswith("selector.")) for n in trainable)
    r = m.report
    want_lora = sum(8 * (l.in_features + l.out_features) for l in m.layers.values())
    assert r["adapter"] == want_lora
    assert r["gates"] == 14 * (16 * 8 + 8) and r["task_embeddings"] == len(TASKS) * 16
    assert r["trainable"] == sum(p.numel() for n, p in m.named_parameters() if p.requires_grad)
    assert r["base"] == sum(p.numel() for n, p in m.named_parameters() if not p.requires_grad)
    assert {id(p) for p in m.selector_parameters()}.isdisjoint({id(p) for p in m.adapter_parameters()})
    groups = m.param_groups(1e-3)
    assert groups[1]["lr"] == pytest.approx(1e-3 * m.config.selector_lr_multiplier)
    # ZeRO-3 is told that every layer reads the selector's shared task table (deepspeed's external parameters)
    emb = m.selector.task_embedding
    assert all(any(p is emb for _, p in layer.ds_external_parameters()) for layer in m.layers.values())


def test_target_matching():
    base = tiny_llama()
    m = inject(base, MoreConfig(target_modules=["q_proj", "mlp.down_proj"]), TASKS)
    assert sorted(m.layers) == sorted([f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
                                      + [f"model.layers.{i}.mlp.down_proj" for i in range(2)])
    m2 = inject(tiny_llama(), MoreConfig(target_modules="all-linear"), TASKS)
    assert len(m2.layers) == 14 and not any("lm_head" in n for n in m2.layers)
    with pytest.raises(ValueError, match="match no module"):
        inject(tiny_llama(), MoreConfig(target_modules=["nope_proj"]), TASKS)


def test_packed_mixed_batch_equals_each_sample_alone():
    """The whole model: a packed batch mixing 3 tasks (and padding) gives, at every sample's positions, the logits of
    that sample run alone with its task; tasks really use different ranks in some layers."""
    m = _model()
    ranks = rank_map(m)
    assert any(len({ranks[t][n] for t in TASKS}) > 1 for n in m.layers)
    b = mixed_batch()
    with torch.no_grad():
        out = m(**b).logits
        for s in range(int(b["segment_ids"].max()) + 1):
            where = b["segment_ids"] == s
            row = int(where.any(1).nonzero()[0])
            ids = b["input_ids"][row][where[row]].unsqueeze(0)
            t = int(b["task_ids"][where][0])
            alone = m(input_ids=ids, task_ids=torch.full_like(ids, t)).logits[0]
            torch.testing.assert_close(out[row][where[row]], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rope", ["eager", "compiled"])
def test_packed_attention_without_a_mask_equals_the_dense_mask(rope):
    """attn_implementation="packed_sdpa" (the trainer's default): MoreCausalLM passes the samples' boundaries from
    segment_ids, no (B, 1, L, L) mask, and every real position's logits equal the masked sdpa's; also through the
    trainer's compiled rotary embedding (pipeline/models/compiled_rope.py)."""
    from pipeline.models.compiled_rope import compile_rope

    m = _model()
    b = mixed_batch()
    real = b["segment_ids"] >= 0
    with torch.no_grad():
        dense = m(**b).logits
        unmasked = m(input_ids=b["input_ids"], task_ids=b["task_ids"]).logits  # samples see each other
        m.base_model.config._attn_implementation = "packed_sdpa"
        if rope == "compiled":
            assert compile_rope(m.base_model) == m.base_model.config.num_hidden_layers
        packed = m(**{k: v for k, v in b.items() if k != "attention_mask"}).logits
        torch.testing.assert_close(packed[real], dense[real], atol=1e-5, rtol=1e-5)
        assert (packed[real] - unmasked[real]).abs().max() > 1e-3  # the negative control: isolation shows
        with pytest.raises(ValueError, match="needs segment_ids"):
            m(input_ids=b["input_ids"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_packed_rows_on_the_varlen_kernel_equal_each_sample_alone(monkeypatch):
    """On a GPU in bf16 packed attention takes torch's varlen flash kernel, once per layer: every sample's logits
    in the packed mixed-task batch equal those of the sample run alone through plain sdpa."""
    from pipeline.models import packed_attention as pa

    calls = []
    varlen = pa.varlen_attention
    monkeypatch.setattr(pa, "varlen_attention", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    m = _model().to("cuda", torch.bfloat16)
    b = {k: v.cuda() for k, v in mixed_batch().items() if k != "attention_mask"}
    with torch.no_grad():
        m.base_model.config._attn_implementation = "packed_sdpa"
        packed = m(**b).logits.float()
        assert len(calls) == m.base_model.config.num_hidden_layers
        m.base_model.config._attn_implementation = "sdpa"
        for s in range(int(b["segment_ids"].max()) + 1):
            where = b["segment_ids"] == s
            row = int(where.any(1).nonzero()[0])
            ids = b["input_ids"][row][where[row]].unsqueeze(0)
            alone = m(input_ids=ids, task_ids=torch.full_like(ids, int(b["task_ids"][where][0]))).logits[0]
            torch.testing.assert_close(packed[row][where[row]], alone.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_inject_into_a_base_on_cuda_initialises_as_on_cpu():
    """The trainer loads the base onto the GPU before injecting: the adapters start there from the same values as
    on CPU (a CUDA tensor cannot draw from the CPU generator), and the mixed-task forward runs."""
    cfg = MoreConfig(gate_init="random", task_embedding="per_layer")
    on_cpu = inject(tiny_llama(0), cfg, TASKS)
    on_cuda = inject(tiny_llama(0).to("cuda"), cfg, TASKS)
    for name, layer in on_cuda.layers.items():
        assert layer.lora_A.is_cuda and layer.task_embedding.is_cuda
        torch.testing.assert_close(layer.lora_A.cpu(), on_cpu.layers[name].lora_A, rtol=0, atol=0)
        torch.testing.assert_close(layer.task_embedding.cpu(), on_cpu.layers[name].task_embedding, rtol=0, atol=0)
    b = {k: v.cuda() for k, v in mixed_batch().items()}
    assert torch.isfinite(on_cuda.eval()(**b).logits).all()


@pytest.mark.parametrize("typo,meant", [("prompt_masks", "prompt_mask"), ("segment_id", "segment_ids"),
                                        ("task_id", "task_ids")])
def test_forward_rejects_a_misspelt_keyword(typo, meant):
    """A misspelt keyword is a TypeError naming it (before, `**_` dropped it and the contrastive loss went off)."""
    m = _model(MoreConfig(gate_init="random", selector_warmup_steps=0))
    b = mixed_batch()
    with torch.no_grad():
        assert m(**b).contrastive_loss is not None  # the whole training batch, labels included, is accepted
        assert m(**b, use_cache=False, return_dict=True).contrastive_loss is not None
        bad = dict(b)
        bad[typo] = bad.pop(meant)
        with pytest.raises(TypeError, match=rf"'{typo}' \(did you mean '{meant}'\?\)"):
            m(**bad)
        with pytest.raises(TypeError, match="'cache_position'"):
            m(input_ids=b["input_ids"], task_ids=0, cache_position=None)
        with pytest.raises(ValueError, match="no KV cache"):
            m(input_ids=b["input_ids"], task_ids=0, use_cache=True)


def test_forced_max_rank_equals_peft_lora():
    from peft import LoraConfig, get_peft_model

    m = _model(seed=3)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama(3)), LoraConfig(r=8, lora_alpha=16, target_modules=LINEARS,
                                                                          lora_dropout=0.0))
    with torch.no_grad():
        for name, layer in m.layers.items():
            mod = peft_model.base_model.model.get_submodule(name)
            mod.lora_A["default"].weight.copy_(layer.lora_A)
            mod.lora_B["default"].weight.copy_(layer.lora_B)
    b = mixed_batch()
    peft_model.eval()
    with torch.no_grad(), m.forced_rank(8):
        ours = m(**b).logits
        theirs = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            position_ids=b["position_ids"]).logits
    real = b["segment_ids"] >= 0
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def _grads(m, b, which="all"):
    m.zero_grad(set_to_none=True)
    out = m(**b)
    if which == "contrastive":
        loss = out.contrastive_loss
    else:
        loss = out.logits.float().pow(2).mean() + out.aux_loss
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in m.trainable_named_parameters()}


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradients_with_checkpointing_including_contrastive(reentrant):
    """Representation from output hidden states: the contrastive loss keeps its graph under checkpointing (with
    reentrant checkpointing each layer's first forward runs under no_grad) and the gradients equal those without."""
    cfg = MoreConfig(gate_init="random", selector_warmup_steps=0)
    b = mixed_batch()
    ref_m = _model(cfg).train()
    ref = _grads(ref_m, b)
    ref_cl = _grads(ref_m, b, "contrastive")
    m = _model(cfg).train()
    m.gradient_checkpointing_enable(use_reentrant=reentrant)
    got = _grads(m, b)
    got_cl = _grads(m, b, "contrastive")
    for n in ref:
        assert got[n] is not None, n
        torch.testing.assert_close(got[n], ref[n], atol=1e-6, rtol=1e-4, msg=n)
    # every kind of trainable parameter receives gradient; the gate's is non-zero through the straight-through
    for key in ["layers.0.self_attn.q_proj.lora_A", "layers.1.mlp.down_proj.lora_B", "layers.0.mlp.up_proj.gate.weight",
                "layers.1.self_attn.v_proj.gate.bias", "selector.task_embedding", "selector.proj.weight"]:
        n = next(n for n in got if n.endswith(key))
        assert got[n].abs().sum() > 0, n
    # the contrastive loss alone reaches the adapters of the layers below the representation
    cl_b = next(n for n in got_cl if n.endswith("layers.0.self_attn.q_proj.lora_B"))
    assert got_cl[cl_b] is not None and got_cl[cl_b].abs().sum() > 0
    torch.testing.assert_close(got_cl[cl_b], ref_cl[cl_b], atol=1e-6, rtol=1e-4)
    assert got_cl[next(n for n in got_cl if n.endswith("selector.task_embedding"))].abs().sum() > 0


def test_selector_warmup_blocks_selector_gradient_only():
    m = _model(MoreConfig(gate_init="random", selector_warmup_steps=2)).train()
    b = mixed_batch()
    g1 = _grads(m, b)
    gate = next(n for n in g1 if n.endswith("layers.0.self_attn.q_proj.gate.weight"))
    assert g1[gate] is None or g1[gate].abs().sum() == 0
    assert g1[next(n for n in g1 if n.endswith("layers.0.self_attn.q_proj.lora_A"))].abs().sum() > 0
    m.set_training_step(2)
    assert _grads(m, b)[gate].abs().sum() > 0


def test_per_layer_reference_layout():
    m = _model(MoreConfig.reference(dropout=0.0, selector_warmup_steps=0)).train()
    assert all(l.task_embedding.shape == (len(TASKS), l.in_features) for l in m.layers.values())
    out = m(**mixed_batch())
    assert out.contrastive_loss is not None and torch.isfinite(out.contrastive_loss)
    (out.logits.pow(2).mean() + out.aux_loss).backward()
    l0 = m.layers["model.layers.0.self_attn.q_proj"]
    assert l0.task_embedding.grad.abs().sum() > 0 and l0.gate.weight.grad.abs().sum() > 0


def test_frozen_selection_is_the_same_computation():
    m = _model()
    b = mixed_batch()
    with torch.no_grad():
        before = m(**b).logits
        m.freeze_selection()
        after = m(**b).logits
    assert torch.equal(before, after)


def test_selector_frozen_config_keeps_the_initial_random_choice():
    """The reference-code ablation: ranks fixed at the random initial gate, whatever training does to the gates."""
    free = _model(MoreConfig(gate_init="random", selector_warmup_steps=0)).train()
    frozen = _model(MoreConfig(gate_init="random", selector_warmup_steps=0, selector_frozen=True)).train()
    initial = rank_map(free)
    assert rank_map(frozen) == initial and len({r for t in initial.values() for r in t.values()}) > 1
    b = mixed_batch()
    for m in (free, frozen):
        opt = torch.optim.SGD(m.param_groups(1.0), lr=1.0)
        for _ in range(3):
            out = m(**b)
            (out.logits.square().mean() + out.aux_loss).backward()
            opt.step()
            opt.zero_grad()
    assert rank_map(frozen) == initial
    assert rank_map(free) != initial  # the same steps move a learning selector (negative control)
    assert all(l.gate.weight.grad is None for l in frozen.layers.values())


def _task_prompts(task, n, g):
    """Task t's prompts start with its own 2-token template (like "cola sentence:"), then tokens from its own
    vocabulary band; responses are random."""
    lo = 3 + task * 40

    def tok(total):
        t = torch.randint(3, VOCAB, (total,), generator=g)
        t[:2] = torch.tensor([lo, lo + 1])
        t[2:6] = torch.randint(lo + 2, lo + 40, (4,), generator=g)
        return t
    return tok


def _routing_batches(n_batches, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        samples = []
        for r in range(4):
            t1, t2 = torch.randint(0, 3, (2,), generator=g).tolist()
            samples += [(r, t1, 6, 9, _task_prompts(t1, 1, g)), (r, t2, 6, 10, _task_prompts(t2, 1, g))]
        out.append(packed_batch(samples, rows=4, length=20))
    return out


@pytest.mark.parametrize("representation", ["prompt_mean", "last_prompt"])
def test_contrastive_training_enables_zero_shot_routing(representation):
    """A few selector steps on the contrastive loss alone; then held-out prompts route to their task. B is not 0,
    so each task's adapter changes the representation the contrastive loss trains on: routing from the base
    model's representation (adapters off, the earlier code) got 0.67 (prompt_mean) and 0.58 (last_prompt) of these
    prompts right, routing under each candidate task's own adapter (the trained representation) 1.0 and 1.0."""
    torch.manual_seed(0)
    cfg = MoreConfig(contrastive=dict(weight=1.0, temperature=0.1, representation=representation))
    m = _model(cfg).train()
    opt = torch.optim.Adam(m.selector_parameters(), lr=0.05)
    train = _routing_batches(25, seed=1)
    before = routing_accuracy(m, _routing_batches(3, seed=99))["accuracy"]
    for b in train:
        loss = m(**b).contrastive_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = routing_accuracy(m, _routing_batches(3, seed=99))
    assert acc["n"] == 24
    assert acc["accuracy"] >= 0.9, (before, acc)


@pytest.mark.parametrize("path", ["head_only", "head_only_chunked", "full_logits_fallback"])
def test_supervised_loss_equals_full_logits_cross_entropy(monkeypatch, path):
    """`supervised_loss=True` runs the LM head at supervised positions only (in checkpointed chunks when many):
    the same per-token CE, per-task sums and gradients as CE over full logits (lm_loss_sums)."""
    import pipeline.more.model as model_mod
    from pipeline.train.loss import lm_loss_sums, token_loss_sums

    cfg = MoreConfig(gate_init="random", selector_warmup_steps=0)
    b = mixed_batch()
    m = _model(cfg).train()
    m.zero_grad(set_to_none=True)
    out = m(**b)
    ref = lm_loss_sums(out.logits, b["labels"], b["task_ids"], len(TASKS), b["position_ids"])
    (ref.total + out.aux_loss).backward()
    ref_grads = {n: p.grad.clone() for n, p in m.trainable_named_parameters()}

    if path == "head_only_chunked":
        monkeypatch.setattr(model_mod, "LOSS_CHUNK", 3)
    if path == "full_logits_fallback":
        monkeypatch.setattr(type(m), "_plain_lm_head", lambda self: False)
    m.zero_grad(set_to_none=True)
    assert m._plain_lm_head() is (path != "full_logits_fallback")
    out = m(**b, supervised_loss=True)
    assert out.logits is None and out.token_loss.shape == out.token_index.shape
    got = token_loss_sums(out.token_loss, out.token_index, b["task_ids"], len(TASKS))
    assert int(got.tokens) == int(ref.tokens) > 3  # more tokens than one chunk of 3
    torch.testing.assert_close(got.total, ref.total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.per_task, ref.per_task, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.per_task_tokens, ref.per_task_tokens)
    (got.total + out.aux_loss).backward()
    for n, p in m.trainable_named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_supervised_loss_follows_a_head_that_scales_its_logits():
    """Granite divides its logits by `logits_scaling` after the head: the loss at supervised positions is the CE
    of the logits the model computes (the head-only shortcut, which skips that, is not taken)."""
    from transformers import GraniteConfig, GraniteForCausalLM

    from pipeline.train.loss import lm_loss_sums, token_loss_sums

    torch.manual_seed(0)
    cfg = GraniteConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, logits_scaling=8.0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    base = GraniteForCausalLM(cfg).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(40)  # logits of a few units, as trained: unscaled they would give another loss
    m = inject(base, MoreConfig(gate_init="random"), TASKS).eval()
    b = mixed_batch()
    with torch.no_grad():
        full = m(**b)
        want = lm_loss_sums(full.logits, b["labels"], b["task_ids"], len(TASKS), b["position_ids"])
        sup = m(**b, supervised_loss=True)
    got = token_loss_sums(sup.token_loss, sup.token_index, b["task_ids"], len(TASKS))
    assert not m._plain_lm_head()
    torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-5)


def test_routing_scores_isolate_packed_samples_on_every_attention():
    """task_scores on a packed mixed-task batch: the same scores with the dense block mask given, with no mask (it
    builds one), with packed_sdpa (the trainer's attention: samples' lengths, positions from the segments), and for
    each sample routed alone."""
    from pipeline.more.routing import task_scores

    m = inject(tiny_llama(0), MoreConfig(gate_init="random"), TASKS).eval()
    b = mixed_batch()
    args = dict(segment_ids=b["segment_ids"], prompt_mask=b["prompt_mask"])
    want, keep = task_scores(m, b["input_ids"], b["attention_mask"], b["position_ids"], **args)
    assert keep.all()
    torch.testing.assert_close(task_scores(m, b["input_ids"], None, b["position_ids"], **args)[0], want)
    alone = []
    for r in range(2):
        for s in b["segment_ids"][r].unique():
            if s < 0:
                continue
            at = b["segment_ids"][r] == s
            alone.append(task_scores(m, b["input_ids"][r][at][None], None, None,
                                     segment_ids=torch.zeros(1, int(at.sum()), dtype=torch.long),
                                     prompt_mask=b["prompt_mask"][r][at][None])[0])
    torch.testing.assert_close(torch.cat(alone), want, atol=1e-5, rtol=1e-5)
    m.base_model.config._attn_implementation = "packed_sdpa"
    torch.testing.assert_close(task_scores(m, b["input_ids"], None, None, **args)[0], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="padding before a sample"):
        task_scores(m, b["input_ids"].flip(1), None, None, segment_ids=b["segment_ids"].flip(1),
                    prompt_mask=b["prompt_mask"].flip(1))


def test_generate_on_a_model_trained_with_packed_attention():
    """packed_sdpa needs the samples' boundaries, which generate does not pass: generate runs through sdpa (the
    same tokens as a model loaded with sdpa) and leaves the model's attention as it was."""
    m = inject(tiny_llama(0), MoreConfig(gate_init="random"), TASKS).eval()
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    want = m.generate(ids, task=1, max_new_tokens=5, do_sample=False)
    m.base_model.config._attn_implementation = "packed_sdpa"
    torch.testing.assert_close(m.generate(ids, task=1, max_new_tokens=5, do_sample=False), want)
    assert m.base_model.config._attn_implementation == "packed_sdpa"
