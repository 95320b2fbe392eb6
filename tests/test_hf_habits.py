"""Hugging Face habits (issue 15): chat data in `dpkd train`/`dpkd eval`, `beta` with TRL's meaning,
`dpkd train --config` with TRL's key names and a `--help` that lists the fields."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpkd.cli import main
from dpkd.config import METHODS, DistillationConfig
from dpkd.recipe import load_models_and_data, load_recipe

# A minimal chat template: enough for `apply_chat_template` on the test tokenizer.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
TINY = {"max_steps": 1, "per_device_train_batch_size": 4, "max_new_tokens": 4, "max_prompt_length": 48,
        "max_length": 64, "logging_steps": 1, "save_strategy": "no", "use_cpu": True, "disable_tqdm": True}


@pytest.fixture
def chat_student(student_dir, tmp_path) -> Path:
    """The tiny student, its tokenizer given a chat template (an instruct model)."""
    path = tmp_path / "chat-student"
    shutil.copytree(student_dir, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def write_messages(path: Path, n: int = 8) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Say the word {i}"},
                          {"role": "assistant", "content": f"word {i} word"}]} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_recipe(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------
# Chat everywhere


def test_messages_data_loads_with_the_students_chat_template(chat_student, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model_name_or_path=str(chat_student), method="sft",
                                      dataset_name=str(write_messages(tmp_path / "chat.jsonl")),
                                      output_dir=str(tmp_path / "run"), **TINY))
    tokenizer, student, _, train, _, _ = load_models_and_data(recipe)
    assert student is not None and len(train) == 8
    assert train[0]["prompt"] == "<user> Say the word 0\n<assistant> "


def test_chat_file_trains_with_dpkd_train_dash_dash_config(chat_student, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", student=str(chat_student), method="sft", template="chat",
                          train_data=str(write_messages(tmp_path / "chat.jsonl")), **TINY)
    assert main(["train", "--config", str(recipe), "--output_dir", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("dpkd train: sft finished 1 steps")
    AutoModelForCausalLM.from_pretrained(tmp_path / "run")


def test_dpkd_eval_renders_prompts_with_the_chosen_template(chat_student, tmp_path, capsys):
    data = tmp_path / "alpaca.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi there"}) + "\n")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(chat_student), "--data", str(data), "--seeds", "1", "--out", str(out),
                 "--max-new-tokens", "2", "--template", "chat", "--device", "cpu"]) == 0
    [written] = (out / "predictions").rglob("seed1.jsonl")
    assert json.loads(written.read_text().splitlines()[-1])["prompt"] == "<user> Say hi\n<assistant> "
    assert json.loads((out / "metrics.json").read_text())["settings"]["template"] == "chat"


# ---------------------------------------------------------------------------------------------------
# One beta per method, with TRL's meaning


def test_beta_is_the_jsd_interpolation_for_jsd_and_the_preference_beta_otherwise(tmp_path):
    jsd = DistillationConfig(output_dir=str(tmp_path), method="jsd", beta=1.0)
    assert METHODS["jsd"].loss_options(jsd)["beta"] == 1.0
    assert DistillationConfig(output_dir=str(tmp_path), method="jsd").beta == 0.5  # GKDConfig's default
    assert DistillationConfig(output_dir=str(tmp_path), method="dpkd").beta == 0.1  # DPOConfig's default
    token = DistillationConfig(output_dir=str(tmp_path), method="dpkd_token", beta=0.3)
    assert METHODS["dpkd_token"].loss_options(token)["beta"] == 0.3


def test_jsd_beta_still_works_with_a_warning_and_conflicts_are_errors(tmp_path):
    with pytest.warns(FutureWarning, match="beta"):
        old = DistillationConfig(output_dir=str(tmp_path), method="jsd", jsd_beta=0.9)
    assert METHODS["jsd"].loss_options(old)["beta"] == 0.9
    with pytest.raises(ValueError, match="jsd_beta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        DistillationConfig(output_dir=str(tmp_path), method="jsd", beta=0.2, jsd_beta=0.9)
    with pytest.raises(ValueError, match="beta: must be in"):
        DistillationConfig(output_dir=str(tmp_path), method="jsd", beta=1.5)


def test_a_trl_style_gkd_config_works(tmp_path):
    """What a GKDConfig user writes: beta, lmbda, max_completion_length, temperature."""
    args = DistillationConfig(output_dir=str(tmp_path), method="jsd", beta=0.0, lmbda=1.0, temperature=0.9,
                              max_completion_length=32)
    assert (args.beta, args.lmbda, args.max_new_tokens, args.sampling().max_new_tokens) == (0.0, 1.0, 32, 32)
    assert METHODS["jsd"].loss_options(args) == {"beta": 0.0, "temperature": 0.9}
    with pytest.raises(ValueError, match="max_completion_length"):
        DistillationConfig(output_dir=str(tmp_path), max_completion_length=32, max_new_tokens=16)


# ---------------------------------------------------------------------------------------------------
# TRL's command line


def test_train_help_lists_every_field_with_help_and_default(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for field in ("--method (default: 'dpkd')", "--beta (default: None)", "--learning_rate (default: 5e-05)",
                  "--student (also --model_name_or_path)", "--dataset_train_split", "--max_completion_length"):
        assert field in text, field
    assert "Distillation method, one of:" in text and "The initial learning rate" in text


def test_trl_key_names_are_the_run_keys(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="s", teacher_model_name_or_path="t",
                          dataset_name="org/set", dataset_config="en", dataset_train_split="train[:10]",
                          output_dir=str(tmp_path / "out"))
    parsed = load_recipe(recipe, ["--dataset_test_split", "test"])
    assert (parsed.run["student"], parsed.run["teacher"], parsed.run["train_data"]) == ("s", "t", "org/set")
    assert (parsed.run["dataset_config"], parsed.run["dataset_test_split"]) == ("en", "test")
    both = write_recipe(tmp_path / "both.yaml", student="s", model_name_or_path="s2", train_data="d",
                        output_dir="out")
    with pytest.raises(ValueError, match="line 2: 'model_name_or_path' is TRL's name for 'student'"):
        load_recipe(both)


def test_a_dataset_dict_without_the_train_split_names_its_splits(student_dir, tmp_path):
    rows = {"prompt": ["a b", "c d"], "completion": [" e", " f"]}
    folder = tmp_path / "dd"
    DatasetDict({"validation": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(folder)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", student=str(student_dir), method="sft",
                                      train_data=str(folder), dataset_train_split="train",
                                      output_dir=str(tmp_path / "run"), **TINY))
    with pytest.raises(ValueError, match="no split 'train'; splits: validation, test"):
        load_models_and_data(recipe)
    picked = load_recipe(recipe.path, ["--dataset_train_split", "validation", "--dataset_test_split", "test"])
    _, _, _, train, evaluation, _ = load_models_and_data(picked)
    assert len(train) == 2 and len(evaluation) == 2


# ---------------------------------------------------------------------------------------------------
# Recipes for pip users


def test_dpkd_recipes_lists_the_bundled_recipes_with_a_description(capsys):
    assert main(["recipes"]) == 0
    lines = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert {"dpkd", "jsd", "sft", "gpt2-dpkd"} <= set(lines)
    assert lines["sft"].startswith("SFT baseline")


def test_a_copied_recipe_trains(student_dir, tmp_path, capsys):
    assert main(["recipes", "copy", "sft", str(tmp_path)]) == 0
    copied = Path(capsys.readouterr().out.strip())
    assert copied == tmp_path / "sft.yaml" and copied.read_text().startswith("# SFT baseline")
    assert main(["recipes", "copy", "sft", str(copied)]) == 2  # never overwrites
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q {i}:", "completion": f" a {i}"}) + "\n" for i in range(8)))
    tiny = [token for key, value in TINY.items() for token in (f"--{key}", str(value))]
    assert main(["train", "--config", str(copied), "--model_name_or_path", str(student_dir), "--dataset_name",
                 str(data), "--output_dir", str(tmp_path / "run"), *tiny]) == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "run")


def test_no_bundled_recipe_writes_a_cache_outside_its_output_dir():
    from dpkd.recipe import BUNDLED_RECIPES, bundled_recipes

    for name in bundled_recipes():
        values = yaml.safe_load((BUNDLED_RECIPES / f"{name}.yaml").read_text()) or {}
        cache = values.get("teacher_cache_dir")
        assert cache is None or Path(cache).is_relative_to(values["output_dir"]), name


# ---------------------------------------------------------------------------------------------------
# Model cards and push_to_hub


def test_every_save_writes_a_model_card_with_the_runs_facts(model_pairs, tokenizer, tmp_path, make_config,
                                                            make_dataset):
    from dpkd.trainer import DistillationTrainer

    teacher_dir, student_dir = model_pairs["llama"]
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "metrics.json").write_text(json.dumps({"sets": {"dolly": {
        "n_examples": 500, "summary": {"rougeL": {"mean": 25.5, "std": 0.25}, "exact_match": {"mean": 3.0, "std": 0.1}}}}}))
    trainer = DistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir),
                                  args=make_config(out, "jsd", beta=0.7, max_steps=1, save_steps=1),
                                  train_dataset=make_dataset(n=4), processing_class=tokenizer)
    trainer.data_name = "org/instructions"
    trainer.train()
    trainer.save_model()
    for folder in (out, out / "checkpoint-1"):
        card = (folder / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers\ntags:\n- dpkd\n- distillation\n- jsd\n"), folder
        assert f"| teacher | `{teacher_dir}` |" in card and f"| student (initial) | `{student_dir}` |" in card
        assert "| training data | `org/instructions` |" in card and "| beta | `0.7` |" in card
        evaluated = "| dolly | 500 | 25.50 ± 0.25 | 3.00 ± 0.10 |" in card  # the folder's own eval/metrics.json
        assert evaluated == (folder == out) and ("Not evaluated yet" in card) == (folder != out), folder
        assert "Direct Preference Knowledge Distillation for Large Language Models" in card and "2406.19774" in card


def test_push_to_hub_uploads_the_card_and_the_weights(model_pairs, tokenizer, tmp_path, make_config, make_dataset,
                                                      monkeypatch):
    import transformers.trainer

    from dpkd.trainer import DistillationTrainer

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            from huggingface_hub import RepoUrl

            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            uploaded.update(repo_id=repo_id, files={p.name: p.read_bytes() for p in Path(folder_path).iterdir()
                                                    if p.is_file()})
            return "https://huggingface.co/me/student/commit/0"

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    teacher_dir, student_dir = model_pairs["llama"]
    args = make_config(tmp_path / "run", "kd", max_steps=1, save_strategy="no", push_to_hub=True,
                       hub_model_id="me/student")
    trainer = DistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir), args=args,
                                  train_dataset=make_dataset(n=4), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    assert uploaded["repo_id"] == "me/student"
    assert "model.safetensors" in uploaded["files"] and "config.json" in uploaded["files"]
    card = uploaded["files"]["README.md"].decode()
    assert "- dpkd\n" in card and "- kd\n" in card and "2406.19774" in card


# ---------------------------------------------------------------------------------------------------
# peft as peft does it


def test_peft_config_trains_an_adapter_that_peft_loads_back(model_pairs, tokenizer, tmp_path, make_config,
                                                            make_dataset):
    import torch
    from peft import LoraConfig, PeftModel

    from dpkd.trainer import DistillationTrainer

    teacher_dir, student_dir = model_pairs["llama"]
    out = tmp_path / "adapter"
    trainer = DistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir),
                                  args=make_config(out, "rkl", max_steps=2, save_strategy="no", learning_rate=1e-2),
                                  train_dataset=make_dataset(n=8), processing_class=tokenizer,
                                  peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model()
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert "library_name: peft" in (out / "README.md").read_text()
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student_dir), out).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
        assert not torch.allclose(loaded(input_ids=ids).logits,
                                  AutoModelForCausalLM.from_pretrained(student_dir)(input_ids=ids).logits)


def test_a_merged_adapter_is_saved_as_a_plain_model_staged_and_never_with_a_non_finite_weight(
        model_pairs, tokenizer, tmp_path, make_config, make_dataset):
    import torch
    from peft import LoraConfig

    from dpkd.trainer import DistillationTrainer, NonFiniteError

    teacher_dir, student_dir = model_pairs["llama"]

    def trained(out):
        trainer = DistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir),
                                      args=make_config(out, "rkl", max_steps=1, save_strategy="no"),
                                      train_dataset=make_dataset(n=4), processing_class=tokenizer,
                                      peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             task_type="CAUSAL_LM"))
        trainer.train()
        return trainer

    trainer = trained(tmp_path / "merged")
    expected = trainer.accelerator.unwrap_model(trainer.model).eval()
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        logits = expected(input_ids=ids).logits
    trainer.save_merged_model()
    out = tmp_path / "merged"
    assert not (out / "adapter_config.json").exists() and not list(out.glob(".partial-*"))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits, logits)
    assert "library_name: peft" not in (out / "README.md").read_text()

    poisoned = trained(tmp_path / "poisoned")
    with torch.no_grad():
        next(p for n, p in poisoned.model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="holds nan values"):
        poisoned.save_merged_model()
    assert not (tmp_path / "poisoned" / "config.json").exists()
    assert not [p for p in (tmp_path / "poisoned").iterdir() if p.name.startswith(".")]


def test_recipe_peft_section_uses_peft_names_and_lora_is_deprecated(student_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q {i}:", "completion": f" a {i}"}) + "\n" for i in range(8)))
    recipe = write_recipe(tmp_path / "r.yaml", student=str(student_dir), method="sft", train_data=str(data),
                          peft={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj"]},
                          merge_adapter=False, learning_rate=1e-2, **TINY)
    assert main(["train", str(recipe), "--output_dir", str(tmp_path / "run")]) == 0
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, ["q_proj"])
    bad = write_recipe(tmp_path / "bad.yaml", student=str(student_dir), method="sft", train_data=str(data),
                       output_dir=str(tmp_path / "bad"), peft={"rank": 4}, **TINY)
    assert main(["train", str(bad)]) == 2
    assert "peft: unknown LoraConfig field(s) rank" in capsys.readouterr().err
    old = write_recipe(tmp_path / "old.yaml", student="s", method="sft", train_data="d", output_dir="o",
                       lora={"r": 4})
    with pytest.warns(FutureWarning, match="peft"):
        load_recipe(old)


# ---------------------------------------------------------------------------------------------------
# The README's Python runs as written


def test_the_readme_python_snippets_run(model_pairs, tmp_path, monkeypatch):
    import re

    teacher_dir, student_dir = model_pairs["llama"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q {i}:", "completion": f" a {i}"}) + "\n" for i in range(8)))
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    # The user's paths, and a run short enough for a test (the snippet's own settings otherwise).
    paths = {'"path/to/teacher"': repr(str(teacher_dir)), '"path/to/student"': repr(str(student_dir)),
             '"train.jsonl"': repr(str(data)),
             'output_dir="runs/dpkd"': f"output_dir={str(tmp_path / 'run')!r}, max_steps=1, max_new_tokens=4, "
                                       "max_prompt_length=48, max_length=64, use_cpu=True"}
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        for placeholder, value in paths.items():
            code = code.replace(placeholder, value)
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    AutoModelForCausalLM.from_pretrained(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------
# log_completions, as TRL


def test_log_completions_writes_each_logging_steps_samples_decoded_from_the_sampled_ids(
        model_pairs, tokenizer, tmp_path, make_config, make_dataset, caplog):
    import logging

    from dpkd.trainer import DistillationTrainer

    teacher_dir, student_dir = model_pairs["llama"]
    out = tmp_path / "run"
    args = make_config(out, "dpkd", max_steps=2, logging_steps=1, save_strategy="no", log_completions=True,
                       num_student_samples=2, num_completions_to_print=3)
    trainer = DistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir), args=args,
                                  train_dataset=make_dataset(n=8), processing_class=tokenizer)
    sampled = []  # what each step really sampled: (student ids, mask), (teacher ids, mask)
    sample_student, teacher_samples = trainer.sample_student, trainer.teacher_samples

    def decoded(ids, mask):
        return [tokenizer.decode(row[keep.bool()].tolist(), skip_special_tokens=True) for row, keep in zip(ids, mask)]

    def recording_student(*a, **k):
        ids, mask = sample_student(*a, **k)
        sampled.append({"student": decoded(ids, mask)})
        return ids, mask

    def recording_teacher(*a, **k):
        ids, mask, logps = teacher_samples(*a, **k)
        sampled[-1]["teacher"] = decoded(ids, mask)
        return ids, mask, logps

    trainer.sample_student, trainer.teacher_samples = recording_student, recording_teacher
    with caplog.at_level(logging.INFO, logger="dpkd.trainer"):
        trainer.train()
    lines = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and len(sampled) == 2
    for line, step in zip(lines, sampled):
        assert len(line["prompts"]) == 3 and all(p for p in line["prompts"])
        assert line["student_completions"] == step["student"][:3]  # k = 2 rows per prompt
        assert line["teacher_completions"] == [step["teacher"][0], step["teacher"][0], step["teacher"][1]]
        assert line["prompts"][0] == line["prompts"][1] != line["prompts"][2]
    assert any(text for line in lines for text in line["student_completions"] + line["teacher_completions"])
    assert sum("completion | prompt:" in r.getMessage() for r in caplog.records) == 6


def test_dpkd_train_shows_the_logged_completions_on_stderr(model_pairs, tmp_path, capsys):
    import logging

    teacher_dir, student_dir = model_pairs["llama"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q {i}:", "completion": f" a {i}"}) + "\n" for i in range(8)))
    recipe = write_recipe(tmp_path / "r.yaml", student=str(student_dir), teacher=str(teacher_dir), method="seqkd",
                          train_data=str(data), log_completions=True, num_completions_to_print=2, **TINY)
    try:
        assert main(["train", "--config", str(recipe), "--output_dir", str(tmp_path / "run")]) == 0
    finally:  # the handler `dpkd train` gave the logger writes to this test's captured stderr
        trainer_logger = logging.getLogger("dpkd.trainer")
        for handler in list(trainer_logger.handlers):
            trainer_logger.removeHandler(handler)
        trainer_logger.setLevel(logging.NOTSET)
    shown = [line for line in capsys.readouterr().err.splitlines() if "completion | prompt:" in line]
    assert len(shown) == 2 and all(line.startswith("dpkd train: step 1 completion | prompt: 'Q ") for line in shown)
    [line] = [json.loads(text) for text in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert line["student_completions"] is None and len(line["teacher_completions"]) == 2


def test_without_log_completions_no_completions_are_kept(model_pairs, tokenizer, tmp_path, make_config,
                                                         make_dataset):
    from dpkd.trainer import DistillationTrainer

    teacher_dir, student_dir = model_pairs["llama"]
    out = tmp_path / "run"
    trainer = DistillationTrainer(model=str(student_dir), teacher_model=str(teacher_dir),
                                  args=make_config(out, "seqkd", max_steps=1, save_strategy="no"),
                                  train_dataset=make_dataset(n=4), processing_class=tokenizer)
    trainer.train()
    assert not (out / "completions.jsonl").exists()


# ---------------------------------------------------------------------------------------------------
# Hub ids wherever a model is named


def test_dpkd_eval_names_a_hub_id_it_cannot_fetch_before_any_heavy_work(tmp_path, monkeypatch, capsys):
    import dpkd.evaluation

    def heavy(*args, **kwargs):
        raise AssertionError("loaded before the hub id was checked")

    monkeypatch.setattr(dpkd.evaluation, "load_instruction_data", heavy)
    monkeypatch.setattr(dpkd.evaluation, "_load_model", heavy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "no-such-org/no-such-model", "--data", "dolly", "--seeds", "1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpkd eval: error: --model: 'no-such-org/no-such-model' is no local folder, and as a "
                          "hub id it cannot be fetched: the Hugging Face Hub is offline (HF_HUB_OFFLINE is set)")
    assert len(err.splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_a_hub_id_evaluates_into_runs_eval_and_a_folder_into_itself(student_dir):
    from dpkd.evaluation import check_model_dir, default_out_dir

    assert check_model_dir("org/name") == "org/name"
    assert default_out_dir("org/name") == Path("runs", "eval", "org__name")
    assert check_model_dir(student_dir) == student_dir and default_out_dir(student_dir) == student_dir / "eval"


def test_a_recipes_hub_teacher_that_cannot_be_fetched_is_named(monkeypatch):
    from dpkd.modeling import ModelFileError, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelFileError, match=r"no-such-org/teacher is a hub id: the Hugging Face Hub is offline"):
        load_tokenizer("no-such-org/teacher")
