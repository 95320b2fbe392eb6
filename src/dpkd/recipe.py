"""`dpkd train` recipes: a YAML file of `DistillationConfig` fields and run keys, `--key value` overrides,
and loading the models and data a recipe names. Everything here raises; `dpkd.cli` reports.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any

from dpkd.config import DistillationConfig
from dpkd.suggest import did_you_mean

# Recipe keys that are not DistillationConfig fields: what to load, and how.
RUN_KEYS = {
    "student": "path (or hub id) of the student model",
    "teacher": "path (or hub id) of the teacher model; not needed for sft",
    "train_data": "training data: a file, folder or bundled set name (see dpkd.data.load_instruction_data)",
    "eval_data": "evaluation data, same forms as train_data",
    "pretrain_data": "text corpus for the L_pt term (see dpkd.data.load_pretrain_chunks)",
    "data_dir": "folder holding the bundled data sets",
    "min_response_words": "keep only training responses with at least this many words (the paper: 11)",
    "limit": "use only the first N training examples",
    "student_dtype": "dtype to load the student in (float32, bfloat16, float16)",
    "teacher_dtype": "dtype to load the teacher in",
    "teacher_gguf_file": "GGUF file of the teacher inside its folder (transformers' gguf_file)",
    "trust_remote_code": "allow models' own code from their folders (off by default)",
    "peft": "mapping of peft.LoraConfig fields (r, lora_alpha, lora_dropout, target_modules, ...): train LoRA "
            "adapters on the student; absent: full fine-tuning",
    "merge_adapter": "with peft: save the final model merged into a plain model (true, the default) or as the "
                     "adapter alone (adapter_model.safetensors + adapter_config.json)",
    "lora": "deprecated: `peft:` with peft's names; mapping {r, alpha, dropout} (see dpkd.modeling.apply_lora)",
    "dataset_config": "configuration name of a hub data set (datasets.load_dataset's `name`)",
    "dataset_train_split": "split of train_data to train on, for a hub id or a saved DatasetDict "
                           "(default: the only split, else `train`)",
    "dataset_test_split": "split to evaluate on: of eval_data, or of train_data when eval_data is absent",
}

# TRL's names (`trl sft --config`, ScriptArguments/ModelConfig) for the run keys: the same key under either name.
RUN_KEY_ALIASES = {
    "model_name_or_path": "student",
    "teacher_model_name_or_path": "teacher",
    "dataset_name": "train_data",
}


@dataclass
class Recipe:
    """A parsed `dpkd train` recipe: what to load (`run`) and the training configuration (`config`)."""

    path: Path
    run: dict[str, Any]
    config: DistillationConfig


# The types of the run keys, read as DistillationConfig's field annotations are, and their ranges.
_RUN_KEY_TYPES: dict[str, Any] = {
    "student": str, "teacher": str | None, "train_data": str, "eval_data": str | None,
    "pretrain_data": str | None, "data_dir": str | None, "min_response_words": int | None, "limit": int | None,
    "student_dtype": str | None, "teacher_dtype": str | None, "teacher_gguf_file": str | None,
    "trust_remote_code": bool, "lora": dict | None, "peft": dict | None, "merge_adapter": bool,
    "dataset_config": str | None, "dataset_train_split": str | None, "dataset_test_split": str | None,
}
_RUN_KEY_RANGES = {"limit": 1, "min_response_words": 0}  # the least value of each count
_DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "auto")


class _Unreadable(Exception):
    """A value that is not of the type a field's annotation names."""


