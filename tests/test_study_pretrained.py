"""`dpkd study` with a pretrained teacher (`dpkd.study.pretrained`): the SmolLM2 recipes are checked up front,
the training set splits deterministically, and the quick profile runs end to end on a tiny Llama teacher
that stands in for SmolLM2 (random weights, the offline test tokenizer with a chat template)."""

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

from dpkd.modeling import load_tokenizer, save_model_and_tokenizer, tiny_config
from dpkd.study import DemoError, load_demo_recipe, study_runs, study_stages, training_configs

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = {preset: REPO_ROOT / "configs" / "study" / f"smollm2-{preset}.yaml" for preset in ("cpu", "gpu")}
DPKD = [sys.executable, "-m", "dpkd"]
# A chat template unlike any plain template, so that rendered prompts are recognisable.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, tokenizer_dir) -> Path:
    """A 3-layer Llama with the test tokenizer and a chat template, saved as a pretrained model folder."""
    torch.manual_seed(0)
    chat_tokenizer = load_tokenizer(tokenizer_dir)
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    config = tiny_config("llama", len(chat_tokenizer), n_layer=3, d_model=64, n_head=4,
                         eos_token_id=chat_tokenizer.eos_token_id)
    return save_model_and_tokenizer(AutoModelForCausalLM.from_config(config), chat_tokenizer,
                                    tmp_path_factory.mktemp("pretrained") / "tiny-llama")


def _recipe_values(tiny_teacher: Path, preset: str = "cpu") -> dict:
    """The preset's recipe with the tiny teacher in place of SmolLM2 and a student of 2 of its 3 blocks."""
    values = yaml.safe_load(RECIPES[preset].read_text())
    values["teacher"]["model"] = str(tiny_teacher)
    values["student"]["from_teacher"]["keep_layers"] = 2
    return values


def _write(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
@pytest.mark.parametrize("profile", [None, "quick"])
def test_smollm2_recipes_are_valid_and_train_every_method_from_the_sft_warm_start(preset, profile):
    recipe = load_demo_recipe(RECIPES[preset], profile)
    v = recipe.values
    assert v["teacher"]["model"] == "smollm2-135m-instruct" and v["init"] == "sft"
    assert {"sft", "kd", "seqkd", "jsd", "dpkd_token", "dpkd"} <= set(v["distill"]["methods"])
    assert set(v["eval"]["sets"]) == {"dolly", "selfinst", "vicuna", "sinst"}
    assert v["data"]["source"] == "dolly-dev" and v["data"]["template"] == "chat"
    runs = study_runs(v)
    for method in ("sft", "dpkd"):
        assert len([r for r, m, _ in runs if m == method]) >= 2, method
    configs = training_configs(recipe, Path("out"))
    stages = {s.name: s for s in study_stages(v, configs)}
    # The student is made from the pretrained teacher, not from its fine-tuned copy: it need not wait for it.
    assert stages["student_init"].needs == ("tokenizer",)
    assert all("warm_start" in stages[f"train_{run}"].needs for run, _, _ in runs)
    if preset == "gpu" and profile is None:
        assert v["bf16"] and v["eval"]["dtype"] == "bfloat16"
        assert all(c.bf16 == torch.cuda.is_available() for c in configs.values())
        assert not any("limit" in (options or {}) for options in v["eval"]["sets"].values())  # the full sets


@pytest.mark.parametrize("edit, message", [
    (lambda v: v["teacher"].update(model="smollm2-135m-instrct"), r"teacher\.model: .*did you mean"),
    (lambda v: v["teacher"].update(n_layer=4), r"teacher\.n_layer: the size of a pretrained teacher"),
    (lambda v: v["student"]["from_teacher"].update(keep_layers=0), r"student\.from_teacher\.keep_layers"),
    (lambda v: v["student"]["from_teacher"].update(keep_layers=[0, 0]), r"student\.from_teacher\.keep_layers"),
    (lambda v: v["student"]["from_teacher"].update(keep_layers=4), r"keeps more blocks than the teacher's 3 layers"),
    (lambda v: v["student"]["from_teacher"].update(keep_layers=[0, 3]), r"names a block beyond the teacher's 3"),
    (lambda v: v["student"].update(d_model=32), r"student: with teacher\.model"),
    (lambda v: v["data"].update(source="dolly-deb"), r"data\.source: 'dolly-deb'.*did you mean"),
    (lambda v: v["data"].update(test=10), r"data\.test: with teacher\.model the test sets are eval\.sets"),
    (lambda v: v["data"].pop("dev"), r"data\.dev"),
    (lambda v: v["eval"]["sets"].update(dolly_eval={}), r"eval\.sets: unknown set 'dolly_eval'"),
    (lambda v: v["eval"]["sets"].update({"dolly-dev": {}}), r"eval\.sets\.dolly-dev: the training set"),
    (lambda v: v["eval"]["sets"].update(vicuna={"limt": 3}), r"eval\.sets\.vicuna: unknown key 'limt'"),
    (lambda v: v["eval"]["sets"].update(vicuna={"limit": 0}), r"eval\.sets\.vicuna\.limit must be a positive"),
    (lambda v: v["eval"].update(dtype="bf16"), r"eval\.dtype must be one of"),
    (lambda v: v.update(tokenizer={"vocab_size": 10}), r"tokenizer: a pretrained teacher"),
    (lambda v: v.update(seeds_by_method={"rkl": [0]}), r"seeds_by_method\.rkl: not a method"),
    (lambda v: v.update(seeds_by_method={"kd": []}), r"seeds_by_method\.kd must be a non-empty list"),
    (lambda v: v.update(seeds_by_method={"kd": [0, 7]}), r"seeds_by_method\.kd: \[0, 7\] are not all seeds the sft"),
])
def test_bad_pretrained_recipe_errors_name_the_file_and_the_key(tmp_path, tiny_teacher, edit, message):
    values = _recipe_values(tiny_teacher)
    edit(values)
    path = _write(tmp_path, values)
    with pytest.raises(DemoError, match=message) as error:
        load_demo_recipe(path)
    assert str(path) in str(error.value)


def test_a_registered_teacher_that_cannot_be_converted_is_refused_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from dpkd import pretrained

    monkeypatch.setenv(pretrained.MODELS_DIR_ENV, str(tmp_path / "empty-cache"))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(DemoError, match=r"teacher\.model: 'smollm2-135m-instruct' is converted .* pip install gguf"):
        load_demo_recipe(RECIPES["cpu"])


def test_generated_task_recipes_refuse_the_pretrained_keys(tmp_path):
    values = yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text())
    values["eval"]["sets"] = {"dolly": {}}
    with pytest.raises(DemoError, match=r"eval\.sets is read only with a pretrained teacher"):
        load_demo_recipe(_write(tmp_path, values))


