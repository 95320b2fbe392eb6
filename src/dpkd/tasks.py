"""A procedurally generated instruction data set for the bundled study (`dpkd demo`).

Every example is drawn from a seeded `random.Random`, so the same seed gives the same data on any
machine; nothing is downloaded. Two task sets:

- `SHORT_ANSWER_TASKS` (the default, the bundled study's): one correct answer of 1 to 5 tokens each, from
  a single retrieved or computed item (a colour from a table, the larger of two numbers, a word count, the
  next item of a pattern) to a short list (add, sort, reverse). Short answers make exact match informative
  for students of a few hundred thousand parameters: a sampled answer of one token is right far more
  often than one of twenty, and the tasks span easy to hard, so the teacher stays ahead.
- `LONG_ANSWER_TASKS` (the earlier protocol's): answers of up to ~35 tokens, two of them free-form (the
  facts fixed, the wording drawn at random, so only ROUGE-L is meaningful there).

The vocabulary is small on purpose: a tokenizer trained on the train split and models of a few hundred
thousand parameters can learn it in minutes on a CPU.

Splits are written as JSONL with the fields `instruction`, `input`, `output` (the MiniLLM/Alpaca format
that `dpkd.data.load_instruction_data` reads). No prompt (instruction + input) occurs in two splits.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

NAMES = ("Ann", "Bob", "Eve", "Tom", "Sam", "Mia", "Leo", "Zoe")
COLORS = ("red", "blue", "green", "black", "white", "brown", "pink", "gray")
WORDS = ("cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen", "sun", "moon", "tree", "rock", "cup",
         "hat", "box", "key")
FOODS = ("apple", "bread", "cake", "fish", "rice", "soup", "milk", "plum")
PLACES = ("park", "lake", "farm", "city", "hill", "shop", "road", "beach")
# Present → past for the rewrite task: a fixed table the models must learn.
VERBS = {"sees": "saw", "eats": "ate", "finds": "found", "takes": "took", "gives": "gave", "makes": "made",
         "likes": "liked", "wants": "wanted", "holds": "held", "sells": "sold"}
# Fixed facts per animal for the free-form description task: knowledge to learn, wording that varies.
ANIMAL_FACTS = {
    "cat": ("small", "gray", "city", "fish"), "dog": ("big", "brown", "farm", "bread"),
    "fox": ("small", "red", "hill", "plum"), "owl": ("small", "white", "tree", "rice"),
    "bee": ("tiny", "black", "park", "cake"), "cow": ("big", "black", "farm", "soup"),
    "pig": ("big", "pink", "farm", "apple"), "hen": ("small", "white", "farm", "rice"),
}


@dataclass(frozen=True)
class Example:
    """One instruction example; `task` names its generator and is kept in the JSONL for analysis."""

    instruction: str
    input: str
    output: str
    task: str

    @property
    def prompt_key(self) -> tuple[str, str]:
        return (self.instruction, self.input)


def _words(items: Sequence[object]) -> str:
    return " ".join(str(x) for x in items)


def reverse_words(rng: random.Random) -> Example:
    items = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
    return Example("Reverse the order of the words.", _words(items), _words(items[::-1]), "reverse")


def sort_numbers(rng: random.Random) -> Example:
    items = rng.sample(range(20), rng.randint(3, 4))
    return Example("Sort the numbers from smallest to largest.", _words(items), _words(sorted(items)), "sort")


def deduplicate_words(rng: random.Random) -> Example:
    pool = rng.sample(WORDS, rng.randint(2, 4))
    items = [rng.choice(pool) for _ in range(rng.randint(4, 6))]
    unique = list(dict.fromkeys(items))
    if len(unique) == len(items):  # make sure there is something to remove
        items.insert(rng.randint(1, len(items)), items[0])
    return Example("Remove the repeated words, keeping the first of each.", _words(items),
                   _words(list(dict.fromkeys(items))), "deduplicate")


def add_to_each(rng: random.Random) -> Example:
    step = rng.randint(1, 3)
    items = [rng.randint(0, 9) for _ in range(rng.randint(3, 4))]
    return Example(f"Add {step} to each number.", _words(items), _words(x + step for x in items), "add")


def look_up(rng: random.Random) -> Example:
    names = rng.sample(NAMES, rng.randint(3, 4))
    colors = [rng.choice(COLORS) for _ in names]
    asked = rng.randrange(len(names))
    table = ", ".join(f"{n}: {c}" for n, c in zip(names, colors))
    return Example(f"What color does {names[asked]} like?", table,
                   f"{names[asked]} likes {colors[asked]}.", "lookup")


def past_tense(rng: random.Random) -> Example:
    subject, other = rng.sample(NAMES, 2)
    verb = rng.choice(sorted(VERBS))
    thing = rng.choice(FOODS + WORDS)
    tail = rng.choice(["", f" with {other}", f" at the {rng.choice(PLACES)}"])
    return Example("Rewrite the sentence in the past tense.", f"{subject} {verb} the {thing}{tail}.",
                   f"{subject} {VERBS[verb]} the {thing}{tail}.", "past_tense")


def _pattern(rng: random.Random, hidden: int, cycle_lengths: tuple[int, int]) -> list:
    """An arithmetic sequence of 3–5 shown numbers, or a repeated cycle of 2–3 colours shown `cycle_lengths`
    times, then `hidden` more items to be found."""
    if rng.random() < 0.5:
        start, step = rng.randint(0, 20), rng.randint(1, 5)
        return [start + step * i for i in range(rng.randint(3, 5) + hidden)]
    cycle = rng.sample(COLORS, rng.randint(2, 3))
    return [cycle[i % len(cycle)] for i in range(rng.randint(*cycle_lengths) + hidden)]


def continue_pattern(rng: random.Random) -> Example:
    seq = _pattern(rng, 3, (5, 6))
    return Example("Continue the pattern with three more items.", _words(seq[:-3]), _words(seq[-3:]), "pattern")


def describe_pet(rng: random.Random) -> Example:
    owner, animal, place = rng.choice(NAMES), rng.choice(sorted(ANIMAL_FACTS)), rng.choice(PLACES)
    when = rng.choice(["morning", "evening", "weekend"])
    size, color, home, food = ANIMAL_FACTS[animal]
    middle = [f"It lives near the {home}.", f"It likes to eat {food}.",
              f"{owner} takes it to the {place} every {when}."]
    rng.shuffle(middle)
    extra = rng.choice([f"Many people like the {animal}.", "It sleeps at night.", "It is a good friend.",
                        f"{owner} loves it very much."])
    text = " ".join([f"{owner} has a {size} {color} {animal}.", *middle, extra])
    return Example("Write a few sentences about the pet.", f"owner: {owner}, pet: {animal}, place: {place}, "
                   f"time: {when}", text, "describe")


def write_story(rng: random.Random) -> Example:
    name, friend = rng.sample(NAMES, 2)
    place, food, thing = rng.choice(PLACES), rng.choice(FOODS), rng.choice(WORDS)
    when = rng.choice(["One day", "In the morning", "At night", "Last week"])
    middle = rng.choice([f"There {name} met {friend}.", f"{friend} was there too.",
                         f"{name} saw a {rng.choice(COLORS)} {thing}."])
    end = rng.choice([f"They ate {food} and went home.", f"{name} and {friend} were happy.",
                      f"Then {name} and {friend} played until it was late."])
    story = f"{when} {name} went to the {place} to find a {thing}. {middle} {end}"
    return Example("Write a short story about two friends, a place and a thing.",
                   f"{name}, {friend}, {place}, {thing}", story, "story")


def color_of(rng: random.Random) -> Example:
    names = rng.sample(NAMES, rng.randint(2, 4))
    colors = [rng.choice(COLORS) for _ in names]
    asked = rng.randrange(len(names))
    table = ", ".join(f"{n}: {c}" for n, c in zip(names, colors))
    return Example(f"Which color does {names[asked]} like?", table, colors[asked], "color_of")


def larger_number(rng: random.Random) -> Example:
    a, b = rng.sample(range(30), 2)
    return Example("Which number is larger?", f"{a} {b}", str(max(a, b)), "larger")


def count_words(rng: random.Random) -> Example:
    items = [rng.choice(WORDS) for _ in range(rng.randint(2, 7))]
    return Example("How many words are there?", _words(items), str(len(items)), "count")


def next_item(rng: random.Random) -> Example:
    seq = _pattern(rng, 1, (4, 6))
    return Example("What comes next?", _words(seq[:-1]), str(seq[-1]), "next")


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "reverse": reverse_words, "sort": sort_numbers, "deduplicate": deduplicate_words, "add": add_to_each,
    "lookup": look_up, "past_tense": past_tense, "pattern": continue_pattern, "describe": describe_pet,
    "story": write_story, "color_of": color_of, "larger": larger_number, "count": count_words, "next": next_item,
}
FREE_FORM_TASKS = frozenset({"describe", "story"})
# The earlier protocol's tasks, in the order that protocol cycled through them (its data is unchanged).
LONG_ANSWER_TASKS = ("reverse", "sort", "deduplicate", "add", "lookup", "past_tense", "pattern", "describe", "story")
SHORT_ANSWER_TASKS = ("color_of", "larger", "count", "next", "add", "sort", "reverse")


def generate_splits(sizes: dict[str, int], seed: int = 0,
                    tasks: Sequence[str] | None = None) -> dict[str, list[Example]]:
    """Draw `sizes[split]` examples per split, cycling through `tasks` (default: `SHORT_ANSWER_TASKS`) so
    every split holds the same mix.

    Prompts are unique across all splits (a repeated draw is discarded), so no test prompt is seen in
    training. Splits are filled in the order given, from one stream seeded by `seed`.
    """
    names = list(tasks) if tasks is not None else list(SHORT_ANSWER_TASKS)
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise ValueError(f"tasks: unknown {unknown or 'empty list'}; choose from {sorted(TASKS)}")
    for split, size in sizes.items():
        if size < 0:
            raise ValueError(f"sizes[{split!r}]: expected a count >= 0, got {size}")
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    splits: dict[str, list[Example]] = {}
    for split, size in sizes.items():
        examples: list[Example] = []
        misses = 0
        while len(examples) < size:
            task = names[len(examples) % len(names)]
            example = TASKS[task](rng)
            if example.prompt_key in seen:
                misses += 1
                if misses > 10_000:  # this task's prompt space is (nearly) used up
                    raise ValueError(f"could not draw {size} distinct {split!r} prompts: task {task!r} "
                                     f"has run out of new prompts; ask for fewer examples")
                continue
            misses = 0
            seen.add(example.prompt_key)
            examples.append(example)
        splits[split] = examples
    return splits


def render_prompt(example: Example, template: str) -> str:
    """The prompt under a template with `{instruction}` and `{input}` placeholders."""
    return template.format(instruction=example.instruction, input=example.input)


def write_jsonl(examples: Sequence[Example], path: str | Path, template: str | None = None) -> Path:
    """Write examples one JSON object a line (`instruction`, `input`, `output`, `task`).

    With `template`, each line also stores its rendered `prompt`, which `dpkd.data` uses as is (MiniLLM's
    processed files do the same); without it, readers apply the Alpaca template.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for example in examples:
            row = asdict(example)
            if template is not None:
                row["prompt"] = render_prompt(example, template)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)  # never leave a half-written split behind an interrupted run
    return path


def write_splits(out_dir: str | Path, sizes: dict[str, int], seed: int = 0, tasks: Sequence[str] | None = None,
                 template: str | None = None) -> dict[str, Path]:
    """Generate the splits and write `<out_dir>/<split>.jsonl` for each; returns the paths."""
    splits = generate_splits(sizes, seed=seed, tasks=tasks)
    return {split: write_jsonl(examples, Path(out_dir) / f"{split}.jsonl", template)
            for split, examples in splits.items()}
