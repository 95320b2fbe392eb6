"""The demo recipe: its schema, loading with the `quick`/`big` overlays, checks, and training configs.

Every check runs before any data or model is made: a bad recipe fails in a second, naming the file and
the key, instead of after the teacher has trained.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpkd.study.pretrained import SCHEMA_ADDITIONS, is_pretrained
from dpkd.suggest import did_you_mean

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
METHODS = ("sft", "kd", "seqkd", "rkl", "jsd", "dpkd_token", "dpkd")
PROFILES = ("quick", "big")

# The recipe's shape: nested mappings of allowed keys; a leaf `dict` is a mapping of DistillationConfig
# fields, checked by constructing the config.
_SCHEMA: dict[str, Any] = {
    "seed": int,
    "init": str,
    "training_seeds": list,
    "select_on_dev": bool,
    "dev_evaluations": int,
    "seeds_by_method": dict,
    "bf16": bool,
    "workers": (int, str),
    "threads": (int, str),
    "data": {"train": int, "dev": int, "test": int, "template": str, "tasks": list},
    "tokenizer": {"vocab_size": int},
    "teacher": {"d_model": int, "n_layer": int, "n_head": int, "processes": int, "training": dict},
    "student": {"d_model": int, "n_layer": int, "n_head": int},
    "warm_start": dict,
    "distill": {"common": dict, "methods": dict},
    "eval": {"seeds": list, "max_new_tokens": int, "batch_size": int},
    "quick": dict,
    "big": dict,
}
# A pretrained teacher (`teacher.model`) adds keys to some sections: see dpkd.study.pretrained.
for _section, _keys in SCHEMA_ADDITIONS.items():
    _SCHEMA[_section] = {**_SCHEMA[_section], **_keys}
# Defaults: workers and threads `auto`, init scratch, one run per method, no warm start, no selection on
# dev (4 scorings when on), float32.
_OPTIONAL = ("workers", "threads", "init", "training_seeds", "seeds_by_method", "warm_start", "select_on_dev",
             "dev_evaluations", "bf16")
INITS = ("scratch", "sft")
DEV_EVALUATIONS = 4  # checkpoints scored on dev per run with select_on_dev, evenly spaced, the last one included
# Keys of a `distill.methods` entry that the study reads itself; every other key is a DistillationConfig field.
# `method`: the library method the entry trains with (default: the entry's name), so one method can appear
# under several names with different settings (a variant: `dpkd_beta1: {method: dpkd, beta: 1.0}`);
# `init`: the entry's own starting point (scratch or sft), for the warm-start ablation.
_ENTRY_KEYS = ("method", "init")
# Settings of every training run that the demo owns; a recipe cannot override them.
_FIXED_TRAINING = {"output_dir", "method", "seed", "teacher_cache_dir", "save_strategy", "report_to"}


class DemoError(ValueError):
    """A bad recipe or output folder: the message names the file and key."""


@dataclass
class DemoRecipe:
    """A validated demo recipe: the merged settings and the training configurations they imply."""

    source: str
    values: dict

    def section(self, name: str) -> dict:
        return self.values[name]


def study_runs(values: dict) -> list[tuple[str, str, int | None]]:
    """`(run, entry, training seed)` for every training run of the study, by `distill.methods` entry then
    seed. Without `training_seeds` one run per entry, named after it, with the recipe's seed (seed None).
    `seeds_by_method` gives some entries other training seeds than `training_seeds` (fewer, where a budget
    allows the control and the method of interest several seeds but not every baseline)."""
    seeds = values.get("training_seeds")
    methods = values["distill"]["methods"]
    if seeds is None:
        return [(m, m, None) for m in methods]
    by_method = values.get("seeds_by_method") or {}
    return [(f"{m}_s{seed}", m, seed) for m in methods for seed in by_method.get(m, seeds)]


def base_method(values: dict, entry: str) -> str:
    """The library method that the `distill.methods` entry `entry` trains with: its `method:`, else its name."""
    return (values["distill"]["methods"][entry] or {}).get("method", entry)


def entry_init(values: dict, entry: str) -> str:
    """Where the entry's runs start: its own `init:`, else the recipe's (`scratch` by default)."""
    return (values["distill"]["methods"][entry] or {}).get("init", values.get("init", "scratch"))


def needs_warm_start(values: dict) -> bool:
    """Whether any run starts from the SFT warm start."""
    return any(entry_init(values, entry) == "sft" for entry in values["distill"]["methods"])


def dev_selection_steps(max_steps: int, evaluations: int) -> list[int]:
    """The steps at which select_on_dev scores a run on dev: `evaluations` evenly spaced, the last step included."""
    n = max(1, min(evaluations, max_steps))
    return sorted({round(max_steps * (i + 1) / n) for i in range(n)})


def parse_training_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2` as a list of distinct integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise DemoError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise DemoError(f"--seeds: expected distinct integers, got {text!r}")
    return seeds


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
            hint = did_you_mean(key, schema, n=1, prefix=path)
            raise DemoError(f"{where}: unknown key {name!r}{hint}; allowed here: {', '.join(schema)}")
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                raise DemoError(f"{where}: {name!r} must be a mapping of {', '.join(expected)}")
            _check_shape(value, expected, where, f"{name}.")
        elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            kinds = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise DemoError(f"{where}: {name!r} must be {kinds}, got {value!r}")


def load_demo_recipe(path: str | Path | None = None, profile: str | None = None,
                     seeds: list[int] | None = None) -> DemoRecipe:
    """Read the YAML recipe (default: the bundled one), apply the `quick`/`big` overlay, check everything.

    `seeds` (from `--seeds`) replaces the recipe's `training_seeds`. Errors name the file and the key; the
    training settings are checked by building every `DistillationConfig` the run will use, before any data
    or model is made.
    """
    import yaml

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise DemoError(f"no such recipe file {str(path)!r}")
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
    optional = (*_OPTIONAL, "tokenizer") if is_pretrained(values) else _OPTIONAL  # it brings its own
    missing = [k for k in _SCHEMA if k not in (*PROFILES, *optional) and k not in values]
    if missing:
        raise DemoError(f"{path}: missing section(s) {', '.join(missing)} (see the bundled {DEFAULT_CONFIG.name})")
    if seeds is not None:
        values["training_seeds"] = list(seeds)
        values.pop("seeds_by_method", None)  # --seeds gives every method these seeds
    recipe = DemoRecipe(source=f"{path}" + (f" --{profile}" if profile else "")
                        + (f" --seeds {','.join(map(str, seeds))}" if seeds is not None else ""), values=values)
    _check_values(recipe, str(path))
    return recipe


def _check_values(recipe: DemoRecipe, where: str) -> None:
    v = recipe.values
    if is_pretrained(v):
        from dpkd.study.pretrained import check_values

        check_values(v, where, DemoError)
    else:
        _check_generated(v, where)
    _check_common(recipe, where)


def _check_generated(v: dict, where: str) -> None:
    """The keys of a study on the generated tasks, with a teacher and student trained from scratch."""
    from dpkd.tasks import TASKS

    for split in ("train", "dev", "test"):
        if v["data"].get(split, 0) < 1:
            raise DemoError(f"{where}: data.{split} must be a positive number of examples")
    for section, key in (("data", "source"), ("student", "from_teacher"), ("eval", "sets"), ("eval", "dtype")):
        if key in v[section]:
            raise DemoError(f"{where}: {section}.{key} is read only with a pretrained teacher (teacher.model)")
    unknown = [t for t in v["data"].get("tasks", []) if t not in TASKS]
    if unknown:
        raise DemoError(f"{where}: data.tasks: unknown task(s) {unknown}; choose from {', '.join(TASKS)}")
    template = v["data"].get("template")
    if template is not None and ("{instruction}" not in template or "{input}" not in template):
        raise DemoError(f"{where}: data.template must contain {{instruction}} and {{input}}")
    for model in ("teacher", "student"):
        for key in ("d_model", "n_layer", "n_head"):
            if v[model].get(key, 0) < 1:
                raise DemoError(f"{where}: {model}.{key} must be a positive integer")
        if v[model]["d_model"] % v[model]["n_head"]:
            raise DemoError(f"{where}: {model}.d_model must be divisible by {model}.n_head")


def _check_common(recipe: DemoRecipe, where: str) -> None:
    """The keys every study has: parallelism, the methods and their training, seeds, evaluation."""
    v = recipe.values
    for key in ("workers", "threads"):
        setting = v.get(key, "auto")
        if not (setting == "auto" or (isinstance(setting, int) and setting >= 1)):
            raise DemoError(f"{where}: {key} must be 'auto' or a positive integer, got {setting!r}")
    processes = v["teacher"].get("processes", 1)
    batch = (v["teacher"].get("training") or {}).get("per_device_train_batch_size", 8)
    if processes < 1 or batch % processes:
        raise DemoError(f"{where}: teacher.processes must be a positive integer that divides "
                        f"teacher.training.per_device_train_batch_size ({batch}), got {processes}")
    methods = v["distill"].get("methods") or {}
    if not methods:
        raise DemoError(f"{where}: distill.methods: expected a mapping of entries, each a method among "
                        f"{', '.join(METHODS)} or a variant naming one with `method:`, got {methods!r}")
    for entry, fields in methods.items():
        _check_entry(entry, fields, where)
    init = v.get("init", "scratch")
    if init not in INITS:
        raise DemoError(f"{where}: init must be one of {', '.join(INITS)}, got {init!r}")
    if needs_warm_start(v) and not (v.get("warm_start") or {}).get("max_steps", 0) > 0:
        raise DemoError(f"{where}: init: sft needs warm_start.max_steps, the warm start's budget in steps")
    if not needs_warm_start(v) and "warm_start" in v:
        raise DemoError(f"{where}: warm_start is read only with init: sft")
    if "sft" in methods and base_method(v, "sft") != "sft":
        raise DemoError(f"{where}: distill.methods.sft: the entry named sft is the control of the paired table, "
                        f"so it must train with method sft, got method {base_method(v, 'sft')!r}")
    if v.get("dev_evaluations", DEV_EVALUATIONS) < 1:
        raise DemoError(f"{where}: dev_evaluations must be a positive integer, got {v['dev_evaluations']!r}")
    if "dev_evaluations" in v and not v.get("select_on_dev", False):
        raise DemoError(f"{where}: dev_evaluations is read only with select_on_dev: true")
    training_seeds = v.get("training_seeds")
    if training_seeds is not None and (not training_seeds or len(set(training_seeds)) != len(training_seeds)
                                       or not all(isinstance(s, int) and not isinstance(s, bool)
                                                  for s in training_seeds)):
        raise DemoError(f"{where}: training_seeds must be a non-empty list of distinct integers, "
                        f"got {training_seeds!r}")
    for method, method_seeds in (v.get("seeds_by_method") or {}).items():
        if training_seeds is None:
            raise DemoError(f"{where}: seeds_by_method is read only with training_seeds")
        if method not in methods:
            raise DemoError(f"{where}: seeds_by_method.{method}: not a method of distill.methods "
                            f"({', '.join(methods)})")
        if (not isinstance(method_seeds, list) or not method_seeds or len(set(method_seeds)) != len(method_seeds)
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in method_seeds)):
            raise DemoError(f"{where}: seeds_by_method.{method} must be a non-empty list of distinct integers, "
                            f"got {method_seeds!r}")
        control = (v.get("seeds_by_method") or {}).get("sft", training_seeds)
        if "sft" in methods and method != "sft" and not set(method_seeds) <= set(control):
            raise DemoError(f"{where}: seeds_by_method.{method}: {method_seeds} are not all seeds the sft control "
                            f"is trained with ({control}); each run is paired with the control of its seed")
    seeds = v["eval"].get("seeds") or []
    if not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise DemoError(f"{where}: eval.seeds must be a list of distinct integers, got {seeds!r}")
    for key in ("max_new_tokens", "batch_size"):
        if v["eval"].get(key, 0) < 1:
            raise DemoError(f"{where}: eval.{key} must be a positive integer")
    # Building each config checks every training field and its range (DistillationConfig.__post_init__).
    training_configs(recipe, Path("unused"), where=where)


def _check_entry(entry: str, fields, where: str) -> None:
    """A `distill.methods` entry: a method's name, or any name with `method:` naming one; `init` valid."""
    key = f"distill.methods.{entry}"
    if fields is not None and not isinstance(fields, dict):
        raise DemoError(f"{where}: {key} must be a mapping of DistillationConfig fields (or {{}}), got {fields!r}")
    fields = fields or {}
    method = fields.get("method", entry)
    if method not in METHODS:
        if "method" in fields:
            raise DemoError(f"{where}: {key}.method: expected one of {', '.join(METHODS)}, got {method!r}"
                            f"{did_you_mean(str(method), METHODS, n=1)}")
        raise DemoError(f"{where}: {key}: {entry!r} is not a method ({', '.join(METHODS)})"
                        f"{did_you_mean(entry, METHODS, n=1)}; a variant names its method, e.g. "
                        f"{entry}: {{method: dpkd, beta: 1.0}}")
    if "init" in fields and fields["init"] not in INITS:
        raise DemoError(f"{where}: {key}.init: expected one of {', '.join(INITS)}, got {fields['init']!r}")


