"""The distillation trainer end to end on the tiny models: every method trains, saves and reloads, and the
losses it logs equal references computed here from the models' full logits."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from dpkd.config import METHODS, DistillationConfig
from dpkd.data import DistillationCollator, tokenize_dataset
from dpkd.trainer import DistillationTrainer

# Each method as the paper (§4 baselines, Eq. 9) and the released code define it, written out here rather
# than read from `METHODS`: (family, token loss, default kd_ratio, what the token loss reads from the config
# when temperature=2, skew_alpha=0.2, beta=0.4 (0.3 for jsd, where beta is the JSD β), label_smoothing=0.05, dpkd_loss_type="ipo",
# dpop_lambda=7).
PAPER_METHODS = {
    "sft": ("supervised", None, 0.0, {}),
    "kd": ("teacher_forced", "kd", 0.5, {"temperature": 2.0}),  # 0.5·CE + 0.5·(−Σ p log q)
    "seqkd": ("teacher_samples", None, 1.0, {}),
    "rkl": ("teacher_forced", "rkl", 1.0, {"temperature": 2.0}),
    "jsd": ("teacher_forced", "jsd", 1.0, {"beta": 0.3, "temperature": 2.0}),
    "skl": ("teacher_forced", "skl", 1.0, {"alpha": 0.2, "temperature": 2.0}),
    "srkl": ("teacher_forced", "srkl", 1.0, {"alpha": 0.2, "temperature": 2.0}),
    "tvd": ("teacher_forced", "tvd", 1.0, {"temperature": 2.0}),
    "dpkd_token": ("teacher_forced", "dpkd_token", 1.0,
                   {"beta": 0.4, "label_smoothing": 0.05, "loss_type": "ipo", "dpop_lambda": 7.0}),
    "dpkd": ("preference", None, 1.0, {}),
}


def test_method_table_matches_the_paper_and_the_released_code(make_config, tmp_path):
    assert list(METHODS) == list(PAPER_METHODS)
    settings = dict(temperature=2.0, skew_alpha=0.2, label_smoothing=0.05, dpkd_loss_type="ipo", dpop_lambda=7.0)
    for method, (family, token_loss, kd_ratio, options) in PAPER_METHODS.items():
        args = make_config(tmp_path, method, beta=0.3 if method == "jsd" else 0.4, **settings)
        spec = METHODS[method]
        assert (spec.family.name, spec.token_loss, spec.kd_ratio) == (family, token_loss, kd_ratio), method
        assert spec.loss_options(args) == options, method
        assert spec.needs_teacher == (family != "supervised"), method


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_a_few_steps_and_saves_a_loadable_model(method, model_pairs, tokenizer, tmp_path,
                                                                    make_config, make_dataset, parameters):
    teacher_dir, student_dir = model_pairs["llama"]
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    teacher = None if method == "sft" else AutoModelForCausalLM.from_pretrained(teacher_dir)
    before = parameters(student)
    teacher_before = parameters(teacher) if teacher is not None else {}
    out = tmp_path / method
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=make_config(out, method),
                                  train_dataset=make_dataset(), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()

    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all(math.isfinite(entry["loss"]) for entry in logged)
    assert all(math.isfinite(entry["loss/distill" if method != "sft" else "loss/ce"]) for entry in logged)
    after = parameters(trainer.model)
    assert any(not torch.equal(before[name], after[name]) for name in before), "no parameter moved"
    if teacher is not None:  # the teacher is frozen
        assert all(torch.equal(teacher_before[n], p) for n, p in parameters(trainer.teacher_model).items())

    for directory in (out, out / "checkpoint-2"):
        reloaded = AutoModelForCausalLM.from_pretrained(directory)
        for name, value in parameters(reloaded).items():
            torch.testing.assert_close(value, after[name], rtol=0, atol=0)
    run = json.loads((out / "dpkd_run.json").read_text())
    assert run["method"] == method and run["student"] == str(student_dir)
    assert run["teacher"] == (None if method == "sft" else str(teacher_dir))
    assert (out / "trainer_state.json").is_file()


def test_sft_loss_is_the_models_own_cross_entropy(student_dir, tokenizer, tmp_path, make_config, make_dataset):
    """Reference: transformers' own shifted cross-entropy on the same (only) batch, before the first update."""
    dataset = make_dataset(n=4)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    reference_model = AutoModelForCausalLM.from_pretrained(student_dir)
    trainer = DistillationTrainer(model=student, args=make_config(tmp_path, "sft", max_steps=1, save_strategy="no"),
                                  train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    batch = _whole_dataset_batch(dataset, tokenizer)
    with torch.no_grad():
        expected = reference_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   labels=batch["labels"]).loss
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("method, kd_ratio", [("kd", None), ("rkl", 0.3), ("jsd", 1.0), ("tvd", 0.5)])
def test_teacher_forced_loss_equals_a_float64_reference_from_full_logits(method, kd_ratio, model_pairs, tokenizer,
                                                                         tmp_path, make_config, make_dataset):
    """The trainer projects only labelled positions; the reference builds every logit and masks afterwards.
    The heads are scaled up so that the random models' distributions are far from uniform and from each
    other: a position off by one or a swapped argument then changes the loss by far more than the tolerance."""
    teacher_dir, student_dir = model_pairs["llama"]
    student, teacher = (_peaked(AutoModelForCausalLM.from_pretrained(d)) for d in (student_dir, teacher_dir))
    reference_student, reference_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    dataset = make_dataset(n=4)
    args = make_config(tmp_path, method, max_steps=1, save_strategy="no", kd_ratio=kd_ratio, temperature=2.0,
                       **({"beta": 0.3} if method == "jsd" else {}))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                  processing_class=tokenizer)
    trainer.train()

    batch = _whole_dataset_batch(dataset, tokenizer)
    with torch.no_grad():
        student_logits = reference_student(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits.double()
        teacher_logits = reference_teacher(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits.double()
    valid = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][valid]
    s, t = student_logits[:, :-1][valid], teacher_logits[:, :-1][valid]
    log_q, log_p = (s / 2.0).log_softmax(-1), (t / 2.0).log_softmax(-1)
    q, p = log_q.exp(), log_p.exp()
    if method == "kd":
        per_token = -(p * log_q).sum(-1)
    elif method == "rkl":
        per_token = (q * (log_q - log_p)).sum(-1)
    elif method == "jsd":  # GKD/TRL: m = β p + (1 − β) q, JSD = β KL(p || m) + (1 − β) KL(q || m), β = 0.3
        m = 0.3 * p + 0.7 * q
        per_token = 0.3 * (p * (log_p - m.log())).sum(-1) + 0.7 * (q * (log_q - m.log())).sum(-1)
    else:
        per_token = 0.5 * (p - q).abs().sum(-1)
    distill = per_token.mean().item()
    ce = -s.log_softmax(-1).gather(-1, targets[:, None]).mean().item()
    ratio = PAPER_METHODS[method][2] if kd_ratio is None else kd_ratio
    logged = trainer.state.log_history[0]
    assert logged["loss/distill"] == pytest.approx(distill, rel=1e-4, abs=1e-7)
    assert logged["loss"] == pytest.approx(ratio * distill + (1 - ratio) * ce, rel=1e-4, abs=1e-7)
    if ratio < 1:
        assert logged["loss/ce"] == pytest.approx(ce, rel=1e-5)


def test_gradient_accumulation_gives_the_same_step_as_one_big_batch(model_pairs, tokenizer, tmp_path, make_config,
                                                                     make_dataset, parameters):
    """Token losses are normalised over the whole optimizer step, not per micro-batch (SGD, so that the
    update is proportional to the gradient)."""
    teacher_dir, student_dir = model_pairs["llama"]
    dataset = make_dataset(n=4)
    results = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        args = make_config(tmp_path / f"ga{accumulation}", "kd", max_steps=1, save_strategy="no",
                           per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                           learning_rate=1.0, optim="sgd", max_grad_norm=0.0)
        trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                                      teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir), args=args,
                                      train_dataset=dataset, processing_class=tokenizer)
        trainer.train()
        results.append(parameters(trainer.model))
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6)


