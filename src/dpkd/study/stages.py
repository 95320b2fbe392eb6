"""The stages of a study as one table: for each kind of stage, what it needs, what its key hashes, and the
function that runs it (in a worker process).

A stage is marked done by `<out>/stages/<name>.done`, which holds its key: a hash of its own settings and
of the keys of the stages it reads from, so editing the recipe redoes exactly the stages it affects.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpkd.study.build import (
    DevSelection,
    Layout,
    build_data,
    build_initial_model,
    build_tokenizer,
    evaluate,
    fill_teacher_samples,
    fresh,
    summary,
    train,
)
from dpkd.study.pretrained import is_pretrained


@dataclass
class Stage:
    """One stage of a study, as the scheduler sees it."""

    name: str
    key: str
    title: str
    needs: tuple[str, ...] = ()
    uses: str | None = None  # a resource no two running stages share
    order: int = 0  # among ready stages, the lowest starts first: the longest chain to the end goes first


class StageMarkers:
    """`<out>/stages/<name>.done` holds the hash of what the stage was made from; written last."""

    def __init__(self, out: Path):
        self.folder = out / "stages"

    def is_done(self, name: str, key: str) -> bool:
        marker = self.folder / f"{name}.done"
        return marker.is_file() and json.loads(marker.read_text()).get("key") == key

    def mark(self, name: str, key: str, **info: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{name}.done").write_text(json.dumps({"key": key, **info}, indent=2) + "\n")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Plan:
    """What the rows of the table read: the checked recipe's values, each method's `MethodSpec`, the
    training configs (only for titles), and the keys of the stages listed before."""

    values: dict
    specs: dict
    max_positions: int
    configs: dict | None = None
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.values["distill"]["methods"])

    @property
    def runs(self) -> dict[str, tuple[str, int | None]]:
        """Each training run's `(method, training seed)`, by run name (see `study_runs`)."""
        from dpkd.study.recipe import study_runs

        return {run: (method, seed) for run, method, seed in study_runs(self.values)}

    @property
    def warm_started(self) -> bool:
        """Whether any run starts from the SFT warm start (`init: sft`) rather than from `student_init`."""
        from dpkd.study.recipe import needs_warm_start

        return needs_warm_start(self.values)

    def run_init(self, run: str) -> str:
        """Where the run starts: `sft` (the warm start) or `scratch` (student_init)."""
        from dpkd.study.recipe import entry_init

        return entry_init(self.values, self.runs[run][0])

    @property
    def selection(self) -> dict | None:
        """What select_on_dev does (it enters the runs' keys), or None when it is off."""
        from dpkd.study.recipe import DEV_EVALUATIONS

        if not self.values.get("select_on_dev", False):
            return None
        return {"select_on_dev": self.values.get("dev_evaluations", DEV_EVALUATIONS),
                "max_new_tokens": self.values["eval"]["max_new_tokens"]}

    @property
    def cache_readers(self) -> list[str]:
        """The methods that read the teacher's sampled responses from the shared cache (and may add to it)."""
        return [m for m in self.methods if self.specs[m].family.reads_teacher_cache]

    def steps(self, name: str) -> int:
        return self.configs[name].max_steps


@dataclass
class Job:
    """A stage to run, as its function in the table receives it (in a worker process)."""

    item: str | None  # the method or model of a per-method or per-model stage
    source: str
    values: dict
    out: Path
    configs: dict
    max_positions: int
    context: Any  # a `dpkd.study.workers.StageContext`

    @property
    def at(self) -> Layout:
        return Layout(self.out)


# --- what each kind of stage runs ---------------------------------------------------------------------


def _data(job: Job) -> None:
    if is_pretrained(job.values):
        from dpkd.study import pretrained

        pretrained.build_data(job.values, fresh(job.at.data))
    else:
        build_data(job.values, fresh(job.at.data))


def _tokenizer(job: Job) -> None:
    if is_pretrained(job.values):
        from dpkd.study.pretrained import save_tokenizer

        save_tokenizer(job.values, fresh(job.at.tokenizer))
    else:
        build_tokenizer(job.values, job.at.split["train"], fresh(job.at.tokenizer))


