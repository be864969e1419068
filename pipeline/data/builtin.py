"""The built-in multi-task set: generated here (no download), written as JSONL so the default config reads it
exactly like user data. Five tasks of increasing difficulty, each with answers a metric can check:

| task       | format   | kind           | example                                             | metric        |
|------------|----------|----------------|-----------------------------------------------------|---------------|
| sentiment  | template | classification | "a truly wonderful film" -> positive (negations flip)| accuracy      |
| reverse    | chat     | generation     | "Reverse: red cat sun" -> "sun cat red"             | exact_match   |
| sort       | alpaca   | generation     | "7 2 9" -> "2 7 9"                                   | exact_match   |
| arithmetic | template | generation     | "23 + 58 =" -> "81"                                  | exact_match   |
| overlap    | template | regression     | letters two words share in place: "plant"/"plane" -> 4| pearson, spearman |

Task sizes differ on purpose (temperature sampling matters). Each task gets `train.jsonl` and `test.jsonl`.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

POSITIVE = ["wonderful", "great", "delightful", "moving", "brilliant", "charming", "superb", "fun", "touching"]
NEGATIVE = ["boring", "awful", "dull", "clumsy", "tedious", "weak", "messy", "bland", "painful"]
SUBJECTS = ["film", "movie", "story", "show", "book", "play", "album", "game"]
INTENS = ["", "truly ", "really ", "quite ", "very "]
WORDS = ["red", "cat", "sun", "tree", "blue", "dog", "moon", "fish", "star", "rock", "bird", "rain", "lamp", "door",
         "milk", "ship", "gold", "snow", "leaf", "wind"]
LETTERS = "abcdefghij"

SIZES = {"sentiment": 2000, "reverse": 1200, "sort": 800, "arithmetic": 3000, "overlap": 1500}
TEST_SIZE = 200


def _sentiment(rng: random.Random) -> dict:
    label = rng.randint(0, 1)
    negated = rng.random() < 0.3
    word = rng.choice(POSITIVE if label != negated else NEGATIVE)
    text = f"the {rng.choice(SUBJECTS)} was {'not ' if negated else ''}{rng.choice(INTENS)}{word}"
    return {"text": text, "label": label}


def _reverse(rng: random.Random) -> dict:
    words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]
    return {"messages": [{"role": "user", "content": "Reverse the words: " + " ".join(words)},
                         {"role": "assistant", "content": " ".join(reversed(words))}]}


def _sort(rng: random.Random) -> dict:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 7))]
    return {"instruction": "Sort the numbers in ascending order.", "input": " ".join(map(str, nums)),
            "output": " ".join(map(str, sorted(nums)))}


def _arithmetic(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-")
    return {"a": a, "b": b, "op": op, "answer": str(a + b if op == "+" else a - b)}


def _overlap(rng: random.Random) -> dict:
    w1 = "".join(rng.choice(LETTERS) for _ in range(5))
    w2 = "".join(c if rng.random() < 0.5 else rng.choice(LETTERS) for c in w1)
    return {"word1": w1, "word2": w2, "score": sum(x == y for x, y in zip(w1, w2))}


GENERATORS = {"sentiment": _sentiment, "reverse": _reverse, "sort": _sort, "arithmetic": _arithmetic,
              "overlap": _overlap}


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write that leaves an identical file untouched (keeps the prep cache valid across runs)."""
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_builtin(out_dir: str | Path, scale: float = 1.0, seed: int = 0) -> Path:
    """Generate `<out_dir>/<task>/{train,test}.jsonl` deterministically from (scale, seed)."""
    out = Path(out_dir)
    for t, (name, gen) in enumerate(GENERATORS.items()):
        rng = random.Random(f"{seed}:{name}")
        (out / name).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", max(1, int(SIZES[name] * scale))), ("test", TEST_SIZE)):
            rows = [gen(rng) for _ in range(n)]
            _write_if_changed(out / name / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out
