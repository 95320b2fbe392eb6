"""`dpkd demo` (`dpkd.study`): the recipe is checked up front; the quick study runs end to end, survives
Ctrl-C, and a second invocation reuses every finished stage; a killed study leaves no process behind."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dpkd.study import (
    METHODS,
    DemoError,
    Stage,
    StageMarkers,
    load_demo_recipe,
    resolve_parallelism,
    run_stages,
    stage_keys,
    study_stages,
    training_configs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DPKD = [sys.executable, "-m", "dpkd"]
STUDY_RECIPES = REPO_ROOT / "src" / "dpkd" / "configs" / "study"
# The earlier protocol (every method from scratch, one run each): the recipe the machinery tests below run.
SCRATCH_RECIPE = STUDY_RECIPES / "scratch-protocol.yaml"
ABLATIONS_RECIPE = STUDY_RECIPES / "ablations.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def _bundled_text() -> str:
    return (REPO_ROOT / "configs" / "demo.yaml").read_text()


def _scratch_values() -> dict:
    import yaml

    return yaml.safe_load(SCRATCH_RECIPE.read_text())


# --- the recipe ------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", [None, "quick", "big"])
@pytest.mark.parametrize("path", [None, SCRATCH_RECIPE, ABLATIONS_RECIPE])
def test_bundled_recipes_are_valid_for_every_profile(path, profile):
    recipe = load_demo_recipe(path, profile)
    assert "sft" in recipe.values["distill"]["methods"]
    assert len(recipe.values["eval"]["seeds"]) == 3


@pytest.mark.parametrize("profile", [None, "big"])
def test_the_bundled_data_sizes_can_be_drawn_without_repeating_a_prompt(profile):
    from dpkd.tasks import generate_splits

    data = load_demo_recipe(None, profile).values["data"]
    sizes = {split: data[split] for split in ("train", "dev", "test")}
    assert {split: len(rows) for split, rows in generate_splits(sizes, tasks=data["tasks"]).items()} == sizes


def test_the_demo_follows_the_papers_protocol_with_compute_matched_controls():
    v = load_demo_recipe(None).values
    assert v["init"] == "sft" and v["training_seeds"] == [0, 1, 2] and v["select_on_dev"] is True
    assert {"sft", "seqkd", "dpkd"} <= set(v["distill"]["methods"]) <= set(METHODS)
    # Every method, the controls too, gets the same extra budget: none sets its own.
    assert all("max_steps" not in (fields or {}) for fields in v["distill"]["methods"].values())
    assert set(load_demo_recipe(SCRATCH_RECIPE).values["distill"]["methods"]) == set(METHODS)
    assert "init" not in load_demo_recipe(SCRATCH_RECIPE).values


def test_quick_profile_overlays_only_what_it_names():
    default, quick = load_demo_recipe(None), load_demo_recipe(None, "quick")
    assert quick.values["data"]["train"] < default.values["data"]["train"]
    assert quick.values["teacher"]["training"]["max_steps"] < default.values["teacher"]["training"]["max_steps"]
    # Untouched keys of a partly overridden section survive the merge.
    assert quick.values["data"]["template"] == default.values["data"]["template"]
    assert quick.values["teacher"]["n_head"] == default.values["teacher"]["n_head"]
    assert quick.values["eval"]["seeds"] == default.values["eval"]["seeds"]


def test_student_is_several_times_smaller_than_teacher_in_the_default_recipe():
    v = load_demo_recipe(None).values

    def size(m: dict, vocab: int = 1000) -> int:  # embeddings, untied head, attention and MLP weights
        d = m["d_model"]
        return 2 * vocab * d + m["n_layer"] * (4 * d * d + 3 * d * 2 * d)

    assert size(v["teacher"]) >= 3 * size(v["student"])


def _bundled_values() -> dict:
    import yaml

    return yaml.safe_load(_bundled_text())


@pytest.mark.parametrize("edit, message", [
    (lambda v: v["teacher"].update(depth=3), r"unknown key 'teacher\.depth'"),
    (lambda v: v.update(distil=1), r"unknown key 'distil' \(did you mean 'distill'\?\)"),
    (lambda v: v["distill"]["common"].update(lr_warmup=3), r"distill\.common: .*lr_warmup"),
    (lambda v: v["distill"]["common"].update(output_dir="x"), r"distill\.common: output_dir"),
    (lambda v: v["distill"]["methods"].update(dpkd={"beta": -1}), r"distill\.methods\.dpkd: beta"),
    (lambda v: v["distill"]["methods"].update(minillm={}), r"distill\.methods.*minillm"),
    (lambda v: v["eval"].update(seeds=[10, 10]), r"eval\.seeds"),
    (lambda v: v["student"].update(n_head=5, d_model=64), r"student\.d_model must be divisible"),
    (lambda v: v.update(threads="many"), r"threads"),
    (lambda v: v.update(workers=0), r"workers must be 'auto' or a positive integer"),
    (lambda v: v["quick"].update(eval={"seed": [1]}), r"unknown key 'quick\.eval\.seed'"),
    (lambda v: v.pop("student"), r"missing section\(s\) student"),
    (lambda v: v["distill"]["methods"].update(dpkd_b1={"beta": 1.0}), r"distill\.methods\.dpkd_b1: 'dpkd_b1' is not a "
     r"method .*a variant names its method"),
    (lambda v: v["distill"]["methods"].update(b1={"method": "dpk", "beta": 1.0}),
     r"distill\.methods\.b1\.method: expected one of .* got 'dpk' \(did you mean 'dpkd'\?\)"),
    (lambda v: v["distill"]["methods"].update(b1={"method": "dpkd", "init": "warm"}),
     r"distill\.methods\.b1\.init: expected one of scratch, sft"),
    (lambda v: v["distill"]["methods"].update(sft={"method": "kd"}), r"distill\.methods\.sft: .*control"),
    (lambda v: v["distill"]["methods"].update(b1="dpkd"), r"distill\.methods\.b1 must be a mapping"),
    (lambda v: v.update(select_on_dev="yes"), r"'select_on_dev' must be bool"),
    (lambda v: v.update(dev_evaluations=0), r"dev_evaluations must be a positive integer"),
    (lambda v: v.update(select_on_dev=False), r"dev_evaluations is read only with select_on_dev: true"),
])
def test_bad_recipe_errors_name_the_file_and_the_key(tmp_path, edit, message):
    import yaml

    values = _bundled_values()
    edit(values)
    path = _write(tmp_path, yaml.safe_dump(values))
    with pytest.raises(DemoError, match=message) as err:
        load_demo_recipe(path)
    assert str(path) in str(err.value)


def test_cli_reports_a_bad_recipe_before_any_work(tmp_path):
    import yaml

    values = _bundled_values()
    values["tokenizer"]["vocab"] = values["tokenizer"].pop("vocab_size")
    path = _write(tmp_path, yaml.safe_dump(values))
    out = tmp_path / "out"
    result = subprocess.run([*DPKD, "demo", "--config", str(path), "--out", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert f"{path}: unknown key 'tokenizer.vocab'" in result.stderr
    assert not out.exists()


def test_stage_keys_change_exactly_downstream_of_an_edited_setting():
    base = load_demo_recipe(SCRATCH_RECIPE).values
    keys = stage_keys(base, 160)

    def changed(edit) -> set[str]:
        values = json.loads(json.dumps(base))
        edit(values)
        new = stage_keys(values, 160)
        return {name for name in keys if new[name] != keys[name]}

    runs = {f"train_{m}" for m in METHODS}
    evals = {f"eval_{m}" for m in METHODS} | {"eval_teacher"}
    assert changed(lambda v: v["eval"].update(seeds=[1, 2, 3])) == evals
    assert changed(lambda v: v["distill"]["methods"]["dpkd"].update(beta=0.5)) == {"train_dpkd", "eval_dpkd"}
    # Teacher samples are redone (from the cache, which the sampling settings key) when the shared settings change.
    assert changed(lambda v: v["distill"]["common"].update(max_steps=7)) == (
        runs | evals - {"eval_teacher"} | {"teacher_samples"})
    # SFT never sees the teacher, so a new teacher leaves the SFT student as it is.
    assert changed(lambda v: v["teacher"]["training"].update(max_steps=7)) == (
        {"teacher", "teacher_samples"} | runs | evals) - {"train_sft", "eval_sft"}
    assert changed(lambda v: v["student"].update(d_model=32)) == {"student_init"} | runs | evals - {"eval_teacher"}
    assert changed(lambda v: v["data"].update(train=100)) == set(keys)


def test_stage_keys_are_those_earlier_versions_wrote_so_their_runs_resume():
    # Pinned from the scratch protocol's quick recipe; a change here makes every existing run redo those stages, so it
    # must come from an edited recipe, not from a refactoring of how keys are computed.
    keys = stage_keys(load_demo_recipe(SCRATCH_RECIPE, "quick").values, 160)
    assert keys == {
        "data": "5107bbff6d97d9da", "tokenizer": "a88d55dfb91e4968", "teacher": "6ff2fb92078b0025",
        "student_init": "4d1d50c9f1ca1428", "teacher_samples": "59bc7889dd15fc8d",
        "train_sft": "bc33f990b80c4bc6", "train_dpkd_token": "ae45748d79201dc9",
        **{f"train_{m}": "3b66606727fccb59" for m in ("kd", "seqkd", "rkl", "jsd", "dpkd")},
        "eval_teacher": "e0e8c0595aac0365", "eval_sft": "e0c235a552bf5a03", "eval_dpkd_token": "f822e83fb1d31c57",
        **{f"eval_{m}": "a8544be3fb1de562" for m in ("kd", "seqkd", "rkl", "jsd", "dpkd")},
    }
    # The recipe with its task list (added when the default tasks changed) taken out: the keys of the
    # demo's quick recipe before that change, so the keys are computed as they were.
    without_tasks = load_demo_recipe(SCRATCH_RECIPE, "quick").values
    without_tasks["data"].pop("tasks")
    old = stage_keys(without_tasks, 160)
    assert (old["data"], old["teacher"], old["train_sft"], old["eval_dpkd"]) == (
        "bd9173a30a645daa", "a708e464fc2b0741", "30a7fa5019ac210c", "d28d8db58f99bd56")


@pytest.mark.parametrize("cores, workers, threads, expected", [
    (2, "auto", "auto", (2, 1)),
    (1, "auto", "auto", (1, 1)),
    (8, "auto", "auto", (4, 2)),
    (8, 3, "auto", (3, 2)),
    (8, 1, 4, (1, 4)),
])
def test_workers_share_the_cores(monkeypatch, cores, workers, threads, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert resolve_parallelism(workers, threads) == expected


def test_every_stage_waits_for_what_it_reads():
    recipe = load_demo_recipe(SCRATCH_RECIPE)
    stages = study_stages(recipe.values, training_configs(recipe, Path("unused")))
    position = {s.name: i for i, s in enumerate(stages)}
    assert len(position) == len(stages) == 5 + 1 + 2 * len(METHODS)
    for s in stages:
        assert all(position[need] < position[s.name] for need in s.needs), s.name
    by_name = {s.name: s for s in stages}
    # The SFT student can train while the teacher does; every other method reads the teacher.
    assert "teacher" not in by_name["train_sft"].needs
    for m in set(METHODS) - {"sft"}:
        assert "teacher" in by_name[f"train_{m}"].needs
    # The two methods that read (and may add to) the shared cache of teacher samples take turns.
    users = {s.name for s in stages if s.uses == "teacher_cache"}
    assert users == {"train_seqkd", "train_dpkd"}
    assert all("teacher_samples" in by_name[name].needs for name in users)
    for m in METHODS:
        assert by_name[f"eval_{m}"].needs == (f"train_{m}",)


def test_a_failed_stage_stops_the_study_and_is_not_marked_done(tmp_path):
    recipe = load_demo_recipe(SCRATCH_RECIPE, "quick")
    markers = StageMarkers(tmp_path)
    stages = [Stage("data", "k-data", "generating the tasks"),
              Stage("no_such_stage", "k-bad", "a stage that fails", needs=("data",)),
              Stage("tokenizer", "k-tok", "training the tokenizer", needs=("no_such_stage",))]
    log = io.StringIO()
    with pytest.raises(ValueError, match="unknown stage 'no_such_stage'"):
        run_stages(stages, markers, source=recipe.source, values=recipe.values, out=tmp_path, workers=2,
                   threads=1, log=log)
    lines = log.getvalue().splitlines()
    assert markers.is_done("data", "k-data") and (tmp_path / "data" / "train.jsonl").is_file()
    assert not markers.is_done("no_such_stage", "k-bad") and not markers.is_done("tokenizer", "k-tok")
    assert "[2/4] a stage that fails ..." in lines and "[3/4] training the tokenizer ..." not in lines


def test_stage_marker_counts_only_for_the_same_key(tmp_path):
    markers = StageMarkers(tmp_path)
    assert not markers.is_done("teacher", "abc")
    markers.mark("teacher", "abc")
    assert markers.is_done("teacher", "abc")
    assert not markers.is_done("teacher", "abd")


# --- signals: a study of two stand-in stages -------------------------------------------------------


def stand_in_stage(name: str, source: str, values: dict, out: str, context) -> None:
    """The stages of the stand-in study, run in the workers: `first` returns at once; `second` starts a
    process of its own, as the teacher's data-parallel ranks are started, says so, and never ends."""
    if name == "second":
        import multiprocessing

        rank = multiprocessing.get_context("spawn").Process(target=_stand_in_rank, args=(os.getpid(),))
        rank.start()
        Path(out, "second.started").write_text(str(rank.pid))
        time.sleep(600)


