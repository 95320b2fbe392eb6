"""compute_metrics against hand-worked cases, written from MiniLLM's definitions (dpkd-method.md §5).

Expected ROUGE-L values come from the LCS definition, not from rouge-score: with the rouge-score
tokenizer (lower-case, every character outside [a-z0-9] becomes a space, Porter stem on words of 4+
letters), F1 = 2·P·R/(P+R) with P = LCS/|pred|, R = LCS/|ref|, which equals 2·LCS/(|pred| + |ref|).
"""

import math

import pytest

from dpkd.evaluation import (
    EvaluationError,
    compute_metrics,
    length_bucket,
    metrics_by_reference_length,
    normalize_answer,
    parse_seeds,
    summarize_seeds,
)


def lcs_f1(lcs: int, n_pred: int, n_ref: int) -> float:
    return 0.0 if lcs == 0 else 2 * lcs / (n_pred + n_ref)


# (prediction, references, exact match 0/1, ROUGE-L F1), each worked by hand in the comment.
CASES = [
    # Case and ASCII punctuation vanish under normalisation; rouge tokens [hello, world] both sides.
    ("Hello, World!", ["hello world"], 1, 1.0),
    # Articles are kept: "the cat sat" != "cat sat". Tokens 3 vs 2, LCS 2 -> 2*2/5.
    ("the cat sat", ["cat sat"], 0, lcs_f1(2, 3, 2)),
    # Whitespace collapses for exact match; rouge ignores it.
    ("  blue \n\t sky ", ["blue sky"], 1, 1.0),
    # Non-ASCII letters: exact match keeps "é" (no match); rouge drops it: [caf, au, lait] vs [cafe, au, lait].
    ("Café au lait", ["cafe au lait"], 0, lcs_f1(2, 3, 3)),
    # Non-ASCII only: normalised strings are equal; rouge sees no tokens at all -> 0.
    ("日本語", ["日本語"], 1, 0.0),
    # Mixed script: rouge keeps only [text] on both sides; exact match sees the Japanese.
    ("日本語 text", ["text"], 0, 1.0),
    # Curly quotes are not ASCII punctuation, so exact match fails; rouge tokens [yes] both sides.
    ("“yes”", ["yes"], 0, 1.0),
    # Empty prediction.
    ("", ["something to say"], 0, 0.0),
    # Empty reference.
    ("something to say", [""], 0, 0.0),
    # Punctuation only against an empty reference: both normalise to "".
    ("!!!", [""], 1, 0.0),
    # Several references: max over them. "Blue sky." normalises to the prediction; rouge 1.0 there.
    ("blue sky", ["red car", "the blue sky", "Blue sky."], 1, 1.0),
    # Max over references: [a, blue, bird, in, the, sky] shares LCS 2 with [blue, sky] -> 2*2/8; "red car" 0.
    ("blue sky", ["red car", "a blue bird in the sky"], 0, lcs_f1(2, 2, 6)),
    # Stemming: running -> run, runs -> run.
    ("running", ["runs"], 0, 1.0),
    # "cats" -> "cat"; "cat" has 3 letters and is not stemmed, but is already "cat".
    ("two cats", ["two cat"], 0, 1.0),
]


def test_normalization_lowercases_strips_ascii_punctuation_and_collapses_spaces():
    assert normalize_answer("  The  Cat's (hat)!\n") == "the cats hat"
    assert normalize_answer("a an the") == "a an the"
    assert normalize_answer("Ünï—cödé") == "ünï—cödé"


@pytest.mark.parametrize("prediction, references, exact, rouge", CASES)
def test_each_hand_worked_case(prediction, references, exact, rouge):
    metrics = compute_metrics([prediction], [references])
    assert metrics["exact_match"] == pytest.approx(100.0 * exact)
    assert metrics["rougeL"] == pytest.approx(100.0 * rouge)


def test_corpus_metrics_are_the_mean_of_the_cases_times_100():
    metrics = compute_metrics([c[0] for c in CASES], [c[1] for c in CASES])
    assert metrics["exact_match"] == pytest.approx(100.0 * sum(c[2] for c in CASES) / len(CASES))
    assert metrics["rougeL"] == pytest.approx(100.0 * sum(c[3] for c in CASES) / len(CASES))


def test_long_texts_score_by_longest_common_subsequence():
    reference = " ".join(str(i) for i in range(1, 300))                   # 299 tokens: 1 .. 299
    prediction = " ".join(str(i) for i in range(2, 300, 2)) + " xyz" * 50  # 149 evens, then 50 others
    metrics = compute_metrics([prediction], [[reference]])
    # The 149 even numbers are a subsequence of the reference; "xyz" appears nowhere in it.
    assert metrics["rougeL"] == pytest.approx(100.0 * lcs_f1(149, 199, 299))
    assert metrics["exact_match"] == 0.0
    assert compute_metrics([reference], [[reference]]) == {"exact_match": 100.0, "rougeL": 100.0}


def test_bad_inputs_are_refused_with_a_message():
    with pytest.raises(EvaluationError, match="2 predictions but 1"):
        compute_metrics(["a", "b"], [["a"]])
    with pytest.raises(EvaluationError, match=r"references\[0\]"):
        compute_metrics(["a"], ["a"])
    with pytest.raises(EvaluationError, match="no predictions"):
        compute_metrics([], [])


def test_length_buckets_are_half_open_word_counts():
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    assert [length_bucket(words(n)) for n in (0, 29, 30, 69, 70, 500)] == [
        "0-30", "0-30", "30-70", "30-70", "70+", "70+"]


def test_breakdown_by_reference_length_scores_each_bucket_alone():
    short, long_ = "a b c", " ".join(["word"] * 80)
    by_length = metrics_by_reference_length(["a b c", "nothing"], [[short], [long_]])
    assert by_length["0-30"] == {"n": 1, "exact_match": 100.0, "rougeL": 100.0}
    assert by_length["30-70"] == {"n": 0, "exact_match": None, "rougeL": None}
    assert by_length["70+"]["n"] == 1 and by_length["70+"]["exact_match"] == 0.0


def test_seed_summary_is_mean_and_population_std_leaf_by_leaf():
    per_seed = [{"rougeL": 10.0, "by": {"x": 1.0, "empty": None}}, {"rougeL": 20.0, "by": {"x": 3.0, "empty": None}}]
    summary = summarize_seeds(per_seed)
    assert summary["rougeL"] == {"mean": 15.0, "std": 5.0}
    assert summary["by"]["x"]["mean"] == 2.0 and math.isclose(summary["by"]["x"]["std"], 1.0)
    assert summary["by"]["empty"] == {"mean": None, "std": None}


def test_seeds_must_be_integers():
    assert parse_seeds("10, 20,30") == [10, 20, 30]
    with pytest.raises(EvaluationError, match="--seeds: 'ten' is not an integer"):
        parse_seeds("10,ten")
    with pytest.raises(EvaluationError, match="repeats"):
        parse_seeds("10,10")