def load_recipe(config_path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe, apply `--key value` overrides and validate everything before any model loads.

    Each value is read as the type its field names (a `DistillationConfig` field's annotation, or the run
    key's type): `learning_rate: 1e-3`, which YAML reads as a string, is the float 0.001; a boolean is a YAML
    boolean or the text true/false; an int field refuses 16.7. Ranges are `DistillationConfig.__post_init__`'s
    (and `limit` >= 1, `min_response_words` >= 0 here). Every error is a ValueError naming the file and line
    (or the override) and the field; unknown and repeated keys are errors too.
    """
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise ValueError(f"{path}: no such recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start}); is it a recipe?") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        values = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a mapping of `key: value` lines, got {type(values).__name__}")
    lines: dict[Any, int] = {}
    for key_node, _ in node.value if node is not None else ():
        line = key_node.start_mark.line + 1
        if key_node.value in lines:
            raise ValueError(f"{path}, line {line}: key {key_node.value!r} repeats line {lines[key_node.value]}; "
                             "keep one")
        lines[key_node.value] = line
    # resume_from_checkpoint: a checkpoint folder, or true for the newest complete one (see dpkd.run_folder).
    types = {**_config_fields(), **_RUN_KEY_TYPES, "resume_from_checkpoint": bool | str | None}
    _apply_aliases(values, lines, path)
    for key in values:
        if key not in types:
            raise ValueError(f"{path}, line {lines.get(key, '?')}: unknown key {key!r}{did_you_mean(key, types)}")
        values[key] = _typed(key, values[key], types[key], f"{path}, line {lines.get(key, '?')}: {key}")
    overridden = set()
    for key, raw in _parse_overrides(overrides or []):
        key = RUN_KEY_ALIASES.get(key, key)
        if key not in types:
            raise ValueError(f"override --{key}: unknown key{did_you_mean(key, types)}")
        values[key] = _typed(key, _override_value(raw, types[key]), types[key], f"override --{key}")
        overridden.add(key)
    run = {k: v for k, v in values.items() if k in RUN_KEYS}
    config_values = {k: v for k, v in values.items() if k not in RUN_KEYS}
    if "output_dir" not in config_values:
        raise ValueError(f"{path}: output_dir is required (in the recipe or as --output_dir DIR)")
    if isinstance(config_values.get("resume_from_checkpoint"), bool):  # YAML `true`: the newest checkpoint
        config_values["resume_from_checkpoint"] = "true" if config_values["resume_from_checkpoint"] else None
    try:
        config = DistillationConfig(**config_values)
    except (TypeError, ValueError) as err:
        field_name = str(err).split(":", 1)[0]
        where = path if field_name in overridden or field_name not in lines else f"{path}, line {lines[field_name]}"
        raise ValueError(f"{where}: {err}") from err
    if run.get("lora"):
        if run.get("peft"):
            raise ValueError(f"{path}: give `peft:` alone; `lora:` is its deprecated older form")
        warnings.warn("recipe key `lora: {r, alpha, dropout}` is deprecated: write `peft: {r, lora_alpha, "
                      "lora_dropout}` with peft.LoraConfig's names", FutureWarning, stacklevel=2)
    for key in ("student", "train_data"):
        if not run.get(key):
            raise ValueError(f"{path}: `{key}` is required ({RUN_KEYS[key]})")
    if config.spec.needs_teacher and not run.get("teacher"):
        raise ValueError(f"{path}: method {config.method!r} needs `teacher` ({RUN_KEYS['teacher']})")
    return Recipe(path, run, config)


BUNDLED_RECIPES = Path(__file__).resolve().parent / "configs"


def bundled_recipes() -> dict[str, str]:
    """The recipes that ship with dpkd (`configs/*.yaml`): name → the first line of its opening comment."""
    found = {}
    for path in sorted(BUNDLED_RECIPES.glob("*.yaml")):
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "")
        found[path.stem] = first.lstrip("#").strip() if first.startswith("#") else ""
    return found


def copy_recipe(name: str, destination: str | os.PathLike) -> Path:
    """Copy the bundled recipe `name` to `destination` (a file, or a folder to put `<name>.yaml` in); refuses to
    overwrite a file. Returns the path written."""
    import shutil

    name = name.removesuffix(".yaml")
    recipes = bundled_recipes()
    if name not in recipes:
        raise ValueError(f"no bundled recipe {name!r}{did_you_mean(name, recipes)}; see `dpkd recipes`")
    target = Path(destination)
    if target.is_dir():
        target = target / f"{name}.yaml"
    if target.exists():
        raise ValueError(f"{target}: already exists; choose another path or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUNDLED_RECIPES / f"{name}.yaml", target)
    return target


def _apply_aliases(values: dict[str, Any], lines: dict[Any, int], path: Path) -> None:
    """Rename TRL's names of run keys (`RUN_KEY_ALIASES`) in place; a key given under both names is an error."""
    for alias, key in RUN_KEY_ALIASES.items():
        if alias not in values:
            continue
        if key in values:
            raise ValueError(f"{path}, line {lines.get(alias, '?')}: {alias!r} is TRL's name for {key!r}, which "
                             f"line {lines.get(key, '?')} gives too; keep one")
        values[key] = values.pop(alias)
        lines[key] = lines.get(alias, "?")


def describe_fields() -> str:
    """Every recipe key with its help text and default, grouped: run keys, distillation fields, then
    `TrainingArguments`' fields (what `dpkd train --help` lists)."""
    import textwrap

    from transformers import TrainingArguments

    def entry(name: str, default: Any, text: str) -> str:
        head = f"  --{name}" + ("" if default is dataclasses.MISSING else f" (default: {default!r})")
        body = textwrap.fill(" ".join(text.split()) or "-", width=100, initial_indent=" " * 6,
                             subsequent_indent=" " * 6)
        return f"{head}\n{body}"

    aliases = {key: alias for alias, key in RUN_KEY_ALIASES.items()}
    out = ["run keys (what to load; TRL's names are accepted too):"]
    for key, text in RUN_KEYS.items():
        alias = f" (also --{aliases[key]})" if key in aliases else ""
        out.append(entry(key + alias, dataclasses.MISSING, text))
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = DistillationConfig.__dataclass_fields__
    groups = (("distillation fields (DistillationConfig):", lambda f: f.name not in inherited or
               own[f.name].default != TrainingArguments.__dataclass_fields__[f.name].default),
              ("training fields (transformers.TrainingArguments):", lambda f: f.name in inherited))
    shown: set[str] = set()
    for title, wanted in groups:
        out.append("")
        out.append(title)
        for f in dataclasses.fields(DistillationConfig):
            if not f.init or f.name.startswith("_") or f.name in shown or not wanted(f):
                continue
            shown.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            out.append(entry(f.name, default, f.metadata.get("help", "")))
    return "\n".join(out)


def _config_fields() -> dict[str, Any]:
    """DistillationConfig's init fields and their resolved types."""
    hints = typing.get_type_hints(DistillationConfig)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(DistillationConfig) if f.init}


def _typed(key: str, value: Any, annotation: Any, where: str) -> Any:
    """`value` as the type `annotation` names, in its range for a run key; else a ValueError that starts with
    `where` (the file, line and field, or the override)."""
    options = _options(annotation)
    try:
        # null (and, where no text is expected, `none`) is None for fields that take it.
        nulls = ("null", "~") if str in options else ("null", "~", "none")
        if value is None or (isinstance(value, str) and value.strip().lower() in nulls):
            if type(None) in options:
                return None
            if value is None:
                raise _Unreadable
        exact = [o for o in options if _is_exactly(value, o)]
        for option in exact or options:
            try:
                value = _read_as(value, option)
                break
            except _Unreadable:
                continue
        else:
            raise _Unreadable
    except _Unreadable:
        raise ValueError(f"{where}: cannot read {value!r} as {_describe(options)}") from None
    if key in _RUN_KEY_RANGES and value is not None and value < _RUN_KEY_RANGES[key]:
        raise ValueError(f"{where}: must be >= {_RUN_KEY_RANGES[key]}, got {value!r}")
    if key in ("student_dtype", "teacher_dtype") and value is not None and value not in _DTYPE_NAMES:
        raise ValueError(f"{where}: expected one of {', '.join(_DTYPE_NAMES)}, got {value!r}"
                         f"{did_you_mean(value, _DTYPE_NAMES, n=1)}")
    return value


def _options(annotation: Any) -> tuple[Any, ...]:
    """The types a value of `annotation` may have; `str` drops out beside an Enum (`SchedulerType | str`
    takes only the enum's values, which is all transformers accepts)."""
    if typing.get_origin(annotation) in (typing.Union, UnionType):
        options = typing.get_args(annotation)
    else:
        options = (annotation,)
    if any(isinstance(o, type) and issubclass(o, enum.Enum) for o in options):
        options = tuple(o for o in options if o is not str)
    return options


def _is_exactly(value: Any, option: Any) -> bool:
    if option in (int, float):
        return type(value) is option
    origin = typing.get_origin(option) or option
    return isinstance(origin, type) and not issubclass(origin, enum.Enum) and isinstance(value, origin)


def _read_as(value: Any, option: Any) -> Any:
    """`value` converted to `option`, or _Unreadable."""
    origin = typing.get_origin(option)
    if option is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
    elif option is int:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
    elif option is float:
        if isinstance(value, str):
            value = _number(value)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif option is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif isinstance(option, type) and issubclass(option, enum.Enum):
        if isinstance(value, option) or value in {member.value for member in option}:
            return value
    elif origin is typing.Literal:
        if value in typing.get_args(option):
            return value
    elif origin is list or option is list:
        items = typing.get_args(option)
        if isinstance(value, list):
            return [_read_as(v, items[0]) for v in value] if items else value
    elif origin is dict or option is dict:
        if isinstance(value, dict):
            return value
    elif option is type(None):
        pass
    elif isinstance(option, type) and isinstance(value, option):
        return value
    raise _Unreadable


def _number(text: str) -> Any:
    """A YAML 1.1 reader's leftovers (`1e-3`, `1_000`) as the number they spell; other text stays text."""
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            continue
    return text


def _describe(options: tuple[Any, ...]) -> str:
    names = []
    for option in options:
        if option is bool:
            names.append("true or false")
        elif isinstance(option, type) and issubclass(option, enum.Enum):
            names.append("one of " + ", ".join(str(member.value) for member in option))
        elif typing.get_origin(option) is typing.Literal:
            names.extend(repr(v) for v in typing.get_args(option))
        elif option is type(None):
            names.append("null")
        elif typing.get_origin(option) is not None:
            names.append(f"a {typing.get_origin(option).__name__}")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)