def test_chunked_losses_above_the_vocabulary_threshold_match_the_dense_path(model_pairs, tokenizer, tmp_path,
                                                                             make_config, make_dataset, parameters):
    """Two SGD steps (an update proportional to the gradient, unlike Adam's first steps) from each path."""
    teacher_dir, student_dir = model_pairs["llama"]
    runs = {}
    for method in ("dpkd_token", "dpkd"):
        for threshold in (10**9, 8):  # dense, then chunked (the tiny vocabulary is above 8)
            args = make_config(tmp_path / f"{method}{threshold}", method, save_strategy="no",
                               chunked_loss_vocab_threshold=threshold, kd_ratio=0.5, optim="sgd",
                               learning_rate=0.1, teacher_cache_dir=str(tmp_path / "cache"))
            trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                                          teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir),
                                          args=args, train_dataset=make_dataset(), processing_class=tokenizer)
            trainer.train()
            runs[method, threshold] = ([e["loss"] for e in trainer.state.log_history if "loss" in e],
                                       parameters(trainer.model))
        (dense_losses, dense), (chunked_losses, chunked) = runs[method, 10**9], runs[method, 8]
        assert chunked_losses == pytest.approx(dense_losses, rel=1e-5)
        for name, value in dense.items():
            torch.testing.assert_close(chunked[name], value, rtol=1e-5, atol=1e-6)


