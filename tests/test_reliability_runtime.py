"""Runtime faults, driven as a user meets them: a loss or gradient that is not finite, a save cut by a kill or a
full disk, a teacher-output cache interrupted or tampered with, evaluation files edited, damaged or from another
model. Each test asserts the message the user reads or the state left behind (docs/reliability.md)."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import dpkd.teacher_cache as teacher_cache
from dpkd.cli import main
from dpkd.evaluation import FINGERPRINT_SAMPLE_BYTES, EvaluationError, evaluate_model
from dpkd.generation import SamplingConfig, left_pad
from dpkd.teacher_cache import TeacherOutputCache, model_fingerprint, teacher_outputs
from dpkd.trainer import DistillationTrainer, NonFiniteError, last_complete_checkpoint

TINY = {"per_device_train_batch_size": 4, "max_new_tokens": 4, "max_prompt_length": 48, "max_length": 64,
        "logging_steps": 1, "use_cpu": True, "disable_tqdm": True, "seed": 0, "report_to": "none"}


def write_recipe(tmp_path: Path, name: str, data: Path, **values) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"train_data": str(data), "output_dir": str(tmp_path / name), **TINY, **values},
                                   sort_keys=False))
    return path


@pytest.fixture
def train_data(training_jsonl) -> Path:
    return training_jsonl(16)


@pytest.fixture
def prompts_data(tmp_path, make_dataset) -> Path:
    """16 examples with 16 distinct prompts, for counting teacher outputs."""
    dataset = make_dataset(n=16, prompt_words=5)
    assert len(set(dataset["prompt"])) == 16
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in dataset))
    return path


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(directory).state_dict())


def all_finite(directory: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in weights(directory).values())


# --------------------------------------------------------------------------------------------------
# Finite or stop


def test_nan_loss_stops_training_naming_the_step_and_term_and_saves_nothing_nonfinite(
        student_dir, train_data, tmp_path, capsys):
    # The probe: float16 weights at lr 1e-2 gave NaN losses from step 4, all-NaN checkpoints and exit 0.
    recipe = write_recipe(tmp_path, "fp16", train_data, method="sft", student=str(student_dir),
                          student_dtype="float16", learning_rate=1e-2, max_steps=8, save_steps=1)
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("dpkd train: error: ")]
    assert "Traceback" not in err and len(errors) == 1
    message = errors[0]
    assert message.startswith("dpkd train: error: training stopped at step ") or "not saving" in message
    assert "not finite" in message or "holds nan" in message or "holds inf" in message
    for hint in ("learning_rate (now 0.01)", "bf16", "max_grad_norm", "training data", "skip_nonfinite"):
        assert hint in message
    run = tmp_path / "fp16"
    assert not (run / "config.json").exists(), "no final model after a fault"
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert checkpoints and all(all_finite(c) for c in checkpoints)
    assert not list(run.glob(".partial-*")), "a refused save leaves no staging folder"
    assert str(last_complete_checkpoint(run)) in message


def test_overflowed_activations_with_a_zero_gradient_stop_training(student_dir, tokenizer, tmp_path, make_config,
                                                                   make_dataset):
    # The probe: lr 1e6 exited 0 with weights of 2.3e6, a loss stuck at log(V) and a gradient norm of 0.
    args = make_config(tmp_path / "run", "sft", learning_rate=1e6, max_steps=4, save_strategy="no")
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args,
                                  train_dataset=make_dataset(), processing_class=tokenizer)
    with pytest.raises(NonFiniteError, match=r"training stopped at step 2: the gradient is exactly 0 in every "
                                             r"parameter while the loss is .*activations overflowed"):
        trainer.train()


def test_skip_nonfinite_skips_the_bad_steps_counts_them_and_keeps_the_last_good_weights(
        student_dir, train_data, tmp_path, capsys):
    recipe = write_recipe(tmp_path, "skip", train_data, method="sft", student=str(student_dir),
                          student_dtype="float16", learning_rate=1e-2, max_steps=8, save_steps=1,
                          skip_nonfinite=True)
    assert main(["train", str(recipe)]) == 0, capsys.readouterr().err
    run = tmp_path / "skip"
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    counts = {entry["step"]: entry["nonfinite_skipped"] for entry in history if "nonfinite_skipped" in entry}
    assert list(counts) == list(range(1, 9)) and counts[8] > 0, counts
    skipped = [step for step in counts if counts[step] > counts.get(step - 1, 0)]
    # What a skipped step logs and leaves: no loss at all (not NaN, not 0) and the weights as they were.
    assert all(math.isfinite(entry["loss"]) for entry in history if "loss" in entry)
    assert all("loss" not in entry for entry in history if entry.get("step") in skipped and "grad_norm" in entry)
    for step in skipped:
        before, after = weights(run / f"checkpoint-{step - 1}"), weights(run / f"checkpoint-{step}")
        assert all(torch.equal(before[name], after[name]) for name in before), f"step {step} moved a weight"
    assert all(all_finite(run / f"checkpoint-{step}") for step in counts) and all_finite(run)


def test_a_model_with_a_nonfinite_weight_is_never_written(student_dir, tokenizer, tmp_path, make_config,
                                                          make_dataset):
    out = tmp_path / "run"
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                                  args=make_config(out, "sft", max_steps=1, save_strategy="no"),
                                  train_dataset=make_dataset(), processing_class=tokenizer)
    with torch.no_grad():
        trainer.model.lm_head.weight[3, 5] = math.inf
    with pytest.raises(NonFiniteError, match=rf"not saving {out}: after step 0 the weight lm_head.weight holds "
                                             r"inf values"):
        trainer.save_model()
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors"))
    assert not list(out.glob(".partial-*"))


# --------------------------------------------------------------------------------------------------
# Atomic checkpoints


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_newest(
        student_dir, tokenizer, tmp_path, make_config, make_dataset, monkeypatch):
    out = tmp_path / "run"
    trainer = DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir),
                                  args=make_config(out, "sft", max_steps=4, save_steps=2),
                                  train_dataset=make_dataset(), processing_class=tokenizer)
    real = DistillationTrainer._save_rng_state

    def disk_full(self, output_dir):
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        return real(self, output_dir)

    monkeypatch.setattr(DistillationTrainer, "_save_rng_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert last_complete_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "checkpoint-4").exists() and not list(out.glob(".partial-*"))


def test_last_complete_checkpoint_passes_over_torn_and_staging_folders(tmp_path):
    def checkpoint(name: str, *files: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for file in files:
            (folder / file).write_text("{}" if file.endswith(".json") else "weights")
        return folder

    assert last_complete_checkpoint(tmp_path / "missing") is None
    assert last_complete_checkpoint(tmp_path) is None
    checkpoint("checkpoint-2", "trainer_state.json", "model.safetensors")
    checkpoint("checkpoint-10", "trainer_state.json", "model.safetensors")
    checkpoint("checkpoint-12", "model.safetensors")  # killed before trainer_state.json
    checkpoint("checkpoint-14", "trainer_state.json")  # no weights
    torn_index = checkpoint("checkpoint-16", "trainer_state.json", "model-00001-of-00002.safetensors")
    (torn_index / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    checkpoint(".partial-checkpoint-18", "trainer_state.json", "model.safetensors")
    (checkpoint("checkpoint-20", "model.safetensors") / "trainer_state.json").write_text('{"global_st')
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    checkpoint("checkpoint-22", "trainer_state.json", "adapter_model.safetensors")  # a LoRA checkpoint
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-22"


_PAUSED_TRAIN = """
import sys, time
from transformers import PreTrainedModel
from dpkd.cli import main
real = PreTrainedModel.save_pretrained
def paused(self, save_directory, *args, **kwargs):
    real(self, save_directory, *args, **kwargs)
    if "checkpoint-4" in str(save_directory):  # weights written, trainer_state.json not yet: kill here
        print("inside the save of checkpoint-4", flush=True)
        time.sleep(600)
