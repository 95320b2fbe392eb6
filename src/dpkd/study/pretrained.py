"""Studies of a real pretrained teacher: the recipe keys, what their stages make, and their tables.

A recipe whose `teacher` names a model (`teacher.model`: a registered name such as `smollm2-135m-instruct`,
or a local folder saved with `save_pretrained`) runs the study on that model instead of on the generated
tasks (the paper's Table 1 at small scale). The stages are the demo's, made differently:

    data/{train,dev}.jsonl   `data.source` (a bundled set such as `dolly-dev`, or a data file) rendered
                             with `data.template` (e.g. `chat`: the teacher's chat template) and split
                             into `dev` rows and the rest for training, by a permutation seeded with
                             the recipe's seed; stored as prompt/completion, so every stage reads the
                             same prompts
    tokenizer/               the teacher's own tokenizer (no tokenizer is trained)
    teacher/                 the pretrained model fine-tuned with `sft` on the train split
                             (`teacher.training`), as the paper's teachers were
    student_init/            the pretrained teacher's embeddings, final norm, head and the blocks that
                             `student.from_teacher` keeps (`keep_layers`: a number evenly spaced, or a
                             list of block indices), copied (`dpkd.modeling.student_from_teacher`)
    <model>/eval/            every set of `eval.sets` (bundled names) with its own `limit` and
                             `max_new_tokens`, through the same template; one `metrics.json` per model
                             with a result per set

Recipe keys this module adds (all checked by `check_values` before any work):

    teacher.model                       name or folder of the pretrained teacher
    student.from_teacher.keep_layers    an int, or a list of block indices
    data.source, data.dev, data.train   the set to split, the dev rows, at most this many train rows
    data.template                       a template name of `dpkd.data` (`chat`, `alpaca`, `none`) or a string
    eval.sets.<set>.limit               the first `limit` examples of the set (default: all)
    eval.sets.<set>.max_new_tokens      default: eval.max_new_tokens
    eval.dtype                          float32 (default), bfloat16 or float16 for generation
"""

from __future__ import annotations

import json
from pathlib import Path

# The recipe keys of a pretrained-teacher study, merged into the demo's schema by `dpkd.study.recipe`.
SCHEMA_ADDITIONS: dict = {
    "teacher": {"model": str},
    "student": {"from_teacher": {"keep_layers": (int, list)}},
    "data": {"source": str},
    "eval": {"sets": dict, "dtype": str},
}
SET_KEYS = {"limit": int, "max_new_tokens": int}
EVAL_DTYPES = ("float32", "bfloat16", "float16")


def is_pretrained(values: dict) -> bool:
    """Whether the recipe's teacher is a pretrained model (`teacher.model`) rather than trained from scratch."""
    return "model" in values.get("teacher", {})


def teacher_source(values: dict) -> str:
    return values["teacher"]["model"]


# --- checks -------------------------------------------------------------------------------------------


