"""The built-in tasks: held-out test inputs, and a skills corpus worded unlike the tasks."""
import json

from pipeline.data.builtin import GENERATORS, skill_texts, write_builtin

TASK_WORDING = ["Sentiment:", "Reverse the words", "Sort the numbers", "Compute:", "Rate the review", "Stars:"]


def test_test_inputs_never_occur_in_train(tmp_path):
    root = write_builtin(tmp_path, scale=0.5)
    for name in GENERATORS:
        train = set((root / name / "train.jsonl").read_text().splitlines())
        test = (root / name / "test.jsonl").read_text().splitlines()
        assert len(test) == 200 and not train & set(test), name
    again = write_builtin(tmp_path / "again", scale=0.5)
    assert (again / "sort" / "test.jsonl").read_text() == (root / "sort" / "test.jsonl").read_text()


def test_skill_corpus_uses_other_words_than_the_tasks():
    texts = skill_texts(200)
    assert len(texts) == 200 * len(GENERATORS) and texts == skill_texts(200)
    assert not [w for w in TASK_WORDING if any(w in t for t in texts)]
    assert any(t.endswith(" positive") for t in texts) and any(t.endswith(" five") for t in texts)
    assert json.dumps(texts) != json.dumps(skill_texts(200, seed=1))