def _training_fields(fields: dict, where: str, key: str) -> dict:
    from dpkd.config import DistillationConfig

    fixed = sorted(_FIXED_TRAINING & set(fields))
    if fixed:
        raise DemoError(f"{where}: {key}: {', '.join(fixed)} are set by the demo itself")
    known = [f.name for f in dataclasses.fields(DistillationConfig) if f.init]
    for name in fields:
        if name not in known:
            raise DemoError(f"{where}: {key}: {name!r} is not a DistillationConfig field{did_you_mean(name, known)}")
    return dict(fields)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_device(recipe: DemoRecipe) -> None:
    """Refuse, before any work, a recipe that needs a GPU (`bf16: true`) on a machine without one. (The
    recipe itself is checked anywhere: its training configs leave bf16 out where there is no GPU.)"""
    if recipe.values.get("bf16") and not _has_cuda():
        raise DemoError(f"{recipe.source}: bf16: true trains in bf16 mixed precision on a CUDA GPU, and this "
                        "machine has none; drop the key (float32) or run the study on a GPU")


def _training_sections(v: dict) -> list[dict]:
    methods = v["distill"].get("methods") or {}
    return [v["teacher"].get("training") or {}, v["distill"].get("common") or {}, v.get("warm_start") or {},
            *(fields or {} for fields in methods.values())]