def _teacher(job: Job) -> None:
    import torch

    from dpkd.study.workers import train_data_parallel

    v, at, args = job.values, job.at, job.configs["teacher"]
    folder = fresh(at.teacher)
    if is_pretrained(v):
        from dpkd.study.pretrained import save_teacher_init, teacher_source

        n_params = save_teacher_init(v, at.tokenizer, folder / "init")
        job.context.note(f"    teacher: {teacher_source(v)}, {n_params / 1e6:.1f}M parameters, fine-tuned with sft")
    else:
        n_params = build_initial_model(v["teacher"], at.tokenizer, folder / "init", v["seed"], job.max_positions)
        job.context.note(f"    teacher: {n_params / 1e6:.2f}M parameters")
    processes = v["teacher"].get("processes", 1)
    if processes > 1 and not torch.cuda.is_available():
        logged = train_data_parallel(processes, job.source, v, job.out, job.context)
    else:
        logged = train(args, folder / "init", at.split["train"], folder, progress=job.context.progress_callback())
    shutil.rmtree(folder / "init")
    # Marks the folder as the teacher for `dpkd report` (its training curve is kept out of the chart).
    (folder / "dpkd_run.json").write_text(json.dumps(
        {"method": "teacher", "trained_with": "sft", "max_steps": args.max_steps,
         "final_loss": logged.get("train_loss")}, indent=2) + "\n")
    if is_pretrained(v):  # evaluated on every test set (eval_teacher); dev is for checkpoint selection
        return
    dev = summary(evaluate(folder, at.split["dev"], v["eval"], folder / "dev_greedy", greedy=True, seeds=[0]))
    job.context.note(f"    teacher on dev, greedy: exact match {dev['exact_match']['mean']:.1f}, "
                     f"ROUGE-L {dev['rougeL']['mean']:.1f}")


def _student_init(job: Job) -> None:
    v = job.values
    if is_pretrained(v):
        from dpkd.study.pretrained import save_student_init

        n_params, layers = save_student_init(v, job.at.tokenizer, fresh(job.at.student_init))
        job.context.note(f"    student: {n_params / 1e6:.1f}M parameters, the teacher's embeddings, head and "
                         f"blocks {layers}")
        return
    n_params = build_initial_model(v["student"], job.at.tokenizer, fresh(job.at.student_init), v["seed"] + 1,
                                   job.max_positions)
    job.context.note(f"    student: {n_params / 1e6:.2f}M parameters")


def _teacher_samples(job: Job) -> None:
    import torch

    v = job.values
    torch.manual_seed(v["seed"])
    from dpkd.study.recipe import study_runs

    first = next(run for run, _, _ in study_runs(v) if job.configs[run].spec.family.reads_teacher_cache)
    n = fill_teacher_samples(job.configs[first], job.at.teacher, job.at.split["train"], v["eval"]["batch_size"])
    job.context.note(f"    {n} teacher responses sampled")


def _warm_start(job: Job) -> None:
    at = job.at
    train(job.configs["warm_start"], at.student_init, at.split["train"], fresh(at.warm_start),
          progress=job.context.progress_callback())


def _train(job: Job) -> None:
    from dpkd.study.recipe import DEV_EVALUATIONS, dev_selection_steps, entry_init, study_runs

    at, v, args = job.at, job.values, job.configs[job.item]
    entry = next(entry for run, entry, _ in study_runs(v) if run == job.item)
    start = at.warm_start if entry_init(v, entry) == "sft" else at.student_init
    select = None
    if v.get("select_on_dev", False):
        steps = dev_selection_steps(args.max_steps, v.get("dev_evaluations", DEV_EVALUATIONS))
        select = DevSelection(at.split["dev"], tuple(steps), v["eval"]["max_new_tokens"], v["eval"]["batch_size"])
    train(args, start, at.split["train"], fresh(at.model(job.item)), teacher_dir=at.teacher,
          progress=job.context.progress_callback(), select=select)


def _eval(job: Job) -> None:
    folder = job.at.model(job.item)
    if is_pretrained(job.values):
        from dpkd.study.pretrained import evaluate_sets

        evaluate_sets(folder, job.values, folder / "eval")
        return
    evaluate(folder, job.at.split["test"], job.values["eval"], folder / "eval")


# --- the table ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageKind:
    """A row of `STAGES`: one stage, or one per item (`each`: the methods, or the models to evaluate),
    named `name` with `{}` replaced by the item. `needs`, `title`, `order` and `uses` are values, or
    functions of the plan and the item."""

    name: str
    needs: tuple[str, ...] | Callable  # stages that must be done first
    inputs: Callable[[Plan, Any], Any]  # what the key hashes: own settings and upstream keys
    title: str | Callable
    run: Callable[[Job], None]  # does the stage, in a worker process
    each: Callable[[Plan], list] = lambda plan: [None]
    order: int | Callable = 0  # among ready stages, the lowest starts first
    uses: str | None | Callable = None  # a resource no two running stages share

    def instances(self, plan: Plan) -> list[tuple[str, Any]]:
        return [(self.name.format(item), item) for item in self.each(plan)]

    def stage(self, plan: Plan, name: str, item: Any) -> Stage:
        def value(field):
            return field(plan, item) if callable(field) else field

        return Stage(name, plan.keys[name], value(self.title), value(self.needs), value(self.uses), value(self.order))