def test_training_set_splits_deterministically_into_disjoint_train_and_dev(tmp_path, tiny_teacher):
    from dpkd.data import load_instruction_data
    from dpkd.study.pretrained import build_data

    values = _recipe_values(tiny_teacher)
    values["data"] = {"source": "vicuna", "dev": 20, "template": "chat"}  # 80 rows: quick to render
    values["eval"]["sets"] = {"selfinst": {}}  # no prompt in common with vicuna

    def split(seed: int, name: str) -> dict[str, list[dict]]:
        folder = tmp_path / name
        folder.mkdir()
        paths = build_data({**values, "seed": seed}, folder)
        return {s: [json.loads(line) for line in p.read_text().splitlines()] for s, p in paths.items()}

    first, again, other = split(0, "a"), split(0, "b"), split(1, "c")
    assert first == again and first != other
    assert len(first["dev"]) == 20 and len(first["train"]) == 60
    source = load_instruction_data("vicuna", template="chat", tokenizer=load_tokenizer(tiny_teacher))
    rows = [{"prompt": p, "completion": c} for p, c in zip(source["prompt"], source["completion"])]
    # Every source row lands in exactly one split, in source order, rendered through the chat template.
    assert sorted(map(json.dumps, first["train"] + first["dev"])) == sorted(map(json.dumps, rows))
    assert all(r["prompt"].startswith("<user> ") and r["prompt"].endswith("<assistant> ") for r in first["train"])
    values["data"]["train"] = 7
    capped = tmp_path / "capped"
    capped.mkdir()
    paths = build_data({**values, "seed": 0}, capped)
    assert paths["train"].read_text().splitlines() == [json.dumps(r, ensure_ascii=False) for r in first["train"][:7]]


