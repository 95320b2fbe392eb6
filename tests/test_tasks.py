"""The demo's generated data set: deterministic, disjoint splits, answers that follow each task's rule."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from dpkd.tasks import (
    ANIMAL_FACTS,
    FREE_FORM_TASKS,
    LONG_ANSWER_TASKS,
    SHORT_ANSWER_TASKS,
    TASKS,
    VERBS,
    generate_splits,
    write_splits,
)

SIZES = {"train": 900, "dev": 90, "test": 90}


@pytest.fixture(scope="module", params=[SHORT_ANSWER_TASKS, LONG_ANSWER_TASKS], ids=["short", "long"])
def task_set(request):
    return request.param


@pytest.fixture(scope="module")
def splits(task_set):
    return generate_splits(SIZES, seed=3, tasks=task_set)


def test_same_seed_gives_identical_splits_and_other_seed_differs(splits, task_set):
    assert generate_splits(SIZES, seed=3, tasks=task_set) == splits
    assert generate_splits(SIZES, seed=4, tasks=task_set)["test"] != splits["test"]


def test_the_default_tasks_are_the_short_answer_ones_with_answers_of_at_most_five_words():
    default = generate_splits(SIZES, seed=3)
    assert default == generate_splits(SIZES, seed=3, tasks=SHORT_ANSWER_TASKS)
    assert set(SHORT_ANSWER_TASKS) | set(LONG_ANSWER_TASKS) == set(TASKS)
    lengths = Counter(len(e.output.split()) for examples in default.values() for e in examples)
    assert max(lengths) <= 5 and lengths[1] > sum(lengths.values()) / 2  # most answers are a single word


def test_no_prompt_occurs_in_two_splits_or_twice_in_one(splits):
    keys = {name: [(e.instruction, e.input) for e in examples] for name, examples in splits.items()}
    for name, k in keys.items():
        assert len(set(k)) == len(k) == SIZES[name], name
    assert not set(keys["train"]) & set(keys["test"])
    assert not set(keys["train"]) & set(keys["dev"])
    assert not set(keys["dev"]) & set(keys["test"])


def test_every_split_holds_every_task_in_equal_shares(splits, task_set):
    for examples in splits.values():
        counts = Counter(e.task for e in examples)
        assert set(counts) == set(task_set)
        assert max(counts.values()) - min(counts.values()) <= 1


def _check_answer(e) -> None:
    """Recompute each rule-based answer from the prompt alone (an independent reading of the task)."""
    items = e.input.split()
    if e.task == "reverse":
        assert e.output.split() == items[::-1]
    elif e.task == "sort":
        assert [int(x) for x in e.output.split()] == sorted(int(x) for x in items)
    elif e.task == "deduplicate":
        kept = []
        for word in items:
            if word not in kept:
                kept.append(word)
        assert e.output.split() == kept and len(kept) < len(items)
    elif e.task == "add":
        step = int(re.fullmatch(r"Add (\d) to each number\.", e.instruction).group(1))
        assert [int(x) for x in e.output.split()] == [int(x) + step for x in items]
    elif e.task == "lookup":
        name = re.fullmatch(r"What color does (\w+) like\?", e.instruction).group(1)
        table = dict(pair.split(": ") for pair in e.input.split(", "))
        assert e.output == f"{name} likes {table[name]}."
    elif e.task == "past_tense":
        subject, verb, *rest = e.input.split(" ")
        assert e.output == " ".join([subject, VERBS[verb], *rest])
    elif e.task == "pattern":
        seen, answer = items + e.output.split(), len(items)
        assert len(e.output.split()) == 3
        if seen[0].isdigit():
            numbers = [int(x) for x in seen]
            assert len({b - a for a, b in zip(numbers, numbers[1:])}) == 1
        else:
            period = len(dict.fromkeys(items))
            assert all(seen[i] == seen[i % period] for i in range(answer, len(seen)))
    elif e.task == "color_of":
        name = re.fullmatch(r"Which color does (\w+) like\?", e.instruction).group(1)
        table = dict(pair.split(": ") for pair in e.input.split(", "))
        assert e.output == table[name]
    elif e.task == "larger":
        a, b = (int(x) for x in items)
        assert a != b and int(e.output) == max(a, b)
    elif e.task == "count":
        assert int(e.output) == len(items)
    elif e.task == "next":
        if items[0].isdigit():
            numbers = [int(x) for x in items]
            assert len({b - a for a, b in zip(numbers, numbers[1:])}) == 1
            assert int(e.output) == 2 * numbers[-1] - numbers[-2]
        else:
            period = len(dict.fromkeys(items))
            assert all(items[i] == items[i % period] for i in range(len(items)))
            assert e.output == items[len(items) - period]
    else:
        raise AssertionError(f"no rule for task {e.task}")


def test_rule_based_answers_follow_from_the_prompt(splits):
    checked = 0
    for examples in splits.values():
        for e in examples:
            if e.task not in FREE_FORM_TASKS:
                _check_answer(e)
                checked += 1
    assert checked > 700


def test_free_form_answers_vary_in_wording_but_state_the_fixed_facts():
    rng = random.Random(0)
    pets = [TASKS["describe"](rng) for _ in range(200)]
    for e in pets:
        fields = dict(pair.split(": ") for pair in e.input.split(", "))
        size, color, home, food = ANIMAL_FACTS[fields["pet"]]
        assert e.output.startswith(f"{fields['owner']} has a {size} {color} {fields['pet']}.")
        assert f"near the {home}" in e.output and f"eat {food}" in e.output
        assert len(e.output.split()) >= 20
    # Same facts, different sentence order and closing line: several wordings per task overall.
    assert len({re.sub(r"\b[A-Z]\w+\b", "X", e.output) for e in pets}) > 20


def test_written_jsonl_has_the_alpaca_fields_and_round_trips(tmp_path, splits, task_set):
    paths = write_splits(tmp_path, SIZES, seed=3, tasks=task_set)
    assert set(paths) == set(SIZES)
    for name, path in paths.items():
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == SIZES[name]
        for row, e in zip(rows, splits[name]):
            assert (row["instruction"], row["input"], row["output"], row["task"]) == (
                e.instruction, e.input, e.output, e.task)
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_arguments_are_named_in_the_error():
    with pytest.raises(ValueError, match="unknown.*nosuch"):
        generate_splits({"train": 5}, tasks=["reverse", "nosuch"])
    with pytest.raises(ValueError, match=r"sizes\['dev'\]"):
        generate_splits({"train": 5, "dev": -1})
    with pytest.raises(ValueError, match="could not draw"):
        # One animal task alone has too few distinct prompts for this many examples.
        generate_splits({"train": 100_000}, tasks=["describe"])
