"""The verbalizer scorer on a hand-built model whose answer is known, and padding invariance of batched scoring
and greedy generation on a tiny Llama."""
from __future__ import annotations

import pytest
import torch

from evaluate_fixtures import one_torch_thread  # noqa: F401
from more_fixtures import VOCAB, save_tiny_llama
from pipeline.evaluate.models import EvalModel, HFModel
from pipeline.evaluate.scoring import greedy_generate, label_logprobs

V = 10


class Bigram(EvalModel):
    """Next-token logits depend only on the current token: logits[b, t] = W[input_ids[b, t]] (an identity
    embedding into a hand-set lm_head), so every label's summed log-prob can be worked out by hand."""

    def __init__(self, W: torch.Tensor):
        self.W = W
        self.seen_tasks = []

    def logits(self, input_ids, attention_mask, tasks, position_ids=None, keep=None):
        self.seen_tasks += list(tasks)
        return self.W[input_ids][:, -keep:] if keep else self.W[input_ids]


def _hand_model():
    W = torch.zeros(V, V)
    W[3, 6], W[3, 5] = 4.0, 2.0    # after 3: "6" (start of the two-token labels) is clearly likelier than "5"
    W[4, 6], W[4, 5] = 2.2, 2.0    # after 4: "6" slightly likelier than "5" ...
    W[6, 8], W[6, 7] = 3.0, -3.0   # ... but after 6 the second token costs log p(8|6) ~ -0.34, more than 0.2
    return W


LABELS = [[5], [6, 7], [6, 8]]  # A (one token), B and C (two tokens sharing the first)


def test_verbalizer_scorer_picks_highest_summed_logprob():
    W = _hand_model()
    lsm = torch.log_softmax(W, -1)
    prompts = [[1, 9, 3], [1, 4]]  # different lengths: the batch is right-padded
    want = torch.tensor([[lsm[p[-1], 5], lsm[p[-1], 6] + lsm[6, 7], lsm[p[-1], 6] + lsm[6, 8]] for p in prompts],
                        dtype=torch.float64)
    for bs in (1, 2, 6):
        model = Bigram(W)
        got = label_logprobs(model, prompts, [LABELS, LABELS], ["t", "t"], batch_size=bs, pad_id=0)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert got.argmax(-1).tolist() == [2, 0]  # C after 3; A after 4 although "6" is the likelier first token
        assert set(model.seen_tasks) == {"t"}


def test_scorer_rejects_ragged_or_empty_inputs():
    with pytest.raises(ValueError, match="empty prompt"):
        label_logprobs(Bigram(_hand_model()), [[]], [LABELS], ["t"])
    with pytest.raises(ValueError, match="3 non-empty label candidates"):
        label_logprobs(Bigram(_hand_model()), [[1], [1]], [LABELS, LABELS[:2]], ["t", "t"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return HFModel(save_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", seed=3), device="cpu")


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]


def test_batched_scores_equal_one_at_a_time(tiny):
    prompts = _prompts()
    cands = [[[10], [11, 12], [13, 14, 15]]] * len(prompts)
    one = label_logprobs(tiny, prompts, cands, ["t"] * 4, batch_size=1)
    many = label_logprobs(tiny, prompts, cands, ["t"] * 4, batch_size=12)
    torch.testing.assert_close(many, one, rtol=0, atol=1e-4)
    # and both equal the log-probs read off one unpadded forward of prompt + label
    p, c = prompts[1], cands[1][2]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        lp = torch.log_softmax(tiny.model(input_ids=ids).logits[0].float(), -1)
    want = sum(float(lp[len(p) - 1 + j, tok]) for j, tok in enumerate(c))
    assert float(many[1, 2]) == pytest.approx(want, abs=1e-4)


def test_batched_greedy_equals_one_at_a_time(tiny):
    prompts = _prompts()
    one = greedy_generate(tiny, prompts, ["t"] * 4, max_new_tokens=6, batch_size=1, pad_id=0, stop_ids=())
    many = greedy_generate(tiny, prompts, ["t"] * 4, max_new_tokens=6, batch_size=4, pad_id=0, stop_ids=())
    assert many == one and all(len(x) == 6 for x in one)
    # the answer is cut before the first EOS: make the first generated token the EOS
    eos = one[0][0]
    cut = greedy_generate(tiny, prompts[:1], ["t"], max_new_tokens=6, pad_id=0, stop_ids=[eos])
    assert cut == [[]]
    # and a manual greedy loop agrees (no cache, full recompute)
    ids = torch.tensor([prompts[1]])
    for _ in range(6):
        nxt = tiny.logits(ids, torch.ones_like(ids), ["t"])[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], 1)
    assert ids[0, len(prompts[1]):].tolist() == one[1]


def test_generation_ends_at_the_chat_templates_end_of_turn(prepared_builtin_data):
    """A chat-template task's training replies end with the template's end of turn, not EOS (Llama-3's <|eot_id|>):
    the evaluator stops there too. A model that writes the trained reply and then another turn is scored on the
    reply alone."""
    from transformers import AutoTokenizer

    from pipeline.config.tasks import TaskConfig
    from pipeline.data.render import render
    from pipeline.data.tokenize import encode_texts
    from pipeline.evaluate.runner import score_task
    from pipeline.evaluate.tasks import encode, stop_token_ids

    tok = AutoTokenizer.from_pretrained(prepared_builtin_data / "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    source = {"type": "jsonl", "path": "unused.jsonl"}
    task = TaskConfig(name="rev", source=source, format="chat", kind="generation", metrics=["exact_match"],
                      max_new_tokens=24)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert stop_token_ids(task, tok) == [tok.eos_token_id, end]
    plain = TaskConfig(name="p", source=source, template={"prompt": "Q: {q}\nA:", "response": " {a}"},
                       kind="generation", metrics=["exact_match"])
    assert stop_token_ids(plain, tok) == [tok.eos_token_id]

    rows = [{"messages": [{"role": "user", "content": "reverse: a b c"}, {"role": "assistant", "content": "c b a"}]}]
    reply = encode_texts(tok, [render(task, rows[0], tok)[1]])[0]
    assert end in reply
    more = encode_texts(tok, ["<|user|>reverse: x y<|end|>\n"])[0]

    class Scripted(EvalModel):
        def identity(self):
            return {}

        def generate(self, ids, mask, tasks, max_new_tokens, pad_id, stop_ids):
            return torch.tensor([(reply + more)[:max_new_tokens]] * ids.shape[0])

    info = score_task(Scripted(), task, encode(task, rows, tok, None, True), tok, progress=False)
    assert info["samples"][0]["prediction"] == "c b a" and info["metrics"]["exact_match"] == 1.0


def test_greedy_ignores_the_checkpoints_generation_config(tiny, tmp_path):
    """A checkpoint may ship generation_config.json with a repetition penalty or sampling defaults (Qwen2.5-Instruct
    does); the evaluator's decoding stays plain greedy, so the same weights score the same."""
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny.path, folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"repetition_penalty": 5.0, "no_repeat_ngram_size": 1, "do_sample": True, "temperature": 3.0}))
    prompts = _prompts()
    want = greedy_generate(tiny, prompts, ["t"] * 4, max_new_tokens=12, pad_id=0, stop_ids=())
    assert any(len(set(x)) < len(x) for x in want)  # repeats that the file's settings would have changed
    assert greedy_generate(HFModel(folder, device="cpu"), prompts, ["t"] * 4, max_new_tokens=12, pad_id=0,
                           stop_ids=()) == want