def _summary_rows(summary_md: str, marker: str) -> dict[str, list[str]]:
    """Rows of the first table after `marker` in summary.md: first cell → the other cells."""
    lines = summary_md.split(marker, 1)[1].strip().split("\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}


@pytest.mark.slow
def test_quick_pretrained_study_runs_end_to_end_with_a_table_per_set(tmp_path, tiny_teacher):
    values = _recipe_values(tiny_teacher)
    # A reduced study: the control, one method with the teacher's samples and one with its logits.
    values["distill"]["methods"] = {m: values["distill"]["methods"][m] for m in ("sft", "kd", "dpkd")}
    values["training_seeds"] = [0, 1]
    values["seeds_by_method"] = {"kd": [1]}
    values["eval"]["seeds"] = [10]
    out = tmp_path / "study"
    result = subprocess.run([*DPKD, "study", str(_write(tmp_path, values)), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    quick = load_demo_recipe(tmp_path / "recipe.yaml", "quick").values

    # The student: the pretrained teacher's embeddings, head and its first and last blocks, copied.
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    student = AutoModelForCausalLM.from_pretrained(out / "student_init")
    assert student.config.num_hidden_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, tensor in s_state.items():
        source = key.replace("layers.1.", "layers.2.")
        assert torch.equal(tensor, t_state[source]), key
    # The teacher was fine-tuned before anything distilled from it.
    sft_teacher = AutoModelForCausalLM.from_pretrained(out / "teacher").state_dict()
    assert not torch.equal(sft_teacher["model.embed_tokens.weight"], t_state["model.embed_tokens.weight"])
    assert json.loads((out / "teacher" / "dpkd_run.json").read_text())["method"] == "teacher"

    train = (out / "data" / "train.jsonl").read_text().splitlines()
    dev = (out / "data" / "dev.jsonl").read_text().splitlines()
    assert len(dev) == quick["data"]["dev"] and len(train) == quick["data"]["train"] and not set(train) & set(dev)
    assert json.loads(train[0])["prompt"].startswith("<user> ")

    sets = quick["eval"]["sets"]
    runs = {"sft_s0", "sft_s1", "kd_s1", "dpkd_s0", "dpkd_s1"}
    assert {p.name for p in (out / "runs").iterdir()} == runs
    means: dict[str, dict] = {}
    for name in ("teacher", "warm_start", *(f"runs/{r}" for r in runs)):
        metrics = json.loads((out / name / "eval" / "metrics.json").read_text())
        assert list(metrics["sets"]) == list(sets)
        for set_name, options in sets.items():
            result = metrics["sets"][set_name]
            assert result["n_examples"] == options["limit"]
            assert result["settings"]["sampling"]["max_new_tokens"] == options.get(
                "max_new_tokens", quick["eval"]["max_new_tokens"])
            assert result["settings"]["template"] == "chat"
            predictions = out / name / "eval" / "sets" / set_name / "predictions" / set_name / "seed10.jsonl"
            first = json.loads(predictions.read_text().splitlines()[0])
            assert first["prompt"].startswith("<user> ") and len(first["response_ids"]) <= options.get(
                "max_new_tokens", quick["eval"]["max_new_tokens"])
        means[name.removeprefix("runs/")] = {s: {m: r["summary"][m]["mean"] for m in ("exact_match", "rougeL")}
                                             for s, r in metrics["sets"].items()}

    summary_md = (out / "report" / "summary.md").read_text()
    results = _summary_rows(summary_md, "Evaluation sets")
    assert list(results)[0] == "teacher"
    assert len(results["teacher"]) == 2 * len(sets)
    teacher_cells = [f"{means['teacher'][s][m]:.1f} ± 0.0" for s in sets for m in ("exact_match", "rougeL")]
    assert results["teacher"] == teacher_cells
    paired = _summary_rows(summary_md, "Paired with")
    assert set(paired) == {"kd", "dpkd"}
    # kd has training seed 1 only: paired with sft_s1 alone; dpkd with both seeds.
    assert paired["kd"][-1] == "1" and paired["dpkd"][-1] == "2"
    for cell, (s, m) in zip(paired["kd"], ((s, m) for s in sets for m in ("exact_match", "rougeL"))):
        assert cell == f"{means['kd_s1'][s][m] - means['sft_s1'][s][m]:+.1f}"
    for cell, (s, m) in zip(paired["dpkd"], ((s, m) for s in sets for m in ("exact_match", "rougeL"))):
        d = [means[f"dpkd_s{k}"][s][m] - means[f"sft_s{k}"][s][m] for k in (0, 1)]
        assert cell == f"{sum(d) / 2:+.1f} ± {abs(d[0] - d[1]) / 2:.1f}"
    report = (out / "report" / "report.md").read_text()
    assert all(title in report for title in ("DollyEval", "SelfInst", "Vicuna", "S-NI"))
    assert "over 1 sampling seeds" in report


def test_set_tables_give_a_column_group_per_set_and_pair_on_the_shared_seeds():
    from dpkd.study.pretrained import paired_sets_table, sets_table

    summary = {"dolly": {"exact_match": {"mean": 1.0, "std": 0.5}, "rougeL": {"mean": 20.25, "std": 2.0}},
               "vicuna": {"exact_match": {"mean": 0.0, "std": 0.0}, "rougeL": {"mean": 15.0, "std": 1.0}}}
    lines = sets_table([("teacher", summary)], ["dolly", "vicuna"]).splitlines()
    assert lines[0] == "| model | DollyEval EM | DollyEval ROUGE-L | Vicuna EM | Vicuna ROUGE-L |"
    assert lines[2] == "| teacher | 1.0 ± 0.5 | 20.2 ± 2.0 | 0.0 ± 0.0 | 15.0 ± 1.0 |"

    def scores(dolly_rouge: float, vicuna_rouge: float) -> dict:
        return {"dolly": {"exact_match": 0.0, "rougeL": dolly_rouge},
                "vicuna": {"exact_match": 0.0, "rougeL": vicuna_rouge}}

    per_method = {"sft": {0: scores(10.0, 30.0), 1: scores(20.0, 10.0)},
                  "dpkd": {0: scores(13.0, 31.0), 1: scores(21.0, 15.0)},
                  "kd": {1: scores(25.0, 8.0)}}
    rows = paired_sets_table(per_method, ["dolly", "vicuna"]).splitlines()[2:]
    # dpkd − sft: dolly +3, +1 → +2.0 ± 1.0; vicuna +1, +5 → +3.0 ± 2.0. kd has seed 1 only: +5 and −2.
    assert rows == ["| dpkd | +0.0 ± 0.0 | +2.0 ± 1.0 | +0.0 ± 0.0 | +3.0 ± 2.0 | 2 |",
                    "| kd | +0.0 | +5.0 | +0.0 | -2.0 | 1 |"]


def test_gpu_preset_is_refused_before_any_work_on_a_machine_without_a_gpu(tmp_path, monkeypatch):
    from dpkd.study import recipe as recipe_module
    from dpkd.study import run_study

    monkeypatch.setattr(recipe_module, "_has_cuda", lambda: False)
    with pytest.raises(DemoError, match=r"bf16: true trains in bf16 mixed precision on a CUDA GPU"):
        run_study(RECIPES["gpu"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompts_of_the_evaluation_sets_are_left_out_of_train_and_dev(tmp_path, tiny_teacher):
    import gzip

    from dpkd.data_files import packaged_data_dir
    from dpkd.study.pretrained import build_data

    def raw(relative: str, n: int) -> list[str]:
        with gzip.open(packaged_data_dir() / relative, "rt", encoding="utf-8") as handle:
            return [line for line, _ in zip(handle, range(n))]

    # 20 Dolly training rows and 2 rows that are also VicunaEval's, as a training file
    source = tmp_path / "train.jsonl"
    shared = raw("vicuna/valid.jsonl.gz", 2)
    source.write_text("".join(raw("dolly/dev.jsonl.gz", 20)[:10] + shared + raw("dolly/dev.jsonl.gz", 20)[10:]))
    values = _recipe_values(tiny_teacher)
    values["data"] = {"source": str(source), "dev": 5, "template": "chat"}
    values["eval"]["sets"] = {"vicuna": {}, "selfinst": {}}
    folder = tmp_path / "data"
    folder.mkdir()
    paths = build_data({**values, "seed": 0}, folder)
    kept = {s: [json.loads(line)["prompt"] for line in p.read_text().splitlines()] for s, p in paths.items()}
    tokenizer = load_tokenizer(tiny_teacher)
    from dpkd.data import load_instruction_data

    vicuna = set(load_instruction_data("vicuna", template="chat", tokenizer=tokenizer)["prompt"])
    assert len(kept["train"]) + len(kept["dev"]) == 20
    assert not vicuna & set(kept["train"] + kept["dev"])

