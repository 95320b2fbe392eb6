"""`dpkd demo`: a complete distillation study on generated tasks, small enough for a laptop CPU.

Stages, each written under `--out` and marked done by a small file in `<out>/stages/` once its outputs
are complete (so Ctrl-C leaves a run that the next invocation resumes, redoing only the stage it cut):

    data/{train,dev,test}.jsonl      dpkd.tasks, deterministic from the recipe's seed
    tokenizer/                       byte-level BPE trained on the train split
    teacher/                         a Llama-style model trained from scratch with method `sft`
    student_init/                    the student's random initialisation, shared by every method
    runs/<method>/                   DistillationTrainer, the same step budget for every method
    <run>/eval/metrics.json          dpkd.evaluation.evaluate_model on the test split, several seeds
    report/report.md, *.png          dpkd.report.write_report

A marker records a hash of the settings its stage depends on (and of its upstream stages' hashes), so
editing the recipe redoes exactly the stages it affects.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
METHODS = ("sft", "kd", "seqkd", "rkl", "jsd", "dpkd_token", "dpkd")
PROFILES = ("quick", "big")

# The recipe's shape: nested mappings of allowed keys; a leaf `dict` is a mapping of DistillationConfig
# fields, checked by constructing the config.
_SCHEMA: dict[str, Any] = {
    "seed": int,
    "workers": (int, str),
    "threads": (int, str),
    "data": {"train": int, "dev": int, "test": int, "template": str, "tasks": list},
    "tokenizer": {"vocab_size": int},
    "teacher": {"d_model": int, "n_layer": int, "n_head": int, "processes": int, "training": dict},
    "student": {"d_model": int, "n_layer": int, "n_head": int},
    "distill": {"common": dict, "methods": dict},
    "eval": {"seeds": list, "max_new_tokens": int, "batch_size": int},
    "quick": dict,
    "big": dict,
}
_OPTIONAL = ("workers", "threads")  # default `auto`
# Settings of every training run that the demo owns; a recipe cannot override them.
_FIXED_TRAINING = {"output_dir", "method", "seed", "teacher_cache_dir", "save_strategy", "report_to"}


class DemoError(ValueError):
    """A bad recipe or output folder: the message names the file and key."""


# ----------------------------------------------------------------------------------------------------
# The recipe


def _merge(base: dict, overlay: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _check_shape(values: dict, schema: dict, where: str, path: str = "") -> None:
    for key, value in values.items():
        name = f"{path}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {path}{close[0]!r}?)" if close else ""
            raise DemoError(f"{where}: unknown key {name!r}{hint}; allowed here: {', '.join(schema)}")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise DemoError(f"{where}: {name!r} must be a mapping of {', '.join(expected)}")
            _check_shape(value, expected, where, f"{name}.")
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            kinds = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise DemoError(f"{where}: {name!r} must be {kinds}, got {value!r}")


@dataclass
class DemoRecipe:
    """A validated demo recipe: the merged settings and the training configurations they imply."""

    source: str
    values: dict

    def section(self, name: str) -> dict:
        return self.values[name]


def load_demo_recipe(path: str | Path | None = None, profile: str | None = None) -> DemoRecipe:
    """Read the YAML recipe (default: the bundled one), apply the `quick`/`big` overlay, check everything.

    Errors name the file and the key; the training settings are checked by building every
    `DistillationConfig` the run will use, before any data or model is made.
    """
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise DemoError(f"--config: no such recipe file {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DemoError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise DemoError(f"{path}: a demo recipe is a mapping of sections ({', '.join(_SCHEMA)})")
    _check_shape(raw, _SCHEMA, str(path))
    for name in PROFILES:
        base_schema = {k: v for k, v in _SCHEMA.items() if k not in PROFILES}
        _check_shape(raw.get(name, {}), base_schema, str(path), f"{name}.")
    if profile is not None:
        if profile not in PROFILES:
            raise DemoError(f"profile: expected one of {', '.join(PROFILES)}, got {profile!r}")
        if profile not in raw:
            raise DemoError(f"{path}: has no {profile!r} section, so --{profile} has nothing to apply")
    values = _merge({k: v for k, v in raw.items() if k not in PROFILES}, raw.get(profile, {}) if profile else {})
    missing = [k for k in _SCHEMA if k not in (*PROFILES, *_OPTIONAL) and k not in values]
    if missing:
        raise DemoError(f"{path}: missing section(s) {', '.join(missing)} (see the bundled {DEFAULT_CONFIG.name})")
    recipe = DemoRecipe(source=f"{path}" + (f" --{profile}" if profile else ""), values=values)
    _check_values(recipe, str(path))
    return recipe


def _check_values(recipe: DemoRecipe, where: str) -> None:
    from dpkd.tasks import TASKS

    v = recipe.values
    for split in ("train", "dev", "test"):
        if v["data"].get(split, 0) < 1:
            raise DemoError(f"{where}: data.{split} must be a positive number of examples")
    unknown = [t for t in v["data"].get("tasks", []) if t not in TASKS]
    if unknown:
        raise DemoError(f"{where}: data.tasks: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    template = v["data"].get("template")
    if template is not None and ("{instruction}" not in template or "{input}" not in template):
        raise DemoError(f"{where}: data.template must contain {{instruction}} and {{input}}")
    for key in ("workers", "threads"):
        setting = v.get(key, "auto")
        if not (setting == "auto" or (isinstance(setting, int) and setting >= 1)):
            raise DemoError(f"{where}: {key} must be 'auto' or a positive integer, got {setting!r}")
    for model in ("teacher", "student"):
        for key in ("d_model", "n_layer", "n_head"):
            if v[model].get(key, 0) < 1:
                raise DemoError(f"{where}: {model}.{key} must be a positive integer")
        if v[model]["d_model"] % v[model]["n_head"]:
            raise DemoError(f"{where}: {model}.d_model must be divisible by {model}.n_head")
    processes = v["teacher"].get("processes", 1)
    batch = (v["teacher"].get("training") or {}).get("per_device_train_batch_size", 8)
    if processes < 1 or batch % processes:
        raise DemoError(f"{where}: teacher.processes must be a positive integer that divides "
                        f"teacher.training.per_device_train_batch_size ({batch}), got {processes}")
    methods = v["distill"].get("methods") or {}
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise DemoError(f"{where}: distill.methods: expected a mapping with keys among {', '.join(METHODS)}, "
                        f"got {list(methods)}")
    seeds = v["eval"].get("seeds") or []
    if not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise DemoError(f"{where}: eval.seeds must be a list of distinct integers, got {seeds!r}")
    for key in ("max_new_tokens", "batch_size"):
        if v["eval"].get(key, 0) < 1:
            raise DemoError(f"{where}: eval.{key} must be a positive integer")
    # Building each config checks every training field and its range (DistillationConfig.__post_init__).
    training_configs(recipe, Path("unused"), where=where)


def _training_fields(fields: dict, where: str, key: str) -> dict:
    import dataclasses

    from dpkd.trainer import DistillationConfig

    fixed = sorted(_FIXED_TRAINING & set(fields))
    if fixed:
        raise DemoError(f"{where}: {key}: {', '.join(fixed)} are set by the demo itself")
    known = [f.name for f in dataclasses.fields(DistillationConfig) if f.init]
    for name in fields:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise DemoError(f"{where}: {key}: {name!r} is not a DistillationConfig field{hint}")
    return dict(fields)


def training_configs(recipe: DemoRecipe, out: Path, *, where: str | None = None) -> dict:
    """`{"teacher": DistillationConfig, method: DistillationConfig, ...}` for this recipe and output folder."""
    from dpkd.trainer import DistillationConfig

    where = where or recipe.source
    v = recipe.values
    base = {"seed": v["seed"], "save_strategy": "no", "report_to": "none", "lr_scheduler_type": "cosine",
            "disable_tqdm": False, "dataloader_num_workers": 0, "dataloader_pin_memory": False}
    fields = {"teacher": ("teacher.training", {**base, "method": "sft", "output_dir": str(out / "teacher" / "training"),
                                               **_training_fields(v["teacher"].get("training") or {}, where,
                                                                  "teacher.training")})}
    common = _training_fields(v["distill"].get("common") or {}, where, "distill.common")
    for method, own in (v["distill"].get("methods") or {}).items():
        fields[method] = (f"distill.methods.{method}", {
            **base, **common, **_training_fields(own or {}, where, f"distill.methods.{method}"),
            "method": method, "output_dir": str(out / "runs" / method),
            "teacher_cache_dir": str(out / "teacher_cache")})
    configs = {}
    for name, (key, kwargs) in fields.items():
        steps = kwargs.get("max_steps", -1)
        kwargs.setdefault("logging_steps", max(1, steps // 10) if steps > 0 else 10)
        try:
            configs[name] = DistillationConfig(**kwargs)
        except (TypeError, ValueError) as err:
            raise DemoError(f"{where}: {key}: {err}") from None
    return configs


# ----------------------------------------------------------------------------------------------------
# Stages and their markers


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def stage_keys(values: dict, max_positions: int) -> dict[str, str]:
    """Each stage's key: a hash of its own settings and of the keys of the stages it reads from."""
    v = values
    keys = {"data": _digest({"seed": v["seed"], "data": v["data"]})}
    keys["tokenizer"] = _digest([keys["data"], v["tokenizer"]])
    keys["teacher"] = _digest([keys["tokenizer"], v["teacher"], max_positions])
    keys["student_init"] = _digest([keys["tokenizer"], v["student"], v["seed"], max_positions])
    keys["eval_teacher"] = _digest([keys["teacher"], v["eval"]])
    keys["teacher_samples"] = _digest([keys["teacher"], v["distill"]["common"], v["eval"]["batch_size"]])
    from dpkd.trainer import METHODS as SPECS

    for method, own in v["distill"]["methods"].items():
        teacher = keys["teacher"] if SPECS[method].needs_teacher else None  # sft never sees the teacher
        keys[f"train_{method}"] = _digest([keys["student_init"], teacher, v["distill"]["common"], own])
        keys[f"eval_{method}"] = _digest([keys[f"train_{method}"], v["eval"]])
    return keys