def check_values(values: dict, where: str, error: type[Exception]) -> None:
    """Check the keys of a pretrained-teacher recipe; raise `error` naming the file (`where`) and the key.

    Cheap: reads no weights. A registered model name is accepted without converting it; a folder must
    hold config.json; bundled set names are checked against `dpkd.data_files.BUNDLED_SETS`.
    """
    from dpkd.data import TEMPLATE_NAMES
    from dpkd.data_files import BUNDLED_SETS
    from dpkd.pretrained import MODELS
    from dpkd.suggest import did_you_mean

    teacher, student, data, evaluation = values["teacher"], values["student"], values["data"], values["eval"]
    model = teacher["model"]
    if model not in MODELS and not (Path(model).expanduser() / "config.json").is_file():
        raise error(f"{where}: teacher.model: {model!r} is neither a registered model ({', '.join(MODELS)})"
                    f"{did_you_mean(model, MODELS)} nor a folder with a config.json")
    if model in MODELS and not Path(model).exists():
        _check_convertible(model, where, error)
    for key in ("d_model", "n_layer", "n_head"):
        if key in teacher:
            raise error(f"{where}: teacher.{key}: the size of a pretrained teacher (teacher.model) is its own")
    if "tokenizer" in values:
        raise error(f"{where}: tokenizer: a pretrained teacher (teacher.model) brings its own tokenizer")
    extra = sorted(set(student) - {"from_teacher"})
    if extra or "from_teacher" not in student:
        raise error(f"{where}: student: with teacher.model the student is made from the teacher's blocks: "
                    f"student: {{from_teacher: {{keep_layers: N}}}}" + (f" (not {', '.join(extra)})" if extra else ""))
    keep = student["from_teacher"].get("keep_layers")
    valid = (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1) or (
        isinstance(keep, list) and keep and len(set(keep)) == len(keep)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in keep))
    if not valid:
        raise error(f"{where}: student.from_teacher.keep_layers must be a positive number of blocks or a "
                    f"list of distinct block indices, got {keep!r}")
    n_layers = _known_layer_count(model)
    if n_layers is not None:
        indices = keep if isinstance(keep, list) else [keep - 1]
        if max(indices) >= n_layers:
            what = "keeps more blocks than" if isinstance(keep, int) else "names a block beyond"
            raise error(f"{where}: student.from_teacher.keep_layers {what} the teacher's {n_layers} layers")
    for key in ("test", "tasks"):
        if key in data:
            raise error(f"{where}: data.{key}: with teacher.model the test sets are eval.sets")
    source = data.get("source")
    if source is None:
        raise error(f"{where}: data.source: with teacher.model, name the training set (e.g. dolly-dev)")
    if source not in BUNDLED_SETS and not Path(source).expanduser().exists():
        raise error(f"{where}: data.source: {source!r} is neither a bundled set ({', '.join(BUNDLED_SETS)})"
                    f"{did_you_mean(source, BUNDLED_SETS)} nor an existing file")
    for key in ("dev", "train"):
        if key in data and data[key] < 1:
            raise error(f"{where}: data.{key} must be a positive number of examples")
    if "dev" not in data:
        raise error(f"{where}: data.dev: the number of rows of data.source held out for checkpoint selection")
    template = data.get("template", "auto")
    if template not in TEMPLATE_NAMES and "{instruction}" not in template:
        raise error(f"{where}: data.template must be one of {', '.join(TEMPLATE_NAMES)} or contain "
                    f"{{instruction}}, got {template!r}")
    sets = evaluation.get("sets")
    if not sets:
        raise error(f"{where}: eval.sets: with teacher.model, name the evaluation sets, e.g. "
                    f"{{dolly: {{limit: 48}}}}; known: {', '.join(s for s in BUNDLED_SETS if s != source)}")
    for name, options in sets.items():
        if name not in BUNDLED_SETS:
            raise error(f"{where}: eval.sets: unknown set {name!r}{did_you_mean(name, BUNDLED_SETS)}; known: "
                        f"{', '.join(BUNDLED_SETS)}")
        if name == source:
            raise error(f"{where}: eval.sets.{name}: the training set (data.source) cannot be a test set")
        options = options or {}
        if not isinstance(options, dict):
            raise error(f"{where}: eval.sets.{name} must be a mapping of {', '.join(SET_KEYS)}")
        for key, value in options.items():
            if key not in SET_KEYS:
                raise error(f"{where}: eval.sets.{name}: unknown key {key!r}{did_you_mean(key, SET_KEYS)}; "
                            f"allowed: {', '.join(SET_KEYS)}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise error(f"{where}: eval.sets.{name}.{key} must be a positive integer, got {value!r}")
    dtype = evaluation.get("dtype", "float32")
    if dtype not in EVAL_DTYPES:
        raise error(f"{where}: eval.dtype must be one of {', '.join(EVAL_DTYPES)}, got {dtype!r}")


def _check_convertible(name: str, where: str, error: type[Exception]) -> None:
    """A registered model not converted yet is converted by the study's first stage, which reads its GGUF
    file with the `gguf` package: refuse now, not in a worker, when that package is missing."""
    import importlib.util

    from dpkd.pretrained import models_dir

    if not (models_dir() / name / "dpkd_source.json").is_file() and importlib.util.find_spec("gguf") is None:
        raise error(f"{where}: teacher.model: {name!r} is converted from its GGUF file on first use, which needs "
                    f"the gguf package: pip install gguf (or pip install 'dpkd[models]'), or give a folder "
                    f"converted elsewhere (`dpkd models fetch {name}` prints its path)")


def _known_layer_count(model: str) -> int | None:
    """The teacher's number of blocks, from its config.json when it is at hand (a folder, or a registered
    model already converted); None when it is not, and then `student_from_teacher` checks later."""
    from dpkd.pretrained import MODELS, models_dir

    folder = models_dir() / model if model in MODELS else Path(model).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("num_hidden_layers")


# --- what the stages make -----------------------------------------------------------------------------


def build_data(values: dict, folder: Path) -> dict[str, Path]:
    """Render `data.source` with `data.template` and write `train.jsonl` and `dev.jsonl` (prompt/completion
    rows): `data.dev` rows drawn by a permutation seeded with the recipe's seed, the rest (at most
    `data.train` of them) for training; rows whose prompt is in one of the evaluation sets are left out of
    both."""
    import random

    from dpkd.data import load_instruction_data
    from dpkd.modeling import load_tokenizer

    data = values["data"]
    tokenizer = load_tokenizer(teacher_source(values))
    rows = load_instruction_data(data["source"], template=data.get("template", "auto"), tokenizer=tokenizer)
    if data["dev"] >= len(rows):
        raise ValueError(f"data.dev: {data['dev']} rows held out of the {len(rows)} of {data['source']} leave "
                         "none to train on")
    order = list(range(len(rows)))
    random.Random(values["seed"]).shuffle(order)
    # A prompt that is also in an evaluation set is neither trained on nor used to choose a checkpoint
    # (MiniLLM's Dolly dev split shares one with DollyEval); dropped after the draw, so that the split of
    # every other row does not depend on the evaluation sets.
    evaluated = {row["prompt"] for name in values["eval"]["sets"]
                 for row in load_instruction_data(name, template=data.get("template", "auto"), tokenizer=tokenizer)}
    dev = [i for i in sorted(order[:data["dev"]]) if rows[i]["prompt"] not in evaluated]
    train = [i for i in sorted(order[data["dev"]:]) if rows[i]["prompt"] not in evaluated][:data.get("train")]
    paths = {}
    for split, indices in (("train", train), ("dev", dev)):
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(
            json.dumps({"prompt": rows[i]["prompt"], "completion": rows[i]["completion"]}, ensure_ascii=False)
            + "\n" for i in indices))
    return paths