def _train_needs(plan: Plan, run: str) -> tuple[str, ...]:
    spec = plan.specs[plan.runs[run][0]]
    start = ("warm_start",) if plan.run_init(run) == "sft" else ("student_init",)
    return (start + (("teacher",) if spec.needs_teacher else ())
            + (("teacher_samples",) if spec.family.reads_teacher_cache else ()))


def _train_inputs(plan: Plan, run: str) -> list:
    """What a run's key hashes. The warm start, the training seed and select_on_dev enter only when the
    recipe sets them, so the keys of a recipe without them are those that earlier versions wrote."""
    method, seed = plan.runs[run]
    inputs = [plan.keys["student_init"], plan.keys["teacher"] if plan.specs[method].needs_teacher else None,
              plan.values["distill"]["common"], plan.values["distill"]["methods"][method]]
    if plan.run_init(run) == "sft":
        inputs.append({"warm_start": plan.keys["warm_start"]})
    if seed is not None:
        inputs.append({"training_seed": seed})
    if plan.selection is not None:
        inputs.append(plan.selection)
    return inputs + _precision(plan)


def _train_title(plan: Plan, run: str) -> str:
    entry, seed = plan.runs[run]
    method = plan.configs[run].method
    name = method if entry == method else f"{entry} ({method})"
    if plan.run_init(run) == "sft":
        what = "continuing sft" if entry == "sft" else f"distilling with {name}"
        what += " from the warm start"
    else:
        what = f"distilling with {name}"
    chosen = ", the best of them on dev kept" if plan.selection is not None else ""
    return f"{what} ({plan.steps(run)} steps{'' if seed is None else f', training seed {seed}'}{chosen})"


def _trained(model: str) -> str:
    """The stage that makes `model` (the teacher, the warm start, or a run's student)."""
    return model if model in ("teacher", "warm_start") else f"train_{model}"


def _sizes(v: dict) -> str:
    if is_pretrained(v):
        return f"{v['data']['source']}, {v['data']['dev']} held out for dev"
    return ", ".join(f"{split} {v['data'][split]}" for split in ("train", "dev", "test"))


def _teacher_model(v: dict) -> dict:
    """What a pretrained teacher adds to the keys of the data and tokenizer stages (its tokenizer renders
    the prompts); nothing for the demo's, whose keys stay those earlier versions wrote."""
    return {"teacher_model": v["teacher"]["model"]} if is_pretrained(v) else {}


def _positions(plan: Plan) -> int | None:
    """The position count of the models built from scratch; a pretrained teacher (and a student made from
    it) keeps its own, so the methods' lengths do not redo them."""
    return None if is_pretrained(plan.values) else plan.max_positions


def _precision(plan: Plan) -> list:
    """`bf16: true` in the keys of the training stages; nothing without it (the keys earlier versions wrote)."""
    return [{"bf16": True}] if plan.values.get("bf16") else []


def _making_data(v: dict) -> str:
    return "splitting the training set" if is_pretrained(v) else "generating the tasks"


def _test_sets(v: dict) -> str:
    return ", ".join(v["eval"]["sets"]) if is_pretrained(v) else "test"


