"""Sequence-level DPKD through the trainer: it learns what the teacher prefers, resumes exactly, and reads
the teacher's outputs from the cache instead of generating them again."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset, concatenate_datasets
from transformers import AutoModelForCausalLM, TrainerCallback

from dpkd.data import load_pretrain_chunks
from dpkd.generation import build_scoring_batch, completion_logps, left_pad
from dpkd.modeling import tiny_config
from dpkd.teacher_cache import TeacherOutputCache, model_fingerprint
from dpkd.trainer import DistillationTrainer

FIXED_CONTINUATION = " the answer"


@pytest.fixture
def make_trainer(student_dir, tokenizer, make_config, make_dataset):
    """`make_trainer(output_dir, teacher, method="dpkd", dataset=None, **config overrides)`: a trainer for
    the tiny student (`make_dataset()` when no dataset is given)."""
    def make(output_dir, teacher, method="dpkd", dataset=None, **overrides):
        return DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), teacher_model=teacher,
                                   args=make_config(output_dir, method, **overrides),
                                   train_dataset=make_dataset() if dataset is None else dataset,
                                   processing_class=tokenizer)
    return make


@pytest.fixture(scope="module")
def opinionated_teacher(model_pairs, tokenizer, tmp_path_factory, make_config, make_dataset):
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
        opinionated_teacher, tokenizer, tmp_path, make_trainer):
    runs = {}
    for name, lr in (("dpkd", 1e-2), ("control", 0.0)):
        trainer = make_trainer(tmp_path / name, AutoModelForCausalLM.from_pretrained(opinionated_teacher),
                               max_steps=30, learning_rate=lr, max_new_tokens=4, beta=0.5,
                               teacher_cache_dir=str(tmp_path / "cache"), save_strategy="no",
                               lr_scheduler_type="constant")
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
        device = next(model.parameters()).device
        with torch.no_grad():
            logps, counts = completion_logps(model.eval(), {key: value.to(device) for key, value in batch.items()})
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
def test_resumed_run_reaches_the_parameters_of_an_uninterrupted_one(method, extra, model_pairs, tokenizer, tmp_path,
                                                                   make_config, make_dataset, parameters):
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


def test_teacher_cache_is_reused_across_runs_and_methods_and_keyed_by_teacher_prompts_and_sampling(
        teacher_dir, tmp_path, make_trainer, make_dataset):
    """Two one-step runs share a cache; then trainers built (not trained) with one setting changed each
    must find none of the first run's outputs. That another key is a miss in the cache itself, and that
    other keys' entries leave the first ones intact, is `test_generation_cache.py`'s to show."""
    cache = str(tmp_path / "cache")
    first_prompts, other_prompts = make_dataset(n=4), make_dataset(n=4, seed=1)
    assert len(set(first_prompts["prompt"]) | set(other_prompts["prompt"])) == 8

    def trainer(name, *, teacher=None, method="dpkd", dataset=first_prompts, **overrides):
        teacher = teacher or AutoModelForCausalLM.from_pretrained(teacher_dir)
        return make_trainer(tmp_path / name, teacher, method=method, dataset=dataset, teacher_cache_dir=cache,
                            save_strategy="no", max_steps=1, **overrides)

    def cached(built) -> int:
        return sum(built.teacher_cache.get(list(p)) is not None for p in built.train_dataset["prompt_input_ids"])

    first = trainer("first")
    first.train()
    assert first.teacher_generations == 4  # one step over four distinct prompts
    # seqkd over the same cache, with two of the first run's prompts and two new ones.
    mixed = concatenate_datasets([first_prompts.select([0, 1]), other_prompts.select([0, 1])])
    seqkd = trainer("seqkd-same-teacher", method="seqkd", dataset=mixed)
    assert cached(seqkd) == 2
    seqkd.train()
    assert seqkd.teacher_generations == 2 and cached(seqkd) == 4

    assert cached(trainer("again")) == 4
    changed = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1e-3
    assert cached(trainer("other-teacher", teacher=changed)) == 0
    assert cached(trainer("other-max-new-tokens", max_new_tokens=6)) == 0
    assert cached(trainer("other-top-p", top_p=0.9)) == 0


def _gpt2_with_positions(tokenizer, n_positions: int, n_layer: int):
    torch.manual_seed(n_layer)
    config = tiny_config("gpt2", len(tokenizer), n_layer=n_layer, d_model=32, n_head=2, max_positions=n_positions,
                         eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config)


def test_dpkd_samples_within_the_models_positions_and_warns_once_per_model(tokenizer, tmp_path, make_config,
                                                                            make_dataset, caplog):
    """GPT-2s with 128 positions and the default max_new_tokens of 256: both models' samples end at
    128 − prompt width (no IndexError in the position embedding), with one warning for each model."""
    student, teacher = _gpt2_with_positions(tokenizer, 128, 1), _gpt2_with_positions(tokenizer, 128, 2)
    trainer = DistillationTrainer(model=student, teacher_model=teacher,
                                  args=make_config(tmp_path, "dpkd", max_new_tokens=256, save_strategy="no"),
                                  train_dataset=make_dataset(), processing_class=tokenizer)
    widths = []
    for name in ("sample_student", "teacher_samples"):
        method = getattr(trainer, name)

        def recorded(*args, method=method, name=name):
            ids, *rest = method(*args)
            widths.append((name, args[-2].shape[1], ids.shape[1]))
            return (ids, *rest)
        setattr(trainer, name, recorded)
    with caplog.at_level(logging.WARNING, logger="dpkd.generation"):
        trainer.train()
    assert {name for name, _, _ in widths} == {"sample_student", "teacher_samples"}
    assert all(prompt + completion <= 128 for _, prompt, completion in widths), widths
    assert any(prompt + completion == 128 for _, prompt, completion in widths), widths
    warnings = [r.getMessage() for r in caplog.records if r.name == "dpkd.generation" and "positions" in r.getMessage()]
    assert len(warnings) == 2, warnings  # one for the student, one for the teacher


def test_a_max_prompt_length_that_leaves_no_room_to_sample_is_refused_before_training(tokenizer, tmp_path,
                                                                                      make_config, make_dataset):
    student, teacher = _gpt2_with_positions(tokenizer, 128, 1), _gpt2_with_positions(tokenizer, 128, 2)
    with pytest.raises(ValueError, match=r"max_prompt_length=128 .* 128 positions"):
        DistillationTrainer(model=student, teacher_model=teacher,
                            args=make_config(tmp_path, "dpkd", max_prompt_length=128, max_length=160),
                            train_dataset=make_dataset(), processing_class=tokenizer)