def resolve_parallelism(workers: int | str, threads: int | str) -> tuple[int, int]:
    """(worker processes, torch threads per worker) for the recipe's `workers` and `threads`.

    `workers: auto` is one per core, at most 4 (the study rarely has more independent stages ready);
    `threads: auto` shares the cores among the workers. For models this small, two one-thread processes
    side by side did 1.66x the work of one, one two-thread process 1.56x (bench/demo_parallel.py).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_workers = min(cores, 4) if workers == "auto" else int(workers)
    n_threads = max(1, cores // n_workers) if threads == "auto" else int(threads)
    return n_workers, n_threads


def _fresh(path: Path) -> Path:
    """An empty folder for a stage that is (re)done: leftovers of an interrupted attempt go."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def build_data(values: dict, folder: Path) -> dict[str, Path]:
    from dpkd.tasks import write_splits

    data = values["data"]
    sizes = {split: data[split] for split in ("train", "dev", "test")}
    return write_splits(folder, sizes, seed=values["seed"], tasks=data.get("tasks"), template=data.get("template"))


def _read_prompts_and_answers(path: Path) -> list[str]:
    from dpkd.data import load_instruction_data

    rows = load_instruction_data(str(path))
    return [p + c for p, c in zip(rows["prompt"], rows["completion"])]


