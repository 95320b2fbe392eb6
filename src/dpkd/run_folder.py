"""The output folder of a `dpkd train` run: writable, holding one run only, and which checkpoint resumes it.

`dpkd_settings.json` records what makes a run (`run_settings`: the method, the models and data, and the
settings that change what is trained); training into a folder that holds a run with another record is
refused unless `overwrite_output_dir`, so two runs never mix their checkpoints and logs. The schedule's
length (`max_steps`, `num_train_epochs`) and bookkeeping (logging, saving, devices) are not part of the
record: resuming a run for longer, or on another machine, is the same run.

`resume_from_checkpoint: true` takes the newest complete checkpoint (a `checkpoint-N` folder with
`trainer_state.json` and weights) and passes over torn ones (a save that was cut short). Everything here
raises `RunFolderError`; `dpkd.cli` reports.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from dpkd.durable import write_atomically
from dpkd.recipe import Recipe

SETTINGS_FILE = "dpkd_settings.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")
# What a finished or interrupted run leaves in its folder besides checkpoints.
_RUN_FILES = ("trainer_state.json", "dpkd_run.json", *_WEIGHTS)

# What makes a run: two folders that agree on these trained the same model the same way.
_RUN_KEYS = ("student", "teacher", "teacher_gguf_file", "train_data", "pretrain_data", "limit", "min_response_words",
             "lora", "peft", "merge_adapter", "dataset_config", "dataset_train_split")
_CONFIG_KEYS = (
    "beta", "dpkd_loss_type", "length_normalize", "label_smoothing", "dpop_lambda", "kd_ratio", "lm_coef",
    "skew_alpha", "temperature", "lmbda", "max_new_tokens", "sampling_temperature", "top_k", "top_p",
    "max_prompt_length", "max_length", "prompt_truncation", "template", "resample_teacher_each_epoch",
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "optim", "max_grad_norm", "label_smoothing_factor", "per_device_train_batch_size",
    "gradient_accumulation_steps", "seed", "data_seed",
    "disable_dropout", "num_student_samples", "sft_target", "pretrain_kd_ratio",
)


class RunFolderError(ValueError):
    """An output folder that cannot take this run: the message names the folder and what to do."""


@dataclass
class OutputFolder:
    """What `prepare_output_dir` found: the checkpoint to resume from (None: train from the start), the torn
    checkpoints it passed over, and what it removed of another run under `overwrite_output_dir`."""

    path: Path
    resume_from: Path | None = None
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def run_settings(recipe: Recipe) -> dict[str, Any]:
    """The values that make `recipe`'s run, as JSON values (what `dpkd_settings.json` holds under "settings")."""
    values = {"method": recipe.config.method, **{key: recipe.run.get(key) for key in _RUN_KEYS}}
    values.update({key: getattr(recipe.config, key) for key in _CONFIG_KEYS})
    values = {key: value.value if isinstance(value, Enum) else value for key, value in values.items()}
    return json.loads(json.dumps(values, default=str))


def prepare_output_dir(recipe: Recipe) -> OutputFolder:
    """Check, before any model loads, that the recipe's output_dir can take its run.

    The folder is made and written to (a full disk or a read-only folder fails here, not at the first
    checkpoint); a folder holding another run is refused, or emptied of its checkpoints under
    `overwrite_output_dir`; `resume_from_checkpoint` is resolved to a complete checkpoint.
    """
    args = recipe.config
    folder = OutputFolder(Path(args.output_dir))
    check_writable(folder.path)
    resume = args.resume_from_checkpoint
    latest = isinstance(resume, str) and resume.strip().lower() in ("true", "last")
    difference = _other_run(folder.path, run_settings(recipe), resuming=bool(resume))
    if difference is not None:
        if resume:
            raise RunFolderError(f"output_dir {folder.path} holds another run ({difference}), so it cannot be resumed "
                                 "with this recipe: resume it with the recipe that started it, or train this one "
                                 "into another output_dir")
        if not args.overwrite_output_dir:
            raise RunFolderError(f"output_dir {folder.path} holds another run ({difference}); choose another "
                                 "output_dir, or set overwrite_output_dir: true to remove its checkpoints and "
                                 "train this run there")
        if args.process_index == 0:  # one process removes; under `accelerate launch` the others only read
            folder.removed = _remove_run(folder.path)
    if latest:
        folder.resume_from, folder.skipped = newest_checkpoint(folder.path)
        if folder.resume_from is None:
            torn = f" (incomplete: {', '.join(folder.skipped)})" if folder.skipped else ""
            raise RunFolderError(f"resume_from_checkpoint: true, but output_dir {folder.path} holds no complete "
                                 f"checkpoint{torn}; remove resume_from_checkpoint to train from the start")
    elif resume:
        folder.resume_from = Path(resume)
        if not (folder.resume_from / "trainer_state.json").is_file():
            raise RunFolderError(f"resume_from_checkpoint: {folder.resume_from} is not a checkpoint folder (it has "
                                 "no trainer_state.json); give a checkpoint-N folder, or true for the newest "
                                 "complete one in output_dir")
    return folder