def _stand_in_rank(parent: int) -> None:
    from dpkd.study.workers import WorkerContext, start_worker

    start_worker(WorkerContext(None, threads=1, parent=parent))
    time.sleep(600)


def stand_in_demo(out, config=None, profile=None, log=None, bars=None, seeds=None) -> None:
    """`run_demo` on the stand-in study instead of the recipe's."""
    stages = [Stage("first", "k-first", "a stage that returns at once"),
              Stage("second", "k-second", "a stage that never ends", needs=("first",))]
    run_stages(stages, StageMarkers(Path(out)), source="stand-in", values={}, out=Path(out), workers=2, threads=1,
               log=log, bars=bars, run=stand_in_stage)


# `dpkd demo` as the command line runs it, on the stand-in study; the workers import `test_demo` as well.
_STAND_IN_DEMO = textwrap.dedent("""
    import sys

    import dpkd.study
    from dpkd.cli import main
    from test_demo import stand_in_demo

    dpkd.study.run_demo = stand_in_demo
    sys.exit(main(["demo", "--out", sys.argv[1]]))
""")


def _signal_when(command: list[str], ready: Path, timeout: float,
                 sig: int) -> tuple[subprocess.CompletedProcess, list]:
    """Start `command`, send it `sig` once `ready` exists, wait for it; return the finished process and
    the processes it had started by then."""
    import psutil

    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            # A job started in the background by a non-interactive shell (as CI may be)
                            # inherits an ignored SIGINT; give the demo the disposition a terminal gives it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"{ready} never appeared:\n{stdout}\n{stderr}")
        time.sleep(0.2)
    started = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), started


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_demo_leaves_no_process_behind(tmp_path, sig):
    import psutil

    killed, started = _signal_when([sys.executable, "-c", _STAND_IN_DEMO, str(tmp_path)],
                                   tmp_path / "second.started", timeout=300, sig=sig)
    assert killed.returncode == (130 if sig == signal.SIGTERM else -signal.SIGKILL), killed.stderr
    if sig == signal.SIGTERM:
        assert "dpkd demo: interrupted; run the same command again" in killed.stderr
    rank = int((tmp_path / "second.started").read_text())
    assert rank in {p.pid for p in started}
    # SIGTERM: the demo stops its workers and theirs as on Ctrl-C; SIGKILL: each worker sees its parent
    # gone and ends, and so does the rank it started.
    _, alive = psutil.wait_procs(started, timeout=15)
    assert not alive, [p.cmdline() for p in alive]
    markers = StageMarkers(tmp_path)
    assert markers.is_done("first", "k-first") and not markers.is_done("second", "k-second")