def test_logs_the_documented_metrics_to_tensorboard_offline(model_pairs, tokenizer, tmp_path, make_config,
                                                            make_dataset):
    teacher_dir, student_dir = model_pairs["llama"]
    args = make_config(tmp_path, "dpkd", save_strategy="no", report_to=["tensorboard"], kd_ratio=0.5,
                       eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
                       gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                                  teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir), args=args,
                                  train_dataset=make_dataset(), eval_dataset=make_dataset(n=4, seed=3),
                                  processing_class=tokenizer)
    trainer.train()
    (evaluation,) = [e for e in trainer.state.log_history if "eval_loss" in e]
    # Evaluation reports unscaled means (no division by the accumulation steps): loss = ½·distill + ½·CE.
    assert evaluation["eval_loss"] == pytest.approx(
        0.5 * evaluation["eval_loss/distill"] + 0.5 * evaluation["eval_loss/ce"], rel=1e-5)
    assert {"eval_rewards/margins", "eval_rkl_estimate", "eval_length/student"} <= set(evaluation)
    names = {"loss", "loss/distill", "loss/ce", "rewards/chosen", "rewards/rejected", "rewards/margins",
             "rewards/accuracies", "rkl_estimate", "length/teacher", "length/student", "generation_time_share"}
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2]  # one entry per optimizer step, none missing
    for entry in logged:
        assert names <= set(entry), names - set(entry)
        assert entry["rewards/margins"] == pytest.approx(entry["rewards/chosen"] - entry["rewards/rejected"],
                                                         abs=1e-6)
        assert 0.0 <= entry["rewards/accuracies"] <= 1.0 and 0.0 < entry["generation_time_share"] < 1.0
        assert 1 <= entry["length/student"] <= 8 and 1 <= entry["length/teacher"] <= 8

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (tmp_path / "runs").iterdir()  # transformers' default: <output_dir>/runs/<date-host>
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"train/rewards/margins", "train/loss/distill", "train/rkl_estimate"} <= set(events.Tags()["scalars"])


def test_student_scores_teacher_and_student_responses_in_one_forward_pass(model_pairs, tokenizer, tmp_path,
                                                                          make_config, make_dataset):
    teacher_dir, student_dir = model_pairs["llama"]
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    calls = []
    student.model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape),
                                        with_kwargs=True)
    args = make_config(tmp_path, "dpkd", max_steps=1, save_strategy="no", preference_micro_batch_size=0)
    trainer = DistillationTrainer(model=student, teacher_model=AutoModelForCausalLM.from_pretrained(teacher_dir),
                                  args=args, train_dataset=make_dataset(), processing_class=tokenizer)
    calls.clear()
    trainer.train()
    # Generation runs the backbone once per new token on the growing cache; with preference_micro_batch_size 0
    # the scoring pass is the one call over 2B full sequences (groups: test_dpkd_protocol).
    full_passes = [shape for shape in calls if shape[0] == 8]
    assert len(full_passes) == 1 and all(shape[0] == 4 for shape in calls if shape[0] != 8)


