"""The built-in multi-task set: generated here (no download), written as JSONL so the default config reads it
exactly like user data. Five small tasks a 2-layer model can learn, each with answers a metric can check:

| task       | format   | kind           | example                                                | metric            |
|------------|----------|----------------|--------------------------------------------------------|-------------------|
| sentiment  | template | classification | "the film was not really boring" -> positive           | accuracy          |
| reverse    | chat     | generation     | "Reverse the words: red cat sun" -> "sun cat red"      | exact_match       |
| sort       | alpaca   | generation     | "7 2 9" -> "2 7 9"                                     | exact_match       |
| arithmetic | template | generation     | "Compute: 7 - 9 =" -> "-2"                             | exact_match       |
| rating     | template | regression     | "the show was very dull" -> 1 ... "truly superb" -> 5  | pearson, spearman |

Task sizes differ on purpose (temperature sampling matters). Each task gets `train.jsonl` and `test.jsonl`, whose
inputs never occur in train (`is_test_input`).

`skill_texts` is the default base's pretraining corpus: the same five skills in OTHER words (other prompts, and
for the rating other answer words: one..five), drawn with another seed. A base pretrained on it
can do the skills but not the tasks' formats, which is the situation of a real pretrained LLM: the adapter has to
learn each task's prompt and answer format and tie it to a skill the base has. The corpus covers the whole input
space, test inputs included (as an LLM knows that 7 - 9 = -2 before it is fine-tuned): what a test row checks is
that the adapter's format carries over to inputs it never saw in the task's format.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from pipeline.atomic import atomic_write

POSITIVE = ["wonderful", "great", "delightful", "moving", "brilliant", "charming", "superb", "fun", "touching"]
NEGATIVE = ["boring", "awful", "dull", "clumsy", "tedious", "weak", "messy", "bland", "painful"]
NEUTRAL = ["okay", "average", "fine", "ordinary", "passable"]
SUBJECTS = ["film", "movie", "story", "show", "book", "play", "album", "game"]
INTENS = ["", "truly ", "really ", "quite ", "very "]
STRONG, MILD = ["very ", "truly ", "really "], ["quite ", "fairly ", "somewhat "]
WORDS = ["red", "cat", "sun", "tree", "blue", "dog", "moon", "fish", "star", "rock", "bird", "rain", "lamp", "door",
         "milk", "ship", "gold", "snow", "leaf", "wind"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]

SIZES = {"sentiment": 2000, "reverse": 1200, "sort": 800, "arithmetic": 3000, "rating": 1500}
TEST_SIZE = 200


def _sentiment(rng: random.Random) -> dict:
    label = rng.randint(0, 1)
    negated = rng.random() < 0.3
    word = rng.choice(POSITIVE if label != negated else NEGATIVE)
    text = f"the {rng.choice(SUBJECTS)} was {'not ' if negated else ''}{rng.choice(INTENS)}{word}"
    return {"text": text, "label": label}


def _reverse(rng: random.Random) -> dict:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
    return {"messages": [{"role": "user", "content": "Reverse the words: " + " ".join(words)},
                         {"role": "assistant", "content": " ".join(reversed(words))}]}


def _sort(rng: random.Random) -> dict:
    nums = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return {"instruction": "Sort the numbers in ascending order.", "input": " ".join(map(str, nums)),
            "output": " ".join(map(str, sorted(nums)))}


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    op = rng.choice("+-")
    return {"a": a, "b": b, "op": op, "answer": str(a + b if op == "+" else a - b)}


def _rating(rng: random.Random) -> dict:
    """1-5 stars: neutral words 3; positive words 4 (mild or no intensifier) or 5 (strong); negative 2 or 1."""
    polarity = rng.choice([-1, 0, 1])
    if polarity == 0:
        return {"text": f"the {rng.choice(SUBJECTS)} was {rng.choice(NEUTRAL)}", "stars": 3}
    strong = rng.random() < 0.5
    intens = rng.choice(STRONG) if strong else rng.choice(MILD + [""])
    word = rng.choice(POSITIVE if polarity > 0 else NEGATIVE)
    return {"text": f"the {rng.choice(SUBJECTS)} was {intens}{word}", "stars": 3 + polarity * (2 if strong else 1)}


GENERATORS = {"sentiment": _sentiment, "reverse": _reverse, "sort": _sort, "arithmetic": _arithmetic,
              "rating": _rating}

# The same skills in other words, for the base's pretraining: (prompt, response) from a generated row.
SKILL_WORDINGS = {
    "sentiment": lambda r: (f"is this review good or bad? {r['text']} answer:",
                            " positive" if r["label"] else " negative"),
    "reverse": lambda r: (f"backwards: {r['messages'][0]['content'].split(': ', 1)[1]} =>",
                          " " + r["messages"][1]["content"]),
    "sort": lambda r: (f"order from small to large: {r['input']} ->", " " + r["output"]),
    "arithmetic": lambda r: (f"{r['a']} {r['op']} {r['b']} equals", " " + r["answer"]),
    "rating": lambda r: (f"how many stars for: {r['text']} ->", " " + NUMBER_WORDS[r["stars"]]),
}


def skill_texts(n_per_task: int, seed: int = 0) -> list[str]:
    """Pretraining texts for the default base (see the module docstring), from a seed unrelated to the task data's."""
    rng = random.Random(f"skills:{seed}")
    texts = []
    for name, gen in GENERATORS.items():
        texts += ["".join(SKILL_WORDINGS[name](gen(rng))) for _ in range(n_per_task)]
    return texts


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write that leaves an identical file untouched (keeps the prep cache valid across runs)."""
    if path.is_file() and path.read_text() == text:
        return
    atomic_write(path, text)


def is_test_input(row: dict) -> bool:
    """A fixed fifth of every task's inputs (by hash; each row's answer is a function of its input) is test-only,
    so no test input ever appears in a task's training data. Small input spaces (one-digit arithmetic has 200
    problems) would otherwise put most test rows in train too."""
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).digest()[0] % 5 == 0


def write_builtin(out_dir: str | Path, scale: float = 1.0, seed: int = 0) -> Path:
    """Generate `<out_dir>/<task>/{train,test}.jsonl` deterministically from (scale, seed)."""
    out = Path(out_dir)
    for name, gen in GENERATORS.items():
        rng = random.Random(f"{seed}:{name}")
        want = {"train": max(1, int(SIZES[name] * scale)), "test": TEST_SIZE}
        rows = {"train": [], "test": []}
        while any(len(rows[k]) < want[k] for k in rows):
            row = gen(rng)
            split = "test" if is_test_input(row) else "train"
            if len(rows[split]) < want[split]:
                rows[split].append(row)
        (out / name).mkdir(parents=True, exist_ok=True)
        for split, r in rows.items():
            _write_if_changed(out / name / f"{split}.jsonl", "".join(json.dumps(x) + "\n" for x in r))
    return out