PreTrainedModel.save_pretrained = paused
sys.exit(main(["train", sys.argv[1]]))
"""


def run_until(script: str, argument: str, line: str) -> None:
    """Run `script` in a child process and SIGKILL it once it prints `line`."""
    child = subprocess.Popen([sys.executable, "-c", script, argument], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        for output in child.stdout:
            if output.strip() == line:
                child.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail(f"the child ended (status {child.wait()}) without printing {line!r}")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


@pytest.mark.slow
def test_a_kill_inside_a_checkpoint_save_resumes_to_the_same_parameters(student_dir, train_data, tmp_path, capsys):
    settings = dict(method="sft", student=str(student_dir), learning_rate=1e-3, max_steps=6, save_steps=2)
    recipe = write_recipe(tmp_path, "killed", train_data, **settings)
    run_until(_PAUSED_TRAIN, str(recipe), "inside the save of checkpoint-4")
    run = tmp_path / "killed"
    assert not (run / "checkpoint-4").exists(), "the half-written checkpoint is not visible as one"
    assert last_complete_checkpoint(run) == run / "checkpoint-2"

    assert main(["train", str(recipe), "--resume_from_checkpoint", "true"]) == 0
    assert "checkpoint-2" in capsys.readouterr().err  # the resume says where it starts
    assert main(["train", str(write_recipe(tmp_path, "whole", train_data, **settings))]) == 0
    resumed, whole = weights(run), weights(tmp_path / "whole")
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert not list(run.glob(".partial-*"))


# --------------------------------------------------------------------------------------------------
# The teacher-output cache and teacher-generate


def cache_contents(cache_dir: Path) -> dict[str, tuple]:
    """{key: (completion_ids, teacher_logp)} over every segment of the cache."""
    contents = {}
    for segment in sorted(cache_dir.glob("*/part-*.jsonl")):
        for line in segment.read_text().splitlines():
            record = json.loads(line)
            contents.setdefault(record["key"], (record["completion_ids"], record["teacher_logp"]))
    return contents


def test_ctrl_c_in_teacher_generate_keeps_what_it_made_and_a_rerun_makes_only_the_rest(
        model_pairs, prompts_data, tmp_path, monkeypatch, capsys):
    teacher_dir, student_dir = model_pairs["llama"]
    recipe = write_recipe(tmp_path, "gen", prompts_data, method="dpkd", student=str(student_dir),
                          teacher=str(teacher_dir), per_device_train_batch_size=2,
                          teacher_cache_dir=str(tmp_path / "cache"))
    real, calls = teacher_cache.teacher_outputs, [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_cache, "teacher_outputs", interrupted)
    assert main(["teacher-generate", str(recipe)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "6 teacher outputs" in err and "run the same command again" in err
    assert len(cache_contents(tmp_path / "cache")) == 6  # three batches of two, flushed on the way out

    monkeypatch.undo()
    assert main(["teacher-generate", str(recipe)]) == 0
    assert "10 new teacher outputs for 16 prompts (6 already cached)" in capsys.readouterr().out


def test_bad_teacher_cache_entries_are_dropped_with_file_and_line_and_generated_again(
        teacher_dir, tokenizer, tmp_path, caplog):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    sampling = SamplingConfig(max_new_tokens=6)
    prompts = [[11, 12, 13], [21, 22], [31, 32, 33, 34], [41]]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    vocab = teacher.get_output_embeddings().weight.shape[0]

    def open_cache():
        return TeacherOutputCache(tmp_path, teacher_id=model_fingerprint(teacher), sampling=sampling,
                                  vocab_size=vocab)

    def outputs(cache):
        return teacher_outputs(teacher, cache, ids, mask, sampling, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)

    assert outputs(open_cache())[3] == 4
    segment = next(tmp_path.glob("*/part-*.jsonl"))
    records = [json.loads(line) for line in segment.read_text().splitlines()]
    records[0]["completion_ids"][0] = vocab + 7  # the probe's IndexError
    records[1]["teacher_logp"] = math.nan  # the probe's loss 0, then a crash
    records[2]["completion_ids"] = records[2]["completion_ids"] * 7  # longer than max_new_tokens
    segment.write_text("".join(json.dumps(r) + "\n" for r in records))

    with caplog.at_level(logging.WARNING, logger="dpkd.teacher_cache"):
        cache = open_cache()
    assert cache.dropped == 3 and len(cache) == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert f"{segment}:1: dropping a bad teacher-cache entry (token id {vocab + 7} is outside the vocabulary " \
           f"[0, {vocab}))" in warnings[0]
    assert f"{segment}:2:" in warnings[1] and "teacher_logp is nan, not finite" in warnings[1]
    assert f"{segment}:3:" in warnings[2] and "more than max_new_tokens=6" in warnings[2]
    assert all(w.endswith("it will be generated again") for w in warnings)
    completion_ids, _, logps, generated = outputs(cache)
    assert generated == 3 and bool(torch.isfinite(logps).all()) and int(completion_ids.max()) < vocab
    cache.compact()
    assert open_cache().dropped == 0  # compaction left the bad lines out


_PAUSED_GENERATE = """
import sys, time
import dpkd.teacher_cache as tc
from dpkd.cli import main
real_fill, real_flush, flushed = tc.fill_teacher_cache, tc.TeacherOutputCache.flush, [0]
def fill(*args, **kwargs):
    return real_fill(*args, **{**kwargs, "flush_interval_s": 0})  # write after every batch