def build_tokenizer(values: dict, train_path: Path, folder: Path) -> None:
    from dpkd.modeling import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(_read_prompts_and_answers(train_path), vocab_size=values["tokenizer"]["vocab_size"])
    tokenizer.save_pretrained(folder)


def build_initial_model(sizes: dict, tokenizer_dir: Path, folder: Path, seed: int, max_positions: int) -> int:
    """Save a randomly initialised Llama-style model of `sizes` with the tokenizer; return its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpkd.modeling import load_tokenizer, save_model_and_tokenizer, tiny_config

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    config = tiny_config("llama", len(tokenizer), n_layer=sizes["n_layer"], d_model=sizes["d_model"],
                         n_head=sizes["n_head"], max_positions=max_positions, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    save_model_and_tokenizer(model, tokenizer, folder)
    return sum(p.numel() for p in model.parameters())


def train(args, init_dir: Path, train_path: Path, save_to: Path, teacher_dir: Path | None = None) -> dict:
    """Train `init_dir` with `args` (a DistillationConfig) and save the model to `save_to`; return the
    last logged values."""
    from dpkd.data import load_instruction_data
    from dpkd.modeling import load_causal_lm, load_tokenizer
    from dpkd.trainer import DistillationTrainer

    tokenizer = load_tokenizer(init_dir)
    student = load_causal_lm(init_dir)
    teacher = load_causal_lm(teacher_dir.resolve()) if teacher_dir is not None and args.spec.needs_teacher else None
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=load_instruction_data(str(train_path)), processing_class=tokenizer)
    if _CHANNEL is not None:
        # In a worker the parent draws the progress bars: replace the trainer's own bar by reports to it.
        from transformers.trainer_callback import ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_progress_callback())
    trainer.train()
    trainer.save_model(str(save_to))
    if Path(save_to) != Path(args.output_dir) and trainer.is_world_process_zero():
        tokenizer.save_pretrained(save_to)
    return _last_logged(trainer.state.log_history)


def _last_logged(log_history: list[dict]) -> dict:
    """The latest value of every name a training run logged."""
    logged: dict = {}
    for entry in log_history:
        logged.update(entry)
    return logged


def fill_teacher_samples(args, teacher_dir: Path, train_path: Path, batch_size: int) -> int:
    """Sample the teacher's responses to every training prompt into the cache that `args` (a seqkd or
    dpkd config) reads, in large batches: much faster on a CPU than the trainer's per-step batches."""
    from dpkd.data import load_instruction_data, tokenize_dataset
    from dpkd.generation import TeacherOutputCache, fill_teacher_cache, model_fingerprint
    from dpkd.modeling import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_causal_lm(teacher_dir).eval()
    rows = load_instruction_data(str(train_path), template=args.template)
    tokenized, _ = tokenize_dataset(rows, tokenizer, max_prompt_length=args.max_prompt_length,
                                    max_length=args.max_length, prompt_truncation=args.prompt_truncation)
    cache = TeacherOutputCache(args.teacher_cache_dir, teacher_id=model_fingerprint(teacher),
                               sampling=args.sampling())
    return fill_teacher_cache(teacher, tokenizer, tokenized, cache, args.sampling(), batch_size=batch_size)