def save_tokenizer(values: dict, folder: Path) -> None:
    from dpkd.modeling import load_tokenizer

    load_tokenizer(teacher_source(values)).save_pretrained(folder)


def save_teacher_init(values: dict, tokenizer_dir: Path, folder: Path) -> int:
    """Save the pretrained teacher (float32) with the study's tokenizer as the start of its SFT stage;
    return its parameter count."""
    from dpkd.modeling import load_causal_lm, load_tokenizer, save_model_and_tokenizer

    model = load_causal_lm(teacher_source(values), dtype="float32")
    save_model_and_tokenizer(model, load_tokenizer(tokenizer_dir), folder)
    return sum(p.numel() for p in model.parameters())


def save_student_init(values: dict, tokenizer_dir: Path, folder: Path) -> tuple[int, list[int]]:
    """Save the student made from the pretrained teacher's blocks; return its parameter count and the
    teacher blocks it kept."""
    from dpkd.modeling import (
        evenly_spaced_layers,
        load_causal_lm,
        load_tokenizer,
        save_model_and_tokenizer,
        student_from_teacher,
    )

    teacher = load_causal_lm(teacher_source(values), dtype="float32")
    keep = values["student"]["from_teacher"]["keep_layers"]
    layers = list(keep) if isinstance(keep, list) else evenly_spaced_layers(teacher.config.num_hidden_layers, keep)
    student = student_from_teacher(teacher, layers=layers)
    save_model_and_tokenizer(student, load_tokenizer(tokenizer_dir), folder)
    return sum(p.numel() for p in student.parameters()), layers


