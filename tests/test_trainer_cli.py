"""`dpkd train` and `dpkd teacher-generate` as a user runs them: a YAML recipe, overrides, errors, recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from dpkd.cli import main
from dpkd.config import METHODS
from dpkd.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dpkd" / "configs"
DPKD = Path(sys.executable).parent / "dpkd"
TINY = {"max_steps": 2, "per_device_train_batch_size": 4, "max_new_tokens": 4, "max_prompt_length": 48,
        "max_length": 64, "logging_steps": 1, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True}


@pytest.fixture
def write_data(make_dataset):
    """`write_data(path, n=8)`: `make_dataset(n=n)` written to `path` as JSONL; returns `path`."""
    def write(path: Path, n: int = 8) -> Path:
        path.write_text("".join(json.dumps(row) + "\n" for row in make_dataset(n=n)))
        return path
    return write


def write_recipe(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(DPKD), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_teacher_generate_then_train_reuses_every_teacher_output(model_pairs, tmp_path, write_data, capsys):
    teacher_dir, student_dir = model_pairs["llama"]
    recipe = write_recipe(tmp_path / "dpkd.yaml", student=str(student_dir), teacher=str(teacher_dir),
                          train_data=str(write_data(tmp_path / "train.jsonl")), output_dir=str(tmp_path / "run"),
                          teacher_cache_dir=str(tmp_path / "cache"), **TINY)

    # In process (a second interpreter would cost as much again); the training run is the user's subprocess.
    assert main(["teacher-generate", str(recipe)]) == 0
    assert "8 new teacher outputs for 8 prompts" in capsys.readouterr().out.strip().splitlines()[-1]

    trained = run_cli("train", str(recipe), "--learning_rate", "2e-3", "--beta=0.2", "--lr-scheduler-type", "constant")
    assert trained.returncode == 0, trained.stderr
    summary = trained.stdout.strip().splitlines()[-1]
    assert summary.startswith("dpkd train: dpkd finished 2 steps") and "teacher generations 0" in summary
    run = json.loads((tmp_path / "run" / "dpkd_run.json").read_text())
    assert (run["method"], run["learning_rate"], run["beta"], run["teacher_generations"]) == ("dpkd", 2e-3, 0.2, 0)
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert [e["learning_rate"] for e in state["log_history"] if "loss" in e] == [2e-3, 2e-3]
    AutoModelForCausalLM.from_pretrained(tmp_path / "run")


def test_unknown_recipe_key_is_named_with_its_line_before_any_model_loads(tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("student: does/not/exist\nteacher: nor/this\ntrain_data: missing.jsonl\n"
                      "output_dir: out\nbetta: 0.2\n")
    monkeypatch.chdir(tmp_path)  # where the relative output_dir would be made
    assert main(["train", str(recipe)]) == 2  # an error message and a status, not an exception
    err = capsys.readouterr().err
    assert f"{recipe}, line 5: unknown key 'betta' (did you mean 'beta'" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["--lerning_rate", "1e-3"], "override --lerning_rate: unknown key (did you mean 'learning_rate'"),
    (["--beta", "high"], "override --beta: cannot read 'high' as float"),
    (["--beta", "-1"], "beta: must be in (0, inf), got -1.0"),
    (["--method", "minillm"], "method: expected one of"),
    (["--method", "kd", "--teacher", ""], "method 'kd' needs `teacher`"),
    (["beta", "0.1"], "override 'beta': expected --key value"),
])
def test_bad_overrides_are_reported_by_name(overrides, message, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", student="s", teacher="t", train_data="d.jsonl",
                          output_dir=str(tmp_path / "out"))
    assert main(["train", str(recipe), *overrides]) == 2
    assert message in capsys.readouterr().err


def test_overrides_are_parsed_with_the_fields_types(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", student="s", teacher="t", train_data="d.jsonl",
                          output_dir=str(tmp_path / "out"))
    parsed = load_recipe(recipe, ["--max_steps", "7", "--lmbda", "0.25", "--length_normalize", "false",
                                  "--bf16=no", "--report_to", "tensorboard", "--kd_ratio", "none",
                                  "--limit", "5", "--lora", "{r: 4}"])
    args = parsed.config
    assert (args.max_steps, args.lmbda, args.length_normalize, args.bf16) == (7, 0.25, False, False)
    assert args.report_to == ["tensorboard"] and args.kd_ratio is None
    assert parsed.run["limit"] == 5 and parsed.run["lora"] == {"r": 4}


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "demo.yaml"))
def test_every_bundled_recipe_is_valid(recipe):
    # The GPU recipes ask for bf16, which this CPU cannot do; everything else is checked as is.
    parsed = load_recipe(CONFIGS / recipe, ["--bf16", "false"])
    assert parsed.run["student"] and parsed.config.output_dir
    stem = Path(recipe).stem
    if stem in METHODS:  # the CPU recipe of one method
        assert parsed.config.method == stem and parsed.config.use_cpu
        assert bool(parsed.run.get("teacher")) == METHODS[stem].needs_teacher


def test_there_is_a_cpu_recipe_per_method_and_the_paper_settings():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= set(METHODS) | {"gpt2-dpkd", "opt-dpkd"}
    gpt2 = load_recipe(CONFIGS / "gpt2-dpkd.yaml", ["--bf16", "false"])
    args = gpt2.config
    assert (gpt2.run["student"], gpt2.run["teacher"]) == ("gpt2", "runs/gpt2-xl-sft")
    assert (args.learning_rate, args.per_device_train_batch_size, args.lr_scheduler_type.value,
            args.max_grad_norm, args.max_length, args.max_prompt_length) == (5e-4, 8, "cosine", 1.0, 512, 256)


# Two recipes cover the two paths (no teacher; teacher with student samples and the cache); that every
# method's step trains and saves is `test_trainer.py`'s, that every recipe loads is the test above's.
@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpkd"])
def test_each_cpu_recipe_trains_on_the_tiny_models(method, model_pairs, tmp_path, capsys, write_data):
    teacher_dir, student_dir = model_pairs["gpt2"]
    overrides = ["--student", str(student_dir), "--teacher", str(teacher_dir),
                 "--train_data", str(write_data(tmp_path / "train.jsonl")), "--output_dir", str(tmp_path / "run"),
                 "--teacher_cache_dir", str(tmp_path / "cache"),
                 *[token for key, value in TINY.items() for token in (f"--{key}", str(value))], "--max_steps", "1"]
    assert main(["train", str(CONFIGS / f"{method}.yaml"), *overrides]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"dpkd train: {method} finished 1 steps")
    AutoModelForCausalLM.from_pretrained(tmp_path / "run")


def test_lora_recipe_trains_adapters_and_saves_a_merged_plain_model(model_pairs, tmp_path, capsys, write_data):
    _, student_dir = model_pairs["llama"]
    recipe = write_recipe(tmp_path / "lora.yaml", student=str(student_dir), method="sft",
                          train_data=str(write_data(tmp_path / "train.jsonl")), output_dir=str(tmp_path / "run"),
                          lora={"r": 4, "alpha": 8, "dropout": 0.0}, learning_rate=1e-2, **TINY)
    assert main(["train", str(recipe)]) == 0
    base = AutoModelForCausalLM.from_pretrained(student_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert not (tmp_path / "run" / "adapter_config.json").exists()
    changed = {name for name, p in merged.named_parameters() if not torch.equal(p, base.get_parameter(name))}
    # Only the adapted projections move; embeddings, norms and MLPs are frozen under LoRA.
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed), changed