STAGES: tuple[StageKind, ...] = (
    StageKind("data", needs=(), run=_data, title=lambda p, _: f"{_making_data(p.values)} ({_sizes(p.values)})",
              inputs=lambda p, _: {"seed": p.values["seed"], "data": p.values["data"], **_teacher_model(p.values)}),
    StageKind("tokenizer", needs=("data",), run=_tokenizer,
              title=lambda p, _: "copying the teacher's tokenizer" if is_pretrained(p.values) else "training the tokenizer",
              inputs=lambda p, _: [p.keys["data"], p.values.get("tokenizer"), *_teacher_model(p.values).values()]),
    StageKind("teacher", needs=("tokenizer",), run=_teacher,
              title=lambda p, _: f"{'fine-tuning' if is_pretrained(p.values) else 'training'} the teacher "
                                 f"({p.steps('teacher')} steps)",
              inputs=lambda p, _: [p.keys["tokenizer"], p.values["teacher"], _positions(p), *_precision(p)]),
    StageKind("student_init", needs=("tokenizer",), run=_student_init, title="initialising the student", order=1,
              inputs=lambda p, _: [p.keys["tokenizer"], p.values["student"], p.values["seed"], _positions(p)]),
    StageKind("warm_start", needs=("student_init",), run=_warm_start, order=1,
              each=lambda p: [None] if p.warm_started else [],
              title=lambda p, _: f"warm-starting the student with sft ({p.steps('warm_start')} steps)",
              inputs=lambda p, _: [p.keys["student_init"], p.values["distill"]["common"], p.values["warm_start"],
                                   *_precision(p)]),
    # One sampling pass in large batches fills the cache for every method that reads it.
    StageKind("teacher_samples", needs=("teacher",), run=_teacher_samples, order=1,
              each=lambda p: [None] if p.cache_readers else [],
              title=lambda p, _: f"sampling the teacher's responses for {', '.join(p.cache_readers)}",
              inputs=lambda p, _: [p.keys["teacher"], p.values["distill"]["common"], p.values["eval"]["batch_size"]]),
    # The methods that read the shared cache take turns (`uses`), so two processes never write or compact
    # it at once; those that sample the student at every step run longest, so they start first. SFT never
    # sees the teacher: its key leaves the teacher out, so a new teacher keeps the SFT student.
    StageKind("train_{}", needs=_train_needs, run=_train, each=lambda p: list(p.runs), title=_train_title,
              order=lambda p, r: 2 if p.specs[p.runs[r][0]].family.samples_student else 3,
              uses=lambda p, r: "teacher_cache" if p.specs[p.runs[r][0]].family.reads_teacher_cache else None,
              inputs=_train_inputs),
    StageKind("eval_{}", needs=lambda p, name: (_trained(name),), run=_eval, order=4,
              each=lambda p: ["teacher", *(["warm_start"] if p.warm_started else []), *p.runs],
              title=lambda p, name: f"evaluating {name} on {_test_sets(p.values)} ({len(p.values['eval']['seeds'])} seeds)",
              inputs=lambda p, name: [p.keys[_trained(name)], p.values["eval"]]
              + ([p.values["data"].get("template")] if is_pretrained(p.values) else [])),
)


def _plan(values: dict, specs: dict, max_positions: int, configs: dict | None = None) -> Plan:
    """The plan with every stage's key filled in, in table order."""
    plan = Plan(values, specs, max_positions, configs)
    for kind in STAGES:
        for name, item in kind.instances(plan):
            plan.keys[name] = _digest(kind.inputs(plan, item))
    return plan


def stage_keys(values: dict, max_positions: int) -> dict[str, str]:
    """Each stage's key: a hash of its own settings and of the keys of the stages it reads from."""
    from dpkd.config import METHODS as SPECS
    from dpkd.study.recipe import base_method

    specs = {entry: SPECS[base_method(values, entry)] for entry in values["distill"]["methods"]}
    return _plan(values, specs, max_positions).keys


def _max_positions(configs: dict) -> int:
    return max(c.max_length for c in configs.values())


def _specs(values: dict, configs: dict) -> dict:
    """Each method's `MethodSpec`, from the config of one of its runs."""
    from dpkd.study.recipe import study_runs

    return {method: configs[run].spec for run, method, _ in study_runs(values)}


def study_stages(values: dict, configs: dict) -> list[Stage]:
    """Every stage of the study, in the order they are numbered, with what each needs first."""
    specs = _specs(values, configs)
    plan = _plan(values, specs, _max_positions(configs), configs)
    return [kind.stage(plan, name, item) for kind in STAGES for name, item in kind.instances(plan)]


def run_stage(name: str, source: str, values: dict, out: str | Path, context) -> None:
    """Do the stage `name` of the study described by `values` (a checked recipe) under `out`, reporting
    through `context` (a `dpkd.study.workers.StageContext`)."""
    from dpkd.study.recipe import DemoRecipe, training_configs

    out = Path(out)
    configs = training_configs(DemoRecipe(source=source, values=values), out)
    specs = _specs(values, configs)
    plan = Plan(values, specs, _max_positions(configs), configs)
    rows = {instance: (kind, item) for kind in STAGES for instance, item in kind.instances(plan)}
    if name not in rows:
        raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(rows)}")
    kind, item = rows[name]
    kind.run(Job(item, source, values, out, configs, plan.max_positions, context))