def evaluate_sets(model_dir: Path, values: dict, out_dir: Path, *, seeds: list[int] | None = None) -> dict:
    """Evaluate on every set of `eval.sets` (each with its own `limit` and `max_new_tokens`) through the
    recipe's template, and write the sets' results together to `<out_dir>/metrics.json` (the layout
    `dpkd.report` reads); each set's predictions stay under `<out_dir>/sets/<set>/`. Returns the metrics."""
    from dpkd.evaluation import evaluate_model
    from dpkd.generation import SamplingConfig
    from dpkd.teacher_cache import write_atomically

    evaluation = values["eval"]
    merged: dict = {}
    for name, options in evaluation["sets"].items():
        options = options or {}
        sampling = SamplingConfig(max_new_tokens=options.get("max_new_tokens", evaluation["max_new_tokens"]))
        result = evaluate_model(model_dir, data=[name], seeds=seeds or evaluation["seeds"],
                                out_dir=out_dir / "sets" / name, limit=options.get("limit"),
                                batch_size=evaluation["batch_size"], sampling=sampling, max_prompt_length=None,
                                template=values["data"].get("template", "auto"),
                                dtype=evaluation.get("dtype", "float32"))
        result["sets"][name]["settings"] = result["settings"]
        merged.setdefault("model", result["model"])
        # What every set shares (`dpkd.report` reads the seeds here); each set's own settings are beside it.
        merged.setdefault("settings", {**result["settings"], "data": list(evaluation["sets"]), "limit": None,
                                       "sampling": "per set"})
        merged.setdefault("sets", {}).update(result["sets"])
    write_atomically(out_dir / "metrics.json", json.dumps(merged, indent=2) + "\n")
    return merged


# --- tables -------------------------------------------------------------------------------------------

METRICS = (("exact_match", "EM"), ("rougeL", "ROUGE-L"))


def set_means(metrics: dict) -> dict[str, dict[str, float]]:
    """Per set, exact match and ROUGE-L of one evaluated model averaged over its sampling seeds."""
    return {name: {m: result["summary"][m]["mean"] for m, _ in METRICS} for name, result in metrics["sets"].items()}


def set_summaries(metrics: dict) -> dict[str, dict]:
    """Per set, the mean/std summary over sampling seeds of one evaluated model."""
    return {name: result["summary"] for name, result in metrics["sets"].items()}


def sets_tables(sets: list[str]):
    """`(results_table, paired_table)` over `sets`, with the signatures of `dpkd.study.build`'s one-set tables."""
    return (lambda rows: sets_table(rows, sets),
            lambda per_method, control="sft": paired_sets_table(per_method, sets, control))


def _header(sets: list[str], first: list[str], last: list[str] = ()) -> list[str]:
    from dpkd.report import SET_TITLES

    cells = [*first, *(f"{SET_TITLES.get(s, s)} {title}" for s in sets for _, title in METRICS), *last]
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]


def sets_table(rows: list[tuple[str, dict]], sets: list[str]) -> str:
    """Markdown: one row per model, a column group per set (exact match, ROUGE-L as mean ± std).
    `rows`: (label, {set: summary}) with each summary `{metric: {"mean", "std"}}`."""
    lines = _header(sets, ["model"])
    for label, per_set in rows:
        cells = [f"{per_set[s][m]['mean']:.1f} ± {per_set[s][m]['std']:.1f}" for s in sets for m, _ in METRICS]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


def paired_sets_table(per_method: dict[str, dict[int, dict[str, dict[str, float]]]], sets: list[str],
                      control: str = "sft") -> str:
    """Markdown: for each method but `control`, (method − control) per training seed, mean ± std over the
    training seeds both were trained with, a column group per set. `per_method`: method → training seed →
    set → metric → value. A method trained with fewer seeds than the control is paired on its own seeds."""
    from dpkd.study.build import paired_differences

    lines = _header(sets, [f"method − {control}"], ["training seeds"])
    for method, per_seed in per_method.items():
        if method == control:
            continue
        shared = sorted(set(per_seed) & set(per_method[control]))
        cells = []
        for s in sets:
            for m, _ in METRICS:
                d = paired_differences({seed: per_seed[seed][s][m] for seed in shared},
                                       {seed: per_method[control][seed][s][m] for seed in shared})
                cells.append(f"{d['mean']:+.1f}" + (f" ± {d['std']:.1f}" if d["n"] > 1 else ""))
        lines.append(f"| {method} | {' | '.join(cells)} | {len(shared)} |")
    return "\n".join(lines)
