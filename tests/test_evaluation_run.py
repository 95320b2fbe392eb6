"""`dpkd eval` end to end on the tiny models: files, metrics, resuming, teacher diagnostics, bad input."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpkd.evaluation as evaluation
from dpkd.cli import main
from dpkd.data import load_instruction_data
from dpkd.evaluation import EvaluationError, check_shared_vocabulary, compute_metrics, evaluate_model
from dpkd.generation import SamplingConfig
from dpkd.modeling import load_tokenizer, train_bpe_tokenizer

SETS = ("dolly", "selfinst", "vicuna", "sinst")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_eval_cli_writes_predictions_and_consistent_metrics_for_each_bundled_set(
        student_dir, eval_data_dir, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "dpkd", "eval", "--model", str(student_dir), "--data", ",".join(SETS),
           "--data-dir", str(eval_data_dir), "--seeds", "10,20", "--limit", "5", "--max-new-tokens", "4",
           "--max-prompt-length", "48", "--batch-size", "5", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ROUGE-L" in done.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["seeds"] == [10, 20]
    assert metrics["settings"]["sampling"] == {"max_new_tokens": 4, "do_sample": True, "temperature": 1.0,
                                               "top_k": 0, "top_p": 1.0}
    for name in SETS:
        dataset = load_instruction_data(name, data_dir=eval_data_dir, limit=5)
        result = metrics["sets"][name]
        assert result["n_examples"] == 5
        per_seed_predictions = []
        for seed in ("10", "20"):
            records = read_jsonl(out / "predictions" / name / f"seed{seed}.jsonl")
            assert [r["index"] for r in records] == list(range(5))
            assert [r["prompt"] for r in records] == dataset["prompt"]
            assert [r["references"] for r in records] == dataset["references"]
            predictions = [r["prediction"] for r in records]
            per_seed_predictions.append(predictions)
            recomputed = compute_metrics(predictions, [r["references"] for r in records])
            scores = result["per_seed"][seed]
            for key in ("exact_match", "rougeL"):
                assert 0.0 <= scores[key] <= 100.0
                assert scores[key] == pytest.approx(recomputed[key])
            assert sum(b["n"] for b in scores["by_reference_length"].values()) == 5
        assert per_seed_predictions[0] != per_seed_predictions[1]  # the seed reaches the sampler
        values = [result["per_seed"][s]["rougeL"] for s in ("10", "20")]
        assert result["summary"]["rougeL"]["mean"] == pytest.approx(sum(values) / 2)
        assert result["summary"]["rougeL"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2)
        settings = json.loads((out / "predictions" / name / "seed10.settings.json").read_text())
        assert settings["seed"] == 10 and settings["batch_size"] == 5


class CountingGenerate:
    """Wraps `generate_responses` to count the prompts it is asked to complete."""

    def __init__(self):
        self.prompts = 0

    def __call__(self, model, tokenizer, prompts, *args, **kwargs):
        self.prompts += len(prompts)
        return CountingGenerate.real(model, tokenizer, prompts, *args, **kwargs)


CountingGenerate.real = staticmethod(evaluation.generate_responses)


def test_rerun_after_losing_half_the_predictions_generates_only_the_missing_half(
        student_dir, eval_data_dir, tmp_path, monkeypatch):
    counter = CountingGenerate()
    monkeypatch.setattr(evaluation, "generate_responses", counter)
    args = dict(data=["dolly"], seeds=[7], data_dir=eval_data_dir, limit=7, batch_size=2,
                sampling=SamplingConfig(max_new_tokens=4), max_prompt_length=32)
    full = evaluate_model(student_dir, out_dir=tmp_path / "a", **args)
    assert counter.prompts == 7
    path = tmp_path / "a" / "predictions" / "dolly" / "seed7.jsonl"
    complete = path.read_text(encoding="utf-8")

    lines = complete.splitlines(keepends=True)
    path.write_text("".join(lines[:3]), encoding="utf-8")  # batches [0, 2) whole, [2, 4) cut
    counter.prompts = 0
    resumed = evaluate_model(student_dir, out_dir=tmp_path / "a", **args)
    assert counter.prompts == 5  # the cut batch is redone from its start, index 2
    assert path.read_text(encoding="utf-8") == complete
    assert resumed["sets"] == full["sets"]

    # A write interrupted in the middle of a line.
    path.write_text("".join(lines[:4]) + lines[4][: len(lines[4]) // 2], encoding="utf-8")
    counter.prompts = 0
    evaluate_model(student_dir, out_dir=tmp_path / "a", **args)
    assert counter.prompts == 3 and path.read_text(encoding="utf-8") == complete

    counter.prompts = 0
    evaluate_model(student_dir, out_dir=tmp_path / "a", **args)
    assert counter.prompts == 0  # complete: nothing to redo


def test_predictions_without_token_ids_are_generated_again_from_the_first_such_line(
        student_dir, eval_data_dir, tmp_path, monkeypatch, caplog):
    counter = CountingGenerate()
    monkeypatch.setattr(evaluation, "generate_responses", counter)
    args = dict(data=["dolly"], seeds=[3], data_dir=eval_data_dir, limit=5, batch_size=2,
                sampling=SamplingConfig(max_new_tokens=4), max_prompt_length=32, out_dir=tmp_path)
    evaluate_model(student_dir, **args)
    path = tmp_path / "predictions" / "dolly" / "seed3.jsonl"
    complete = path.read_text(encoding="utf-8")
    records = read_jsonl(path)
    assert all(r["response_ids"] and r["prediction"] is not None for r in records)

    # As an older dpkd wrote them: no token ids from line 4 on, inside the batch [2, 4).
    for r in records[3:]:
        del r["response_ids"]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    counter.prompts = 0
    with caplog.at_level(logging.WARNING, logger="dpkd.evaluation"):
        evaluate_model(student_dir, **args)
    assert counter.prompts == 3  # from the start of that batch, index 2
    assert "lines from 4 on have no generated token ids" in caplog.text
    assert path.read_text(encoding="utf-8") == complete


def test_predictions_made_otherwise_are_refused_not_overwritten(student_dir, eval_data_dir, tmp_path):
    args = dict(data=["vicuna"], seeds=[1], data_dir=eval_data_dir, batch_size=2, max_prompt_length=32,
                out_dir=tmp_path)
    evaluate_model(student_dir, limit=4, sampling=SamplingConfig(max_new_tokens=3), **args)
    path = tmp_path / "predictions" / "vicuna" / "seed1.jsonl"
    complete = path.read_text(encoding="utf-8")

    with pytest.raises(EvaluationError, match=r"seed1.jsonl: predictions made with other settings \(differ in: sampling\)"):
        evaluate_model(student_dir, limit=4, sampling=SamplingConfig(max_new_tokens=5), **args)
    # --limit 3 would redo the batch [2, 4) as [2, 3): a whole batch of work, so it is refused.
    with pytest.raises(EvaluationError, match="holds 4 predictions laid out for another --limit"):
        evaluate_model(student_dir, limit=3, sampling=SamplingConfig(max_new_tokens=3), **args)
    # --limit 2 is a prefix of whole batches: reused as it is.
    evaluate_model(student_dir, limit=2, sampling=SamplingConfig(max_new_tokens=3), **args)
    assert path.read_text(encoding="utf-8") == complete

    records = read_jsonl(path)
    records[1]["prompt"] = "another prompt"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:3]), encoding="utf-8")
    with pytest.raises(EvaluationError, match="line 2 was generated for another prompt"):
        evaluate_model(student_dir, limit=4, sampling=SamplingConfig(max_new_tokens=3), **args)


def test_teacher_diagnostics_are_reported_per_seed_with_a_first_token_kl(
        student_dir, teacher_dir, eval_data_dir, tmp_path):
    metrics = evaluate_model(student_dir, teacher_dir=teacher_dir, data=["vicuna"], seeds=[1, 2],
                             data_dir=eval_data_dir, limit=3, batch_size=3,
                             sampling=SamplingConfig(max_new_tokens=4), max_prompt_length=32, out_dir=tmp_path)
    # The reference: both models in float64, one example at a time (evaluation batches, pads, uses float32).
    student, teacher = (AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
                        for d in (student_dir, teacher_dir))
    tokenizer = load_tokenizer(student_dir)
    result = metrics["sets"]["vicuna"]
    for seed in ("1", "2"):
        teacher_records = read_jsonl(tmp_path / "teacher_predictions" / "vicuna" / f"seed{seed}.jsonl")
        assert len(teacher_records) == 3
        scores = result["per_seed"][seed]
        assert scores["teacher"] == pytest.approx(compute_metrics(
            [r["prediction"] for r in teacher_records], [r["references"] for r in teacher_records]))
        student_records = read_jsonl(tmp_path / "predictions" / "vicuna" / f"seed{seed}.jsonl")
        for outputs, records in (("student_outputs", student_records), ("teacher_outputs", teacher_records)):
            expected = _implicit_rewards_float64(student, teacher, tokenizer, records, beta=0.1)
            assert scores["implicit_reward"][outputs] == pytest.approx(expected, rel=1e-4, abs=1e-6), outputs
    expected_kl = _first_token_reverse_kl_float64(student, teacher, tokenizer, teacher_records)
    assert expected_kl > 0.01  # the two random models disagree, so a swapped argument or position shows
    assert result["reverse_kl_first_token"] == pytest.approx(expected_kl, rel=1e-4)
    assert metrics["teacher"] == str(Path(teacher_dir).resolve())


def _prompt_ids(tokenizer, prompt: str, max_prompt_length: int = 32) -> list[int]:
    # The test tokenizer adds no special tokens, so a long prompt keeps just its last tokens.
    return tokenizer(prompt)["input_ids"][-max_prompt_length:]


def _implicit_rewards_float64(student, teacher, tokenizer, records, *, beta: float) -> dict[str, float]:
    """r = β·[log q(y|x) − log p(y|x)] summed over y's tokens, from one unpadded float64 forward per pair;
    the mean of r and of r/|y| over the records."""
    rewards, per_token = [], []
    for record in records:
        prompt, response = _prompt_ids(tokenizer, record["prompt"]), record["response_ids"]
        ids = torch.tensor([prompt + response])
        targets = torch.tensor(response)[:, None]
        logps = []
        with torch.no_grad():
            for model in (student, teacher):
                log_probs = model(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
                logps.append(log_probs.gather(-1, targets).sum().item())
        rewards.append(beta * (logps[0] - logps[1]))
        per_token.append(rewards[-1] / len(response))
    return {"reward": sum(rewards) / len(rewards), "reward_per_token": sum(per_token) / len(per_token)}


def _first_token_reverse_kl_float64(student, teacher, tokenizer, records) -> float:
    """Mean over prompts of KL(q || p) = Σ_v q(v|x)·[log q(v|x) − log p(v|x)] at the first response token."""
    total = 0.0
    with torch.no_grad():
        for record in records:
            ids = torch.tensor([_prompt_ids(tokenizer, record["prompt"])])
            log_q, log_p = (model(ids).logits[0, -1].log_softmax(-1) for model in (student, teacher))
            total += (log_q.exp() * (log_q - log_p)).sum().item()
    return total / len(records)


def _fail_if_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the arguments were checked")


@pytest.mark.parametrize("argv_tail, message", [
    (["--model", "/no/such/model"], "--model: model directory '/no/such/model' does not exist"),
    (["--data", "dolly,nosuchset"], "--data: unknown evaluation set 'nosuchset'"),
    (["--seeds", "10,x"], "--seeds: 'x' is not an integer"),
    (["--teacher", "/no/teacher"], "--teacher: model directory '/no/teacher' does not exist"),
    (["--limit", "0"], "--limit: expected a positive number"),
    (["--temperature", "0"], "--temperature: expected > 0"),
])
def test_bad_eval_arguments_fail_clearly_before_loading_a_model(
        argv_tail, message, student_dir, eval_data_dir, monkeypatch, capsys):
    monkeypatch.setattr(evaluation, "_load_model", _fail_if_loaded)
    argv = ["eval", "--model", str(student_dir), "--data-dir", str(eval_data_dir), *argv_tail]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _fail_if_generating(*args, **kwargs):
    raise AssertionError("generation started before the arguments were checked")


def test_teacher_with_another_vocabulary_is_refused_before_loading_saying_what_differs(
        student_dir, teacher_dir, eval_data_dir, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other-teacher"
    other.mkdir()
    shutil.copy(teacher_dir / "config.json", other / "config.json")
    train_bpe_tokenizer(["a completely different corpus", "with few words"], vocab_size=300).save_pretrained(other)
    monkeypatch.setattr(evaluation, "_load_model", _fail_if_loaded)
    monkeypatch.setattr(evaluation, "generate_responses", _fail_if_generating)
    argv = ["eval", "--model", str(student_dir), "--teacher", str(other), "--data", "vicuna",
            "--data-dir", str(eval_data_dir), "--limit", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--teacher: {other} and --model {student_dir} do not share a vocabulary" in err
    # The detail of `dpkd.modeling.check_tokenizers_match` follows, on the one error line.
    assert len(err.strip().splitlines()) == 1
    assert "- tokenizer sizes differ: teacher" in err
    assert "tokens have different ids" in err


def test_teacher_with_the_same_vocabulary_passes_even_when_saved_without_a_pad_token(
        student_dir, teacher_dir, tmp_path):
    # As a hub GPT-2 teacher: no pad token, while `dpkd train` saved the student's as EOS.
    bare = tmp_path / "teacher-without-pad"
    shutil.copytree(teacher_dir, bare)
    tokenizer = load_tokenizer(teacher_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(bare)
    assert load_tokenizer(student_dir).pad_token_id is not None
    for teacher in (teacher_dir, bare):
        tokenizer = check_shared_vocabulary(Path(student_dir), Path(teacher))
        assert tokenizer.get_vocab() == load_tokenizer(student_dir).get_vocab()


def test_teacher_with_another_eos_is_refused(student_dir, teacher_dir, tmp_path):
    other_eos = tmp_path / "teacher-other-eos"
    shutil.copytree(teacher_dir, other_eos)
    tokenizer = load_tokenizer(teacher_dir)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(5)
    tokenizer.save_pretrained(other_eos)
    with pytest.raises(EvaluationError, match=r"do not share a vocabulary; log q/p compares token ids:\n"
                                              r"  - eos_token_id differs: teacher 5, student 0"):
        check_shared_vocabulary(Path(student_dir), other_eos)


def test_a_mistyped_folder_under_a_local_folder_is_no_hub_id_and_is_named_with_a_suggestion(
        student_dir, eval_data_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "runs" / "student").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluation, "_load_model", _fail_if_loaded)
    assert main(["eval", "--model", "runs/stdent", "--data-dir", str(eval_data_dir)]) == 2
    err = capsys.readouterr().err
    assert "--model: model directory 'runs/stdent' does not exist (did you mean 'student'?)" in err
    assert "hub" not in err
