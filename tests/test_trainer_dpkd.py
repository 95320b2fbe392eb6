"""Sequence-level DPKD through the trainer: it learns what the teacher prefers, resumes exactly, and reads
the teacher's outputs from the cache instead of generating them again."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from test_trainer import make_config, make_dataset, parameters
from transformers import AutoModelForCausalLM, TrainerCallback

from dpkd.data import load_pretrain_chunks
from dpkd.generation import (
    TeacherOutputCache,
    build_scoring_batch,
    completion_logps,
    left_pad,
    model_fingerprint,
)
from dpkd.trainer import DistillationTrainer

FIXED_CONTINUATION = " the answer"


def _trainer(tmp_path, student_dir, teacher, tokenizer, method="dpkd", dataset=None, **overrides):
    args = make_config(tmp_path, method, **overrides)
    return DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), teacher_model=teacher,
                               args=args, train_dataset=make_dataset() if dataset is None else dataset,
                               processing_class=tokenizer)


@pytest.fixture(scope="module")
def opinionated_teacher(model_pairs, tokenizer, tmp_path_factory):
    """The tiny teacher after a few SFT steps (the trainer's own `sft`) on one fixed continuation."""
    teacher_dir, _ = model_pairs["llama"]
    prompts = make_dataset(n=16)["prompt"]
    fixed = Dataset.from_dict({"prompt": prompts, "completion": [FIXED_CONTINUATION] * len(prompts)})
    out = tmp_path_factory.mktemp("opinionated-teacher")
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(teacher_dir),
                                  args=make_config(out, "sft", max_steps=20, learning_rate=1e-2, save_strategy="no"),
                                  train_dataset=fixed, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    return out


@pytest.mark.slow
def test_dpkd_raises_the_students_log_prob_of_teacher_outputs_and_preference_accuracy(
        opinionated_teacher, student_dir, tokenizer, tmp_path):
    runs = {}
    for name, lr in (("dpkd", 1e-2), ("control", 0.0)):
        trainer = _trainer(tmp_path / name, student_dir, AutoModelForCausalLM.from_pretrained(opinionated_teacher),
                           tokenizer, max_steps=30, learning_rate=lr, max_new_tokens=4, beta=0.5,
                           teacher_cache_dir=str(tmp_path / "cache"), save_strategy="no", lr_scheduler_type="constant")
        trainer.train()
        last = [e for e in trainer.state.log_history if "rewards/accuracies" in e][-10:]
        runs[name] = (trainer, sum(e["rewards/accuracies"] for e in last) / len(last),
                      sum(e["rewards/margins"] for e in last) / len(last))
    # The teacher's own outputs, read back from the cache both runs shared.
    trainer = runs["dpkd"][0]
    cache = TeacherOutputCache(tmp_path / "cache", teacher_id=model_fingerprint(
        AutoModelForCausalLM.from_pretrained(opinionated_teacher)), sampling=trainer.args.sampling())
    prompts = [list(p) for p in trainer.train_dataset["prompt_input_ids"]]
    outputs = [list(cache.get(p).completion_ids) for p in prompts]
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    width = max(len(o) for o in outputs)
    completion_ids = torch.tensor([o + [tokenizer.pad_token_id] * (width - len(o)) for o in outputs])
    completion_mask = torch.tensor([[1] * len(o) + [0] * (width - len(o)) for o in outputs])
    batch = build_scoring_batch(prompt_ids, prompt_mask, completion_ids, completion_mask)

    def mean_token_logp(model):
        with torch.no_grad():
            logps, counts = completion_logps(model.eval(), batch)
        return (logps / counts).mean().item()

    trained, control = mean_token_logp(runs["dpkd"][0].model), mean_token_logp(runs["control"][0].model)
    fixed_ids = tokenizer(FIXED_CONTINUATION)["input_ids"] + [tokenizer.eos_token_id]
    assert sum(o == fixed_ids for o in outputs) >= 12, "the teacher should mostly produce its fixed continuation"
    assert trained > control + 1.0, (trained, control)
    (_, accuracy, margin), (_, control_accuracy, control_margin) = runs["dpkd"], runs["control"]
    assert accuracy > control_accuracy, (accuracy, control_accuracy)
    assert margin > control_margin + 2.0, (margin, control_margin)


class _StopAt(TrainerCallback):
    """Ends training after `step` optimizer steps, as a killed job would (its last checkpoint survives)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("method, extra", [("dpkd", {"lm_coef": 0.5, "kd_ratio": 0.5}),
                                           ("jsd", {"lmbda": 0.5})])
def test_resumed_run_reaches_the_parameters_of_an_uninterrupted_one(method, extra, model_pairs, tokenizer, tmp_path):
    """dpkd with a pre-training term and CE (student samples, cached teacher outputs, the pre-training
    stream), and jsd with on-policy batches (GKD's coin): everything random must continue where it was."""
    teacher_dir, student_dir = model_pairs["llama"]
    pretrain = load_pretrain_chunks(Dataset.from_dict({"text": make_dataset(n=40, seed=5)["completion"]}),
                                    tokenizer, seq_length=16)

    def run(out, stop_at=None, resume=None):
        args = make_config(out, method, max_steps=4, save_steps=2, **extra)
        trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                                      teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir), args=args,
                                      train_dataset=make_dataset(), processing_class=tokenizer,
                                      pretrain_dataset=pretrain if method == "dpkd" else None,
                                      callbacks=[_StopAt(stop_at)] if stop_at else None)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    uninterrupted = run(tmp_path / "whole")
    interrupted = run(tmp_path / "parts", stop_at=2)
    assert interrupted.state.global_step == 2
    resumed = run(tmp_path / "parts", resume=str(tmp_path / "parts" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    expected = parameters(uninterrupted.model)
    assert any(not torch.equal(expected[n], p) for n, p in parameters(interrupted.model).items())
    for name, value in parameters(resumed.model).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (uninterrupted, resumed)]
    assert losses[1][-2:] == pytest.approx(losses[0][2:], rel=1e-5)


def test_teacher_cache_is_reused_across_runs_and_invalidated_by_teacher_prompts_or_sampling(
        model_pairs, tokenizer, tmp_path):
    teacher_dir, student_dir = model_pairs["llama"]
    cache = str(tmp_path / "cache")

    def generations(name, *, teacher=None, method="dpkd", dataset=None, **overrides):
        teacher = teacher or AutoModelForCausalLM.from_pretrained(teacher_dir)
        trainer = _trainer(tmp_path / name, student_dir, teacher, tokenizer, method=method, dataset=dataset,
                           teacher_cache_dir=cache, save_strategy="no", max_steps=1, **overrides)
        trainer.train()
        return trainer.teacher_generations

    assert generations("first") == 4  # one step of four distinct prompts
    assert generations("again") == 0
    assert generations("seqkd-same-teacher", method="seqkd") == 0
    assert generations("other-sampling", max_new_tokens=6) == 4
    assert generations("other-top-p", top_p=0.9) == 4
    changed = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1e-3
    assert generations("other-teacher", teacher=changed) == 4
    assert generations("other-prompts", dataset=make_dataset(seed=1)) == 4
    assert generations("again-at-the-end") == 0
