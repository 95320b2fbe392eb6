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
