"""Mixed precision holds: with `bf16=True` every forward of the student and the teacher in a training step
(loss terms, sampling, the teacher's scoring) runs under bf16 autocast, so their matmuls give bfloat16; with
it off everything is float32. bf16 autocast works on the CPU, so this runs anywhere."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpkd.trainer import DistillationTrainer


def _record_activation_dtypes(model, role: str, seen: dict[str, list[tuple]]):
    """Hook the first decoder block's MLP; record under `role`, for every call, its output dtype, the tokens
    in the forward and what kind of forward it is: a loss term's (gradient on), the frozen teacher's scoring
    (inference mode) or a sampling step (neither)."""
    def hook(module, inputs, output):
        kind = ("loss" if torch.is_grad_enabled() else "scoring" if torch.is_inference_mode_enabled()
                else "sampling")
        seen[role].append((output.dtype, inputs[0].shape[1], kind))

    return model.model.layers[0].mlp.register_forward_hook(hook)


def _train_two_steps(method, bf16, model_pairs, tokenizer, tmp_path, make_config, make_dataset):
    teacher_dir, student_dir = model_pairs["llama"]
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    seen: dict[str, list[tuple]] = defaultdict(list)
    hooks = [_record_activation_dtypes(student, "student", seen), _record_activation_dtypes(teacher, "teacher", seen)]
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_config(tmp_path, method, bf16=bf16),
                                  train_dataset=make_dataset(), processing_class=tokenizer)
    trainer.train()
    for handle in hooks:
        handle.remove()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss/distill"]) for entry in logged)
    return seen


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("method", ["jsd", "dpkd"])
def test_bf16_runs_every_student_and_teacher_forward_of_a_training_step_in_bfloat16(
        method, bf16, model_pairs, tokenizer, tmp_path, make_config, make_dataset):
    seen = _train_two_steps(method, bf16, model_pairs, tokenizer, tmp_path, make_config, make_dataset)
    expected = torch.bfloat16 if bf16 else torch.float32
    for role in ("student", "teacher"):
        dtypes = {dtype for dtype, _, _ in seen[role]}
        assert dtypes == {expected}, f"{role}: {dtypes}"
    kinds = {role: {kind for _, _, kind in seen[role]} for role in seen}
    assert "loss" in kinds["student"]
    assert "scoring" in kinds["teacher"]  # jsd: the teacher at the labelled positions; dpkd: log p(y_s), log p(y_t)
    if method == "dpkd":  # both models sampled (the teacher cache starts cold), one token per decode step
        for role in ("student", "teacher"):
            assert any(kind == "sampling" and tokens == 1 for _, tokens, kind in seen[role]), role