# --- the quick study, end to end ---------------------------------------------------------------------


# Timeouts are generous: on a shared 2-core machine a quick study has taken from 1 to 10 minutes.
def _run_demo(out: Path, timeout: float, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([*DPKD, "demo", "--quick", "--out", str(out), "--config", str(SCRATCH_RECIPE), *options],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _report_rows(report_md: str, section: str) -> list[str]:
    """First-column labels of the first table under `## section` (header and rule skipped)."""
    lines = report_md.split(f"## {section}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return [line.split("|")[1].strip() for line in table[2:]]


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_resumes_after_ctrl_c_and_reuses_finished_stages(tmp_path):
    out = tmp_path / "demo"

    import psutil

    interrupted, workers = _signal_when([*DPKD, "demo", "--quick", "--out", str(out), "--config", str(SCRATCH_RECIPE)],
                                        out / "stages" / "teacher.done",
                                        timeout=600, sig=signal.SIGINT)
    assert interrupted.returncode == 130, interrupted.stderr
    assert "interrupted" in interrupted.stderr
    # The worker processes go with the study: none is left writing into the folder.
    assert workers
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive

    # One worker process instead of several: the same models, to the last sampled token. A reduced study,
    # beside the rest of this one: it starts from the stages done so far (data, tokenizer, teacher, and the
    # student initialisation if done) and runs one method of each family and every evaluation one after
    # another in one process.
    alone = tmp_path / "alone"
    (alone / "stages").mkdir(parents=True)
    for stage in ("data", "tokenizer", "teacher", "student_init"):
        if (out / "stages" / f"{stage}.done").exists():
            shutil.copytree(out / stage, alone / stage)
            shutil.copy(out / "stages" / f"{stage}.done", alone / "stages")
    shutil.rmtree(alone / "teacher" / "eval", ignore_errors=True)
    import yaml

    values = _scratch_values()
    reduced = ("sft", "kd", "seqkd", "dpkd")
    values["workers"] = 1
    values["distill"]["methods"] = {m: values["distill"]["methods"][m] for m in reduced}
    recipe = _write(tmp_path, yaml.safe_dump(values))
    with open(tmp_path / "alone.out", "w") as stdout, open(tmp_path / "alone.err", "w") as stderr:
        one_worker = subprocess.Popen([*DPKD, "demo", "--quick", "--out", str(alone), "--config", str(recipe)],
                                      stdout=stdout, stderr=stderr, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        _finish_and_rerun(out)
        one_worker.wait(timeout=600)
    finally:
        if one_worker.poll() is None:
            one_worker.kill()  # its workers see it gone and end
    assert one_worker.returncode == 0, (tmp_path / "alone.err").read_text()
    stdout = (tmp_path / "alone.out").read_text()
    assert "1 worker process(es)" in stdout
    assert "training the teacher (20 steps): done before, reused" in stdout
    for name in ("teacher", *(f"runs/{m}" for m in reduced)):
        for seed in (10, 20, 30):
            ours = (out / name / "eval" / "predictions" / "test" / f"seed{seed}.jsonl").read_text()
            theirs = (alone / name / "eval" / "predictions" / "test" / f"seed{seed}.jsonl").read_text()
            assert [json.loads(x)["prediction"] for x in ours.splitlines()] == [
                json.loads(x)["prediction"] for x in theirs.splitlines()], (name, seed)


def _finish_and_rerun(out: Path) -> None:
    """Finish the interrupted quick study in `out`, check its report, and run it once more: all reused."""
    teacher_weights = out / "teacher" / "model.safetensors"
    teacher_mtime = teacher_weights.stat().st_mtime_ns

    finished = _run_demo(out, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert "training the teacher (20 steps): done before, reused" in finished.stdout
    assert teacher_weights.stat().st_mtime_ns == teacher_mtime

    report = out / "report" / "report.md"
    assert f"report {report}" in finished.stdout
    text = report.read_text()
    labels = ["Teacher (teacher)", "SFT", "KD", "SeqKD", "rkl", "jsd", "dpkd_token", "DPKD"]
    for section in ("Exact match", "ROUGE-L"):
        assert sorted(_report_rows(text, section)) == sorted(labels), section
    for name in ("teacher", *(f"runs/{m}" for m in METHODS)):
        metrics = json.loads((out / name / "eval" / "metrics.json").read_text())
        (result,) = metrics["sets"].values()
        assert set(result["per_seed"]) == {"10", "20", "30"}
        assert result["n_examples"] == 9
    for m in METHODS:
        run = json.loads((out / "runs" / m / "dpkd_run.json").read_text())
        assert run["method"] == m and run["global_step"] == 6
        assert run["student"] == str(out.resolve() / "student_init")
    for png in ("rougeL.png", "training_curves.png"):
        data = (out / "report" / png).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
        import matplotlib.image

        height, width, _ = matplotlib.image.imread(out / "report" / png).shape
        assert height > 100 and width > 100
    summary = (out / "report" / "summary.md").read_text()
    assert all(f"| {name} |" in summary for name in ("teacher", *METHODS))

    weights = {p: p.stat().st_mtime_ns for p in out.glob("**/model.safetensors")}
    again = _run_demo(out, timeout=300)
    assert again.returncode == 0, again.stderr
    reused = [line for line in again.stdout.splitlines() if line.startswith("[")]
    assert sum("done before, reused" in line for line in reused) == 5 + 2 * len(METHODS) + 1
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/model.safetensors")} == weights



# --- the paper's protocol: a warm start, training seeds, the paired table -----------------------------

PAPER_RECIPE = REPO_ROOT / "src" / "dpkd" / "configs" / "demo.yaml"  # the demo follows the paper's protocol


def test_paired_difference_is_the_mean_and_std_of_per_seed_differences():
    from dpkd.study import paired_differences

    # Seeds 0, 1, 2: differences 2 − 1 = 1, 5 − 2 = 3, 4 − 2 = 2; mean 2, population std sqrt(2/3).
    paired = paired_differences({0: 2.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 2.0})
    assert paired["per_seed"] == {0: 1.0, 1: 3.0, 2: 2.0}
    assert paired["mean"] == pytest.approx(2.0)
    assert paired["std"] == pytest.approx((2 / 3) ** 0.5)
    assert paired["n"] == 3
    with pytest.raises(ValueError, match="same training seeds"):
        paired_differences({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})


def test_paired_table_pairs_each_method_with_the_control_of_the_same_seed():
    from dpkd.study.build import paired_table

    per_method = {"sft": {0: {"exact_match": 10.0, "rougeL": 20.0}, 1: {"exact_match": 30.0, "rougeL": 40.0}},
                  "dpkd": {0: {"exact_match": 12.0, "rougeL": 19.0}, 1: {"exact_match": 30.0, "rougeL": 43.0}}}
    # Exact match: +2 and 0 → +1.0 ± 1.0; ROUGE-L: −1 and +3 → +1.0 ± 2.0 (unpaired, the spreads would be 10).
    assert paired_table(per_method).splitlines()[2:] == ["| dpkd | +1.0 ± 1.0 | +1.0 ± 2.0 | 2 |"]
    one_seed = {m: {0: per_seed[0]} for m, per_seed in per_method.items()}
    assert paired_table(one_seed).splitlines()[2:] == ["| dpkd | +2.0 | -1.0 | 1 |"]


def test_sampling_spread_is_the_std_over_sampling_seeds_averaged_over_a_methods_runs():
    from dpkd.study.build import sampling_spread_table

    runs = [{"exact_match": {"std": 1.0}, "rougeL": {"std": 2.0}}, {"exact_match": {"std": 2.0}, "rougeL": {"std": 0.5}}]
    assert sampling_spread_table({"dpkd": runs}).splitlines()[2:] == ["| dpkd | 1.5 | 1.2 |"]


def test_paper_protocol_recipe_warm_starts_and_trains_each_method_per_seed():
    recipe = load_demo_recipe(PAPER_RECIPE)
    v = recipe.values
    methods = list(v["distill"]["methods"])
    assert v["init"] == "sft" and v["training_seeds"] == [0, 1, 2]
    configs = training_configs(recipe, Path("out"))
    assert configs["warm_start"].method == "sft" and configs["warm_start"].max_steps == v["warm_start"]["max_steps"]
    stages = {s.name: s for s in study_stages(v, configs)}
    for m in methods:
        for seed in (0, 1, 2):
            assert configs[f"{m}_s{seed}"].seed == seed
            assert configs[f"{m}_s{seed}"].output_dir == str(Path("out") / "runs" / f"{m}_s{seed}")
            assert "warm_start" in stages[f"train_{m}_s{seed}"].needs
            assert stages[f"eval_{m}_s{seed}"].needs == (f"train_{m}_s{seed}",)
    assert stages["warm_start"].needs == ("student_init",) and "eval_warm_start" in stages
    # `--seeds` replaces the recipe's training seeds.
    reseeded = training_configs(load_demo_recipe(PAPER_RECIPE, seeds=[7]), Path("out"))
    assert [name for name in reseeded if name.startswith("sft_")] == ["sft_s7"] and reseeded["sft_s7"].seed == 7


def test_ablation_variants_train_their_base_method_and_reuse_the_demos_stages():
    recipe = load_demo_recipe(ABLATIONS_RECIPE)
    v = recipe.values
    configs = training_configs(recipe, Path("out"))
    assert configs["dpkd_beta1_s0"].method == "dpkd" and configs["dpkd_beta1_s0"].beta == 1.0
    assert configs["dpkd_eq8_s1"].length_normalize is False and configs["dpkd_s1"].length_normalize is True
    assert configs["dpkd_ce_s2"].effective_kd_ratio == 0.5 and configs["dpkd_s2"].effective_kd_ratio == 1.0
    assert configs["dpkd_k4_s0"].num_student_samples == 4
    # From scratch with the warm start's and the extra budget together: compute-matched with SFT continued.
    assert configs["dpkd_scratch_s0"].max_steps == configs["warm_start"].max_steps + configs["sft_s0"].max_steps
    stages = {s.name: s for s in study_stages(v, configs)}
    assert "student_init" in stages["train_dpkd_scratch_s0"].needs
    assert "warm_start" not in stages["train_dpkd_scratch_s0"].needs
    assert "warm_start" in stages["train_dpkd_k4_s0"].needs
    assert "distilling with dpkd_k4 (dpkd) from the warm start" in stages["train_dpkd_k4_s0"].title
    # Everything but the methods is the demo's: run in a copy of a finished demo, it trains only the variants.
    demo, ablations = stage_keys(load_demo_recipe(None).values, 80), stage_keys(v, 80)
    shared = set(demo) & set(ablations)
    assert {"data", "teacher", "warm_start", "teacher_samples", "train_sft_s0", "train_dpkd_s2"} <= shared
    assert all(demo[name] == ablations[name] for name in shared)


def test_warm_start_and_training_seed_enter_the_keys_of_the_runs_only():
    base = load_demo_recipe(PAPER_RECIPE, "quick").values
    methods = list(base["distill"]["methods"])
    keys = stage_keys(base, 160)

    def changed(edit) -> set[str]:
        values = json.loads(json.dumps(base))
        edit(values)
        new = stage_keys(values, 160)
        return {name for name in keys if name not in new or new[name] != keys[name]}

    runs = {f"train_{m}_s0" for m in methods}
    evals = {f"eval_{m}_s0" for m in methods}
    assert changed(lambda v: v["warm_start"].update(max_steps=9)) == {"warm_start", "eval_warm_start"} | runs | evals
    assert changed(lambda v: v.update(training_seeds=[5])) == runs | evals
    # Selection on dev changes what every run saves, and nothing else.
    assert changed(lambda v: v.update(dev_evaluations=3)) == runs | evals
    off = json.loads(json.dumps(base))
    off.update(select_on_dev=False)
    off.pop("dev_evaluations")
    assert {name for name in keys if stage_keys(off, 160)[name] != keys[name]} == runs | evals
    # The same run from scratch has another key than from the warm start.
    scratch = json.loads(json.dumps(base))
    scratch.update(init="scratch")
    scratch.pop("warm_start")
    assert stage_keys(scratch, 160)["train_sft_s0"] != keys["train_sft_s0"]


@pytest.mark.parametrize("edit, message", [
    (lambda v: v.update(init="pretrained"), r"init must be one of scratch, sft"),
    (lambda v: v.update(init="sft"), r"init: sft needs warm_start\.max_steps"),
    (lambda v: v.update(warm_start={"max_steps": 5}), r"warm_start is read only with init: sft"),
    (lambda v: v.update(init="sft", warm_start={"max_steps": 5, "seed": 1}), r"warm_start: seed"),
    (lambda v: v.update(training_seeds=[1, 1]), r"training_seeds must be a non-empty list of distinct"),
    (lambda v: v.update(training_seeds=[]), r"training_seeds must be"),
])
def test_bad_protocol_settings_name_the_key(tmp_path, edit, message):
    import yaml

    values = _scratch_values()
    edit(values)
    path = _write(tmp_path, yaml.safe_dump(values))
    with pytest.raises(DemoError, match=message):
        load_demo_recipe(path)


def test_seeds_option_must_be_distinct_integers():
    from dpkd.study import parse_training_seeds

    assert parse_training_seeds("0,1,2") == [0, 1, 2]
    for bad in ("0,x", "1,1", ""):
        with pytest.raises(DemoError, match="--seeds"):
            parse_training_seeds(bad)


def _paired_rows(summary_md: str) -> dict[str, list[str]]:
    """The paired table of a study's summary.md: method → [exact match, ROUGE-L, training seeds] cells."""
    lines = summary_md.split("Paired with", 1)[1].splitlines()
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in lines if line.startswith("| ") and not line.startswith("| method")}


@pytest.mark.slow
def test_study_from_a_warm_start_with_training_seeds_pairs_each_method_with_sft(tmp_path):
    import yaml

    values = yaml.safe_load(PAPER_RECIPE.read_text())
    values["distill"]["methods"] = {"sft": {}, "kd": {}}
    values["eval"]["seeds"] = [10, 20]
    values["quick"]["warm_start"] = {"max_steps": 4}
    values["quick"]["distill"]["common"]["max_steps"] = 3
    recipe = _write(tmp_path, yaml.safe_dump(values))
    out = tmp_path / "study"
    result = subprocess.run([*DPKD, "study", str(recipe), "--quick", "--seeds", "0,1", "--out", str(out)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "warm-starting the student with sft (4 steps)" in result.stdout
    warm = json.loads((out / "warm_start" / "dpkd_run.json").read_text())
    assert warm["method"] == "sft" and warm["global_step"] == 4
    assert warm["student"] == str(out.resolve() / "student_init")
    runs = {f"{m}_s{seed}": (m, seed) for m in ("sft", "kd") for seed in (0, 1)}
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(runs)
    for run, (method, seed) in runs.items():
        record = json.loads((out / "runs" / run / "dpkd_run.json").read_text())
        # Every run starts from the warm start's weights, with the same extra budget, under its own seed.
        assert record["student"] == str(out.resolve() / "warm_start")
        assert (record["method"], record["seed"], record["global_step"]) == (method, seed, 3)
    # The training seed matters: the two SFT continuations differ.
    assert (out / "runs" / "sft_s0" / "model.safetensors").read_bytes() != (
        out / "runs" / "sft_s1" / "model.safetensors").read_bytes()

    def seed_mean(run: str, metric: str) -> float:
        (result_set,) = json.loads((out / "runs" / run / "eval" / "metrics.json").read_text())["sets"].values()
        assert set(result_set["per_seed"]) == {"10", "20"}
        return sum(s[metric] for s in result_set["per_seed"].values()) / 2

    summary_md = (out / "report" / "summary.md").read_text()
    kd = _paired_rows(summary_md)["kd"]
    for cell, metric in zip(kd, ("exact_match", "rougeL")):
        d = [seed_mean(f"kd_s{s}", metric) - seed_mean(f"sft_s{s}", metric) for s in (0, 1)]
        mean, std = sum(d) / 2, abs(d[0] - d[1]) / 2
        assert cell == f"{mean:+.1f} ± {std:.1f}", (metric, d)
    assert kd[2] == "2"
    assert list(_paired_rows(summary_md)) == ["kd"]
    assert "Paired with the sft continued control" in result.stdout
    assert "| sft continued |" in summary_md and "| warm start |" in summary_md
    report = (out / "report" / "report.md").read_text()
    assert "SFT continued (sft_s0)" in report and "SFT warm start" in report
    # select_on_dev: every run, the control too, kept its best-scored step on dev among those scored.
    for run in runs:
        selection = json.loads((out / "runs" / run / "dev_selection.json").read_text())
        scores = [(e["rougeL"], -e["step"]) for e in selection["evaluated"]]
        assert [e["step"] for e in selection["evaluated"]] == [2, 3]
        assert selection["kept_step"] == -max(scores)[1]
    assert "Checkpoints selected on dev (greedy decoding, ROUGE-L; scored after steps 2, 3" in summary_md