def flush(self):
    path = real_flush(self)
    flushed[0] += path is not None
    if flushed[0] == 3:
        print("flushed 3 batches", flush=True)
        time.sleep(600)
    return path
tc.fill_teacher_cache, tc.TeacherOutputCache.flush = fill, flush
sys.exit(main(["teacher-generate", sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_killed_teacher_generate_resumes_to_the_same_cache(model_pairs, prompts_data, tmp_path, capsys):
    teacher_dir, student_dir = model_pairs["llama"]
    settings = dict(method="dpkd", student=str(student_dir), teacher=str(teacher_dir), per_device_train_batch_size=2)
    killed = write_recipe(tmp_path, "killed", prompts_data, teacher_cache_dir=str(tmp_path / "killed-cache"),
                          **settings)
    run_until(_PAUSED_GENERATE, str(killed), "flushed 3 batches")
    assert len(cache_contents(tmp_path / "killed-cache")) == 6

    assert main(["teacher-generate", str(killed)]) == 0
    assert "10 new teacher outputs for 16 prompts (6 already cached)" in capsys.readouterr().out
    whole = write_recipe(tmp_path, "whole", prompts_data, teacher_cache_dir=str(tmp_path / "whole-cache"), **settings)
    assert main(["teacher-generate", str(whole)]) == 0
    resumed, uninterrupted = cache_contents(tmp_path / "killed-cache"), cache_contents(tmp_path / "whole-cache")
    assert len(uninterrupted) == 16 and resumed == uninterrupted


# --------------------------------------------------------------------------------------------------
# Evaluation files


EVAL = dict(data=["dolly"], seeds=[5], limit=4, batch_size=2, sampling=SamplingConfig(max_new_tokens=4),
            max_prompt_length=32)


def test_hand_edited_predictions_are_refused_never_scored(student_dir, eval_data_dir, tmp_path, capsys):
    evaluate_model(student_dir, data_dir=eval_data_dir, out_dir=tmp_path, **EVAL)
    path = tmp_path / "predictions" / "dolly" / "seed5.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record["prediction"] = record["references"][0]  # the probe: references pasted in scored 100
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    before = (tmp_path / "metrics.json").read_text()

    status = main(["eval", "--model", str(student_dir), "--data", "dolly", "--data-dir", str(eval_data_dir),
                   "--seeds", "5", "--limit", "4", "--batch-size", "2", "--max-new-tokens", "4",
                   "--max-prompt-length", "32", "--out", str(tmp_path)])
    assert status == 2
    err = capsys.readouterr().err
    assert f"{path}: line 1 is not what this model made with these settings" in err and "not scored" in err
    assert (tmp_path / "metrics.json").read_text() == before


def test_predictions_of_another_model_are_refused(student_dir, teacher_dir, eval_data_dir, tmp_path):
    evaluate_model(student_dir, data_dir=eval_data_dir, out_dir=tmp_path / "student", **EVAL)
    shutil.copytree(tmp_path / "student" / "predictions", tmp_path / "teacher" / "predictions")
    with pytest.raises(EvaluationError, match=r"seed5.jsonl: predictions made by another model \(fingerprint"):
        evaluate_model(teacher_dir, data_dir=eval_data_dir, out_dir=tmp_path / "teacher", **EVAL)
    # Editing the settings file to the teacher's fingerprint does not help: every line's digest binds it.
    settings_path = tmp_path / "teacher" / "predictions" / "dolly" / "seed5.settings.json"
    settings = json.loads(settings_path.read_text())
    settings["model_fingerprint"] = model_fingerprint(AutoModelForCausalLM.from_pretrained(teacher_dir),
                                                      sample_bytes_per_tensor=FINGERPRINT_SAMPLE_BYTES)
    settings_path.write_text(json.dumps(settings))
    with pytest.raises(EvaluationError, match="line 1 is not what this model made with these settings"):
        evaluate_model(teacher_dir, data_dir=eval_data_dir, out_dir=tmp_path / "teacher", **EVAL)


@pytest.mark.parametrize("damage, message", [
    ("predictions-not-utf8", r"seed5.jsonl: not UTF-8 text \(byte 10\)"),
    ("predictions-middle-line", r"seed5.jsonl: line 2 is not a predictions record"),
    ("settings-truncated", r"seed5.settings.json: not a readable settings file"),
    ("settings-not-utf8", r"seed5.settings.json: not a readable settings file"),
])
def test_damaged_predictions_and_settings_files_are_named(damage, message, student_dir, eval_data_dir, tmp_path):
    evaluate_model(student_dir, data_dir=eval_data_dir, out_dir=tmp_path, **EVAL)
    folder = tmp_path / "predictions" / "dolly"
    predictions, settings = folder / "seed5.jsonl", folder / "seed5.settings.json"
    lines = predictions.read_bytes().splitlines(keepends=True)
    if damage == "predictions-not-utf8":
        predictions.write_bytes(lines[0][:10] + b"\xff\xfe" + lines[0][10:] + b"".join(lines[1:]))
    elif damage == "predictions-middle-line":
        predictions.write_bytes(lines[0] + lines[1][:20] + b"\n" + b"".join(lines[2:]))
    elif damage == "settings-truncated":
        settings.write_bytes(settings.read_bytes()[:40])
    else:
        settings.write_bytes(b"\xff" + settings.read_bytes())
    with pytest.raises(EvaluationError, match=message):
        evaluate_model(student_dir, data_dir=eval_data_dir, out_dir=tmp_path, **EVAL)


def test_evaluation_interrupted_inside_a_write_keeps_the_complete_batches(
        student_dir, eval_data_dir, tmp_path, monkeypatch):
    whole = evaluate_model(student_dir, data_dir=eval_data_dir, out_dir=tmp_path / "whole", **EVAL)
    real, writes = os.replace, [0]

    def killed_on_the_second_batch(source, target):
        if str(target).endswith("seed5.jsonl"):
            writes[0] += 1
            if writes[0] == 2:
                raise KeyboardInterrupt  # the process dies between writing the new file and the rename
        return real(source, target)

    monkeypatch.setattr(os, "replace", killed_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(student_dir, data_dir=eval_data_dir, out_dir=tmp_path / "cut", **EVAL)
    monkeypatch.undo()
    path = tmp_path / "cut" / "predictions" / "dolly" / "seed5.jsonl"
    assert len(path.read_text().splitlines()) == 2  # the first batch, whole
    resumed = evaluate_model(student_dir, data_dir=eval_data_dir, out_dir=tmp_path / "cut", **EVAL)
    assert resumed["sets"] == whole["sets"]
    assert path.read_text() == (tmp_path / "whole" / "predictions" / "dolly" / "seed5.jsonl").read_text()


def test_predictions_from_an_older_dpkd_without_digests_are_generated_again(
        student_dir, eval_data_dir, tmp_path, caplog):
    first = evaluate_model(student_dir, data_dir=eval_data_dir, out_dir=tmp_path, **EVAL)
    folder = tmp_path / "predictions" / "dolly"
    path, settings_path = folder / "seed5.jsonl", folder / "seed5.settings.json"
    complete = path.read_text()
    records = [json.loads(line) for line in complete.splitlines()]
    for record in records:
        del record["digest"]
        record["prediction"] = record["references"][0]  # whatever it says, it is not scored
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    settings = json.loads(settings_path.read_text())
    del settings["format"]
    settings_path.write_text(json.dumps(settings))
    with caplog.at_level(logging.WARNING, logger="dpkd.evaluation"):
        again = evaluate_model(student_dir, data_dir=eval_data_dir, out_dir=tmp_path, **EVAL)
    assert "written by an older dpkd, without a digest per line" in caplog.text
    assert path.read_text() == complete and again["sets"] == first["sets"]