def training_configs(recipe: DemoRecipe, out: Path, *, where: str | None = None) -> dict:
    """`{"teacher": DistillationConfig, run: DistillationConfig, ...}` for this recipe and output folder, one
    per run of `study_runs` (with its training seed, if any; with its entry's `method`), and `"warm_start"`
    when a run starts from it: method `sft` on `distill.common` and the `warm_start` fields."""
    from dpkd.config import DistillationConfig

    where = where or recipe.source
    v = recipe.values
    if any("bf16" in section for section in _training_sections(v)):  # on a CPU it fails in transformers, obscurely
        raise DemoError(f"{where}: bf16 is set for the whole study, by the top-level key `bf16: true`, not per "
                        "training section")
    base = {"seed": v["seed"], "save_strategy": "no", "report_to": "none", "lr_scheduler_type": "cosine",
            "disable_tqdm": False, "dataloader_num_workers": 0, "dataloader_pin_memory": False,
            **({"bf16": True} if v.get("bf16") and _has_cuda() else {})}
    fields = {"teacher": ("teacher.training", {**base, "method": "sft", "output_dir": str(out / "teacher" / "training"),
                                               **_training_fields(v["teacher"].get("training") or {}, where,
                                                                  "teacher.training")})}
    common = _training_fields(v["distill"].get("common") or {}, where, "distill.common")
    if needs_warm_start(v):
        fields["warm_start"] = ("warm_start", {
            **base, **common, **_training_fields(v.get("warm_start") or {}, where, "warm_start"),
            "method": "sft", "output_dir": str(out / "warm_start")})
    methods = v["distill"].get("methods") or {}
    for run, entry, seed in study_runs(v) if methods else []:
        own = {k: value for k, value in (methods[entry] or {}).items() if k not in _ENTRY_KEYS}
        fields[run] = (f"distill.methods.{entry}", {
            **base, **common, **_training_fields(own, where, f"distill.methods.{entry}"),
            "method": base_method(v, entry), "output_dir": str(out / "runs" / run),
            "teacher_cache_dir": str(out / "teacher_cache"), **({"seed": seed} if seed is not None else {})})
    configs = {}
    for name, (key, kwargs) in fields.items():
        steps = kwargs.get("max_steps", -1)
        kwargs.setdefault("logging_steps", max(1, steps // 10) if steps > 0 else 10)
        try:
            configs[name] = DistillationConfig(**kwargs)
        except (TypeError, ValueError) as err:
            raise DemoError(f"{where}: {key}: {err}") from None
    return configs
