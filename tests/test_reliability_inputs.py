"""Issue #14, the input half: bad recipes, data, folders and model files give one error line and exit 2.

Each test drives `dpkd` as the adversarial probe did (`dpkd.cli.main`, in-process, or `python -m dpkd`) and
asserts the message, the exit status and that no traceback was printed. Most refusals happen before any
model loads; `no_model_loads` makes that a checked claim. docs/reliability.md lists the cases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpkd import modeling
from dpkd.cli import main
from dpkd.recipe import Recipe, load_recipe
from dpkd.run_folder import SETTINGS_FILE, prepare_output_dir, record_settings

TINY = {"max_steps": 2, "per_device_train_batch_size": 4, "max_new_tokens": 4, "max_prompt_length": 48,
        "max_length": 64, "logging_steps": 1, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True}


@pytest.fixture
def data_file(training_jsonl) -> Path:
    return training_jsonl(8)


@pytest.fixture
def recipe_file(tmp_path, data_file):
    """`recipe_file(text="", **values)`: a fast sft recipe (model paths need not exist until the models load)
    with `values`, then the raw YAML `text` (to test how YAML itself reads a value; its keys replace the
    recipe's own)."""
    def write(text: str = "", **values) -> Path:
        base = {"student": str(tmp_path / "student"), "teacher": None,
                "train_data": str(data_file), "output_dir": str(tmp_path / "run"), "method": "sft", **TINY}
        base.update(values)
        for line in text.splitlines():
            base.pop(line.partition(":")[0], None)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(base, sort_keys=False) + text)
        return path
    return write


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a model starts loading: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the error was found")
    monkeypatch.setattr(modeling, "load_causal_lm", refuse)