def check_writable(path: Path) -> None:
    """Make `path` and write a small file in it; a RunFolderError says why that failed and what to do."""
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"output_dir {path} is a file, not a folder; choose another output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".dpkd-write-test-") as probe:
            probe.write(b"\0" * 4096)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        raise RunFolderError(f"output_dir {path} is not writable: {describe_os_error(err)}") from None


def describe_os_error(err: OSError) -> str:
    """An OSError as one line: what failed, on which file, and what to do about it."""
    what = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{what}{where}: free space on that disk, or choose a folder on another one"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{what}{where}: fix its permissions, or choose a folder you can write to"
    if err.errno == errno.ENOENT:
        return f"{what}{where}: check the path"
    return f"{what}{where}"


def newest_checkpoint(path: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint in `path` (`dpkd.trainer.last_complete_checkpoint`; None if there is
    none) and the names of the newer, torn `checkpoint-N` folders it passes over."""
    from dpkd.trainer import last_complete_checkpoint

    chosen = last_complete_checkpoint(path)
    floor = _step(chosen.name) if chosen is not None else -1
    newer = [child.name for child in path.iterdir() if child.is_dir() and _step(child.name) > floor]
    return chosen, sorted(newer, key=_step)


def _step(name: str) -> int:
    match = _CHECKPOINT.fullmatch(name)
    return int(match.group(1)) if match else -1


def record_settings(recipe: Recipe) -> Path:
    """Write `dpkd_settings.json` (the method and `run_settings`) into output_dir, atomically."""
    path = Path(recipe.config.output_dir) / SETTINGS_FILE
    record = {"method": recipe.config.method, "recipe": str(recipe.path), "settings": run_settings(recipe)}
    write_atomically(path, json.dumps(record, indent=2) + "\n")
    return path


def _other_run(path: Path, settings: dict[str, Any], *, resuming: bool) -> str | None:
    """How the run in `path` differs from `settings` (None: no run there, or the same run, or a run without any
    record that the user asks to resume)."""
    if not _holds_run(path):
        return None
    record_path = path / SETTINGS_FILE
    if not record_path.is_file():
        legacy = path / "dpkd_run.json"  # written at the end of a run by dpkd before the settings record
        try:
            method = json.loads(legacy.read_text(encoding="utf-8")).get("method") if legacy.is_file() else None
        except (OSError, ValueError, AttributeError):
            method = None
        if method == settings["method"] or (method is None and resuming):
            return None
        if method:
            return f"method {method!r} there, {settings['method']!r} here"
        return f"checkpoints or weights without a {SETTINGS_FILE}: an older dpkd's run, or another program's"
    try:
        recorded = json.loads(record_path.read_text(encoding="utf-8"))["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {SETTINGS_FILE} is unreadable"
    changed = [key for key in settings if key in recorded and recorded[key] != settings[key]]
    changed += [key for key in recorded if key not in settings]
    if not changed:
        return None
    shown = "; ".join(f"{key} {recorded.get(key)!r} there, {settings.get(key)!r} here" for key in changed[:3])
    return shown + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")


def _holds_run(path: Path) -> bool:
    if not path.is_dir():
        return False
    return any((path / name).exists() for name in _RUN_FILES) or any(
        _CHECKPOINT.fullmatch(child.name) for child in path.iterdir())


def _remove_run(path: Path) -> list[str]:
    """Remove another run's checkpoints and records from `path` (overwrite_output_dir); the names removed."""
    removed = []
    for child in sorted(path.iterdir()):
        if _CHECKPOINT.fullmatch(child.name) and child.is_dir():
            shutil.rmtree(child)
            removed.append(child.name)
        elif child.name in ("trainer_state.json", "dpkd_run.json", SETTINGS_FILE):
            child.unlink()
            removed.append(child.name)
    return removed