def evaluate(model_dir: Path, test_path: Path, eval_values: dict, out_dir: Path, *, greedy: bool = False,
             seeds: list[int] | None = None) -> dict:
    from dpkd.evaluation import evaluate_model
    from dpkd.generation import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=eval_values["max_new_tokens"], do_sample=not greedy)
    return evaluate_model(model_dir, data=[str(test_path)], seeds=seeds or eval_values["seeds"], out_dir=out_dir,
                          batch_size=eval_values["batch_size"], sampling=sampling, max_prompt_length=None)


def _summary(metrics: dict) -> dict:
    (result,) = metrics["sets"].values()
    return result["summary"]


def results_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown: one row per model, exact match and ROUGE-L as mean ± std over the seeds."""
    lines = ["| model | exact match | ROUGE-L |", "|---|---|---|"]
    for label, summary in rows:
        em, rl = summary["exact_match"], summary["rougeL"]
        lines.append(f"| {label} | {em['mean']:.1f} ± {em['std']:.1f} | {rl['mean']:.1f} ± {rl['std']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# The stages: what each one does, run in a worker process


class _Layout:
    """Where each stage writes under the output folder."""

    def __init__(self, out: Path):
        self.out = out
        self.data = out / "data"
        self.split = {split: self.data / f"{split}.jsonl" for split in ("train", "dev", "test")}
        self.tokenizer = out / "tokenizer"
        self.teacher = out / "teacher"
        self.student_init = out / "student_init"

    def model(self, name: str) -> Path:
        """The folder of `teacher` or of a method's run."""
        return self.teacher if name == "teacher" else self.out / "runs" / name


