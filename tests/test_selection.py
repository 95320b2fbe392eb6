"""Checkpoint selection on dev (`dpkd.selection`, a study's `select_on_dev`): the kept weights are those of
the step that scored best among those scored, against the scores recorded."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from dpkd.selection import SELECTION_FILE, SelectOnDev, greedy_dev_scorer
from dpkd.study.recipe import dev_selection_steps
from dpkd.trainer import DistillationTrainer


class _Snapshots(TrainerCallback):
    """The model's weights after every optimizer step."""

    def __init__(self):
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights[state.global_step] = {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kept_weights_are_the_best_scored_steps_and_ties_keep_the_earliest(student_dir, tokenizer, make_config,
                                                                           make_dataset, tmp_path):
    scores = iter([10.0, 30.0, 20.0, 30.0])  # steps 1, 3, 5, 6: the best, 30, first at step 3
    select = SelectOnDev(lambda model: {"rougeL": next(scores), "exact_match": 0.0}, [1, 3, 5, 6],
                         tmp_path / SELECTION_FILE)
    snapshots = _Snapshots()
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), processing_class=tokenizer,
                                  train_dataset=make_dataset(n=24), callbacks=[snapshots, select],
                                  args=make_config(tmp_path, "sft", max_steps=6, save_strategy="no", learning_rate=1e-2))
    trainer.train()
    record = json.loads((tmp_path / SELECTION_FILE).read_text())
    assert [e["step"] for e in record["evaluated"]] == [1, 3, 5, 6]
    assert record["kept_step"] == 3 and record["metric"] == "rougeL"
    final = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert _same(final, snapshots.weights[3])
    assert not _same(snapshots.weights[3], snapshots.weights[6])  # selection changed what is saved


def test_a_study_run_saves_the_step_that_scored_best_on_dev(student_dir, make_config, training_jsonl, tmp_path):
    from dpkd.modeling import load_tokenizer
    from dpkd.study.build import DevSelection, train

    data = training_jsonl(24)
    out = tmp_path / "run"
    args = make_config(out, "sft", max_steps=6, save_strategy="no", learning_rate=3e-2, disable_tqdm=True)
    train(args, student_dir, data, out, select=DevSelection(data, (2, 4, 6), max_new_tokens=6, batch_size=8))
    record = json.loads((out / SELECTION_FILE).read_text())
    evaluated = {e["step"]: e for e in record["evaluated"]}
    assert sorted(evaluated) == [2, 4, 6]
    best = max(e["rougeL"] for e in evaluated.values())
    assert record["kept_step"] == min(step for step, e in evaluated.items() if e["rougeL"] == best)
    # The saved model is the kept one: scored again, it gets the score recorded for the kept step.
    score = greedy_dev_scorer(load_tokenizer(out), data, max_new_tokens=6, batch_size=8)
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        again = score(saved)
    assert again["rougeL"] == pytest.approx(evaluated[record["kept_step"]]["rougeL"])
    assert again["exact_match"] == pytest.approx(evaluated[record["kept_step"]]["exact_match"])


def test_training_that_ends_before_any_scored_step_is_an_error(student_dir, tokenizer, make_config, make_dataset,
                                                               tmp_path):
    select = SelectOnDev(lambda model: {"rougeL": 1.0}, [5])
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), processing_class=tokenizer,
                                  train_dataset=make_dataset(n=8), callbacks=[select],
                                  args=make_config(tmp_path, "sft", max_steps=2, save_strategy="no"))
    with pytest.raises(RuntimeError, match=r"select_on_dev: training ended at step 2 before .*\[5\]"):
        trainer.train()


@pytest.mark.parametrize("max_steps, evaluations, expected", [
    (100, 4, [25, 50, 75, 100]), (10, 3, [3, 7, 10]), (3, 4, [1, 2, 3]), (7, 1, [7])])
def test_dev_checks_are_evenly_spaced_and_include_the_last_step(max_steps, evaluations, expected):
    assert dev_selection_steps(max_steps, evaluations) == expected
