"""Checkpoints that a kill or a full disk cannot tear.

A save is written to `<folder>/.partial-<name>` and renamed to `<name>` once complete
(`DistillationTrainer._save_checkpoint`, `save_model`); `last_complete_checkpoint` passes over what a killed
save left behind, so a resume always starts from a whole checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dpkd.durable import fsync_path, sync_tree

# A save in progress lives in `<output_dir>/.partial-<name>` until it is complete and renamed to `<name>`.
STAGING_PREFIX = ".partial-"
# Weight files as `save_pretrained` names them (sharded or not, full model or adapter).
_WEIGHTS_FILE = re.compile(r"(?:pytorch_model|model|adapter_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)(?:\.index\.json)?")
# Files whose presence says a saved model folder is loadable; written last, removed first.
_MODEL_MARKERS = ("config.json", "adapter_config.json")



def last_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest `checkpoint-<step>` folder in `output_dir` that is complete, or None.

    Complete: `trainer_state.json` reads as JSON and the model weights are there (every shard an index names).
    Staging folders (`.partial-*`, left by a save that was killed) and torn folders are passed over.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
        if match and path.is_dir() and _is_complete_checkpoint(path):
            found.append((int(match[1]), path))
    return max(found)[1] if found else None


def _is_complete_checkpoint(path: Path) -> bool:
    try:
        state = json.loads((path / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict):
        return False
    names = os.listdir(path)
    if any(name.startswith(("pytorch_model_fsdp", "global_step")) for name in names):
        return True  # FSDP sharded and DeepSpeed checkpoints
    weights = [name for name in names if _WEIGHTS_FILE.fullmatch(name)]
    for index in (name for name in weights if name.endswith(".index.json")):
        try:
            shards = set(json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            return False
        if not all((path / shard).is_file() for shard in shards):
            return False
    return bool(weights)


def unstaged(path: str | os.PathLike) -> Path:
    """Where a save into a staging folder will end up (for messages)."""
    path = Path(path)
    if path.name.startswith(STAGING_PREFIX):
        return path.parent
    if path.parent.name.startswith(STAGING_PREFIX):
        return path.parent.parent / path.name
    return path


def move_into_place(source: Path, target: Path) -> None:
    """Rename the folder `source` to `target`, replacing an older `target` (set aside first, deleted after);
    its contents are on disk before the rename is."""
    sync_tree(source)
    if target.exists():
        old = target.with_name(f"{STAGING_PREFIX}old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)
    fsync_path(target.parent)


def replace_model_files(staging: Path, target: Path) -> None:
    """Move a saved model's files from `staging` into `target`: the marker files (`config.json`) go first and
    come back last, and weight files of an older save that the new one does not have are removed."""
    sync_tree(staging)
    new = {path.name for path in staging.iterdir()}
    for marker in _MODEL_MARKERS:
        (target / marker).unlink(missing_ok=True)
    for path in target.iterdir():
        if path.is_file() and _WEIGHTS_FILE.fullmatch(path.name) and path.name not in new:
            path.unlink()
    for path in sorted(staging.iterdir(), key=lambda p: p.name in _MODEL_MARKERS):
        destination = target / path.name
        if path.is_dir() and destination.exists():
            shutil.rmtree(destination)
        os.replace(path, destination)
    staging.rmdir()
    fsync_path(target)
