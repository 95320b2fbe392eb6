"""DPKD as the paper and its released code train it (issue 11): dropout off, k student samples per prompt, the
CE term on the teacher's samples, and the pre-training term's KD half; each held to a hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

from dpkd.recipe import load_recipe
from dpkd.run_folder import run_settings
from dpkd.trainer import DistillationTrainer

PAPER_RECIPE = Path(__file__).resolve().parents[1] / "src" / "dpkd" / "configs" / "dpkd_paper.yaml"
PROTOCOL_FIELDS = ("disable_dropout", "num_student_samples", "sft_target", "pretrain_kd_ratio")


# ----------------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_a_student_identical_to_its_teacher_gets_zero_rewards_and_loss_log2_only_with_dropout_off(
        model_pairs, tokenizer, make_config, make_dataset, tmp_path, disable_dropout):
    gpt2 = model_pairs["gpt2"][0]
    teacher, student = (AutoModelForCausalLM.from_pretrained(gpt2) for _ in range(2))
    assert student.config.resid_pdrop == 0.1  # the tiny GPT-2 keeps GPT-2's dropout
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tokenizer,
                                  args=make_config(tmp_path, "dpkd", max_steps=1, save_strategy="no",
                                                   disable_dropout=disable_dropout),
                                  train_dataset=make_dataset(n=8))
    trainer.train()
    first = next(e for e in trainer.state.log_history if "rewards/chosen" in e)  # step 1, before any update
    rewards = [first[k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")]
    if disable_dropout:
        assert rewards == [0.0, 0.0, 0.0]
        assert first["loss/distill"] == pytest.approx(math.log(2), abs=1e-7)
        assert not any(isinstance(m, torch.nn.Dropout) and m.p for m in trainer.model.modules())
        assert trainer.model.config.resid_pdrop == 0.1  # the saved config keeps the user's dropout
    else:
        assert all(abs(r) > 1e-5 for r in rewards[:2])
        assert first["loss/distill"] != pytest.approx(math.log(2), abs=1e-7)
    record = json.loads((tmp_path / "dpkd_run.json").read_text())
    assert record["disable_dropout"] is disable_dropout
    assert {"num_student_samples", "sft_target", "pretrain_kd_ratio"} <= set(record)


# ----------------------------------------------------------------------------------------------------
# k student samples, and CE on the teacher's samples: one step against a float64 hand computation


def _stub_sampler(trainer, vocab_size: int):
    """Replace the student's sampler by one returning fixed, varied-length completions; record its calls."""
    calls = []

    def sample(student, prompts, prompt_mask):
        calls.append((prompts.clone(), prompt_mask.clone()))
        generator = torch.Generator().manual_seed(7)
        n, width = prompts.shape[0], 5
        ids = torch.randint(10, vocab_size, (n, width), generator=generator)
        lengths = torch.arange(n) % width + 1
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        return ids.masked_fill(mask == 0, trainer.pad_token_id), mask

    trainer.sample_student = sample
    return calls


