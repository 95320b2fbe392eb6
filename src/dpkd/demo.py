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
    "threads": (int, str),
    "data": {"train": int, "dev": int, "test": int, "template": str, "tasks": list},
    "tokenizer": {"vocab_size": int},
    "teacher": {"d_model": int, "n_layer": int, "n_head": int, "training": dict},
    "student": {"d_model": int, "n_layer": int, "n_head": int},
    "distill": {"common": dict, "methods": dict},
    "eval": {"seeds": list, "max_new_tokens": int, "batch_size": int},
    "quick": dict,
    "big": dict,
}
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
    missing = [k for k in _SCHEMA if k not in PROFILES and k not in values]
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
    threads = v["threads"]
    if not (threads == "auto" or (isinstance(threads, int) and threads >= 1)):
        raise DemoError(f"{where}: threads must be 'auto' or a positive integer, got {threads!r}")
    for model in ("teacher", "student"):
        for key in ("d_model", "n_layer", "n_head"):
            if v[model].get(key, 0) < 1:
                raise DemoError(f"{where}: {model}.{key} must be a positive integer")
        if v[model]["d_model"] % v[model]["n_head"]:
            raise DemoError(f"{where}: {model}.d_model must be divisible by {model}.n_head")
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
    for method, own in v["distill"]["methods"].items():
        keys[f"train_{method}"] = _digest([keys["student_init"], keys["teacher"], v["distill"]["common"], own])
        keys[f"eval_{method}"] = _digest([keys[f"train_{method}"], v["eval"]])
    return keys


def resolve_threads(setting: int | str) -> int:
    """`auto`: the cores not already busy by the 1-minute load average (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if setting != "auto":
        return int(setting)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - busy)))


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
    trainer.train()
    trainer.save_model(str(save_to))
    if Path(save_to) != Path(args.output_dir):
        tokenizer.save_pretrained(save_to)
    logged: dict = {}
    for entry in trainer.state.log_history:
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
# The study


def run_demo(out: str | Path = "runs/demo", config: str | Path | None = None, profile: str | None = None,
             log=print) -> Path:
    """Run (or resume) the whole study under `out`; return the path of the report."""
    started = time.perf_counter()
    recipe = load_demo_recipe(config, profile)  # every setting is checked before any work starts
    out = Path(out).resolve()
    v = recipe.values

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    threads = resolve_threads(v["threads"])
    torch.set_num_threads(threads)
    methods = list(v["distill"]["methods"])
    configs = training_configs(recipe, out)
    markers = StageMarkers(out)
    # data, tokenizer, teacher, student init, teacher eval, report; a run and an eval per method; teacher samples
    total = 6 + 2 * len(methods) + any(configs[m].spec.family in ("teacher_samples", "preference") for m in methods)
    step = 0
    log(f"dpkd demo: recipe {recipe.source}; output {out}; {threads} CPU thread(s)")

    def stage(name: str, key: str, title: str, work) -> None:
        nonlocal step
        step += 1
        if markers.is_done(name, key):
            log(f"[{step}/{total}] {title}: done before, reused")
            return
        log(f"[{step}/{total}] {title} ...")
        t0 = time.perf_counter()
        work()
        markers.mark(name, key, seconds=round(time.perf_counter() - t0, 1))
        log(f"[{step}/{total}] {title}: {time.perf_counter() - t0:.0f}s")

    data_dir = out / "data"
    paths = {split: data_dir / f"{split}.jsonl" for split in ("train", "dev", "test")}
    # Room in the position table for the longest prompt plus answer any run produces.
    max_positions = max(c.max_length for c in configs.values())
    keys = stage_keys(v, max_positions)
    sizes = ", ".join(f"{split} {v['data'][split]}" for split in paths)
    stage("data", keys["data"], f"generating the tasks ({sizes})", lambda: build_data(v, _fresh(data_dir)))

    tokenizer_dir = out / "tokenizer"
    stage("tokenizer", keys["tokenizer"], "training the tokenizer",
          lambda: build_tokenizer(v, paths["train"], _fresh(tokenizer_dir)))

    teacher_dir = out / "teacher"

    def make_teacher() -> None:
        folder = _fresh(teacher_dir)
        n_params = build_initial_model(v["teacher"], tokenizer_dir, folder / "init", v["seed"], max_positions)
        log(f"    teacher: {n_params / 1e6:.2f}M parameters")
        logged = train(configs["teacher"], folder / "init", paths["train"], folder)
        shutil.rmtree(folder / "init")
        # Marks the folder as the teacher for `dpkd report` (its training curve is kept out of the chart).
        (folder / "dpkd_run.json").write_text(json.dumps(
            {"method": "teacher", "trained_with": "sft", "max_steps": configs["teacher"].max_steps,
             "final_loss": logged.get("train_loss")}, indent=2) + "\n")
        dev = evaluate(folder, paths["dev"], v["eval"], folder / "dev_greedy", greedy=True, seeds=[0])
        log(f"    teacher on dev, greedy: exact match {_summary(dev)['exact_match']['mean']:.1f}, "
            f"ROUGE-L {_summary(dev)['rougeL']['mean']:.1f}")

    stage("teacher", keys["teacher"], f"training the teacher ({configs['teacher'].max_steps} steps)", make_teacher)

    init_dir = out / "student_init"

    def make_student() -> None:
        n_params = build_initial_model(v["student"], tokenizer_dir, _fresh(init_dir), v["seed"] + 1, max_positions)
        log(f"    student: {n_params / 1e6:.2f}M parameters")

    stage("student_init", keys["student_init"], "initialising the student", make_student)

    sampled = [m for m in methods if configs[m].spec.family in ("teacher_samples", "preference")]
    if sampled:
        def sample_teacher() -> None:
            import torch

            torch.manual_seed(v["seed"])
            n = fill_teacher_samples(configs[sampled[0]], teacher_dir, paths["train"], v["eval"]["batch_size"])
            log(f"    {n} teacher responses sampled")

        stage("teacher_samples", keys["teacher_samples"], f"sampling the teacher's responses for {', '.join(sampled)}",
              sample_teacher)

    run_dirs = {}
    for method in methods:
        args = configs[method]
        run_dir = out / "runs" / method
        run_dirs[method] = run_dir

        def distil(args=args, run_dir=run_dir) -> None:
            _fresh(run_dir)
            train(args, init_dir, paths["train"], run_dir, teacher_dir=teacher_dir)

        stage(f"train_{method}", keys[f"train_{method}"], f"distilling with {method} ({args.max_steps} steps)", distil)

    evaluated = {"teacher": teacher_dir, **run_dirs}
    for name, folder in evaluated.items():
        def score(folder=folder) -> None:
            evaluate(folder, paths["test"], v["eval"], folder / "eval")

        stage(f"eval_{name}", keys[f"eval_{name}"], f"evaluating {name} on test ({len(v['eval']['seeds'])} seeds)", score)

    from dpkd.report import write_report

    step += 1
    log(f"[{step}/{total}] writing the report ...")
    report = write_report([evaluated[name] for name in evaluated], out / "report")
    rows = [(name, _summary(json.loads((folder / "eval" / "metrics.json").read_text())))
            for name, folder in evaluated.items()]
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