# Set in each worker process by `_start_worker`: the queue its progress and notes go to the parent by.
_CHANNEL = None
_STAGE: str | None = None


def _note(text: str) -> None:
    """A line for the study's log, printed by the parent under the stage's progress line."""
    if _CHANNEL is None:
        print(text)
    else:
        _CHANNEL.put(("note", _STAGE, text))


def _progress_callback():
    from transformers import TrainerCallback

    class StageProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            _CHANNEL.put(("total", _STAGE, state.max_steps))

        def on_step_end(self, args, state, control, **kwargs):
            _CHANNEL.put(("step", _STAGE, state.global_step))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                _CHANNEL.put(("loss", _STAGE, logs["loss"]))

    return StageProgress()


def _exit_with_parent(parent: int) -> None:
    """End this process as soon as its parent (pid `parent`, given by the parent itself: a process that
    asked for its parent only after that one died would get the adopting process) is gone, killed without
    a chance to stop its workers, so that no orphan goes on writing into the output folder."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _start_worker(channel, threads: int, parent: int) -> None:
    """Initialise a worker process: its torch threads, quiet libraries, and the channel to the parent."""
    global _CHANNEL
    import signal

    # Ctrl-C reaches the whole process group; the parent alone handles it (it stops the workers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent)
    os.environ["TQDM_DISABLE"] = "1"  # the parent draws the bars; read when tqdm is first imported
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _CHANNEL = channel
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()


def run_stage(name: str, source: str, values: dict, out: str | Path) -> None:
    """Do the stage `name` of the study described by `values` (a checked recipe) under `out`."""
    global _STAGE
    v = values
    methods = list(v["distill"]["methods"])
    known = ["data", "tokenizer", "teacher", "student_init", "teacher_samples",
             *(f"train_{m}" for m in methods), *(f"eval_{m}" for m in ("teacher", *methods))]
    if name not in known:
        raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(known)}")
    _STAGE = name
    out = Path(out)
    configs = training_configs(DemoRecipe(source=source, values=values), out)
    max_positions = max(c.max_length for c in configs.values())
    at = _Layout(out)
    if name == "data":
        build_data(v, _fresh(at.data))
    elif name == "tokenizer":
        build_tokenizer(v, at.split["train"], _fresh(at.tokenizer))
    elif name == "teacher":
        folder = _fresh(at.teacher)
        n_params = build_initial_model(v["teacher"], at.tokenizer, folder / "init", v["seed"], max_positions)
        _note(f"    teacher: {n_params / 1e6:.2f}M parameters")
        processes = v["teacher"].get("processes", 1)
        if processes > 1 and not _has_cuda():
            logged = train_data_parallel(processes, source, v, out)
        else:
            logged = train(configs["teacher"], folder / "init", at.split["train"], folder)
        shutil.rmtree(folder / "init")
        # Marks the folder as the teacher for `dpkd report` (its training curve is kept out of the chart).
        (folder / "dpkd_run.json").write_text(json.dumps(
            {"method": "teacher", "trained_with": "sft", "max_steps": configs["teacher"].max_steps,
             "final_loss": logged.get("train_loss")}, indent=2) + "\n")
        dev = _summary(evaluate(folder, at.split["dev"], v["eval"], folder / "dev_greedy", greedy=True, seeds=[0]))
        _note(f"    teacher on dev, greedy: exact match {dev['exact_match']['mean']:.1f}, "
              f"ROUGE-L {dev['rougeL']['mean']:.1f}")
    elif name == "student_init":
        n_params = build_initial_model(v["student"], at.tokenizer, _fresh(at.student_init), v["seed"] + 1,
                                       max_positions)
        _note(f"    student: {n_params / 1e6:.2f}M parameters")
    elif name == "teacher_samples":
        import torch

        torch.manual_seed(v["seed"])
        first = next(m for m in v["distill"]["methods"] if configs[m].spec.family in _SAMPLED)
        n = fill_teacher_samples(configs[first], at.teacher, at.split["train"], v["eval"]["batch_size"])
        _note(f"    {n} teacher responses sampled")
    elif name.startswith("train_"):
        method = name.removeprefix("train_")
        train(configs[method], at.student_init, at.split["train"], _fresh(at.model(method)), teacher_dir=at.teacher)
    else:  # eval_<teacher or method>
        folder = at.model(name.removeprefix("eval_"))
        evaluate(folder, at.split["test"], v["eval"], folder / "eval")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_data_parallel(processes: int, source: str, values: dict, out: Path) -> dict:
    """Train the teacher with DDP over `processes` CPU processes (gloo), each with 1/processes of the batch.

    Reads `<out>/data/train.jsonl` and `<out>/teacher/init`, writes the model to `<out>/teacher`; returns
    the last logged values, as `train` does. Processes synchronise once a step (the gradient all-reduce),
    threads at every operation: on a quiet 2-core machine two threads were a little faster, but on a
    busy one, whose CPU time is partly stolen, threads lost and processes held up (docs/benchmarks.md).
    """
    import torch.multiprocessing

    torch.multiprocessing.start_processes(
        _teacher_rank, args=(processes, _free_port(), source, values, str(out), _CHANNEL, os.getpid()),
        nprocs=processes, join=True, start_method="spawn")
    state = json.loads((_Layout(out).teacher / "training" / "trainer_state.json").read_text())
    return _last_logged(state["log_history"])


def _teacher_rank(rank: int, processes: int, port: int, source: str, values: dict, out: str, channel,
                  parent: int) -> None:
    """One process of `train_data_parallel`: rank `rank` of `processes`."""
    global _STAGE
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes))
    _start_worker(channel if rank == 0 else None, threads=1, parent=parent)
    _STAGE = "teacher"
    values = copy.deepcopy(values)
    # Only the teacher's config: the first config built fixes accelerate's process state for good, and it
    # must be one with use_cpu set, or a CPU run does not count as distributed.
    values["distill"]["methods"] = {}
    training = values["teacher"]["training"]
    training["per_device_train_batch_size"] //= processes  # the recipe gives the batch of all ranks together
    training["use_cpu"] = True
    at = _Layout(Path(out))
    args = training_configs(DemoRecipe(source=source, values=values), Path(out))["teacher"]
    assert args.world_size == processes, f"the teacher's rank {rank} does not see the other ranks"
    train(args, at.teacher / "init", at.split["train"], at.teacher)


# ----------------------------------------------------------------------------------------------------
# The study: stages in dependency order, run by a pool of worker processes


# Methods that read the teacher's sampled responses from the shared cache (and may add to it): their
# runs take turns, so two processes never write or compact the cache at once.
_SAMPLED = ("teacher_samples", "preference")


@dataclass
class Stage:
    name: str
    key: str
    title: str
    needs: tuple[str, ...] = ()
    uses: str | None = None  # a resource no two running stages share
    order: int = 0  # among ready stages, the lowest starts first: the longest chain to the end goes first


def study_stages(values: dict, configs: dict) -> list[Stage]:
    """Every stage of the study, in the order they are numbered, with what each needs first."""
    v = values
    methods = list(v["distill"]["methods"])
    keys = stage_keys(v, max(c.max_length for c in configs.values()))
    sizes = ", ".join(f"{split} {v['data'][split]}" for split in ("train", "dev", "test"))
    sampled = [m for m in methods if configs[m].spec.family in _SAMPLED]
    stages = [
        Stage("data", keys["data"], f"generating the tasks ({sizes})"),
        Stage("tokenizer", keys["tokenizer"], "training the tokenizer", ("data",)),
        Stage("teacher", keys["teacher"], f"training the teacher ({configs['teacher'].max_steps} steps)",
              ("tokenizer",)),
        Stage("student_init", keys["student_init"], "initialising the student", ("tokenizer",), order=1),
    ]
    if sampled:
        stages.append(Stage("teacher_samples", keys["teacher_samples"],
                            f"sampling the teacher's responses for {', '.join(sampled)}", ("teacher",), order=1))
    for method in methods:
        spec = configs[method].spec
        needs = ("student_init",) + (("teacher",) if spec.needs_teacher else ())
        if method in sampled:
            needs += ("teacher_samples",)
        # The preference methods sample from the student at every step: the longest runs start first.
        order = 2 if spec.family == "preference" else 3
        stages.append(Stage(f"train_{method}", keys[f"train_{method}"],
                            f"distilling with {method} ({configs[method].max_steps} steps)", needs,
                            uses="teacher_cache" if method in sampled else None, order=order))
    for name in ("teacher", *methods):
        after = "teacher" if name == "teacher" else f"train_{name}"
        stages.append(Stage(f"eval_{name}", keys[f"eval_{name}"],
                            f"evaluating {name} on test ({len(v['eval']['seeds'])} seeds)", (after,), order=4))
    return stages


class _ProgressBoard:
    """The parent's view of the running stages: one progress bar each, and the study's log lines."""

    def __init__(self, stages: list[Stage], log):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.log = log
        self.number = {s.name: f"[{i}/{len(stages) + 1}]" for i, s in enumerate(stages, 1)}
        self.title = {s.name: s.title for s in stages}
        self.bars: dict[str, Any] = {}
        self.started: dict[str, float] = {}
        self.last_refresh = 0.0

    def write(self, text: str) -> None:
        with self._tqdm.external_write_mode():
            self.log(text)

    def start(self, name: str) -> None:
        self.started[name] = time.perf_counter()
        self.write(f"{self.number[name]} {self.title[name]} ...")
        self.bars[name] = self._tqdm(desc=f"{self.number[name]} {name}", total=None, leave=False,
                                     bar_format="{desc}: {elapsed}", dynamic_ncols=True)

    def receive(self, kind: str, name: str, value) -> None:
        bar = self.bars.get(name)
        if kind == "note":
            self.write(value)
        elif bar is None:
            return
        elif kind == "total":
            bar.reset(total=value)
            bar.bar_format = None
        elif kind == "step":
            bar.update(value - bar.n)
        elif kind == "loss":
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)

    def tick(self) -> None:
        """Keep the elapsed times moving, about once a second."""
        now = time.perf_counter()
        if now - self.last_refresh >= 1.0:
            self.last_refresh = now
            for bar in self.bars.values():
                bar.refresh()

    def finish(self, name: str) -> float:
        seconds = time.perf_counter() - self.started.pop(name)
        self.bars.pop(name).close()
        self.write(f"{self.number[name]} {self.title[name]}: {seconds:.0f}s")
        return seconds

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _stop_workers(pool) -> None:
    """Terminate the pool's workers and their own children (the teacher's data-parallel ranks)."""
    import psutil

    workers = [psutil.Process(p.pid) for p in list((getattr(pool, "_processes", None) or {}).values())
               if p.is_alive()]
    everyone = []
    for worker in workers:
        try:
            everyone += [worker, *worker.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for process in everyone:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(everyone, timeout=10)
    pool.shutdown(wait=True, cancel_futures=True)


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _on_sigterm(handler):
    """Install `handler` for SIGTERM (from the main thread only); return the one it replaces."""
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def run_stages(stages: list[Stage], markers: StageMarkers, *, source: str, values: dict, out: Path,
               workers: int, threads: int, log=print) -> None:
    """Run the stages not marked done, each in a worker process as soon as what it needs is done.

    A stage's marker is written by this process after the stage returns, so a stage cut short by Ctrl-C
    or an error is redone by the next run. On Ctrl-C or a failed stage the other workers are stopped.
    """
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from queue import Empty

    board = _ProgressBoard(stages, log)
    done = set()
    for s in stages:
        if markers.is_done(s.name, s.key):
            log(f"{board.number[s.name]} {s.title}: done before, reused")
            done.add(s.name)
    todo = [s for s in stages if s.name not in done]
    if not todo:
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process that has loaded torch
    channel = context.Queue()
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=context,
                               initializer=_start_worker, initargs=(channel, threads, os.getpid()))
    running: dict = {}
    failed = True
    # `kill` (SIGTERM) stops the study as Ctrl-C does: workers stopped, finished stages kept.
    previous_handler = _on_sigterm(_raise_keyboard_interrupt)
    try:
        while todo or running:
            held = {s.uses for s in running.values() if s.uses}
            for s in sorted(todo, key=lambda s: s.order):
                if len(running) >= workers:
                    break
                if all(n in done for n in s.needs) and (s.uses is None or s.uses not in held):
                    todo.remove(s)
                    board.start(s.name)
                    running[pool.submit(run_stage, s.name, source, values, str(out))] = s
                    if s.uses:
                        held.add(s.uses)
            if not running:
                raise RuntimeError(f"stages that can never start: {', '.join(s.name for s in todo)}")
            finished, _ = wait(running, timeout=0.2, return_when=FIRST_COMPLETED)
            while True:
                try:
                    board.receive(*channel.get_nowait())
                except Empty:
                    break
            board.tick()
            for future in finished:
                s = running.pop(future)
                future.result()  # a stage's error stops the study here
                seconds = board.finish(s.name)
                markers.mark(s.name, s.key, seconds=round(seconds, 1))
                done.add(s.name)
        failed = False
    finally:
        _on_sigterm(previous_handler)
        board.close()
        if failed:
            _stop_workers(pool)
        else:
            pool.shutdown(wait=True)


def run_demo(out: str | Path = "runs/demo", config: str | Path | None = None, profile: str | None = None,
             log=print) -> Path:
    """Run (or resume) the whole study under `out`; return the path of the report."""
    started = time.perf_counter()
    recipe = load_demo_recipe(config, profile)  # every setting is checked before any work starts
    out = Path(out).resolve()
    v = recipe.values
    workers, threads = resolve_parallelism(v.get("workers", "auto"), v.get("threads", "auto"))
    configs = training_configs(recipe, out)
    stages = study_stages(v, configs)
    log(f"dpkd demo: recipe {recipe.source}; output {out}; {workers} worker process(es) × {threads} "
        f"CPU thread(s)")
    run_stages(stages, StageMarkers(out), source=recipe.source, values=v, out=out, workers=workers,
               threads=threads, log=log)

    from dpkd.report import write_report

    log(f"[{len(stages) + 1}/{len(stages) + 1}] writing the report ...")
    at = _Layout(out)
    names = ["teacher", *v["distill"]["methods"]]
    report = write_report([at.model(name) for name in names], out / "report")
    rows = [(name, _summary(json.loads((at.model(name) / "eval" / "metrics.json").read_text()))) for name in names]
    table = results_table(rows)
    (out / "report" / "summary.md").write_text(
        f"Test split ({v['data']['test']} examples), mean ± std over seeds {v['eval']['seeds']}:\n\n{table}\n")
    log("")
    log(table)
    log("")
    log(f"dpkd demo: finished in {time.perf_counter() - started:.0f}s; report {report}")
    return report


def demo_from_cli(args: argparse.Namespace) -> int:
    """`dpkd demo [--out DIR] [--config FILE] [--quick | --big]`."""
    # Transparent huge pages for torch's CPU allocator: faster on CPUs; read when torch is first imported.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    profile = "quick" if args.quick else "big" if args.big else None
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # the log keeps pace with the bars under `| tee`, too
    try:
        run_demo(args.out, args.config, profile)
    except DemoError as err:
        print(f"dpkd demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndpkd demo: interrupted; run the same command again to resume from the finished stages in "
              f"{args.out}", file=sys.stderr)
        return 130
    return 0