def _logp64(model, prompt: list[int], completion: list[int]) -> float:
    """Σ log p(completion | prompt) by a plain forward of the unpadded sequence, log-softmax in float64."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
    return float(F.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).sum())


def _one_step(teacher_dir, student_dir, tokenizer, make_config, make_dataset, tmp_path, **overrides):
    student, teacher = AutoModelForCausalLM.from_pretrained(student_dir), AutoModelForCausalLM.from_pretrained(teacher_dir)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tokenizer,
                                  args=make_config(tmp_path, "dpkd", beta=0.5, **overrides),
                                  train_dataset=make_dataset(n=4))
    calls = _stub_sampler(trainer, len(tokenizer))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return trainer, calls, inputs, float(loss.detach()), logged


def _hand_terms(trainer, calls, inputs, k: int):
    """(mean over the k·B pairs of −log σ(β(ρ_t/|y_t| − ρ_s/|y_s|)), CE on y_t), from plain float64 scoring."""
    student, teacher = trainer.model.eval(), trainer.accelerator.unwrap_model(trainer.teacher_model)
    beta = trainer.args.beta
    sampled_ids, sampled_mask = trainer.sample_student(None, *calls[0])  # the stub is deterministic
    calls.pop()
    prompts = [row[m.bool()].tolist() for row, m in zip(inputs["prompt_input_ids"], inputs["prompt_attention_mask"])]
    pair_losses, ce_sum, ce_count = [], 0.0, 0
    for j, prompt in enumerate(prompts):
        y_t = list(trainer.teacher_cache.get(prompt).completion_ids)
        rho_t = (_logp64(student, prompt, y_t) - _logp64(teacher, prompt, y_t)) / len(y_t)
        ce_sum -= _logp64(student, prompt, y_t)
        ce_count += len(y_t)
        for i in range(j * k, j * k + k):
            y_s = sampled_ids[i][sampled_mask[i].bool()].tolist()
            rho_s = (_logp64(student, prompt, y_s) - _logp64(teacher, prompt, y_s)) / len(y_s)
            pair_losses.append(-math.log(1 / (1 + math.exp(-beta * (rho_t - rho_s)))))
    assert max(pair_losses) - min(pair_losses) > 1e-3  # so that their mean is not any one pair's loss
    return sum(pair_losses) / len(pair_losses), ce_sum / ce_count


def test_k_student_samples_per_prompt_give_the_mean_of_the_k_pairwise_losses(
        teacher_dir, student_dir, tokenizer, make_config, make_dataset, tmp_path):
    k = 3
    trainer, calls, inputs, loss, logged = _one_step(teacher_dir, student_dir, tokenizer, make_config,
                                                     make_dataset, tmp_path, num_student_samples=k)
    prompts, prompt_mask = inputs["prompt_input_ids"], inputs["prompt_attention_mask"]
    assert len(calls) == 1  # the k draws are one batched sampling call over the k·B repeated prompts
    assert torch.equal(calls[0][0], prompts.repeat_interleave(k, 0))
    assert torch.equal(calls[0][1], prompt_mask.repeat_interleave(k, 0))
    expected, _ = _hand_terms(trainer, calls, inputs, k)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert logged["loss/distill"] == pytest.approx(expected, rel=1e-5)


def test_sft_target_teacher_trains_the_ce_term_on_the_teachers_samples(
        teacher_dir, student_dir, tokenizer, make_config, make_dataset, tmp_path):
    trainer, calls, inputs, loss, logged = _one_step(teacher_dir, student_dir, tokenizer, make_config,
                                                     make_dataset, tmp_path, num_student_samples=2,
                                                     kd_ratio=0.5, sft_target="teacher")
    distill, ce = _hand_terms(trainer, calls, inputs, 2)
    assert logged["loss/ce"] == pytest.approx(ce, rel=1e-5)
    assert loss == pytest.approx(0.5 * distill + 0.5 * ce, rel=1e-5)


def test_seqkd_with_sft_target_teacher_trains_its_ce_on_the_same_teacher_samples(
        teacher_dir, student_dir, tokenizer, make_config, make_dataset, tmp_path):
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), processing_class=tokenizer,
                                  teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir),
                                  args=make_config(tmp_path, "seqkd", kd_ratio=0.5, sft_target="teacher"),
                                  train_dataset=make_dataset(n=4))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["loss/ce"] == logged["loss/distill"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert trainer.teacher_generations == 4  # y_t generated once, for both terms


# ----------------------------------------------------------------------------------------------------
# The pre-training term


def test_pretrain_kd_ratio_mixes_ce_and_the_teachers_soft_cross_entropy_on_the_chunks(
        teacher_dir, student_dir, tokenizer, make_config, make_dataset, tmp_path):
    r = 0.5
    chunks = Dataset.from_dict({"input_ids": torch.randint(10, len(tokenizer), (4, 12),
                                                           generator=torch.Generator().manual_seed(3)).tolist()})
    student, teacher = AutoModelForCausalLM.from_pretrained(student_dir), AutoModelForCausalLM.from_pretrained(teacher_dir)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, processing_class=tokenizer,
                                  args=make_config(tmp_path, "kd", pretrain_kd_ratio=r, lm_coef=0.5),
                                  train_dataset=make_dataset(n=4), pretrain_dataset=chunks)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch = trainer._pretrain_batch()
    trainer.model.train()
    trainer.compute_loss(trainer.model, inputs)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    with torch.no_grad():
        log_q = F.log_softmax(student(**batch).logits[:, :-1].double(), -1)
        log_p = F.log_softmax(teacher(**batch).logits[:, :-1].double(), -1)
    targets = batch["input_ids"][:, 1:]
    ce = -log_q.gather(-1, targets[..., None]).mean().item()
    soft_ce = -(log_p.exp() * log_q).sum(-1).mean().item()
    assert logged["loss/pt_ce"] == pytest.approx(ce, rel=1e-5)
    assert logged["loss/pt_kd"] == pytest.approx(soft_ce, rel=1e-5)
    assert logged["loss/pt"] == pytest.approx((1 - r) * ce + r * soft_ce, rel=1e-5)


def test_the_released_codes_mixture_trains_end_to_end(teacher_dir, student_dir, tokenizer, make_config,
                                                       make_dataset, tmp_path, parameters):
    chunks = Dataset.from_dict({"input_ids": torch.randint(10, len(tokenizer), (8, 12),
                                                           generator=torch.Generator().manual_seed(3)).tolist()})
    trainer = DistillationTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir), processing_class=tokenizer,
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir), train_dataset=make_dataset(n=8),
        pretrain_dataset=chunks, args=make_config(tmp_path, "dpkd", kd_ratio=0.5, sft_target="teacher",
                                                  pretrain_kd_ratio=0.5, num_student_samples=2, save_strategy="no"))
    before = parameters(trainer.model)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss/pt_kd" in e]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) and e["loss/ce"] > 0 for e in logs)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


# ----------------------------------------------------------------------------------------------------
# Configuration, records, the recipe


@pytest.mark.parametrize("settings, message", [
    (dict(method="dpkd", num_student_samples=0), "num_student_samples: must be in [1, inf)"),
    (dict(method="dpkd", num_student_samples=1.5), "num_student_samples: expected a whole number"),
    (dict(method="dpkd", sft_target="teachers"), "sft_target: expected one of dataset, teacher"),
    (dict(method="kd", sft_target="teacher"), "method 'kd' does not"),
    (dict(method="sft", sft_target="teacher"), "method 'sft' does not"),
    (dict(method="dpkd", pretrain_kd_ratio=1.5), "pretrain_kd_ratio: must be in [0, 1]"),
    (dict(method="sft", pretrain_kd_ratio=0.5), "pretrain_kd_ratio: must be 0 for method 'sft'"),
])
def test_protocol_fields_refuse_values_out_of_range_naming_the_field(make_config, tmp_path, settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        make_config(tmp_path, **settings)


def test_protocol_fields_are_part_of_the_run_settings_record():
    recipe = load_recipe(PAPER_RECIPE)
    settings = run_settings(recipe)
    assert {name: settings[name] for name in PROTOCOL_FIELDS} == {
        "disable_dropout": True, "num_student_samples": 1, "sft_target": "teacher", "pretrain_kd_ratio": 0.5}
    assert recipe.config.kd_ratio == 0.5 and recipe.config.beta == 0.1
    first_line = PAPER_RECIPE.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# ") and "released code" in first_line


# ----------------------------------------------------------------------------------------------------
# Scoring y_t and y_s in groups under activation checkpointing


@pytest.mark.parametrize("group_size", [None, 1, 3])
def test_scoring_in_groups_gives_the_one_pass_loss_and_gradients_one_group_forward_at_a_time(
        teacher_dir, student_dir, tokenizer, make_config, make_dataset, tmp_path, group_size):
    def step(size):
        trainer, _, _, loss, _ = _one_step(teacher_dir, student_dir, tokenizer, make_config, make_dataset,
                                           tmp_path / str(size), num_student_samples=2,
                                           preference_micro_batch_size=size)
        return trainer, loss

    reference, reference_loss = step(0)
    # compute_loss was run without backward in _one_step: redo it with one, counting student forwards.
    def gradients(trainer):
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        rows = []
        hook = trainer.model.model.register_forward_hook(lambda module, args, kwargs, out: rows.append(
            kwargs["input_ids"].shape[0]) if torch.is_grad_enabled() else None, with_kwargs=True)
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, inputs).backward()
        hook.remove()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}, rows

    expected, reference_rows = gradients(reference)
    grouped, loss = step(group_size)
    got, rows = gradients(grouped)
    assert loss == pytest.approx(reference_loss, rel=1e-6)
    assert got.keys() == expected.keys() and len(expected) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    total = 4 + 2 * 4  # B y_t and k·B y_s
    assert reference_rows == [total]
    size = 4 if group_size is None else group_size  # None: the per-device batch, 4 prompts
    groups = [min(size, total - start) for start in range(0, total, size)]
    # each group forward once with the loss, then again, alone, in the backward pass
    assert sorted(rows) == sorted(groups * 2) and rows[:len(groups)] == groups


def test_preference_micro_batch_size_must_be_a_whole_number_or_null(make_config, tmp_path):
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(ValueError, match="preference_micro_batch_size: expected a whole number"):
            make_config(tmp_path, "dpkd", preference_micro_batch_size=bad)
    assert make_config(tmp_path, "dpkd", preference_micro_batch_size=8.0).preference_micro_batch_size == 8