def test_sft_needs_no_teacher_and_the_other_methods_do(student_dir, tokenizer, tmp_path, make_config,
                                                       make_dataset):
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    for method in PAPER_METHODS:
        args = make_config(tmp_path / method, method)
        if method == "sft":
            trainer = DistillationTrainer(model=student, args=args, train_dataset=make_dataset(n=4),
                                          processing_class=tokenizer)
            assert trainer.teacher_model is None
        else:
            with pytest.raises(ValueError, match="teacher_model"):
                DistillationTrainer(model=student, args=args, train_dataset=make_dataset(n=4),
                                    processing_class=tokenizer)


@pytest.mark.parametrize("field, value, message", [
    ("method", "dpo", "method: expected one of"),
    ("beta", 0.0, "beta: must be in"),
    ("kd_ratio", 1.5, "kd_ratio: must be in"),
    ("lmbda", -0.1, "lmbda: must be in"),
    ("jsd_beta", 2.0, "jsd_beta: must be in"),
    ("top_p", 0.0, "top_p: must be in"),
    ("max_new_tokens", 0, "max_new_tokens: must be in"),
    ("dpkd_loss_type", "hinge", "dpkd_loss_type: expected one of"),
    ("max_length", 32, "max_length: must be greater than max_prompt_length"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir=str(tmp_path), max_prompt_length=48, **{field: value})


def test_config_defaults_suit_distillation(tmp_path):
    args = DistillationConfig(output_dir=str(tmp_path))
    assert args.method == "dpkd" and args.remove_unused_columns is False and args.report_to == []
    assert args.effective_kd_ratio == 1.0 and args.length_normalize and args.sampling().temperature == 1.0
    assert DistillationConfig(output_dir=str(tmp_path), method="kd").effective_kd_ratio == 0.5
    assert DistillationConfig(output_dir=str(tmp_path), method="sft", kd_ratio=0.7).effective_kd_ratio == 0.0


def _peaked(model, scale: float = 40.0):
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


def _whole_dataset_batch(dataset: Dataset, tokenizer) -> dict[str, torch.Tensor]:
    tokenized, _ = tokenize_dataset(dataset, tokenizer, max_prompt_length=48, max_length=64)
    return DistillationCollator(tokenizer.pad_token_id, max_length=64)(list(tokenized))


def _padding_share(trainer: DistillationTrainer, n_batches: int) -> float:
    padded = useful = 0
    for batch, _ in zip(trainer.get_train_dataloader(), range(n_batches)):
        padded += batch["attention_mask"].numel()
        useful += int(batch["attention_mask"].sum())
    return 1 - useful / padded


def test_group_by_length_samples_batches_of_similar_length(student_dir, tokenizer, tmp_path, make_config,
                                                           make_dataset):
    examples = make_dataset(n=96, prompt_words=2, completion_words=(1, 14))

    def trainer(strategy: str) -> DistillationTrainer:
        args = make_config(tmp_path / strategy, "sft", train_sampling_strategy=strategy, max_steps=1)
        return DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args,
                                   train_dataset=examples, processing_class=tokenizer)

    grouped, shuffled = trainer("group_by_length"), trainer("random")
    # The length column the samplers read is the tokenised prompt + completion (+ EOS), capped at max_length.
    for row in grouped.train_dataset:
        assert row["length"] == min(len(row["prompt_input_ids"]) + len(row["completion_input_ids"]), 64)
    assert "length" not in shuffled.train_dataset.column_names
    assert _padding_share(grouped, 24) < 0.5 * _padding_share(shuffled, 24)
    grouped.train()
    assert grouped.state.global_step == 1