def refused(argv: list[str], capsys) -> str:
    """Run `dpkd ARGV` in-process; assert exit status 2 and one error line, no traceback; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"dpkd {argv[0]}: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def line_of(path: Path, key: str) -> int:
    return next(n for n, text in enumerate(path.read_text().splitlines(), start=1) if text.startswith(f"{key}:"))


# ---------------------------------------------------------------------------------------------------
# Problem 7: recipe values typed and ranged before anything loads


def test_a_yaml_string_that_spells_a_number_is_read_as_the_fields_type(recipe_file):
    # YAML 1.1 reads `1e-3` (no dot) as the string "1e-3"; it is the float 0.001 here, as on the command line.
    recipe = load_recipe(recipe_file("learning_rate: 1e-3\nmax_new_tokens: 16.0\nuse_cpu: 'TRUE'\n"))
    assert recipe.config.learning_rate == 0.001 and isinstance(recipe.config.learning_rate, float)
    assert recipe.config.max_new_tokens == 16 and recipe.config.use_cpu is True
    assert load_recipe(recipe_file(), ["--learning_rate", "1e-3"]).config.learning_rate == 0.001


@pytest.mark.parametrize("text, key, message", [
    ('max_steps: "four"\n', "max_steps", "cannot read 'four' as int"),
    ("max_steps: -5\n", "max_steps", "must be in [1, inf) or -1"),
    ("use_cpu: maybe\n", "use_cpu", "cannot read 'maybe' as true or false"),
    ("max_new_tokens: 16.7\n", "max_new_tokens", "cannot read 16.7 as int"),
    ("learning_rate: -1.0e-3\n", "learning_rate", "must be in [0, inf), got -0.001"),
    ("per_device_train_batch_size: 0\n", "per_device_train_batch_size", "must be in [1, inf), got 0"),
    ("gradient_accumulation_steps: 0\n", "gradient_accumulation_steps", "must be in [1, inf)"),
    ("num_train_epochs: 0\n", "num_train_epochs", "must be in (0, inf)"),
    ("logging_steps: 2.5\n", "logging_steps", "a whole number of steps"),
    ("lr_scheduler_type: cosin\n", "lr_scheduler_type", "cannot read 'cosin' as one of linear, cosine"),
    ("beta: .nan\n", "beta", "cannot read nan as float"),
    ("limit: 0\n", "limit", "must be >= 1, got 0"),
    ("min_response_words: -1\n", "min_response_words", "must be >= 0, got -1"),
    ("student_dtype: flot16\n", "student_dtype", "did you mean 'float16'"),
    ("lora: 3\n", "lora", "cannot read 3 as dict or null"),
    ("trust_remote_code: maybe\n", "trust_remote_code", "cannot read 'maybe' as true or false"),
])
def test_a_bad_recipe_value_is_refused_with_file_line_and_field(text, key, message, recipe_file, capsys,
                                                                no_model_loads):
    recipe = recipe_file(text)
    error = refused(["train", str(recipe)], capsys)
    assert f"{recipe}, line {line_of(recipe, key)}: {key}: " in error and message in error, error
    assert not (recipe.parent / "run").exists()  # refused before the output folder was even made


def test_a_bad_override_is_refused_by_name(recipe_file, capsys):
    error = refused(["train", str(recipe_file()), "--use_cpu", "1"], capsys)
    assert "override --use_cpu: cannot read '1' as true or false" in error


def test_a_repeated_recipe_key_is_refused_not_silently_overwritten(recipe_file, capsys):
    recipe = recipe_file("seed: 1\nseed: 2\n")
    first = line_of(recipe, "seed")
    assert f"{recipe}, line {first + 1}: key 'seed' repeats line {first}" in refused(["train", str(recipe)], capsys)


def test_a_recipe_error_is_one_line_on_stderr_from_the_command(recipe_file):
    recipe = recipe_file('max_steps: "four"\n')
    done = subprocess.run([sys.executable, "-m", "dpkd", "train", str(recipe)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"dpkd train: error: {recipe}, line {line_of(recipe, 'max_steps')}: max_steps: cannot read 'four' as int"]


def test_debug_shows_the_traceback(recipe_file):
    with pytest.raises(ValueError, match="cannot read 'maybe'"):
        main(["--debug", "train", str(recipe_file("use_cpu: maybe\n"))])


# ---------------------------------------------------------------------------------------------------
# Problem 2: trust_remote_code is a real boolean


def test_trust_remote_code_false_in_quotes_does_not_run_the_model_folders_code(tmp_path, student_dir, recipe_file,
                                                                               capsys):
    # A model folder whose config names its own code, which leaves a marker when it is imported.
    folder = tmp_path / "remote"
    shutil.copytree(student_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-llama",
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))

    recipe = recipe_file('trust_remote_code: "false"\n', student=str(folder))
    assert load_recipe(recipe).run["trust_remote_code"] is False
    error = refused(["train", str(recipe)], capsys)
    assert str(folder) in error and "trust_remote_code" in error
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Problem 8, the input cases: errors, not tracebacks


def test_prompts_all_over_max_prompt_length_are_refused_before_the_models_load(recipe_file, data_file, capsys,
                                                                               student_dir, no_model_loads):
    recipe = recipe_file(student=str(student_dir), max_prompt_length=2)
    error = refused(["train", str(recipe)], capsys)
    assert f"{data_file}: all 8 prompts are longer than max_prompt_length=2 tokens" in error


def test_a_20_mb_line_is_refused_at_once_naming_file_and_line(recipe_file, tmp_path, capsys, no_model_loads):
    data = tmp_path / "huge.jsonl"
    row = json.dumps({"prompt": "Repeat: the\nAnswer:", "completion": " the"})
    data.write_text(row + "\n" + json.dumps({"prompt": "x" * 20_000_000, "completion": " y"}) + "\n")
    started = time.perf_counter()
    error = refused(["train", str(recipe_file(train_data=str(data)))], capsys)
    assert f"{data}, line 2: longer than 1,048,576 bytes" in error and "DPKD_MAX_LINE_BYTES" in error
    assert time.perf_counter() - started < 20  # was 43 s and 4.3 GB before failing


def test_a_non_utf8_data_line_is_refused_naming_file_and_line(recipe_file, tmp_path, capsys, no_model_loads):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    error = refused(["train", str(recipe_file(train_data=str(data)))], capsys)
    assert f"{data}, line 2: not UTF-8 text" in error


def test_eval_refuses_max_prompt_length_zero(tmp_path, capsys):
    error = refused(["eval", "--model", str(tmp_path), "--max-prompt-length", "0"], capsys)
    assert "--max-prompt-length: expected at least 1" in error


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_models_load(recipe_file, tmp_path, capsys,
                                                                                no_model_loads):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    error = refused(["train", str(recipe_file(output_dir=str(blocker / "run")))], capsys)
    assert f"output_dir {blocker / 'run'} is not writable" in error


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_the_models_load(recipe_file, tmp_path, capsys, no_model_loads):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        error = refused(["train", str(recipe_file(output_dir=str(folder)))], capsys)
    finally:
        folder.chmod(0o700)
    assert f"output_dir {folder} is not writable: Permission denied" in error


def test_a_full_disk_under_the_output_folder_is_refused_before_the_models_load(recipe_file, capsys, monkeypatch,
                                                                               no_model_loads):
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("dpkd.run_folder.os.fsync", full)
    error = refused(["train", str(recipe_file())], capsys)
    assert "is not writable: No space left on device: free space on that disk" in error


def test_a_truncated_safetensors_file_is_named(recipe_file, tmp_path, student_dir, capsys):
    folder = tmp_path / "torn-student"
    shutil.copytree(student_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    error = refused(["train", str(recipe_file(student=str(folder)))], capsys)
    assert f"{folder}: cannot load the model" in error and "truncated or corrupt" in error


def test_a_truncated_gguf_teacher_is_named(recipe_file, tmp_path, student_dir, capsys):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    folder = tmp_path / "gguf-teacher"
    folder.mkdir()
    writer = gguf.GGUFWriter(str(folder / "teacher.gguf"), "llama")
    writer.add_block_count(2)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((512, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = (folder / "teacher.gguf").read_bytes()
    (folder / "teacher.gguf").write_bytes(data[: len(data) // 3])
    recipe = recipe_file(student=str(student_dir), teacher=str(folder), teacher_gguf_file="teacher.gguf",
                         method="kd")
    error = refused(["teacher-generate", str(recipe)], capsys)
    assert f"{folder / 'teacher.gguf'}: cannot load the tokenizer" in error and "truncated or corrupt" in error


# ---------------------------------------------------------------------------------------------------
# Problems 3 and 4: resume takes a complete checkpoint; a folder holds one run


def _checkpoint(folder: Path, step: int, *, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_resume_true_takes_the_newest_complete_checkpoint_and_passes_over_torn_ones(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(resume_from_checkpoint=True))
    record_settings_in(recipe)
    good = _checkpoint(tmp_path / "run", 2)
    _checkpoint(tmp_path / "run", 4, complete=False)  # a save cut short: no trainer_state.json
    folder = prepare_output_dir(recipe)
    assert folder.resume_from == good and folder.skipped == ["checkpoint-4"]


def test_resume_true_without_a_checkpoint_is_an_error(recipe_file, tmp_path, capsys, no_model_loads):
    _checkpoint(tmp_path / "run", 3, complete=False)
    error = refused(["train", str(recipe_file(resume_from_checkpoint=True))], capsys)
    assert (f"resume_from_checkpoint: true, but output_dir {tmp_path / 'run'} holds no complete checkpoint "
            "(incomplete: checkpoint-3)") in error


def record_settings_in(recipe: Recipe) -> None:
    Path(recipe.config.output_dir).mkdir(parents=True, exist_ok=True)
    record_settings(recipe)


def test_training_into_a_folder_that_holds_another_run_is_refused(recipe_file, tmp_path, capsys, no_model_loads):
    teacher = str(tmp_path / "teacher")
    record_settings_in(load_recipe(recipe_file(method="dpkd", teacher=teacher)))
    _checkpoint(tmp_path / "run", 2)
    error = refused(["train", str(recipe_file(method="sft", teacher=teacher))], capsys)
    assert f"output_dir {tmp_path / 'run'} holds another run (method 'dpkd' there, 'sft' here)" in error
    assert "overwrite_output_dir: true" in error
    # Resuming it with this recipe is refused too: that is how an sft run continued a dpkd run's checkpoint.
    error = refused(["train", str(recipe_file(method="sft", teacher=teacher, resume_from_checkpoint=True))], capsys)
    assert "holds another run" in error and "cannot be resumed" in error


def test_the_same_run_resumes_and_overwrite_output_dir_replaces_another(recipe_file, tmp_path):
    record_settings_in(load_recipe(recipe_file(learning_rate=1e-3)))
    _checkpoint(tmp_path / "run", 2)
    # Same run, longer: max_steps is not part of what makes a run.
    same = prepare_output_dir(load_recipe(recipe_file(learning_rate=1e-3, max_steps=9, resume_from_checkpoint=True)))
    assert same.resume_from == tmp_path / "run" / "checkpoint-2"
    with pytest.raises(ValueError, match="learning_rate 0.001 there, 0.002 here"):
        prepare_output_dir(load_recipe(recipe_file(learning_rate=2e-3)))
    replaced = prepare_output_dir(load_recipe(recipe_file(learning_rate=2e-3, overwrite_output_dir=True)))
    assert replaced.removed == ["checkpoint-2", SETTINGS_FILE] and not (tmp_path / "run" / "checkpoint-2").exists()


@pytest.mark.slow
def test_a_run_records_its_settings_and_resumes_past_a_torn_checkpoint(model_pairs, recipe_file, tmp_path, capsys):
    teacher_dir, student_dir = model_pairs["llama"]
    run = tmp_path / "run"
    recipe = recipe_file(student=str(student_dir), teacher=str(teacher_dir), save_strategy="steps", save_steps=1)
    assert main(["train", str(recipe)]) == 0
    settings = json.loads((run / SETTINGS_FILE).read_text())
    assert settings["method"] == "sft" and settings["settings"]["student"] == str(student_dir)
    (run / "checkpoint-2" / "trainer_state.json").unlink()  # as a kill inside the save would leave it
    capsys.readouterr()

    assert main(["train", str(recipe), "--resume_from_checkpoint", "true", "--max_steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "passing over incomplete checkpoint-2" in err and f"resuming from {run / 'checkpoint-1'}" in err
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 3
