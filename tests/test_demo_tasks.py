"""The demo's task families: every right answer of a multi-answer prompt is accepted by the
verifier and nothing else is, and the drawn training answer is one of them, spread over all."""
from collections import Counter

import pytest

from fastdadpo.commands.judges import ExactJudge, Pair, is_correct
from fastdadpo.demo.synthetic import (ALL_TASKS, MULTI_ANSWER_TASKS, SINGLE_ANSWER_TASKS, WORDS, answers_for,
                                      make_examples)


def _list_words(prompt: str):
    return prompt.split(": ", 1)[1].split()


@pytest.mark.parametrize("task", ALL_TASKS)
def test_answers_are_exactly_the_right_ones(task):
    for row in make_examples(60, seed=1, tasks=(task,)):
        words = _list_words(row["prompt"])
        assert all(word in WORDS for word in words)
        answers = row["answers"]
        assert row["answer"] in answers and len(set(answers)) == len(answers)
        if task in SINGLE_ANSWER_TASKS:
            assert len(answers) == 1
        elif task == "pick":
            assert sorted(answers) == sorted(f"I pick {w}." for w in words)
        elif task == "starts":
            letter = row["prompt"].split(":")[0].split()[-2]  # "... with b from: ..." / "... letter b in: ..."
            matching = [w for w in words if w[0] == letter]
            assert 2 <= len(matching) <= 3 and answers == [f"It is {w}." for w in matching]
        else:  # pair: every two words in their order, and no pair out of order
            assert len(answers) == len(words) * (len(words) - 1) // 2
            assert f"In order: {words[-1]} {words[0]}" not in answers


def test_verifier_accepts_every_right_answer_and_nothing_else():
    row = make_examples(1, seed=0, tasks=("pair",))[0]
    words = _list_words(row["prompt"])
    for answer in row["answers"]:
        assert is_correct("  " + answer.upper() + " ", row["answers"])
    assert not is_correct(f"In order: {words[1]} {words[0]}", row["answers"])
    assert not is_correct(row["answers"][0], None)
    assert is_correct("You said: a b", "you said: a b")
    # Teacher right with one answer, student right with another: a tie, not a loss.
    assert ExactJudge().judge([Pair("", row["answers"], row["answers"][0], row["answers"][-1])]) == ["tie"]


def test_training_answers_spread_over_the_right_ones():
    """A teacher trained on these rows learns to spread its probability: the drawn answer is uniform."""
    rows = make_examples(3000, seed=2, tasks=("pick",), min_words=3, max_words=3)
    position = Counter(row["answers"].index(row["answer"]) for row in rows)
    assert set(position) == {0, 1, 2} and min(position.values()) > 900


def test_single_answer_rows_unchanged_by_the_new_families():
    """The default task set draws exactly the rows it drew before the multi-answer families existed."""
    rows = make_examples(5, seed=11)
    assert [r["task"] for r in rows] == [r["task"] for r in make_examples(5, seed=11, tasks=SINGLE_ANSWER_TASKS)]
    assert all(r["answers"] == [r["answer"]] for r in rows)
    assert set(MULTI_ANSWER_TASKS).isdisjoint(r["task"] for r in rows)
    assert answers_for("first", ["red", "cat"]) == ["The first word is red."]