def _override_value(raw: str, annotation: Any) -> Any:
    """An override's text as the recipe would hold it: a YAML boolean, list or mapping where the field takes one
    (`--bf16 no`, `--lora "{r: 4}"`); otherwise the text itself, which `_typed` reads."""
    import yaml

    options = _options(annotation)
    wants = {bool} if bool in options else set()
    wants |= {o for o in options if (typing.get_origin(o) or o) in (list, dict)}
    if not wants:
        return raw
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return parsed if isinstance(parsed, bool | list | dict) else raw


def _parse_overrides(tokens: list[str]) -> list[tuple[str, str]]:
    """`--key value` or `--key=value` pairs; dashes in keys read as underscores. A flag alone means true."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"override {token!r}: expected --key value")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
                i += 1
            else:
                value = "true"
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def load_models_and_data(recipe: Recipe, *, need_student: bool = True):
    """What a recipe trains on: (tokenizer, student, teacher, train, eval, pretrain); absent parts are None.

    Data first (cheap, and its errors name files and lines), then tokenizers (chat data and `template: chat` are
    read after them: their prompts are rendered with the tokenizer's chat template), then the data tokenised
    (`train` and `eval` come back with `prompt_input_ids` and `completion_input_ids`, so a prompt-length error
    names its file before any model loads), then models. `need_student=False` loads the teacher and its
    tokenizer alone (for `dpkd teacher-generate`).
    """
    from dpkd import data, modeling

    run, args = recipe.run, recipe.config
    remote = run.get("trust_remote_code") is True  # a real boolean (load_recipe): the text "false" is not true
    hub = dict(template=args.template, data_dir=run.get("data_dir"), dataset_config=run.get("dataset_config"))

    def read(tokenizer):
        train = data.load_instruction_data(run["train_data"], split=run.get("dataset_train_split"),
                                           limit=run.get("limit"), min_response_words=run.get("min_response_words"),
                                           tokenizer=tokenizer, **hub)
        evaluation = None
        if run.get("eval_data") or run.get("dataset_test_split"):
            evaluation = data.load_instruction_data(run.get("eval_data") or run["train_data"],
                                                    split=run.get("dataset_test_split"), tokenizer=tokenizer, **hub)
        return train, evaluation

    try:
        loaded = read(None) if args.template != "chat" else None
    except data.TokenizerNeeded:
        loaded = None
    if need_student:
        tokenizer = modeling.load_tokenizer(run["student"], trust_remote_code=remote)
    else:
        tokenizer = modeling.load_tokenizer(run["teacher"], gguf_file=run.get("teacher_gguf_file"),
                                            trust_remote_code=remote)
    if run.get("teacher") and need_student:
        teacher_tokenizer = modeling.load_tokenizer(run["teacher"], gguf_file=run.get("teacher_gguf_file"),
                                                    trust_remote_code=remote)
        modeling.check_tokenizers_match(teacher_tokenizer, tokenizer)
    train, evaluation = loaded if loaded is not None else read(tokenizer)
    train = _tokenize(train, tokenizer, args, run["train_data"])
    if evaluation is not None:
        evaluation = _tokenize(evaluation, tokenizer, args, run.get("eval_data") or run["train_data"])
    pretrain = None
    if run.get("pretrain_data") and need_student:
        pretrain = data.load_pretrain_chunks(run["pretrain_data"], tokenizer, args.max_length)
    teacher = None
    if run.get("teacher") and (args.spec.needs_teacher or not need_student):
        teacher = modeling.load_causal_lm(run["teacher"], dtype=run.get("teacher_dtype"),
                                          device=args.teacher_device, gguf_file=run.get("teacher_gguf_file"),
                                          trust_remote_code=remote)
    student = None
    if need_student:
        student = modeling.load_causal_lm(run["student"], dtype=run.get("student_dtype"), trust_remote_code=remote)
        if run.get("peft"):
            student = modeling.apply_peft(student, run["peft"])
        elif run.get("lora"):
            student = modeling.apply_lora(student, **run["lora"])
    return tokenizer, student, teacher, train, evaluation, pretrain


def _tokenize(dataset, tokenizer, args: DistillationConfig, source: str):
    """`dpkd.data.tokenize_dataset` with the recipe's lengths; its errors name the data they are about."""
    from dpkd import data

    try:
        tokenized, _ = data.tokenize_dataset(dataset, tokenizer, max_prompt_length=args.max_prompt_length,
                                             max_length=args.max_length, prompt_truncation=args.prompt_truncation)
    except data.DataError as err:
        raise data.DataError(f"{source}: {err}") from None
    return tokenized
