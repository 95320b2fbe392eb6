"""Checkpoints that a kill or a full disk cannot tear.

A save is written to `<folder>/.partial-<name>` and renamed to `<name>` once complete
(`StagedSaves._save_checkpoint`, `save_model`, `save_merged_model`); `last_complete_checkpoint` passes over what a killed
save left behind, so a resume always starts from a whole checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

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


class StagedSaves:
    """The `transformers.Trainer` saves, staged: a checkpoint or a model is written to
    `<folder>/.partial-<name>` and moved into place once complete, and no weight that is not finite is written.
    Mixed into `dpkd.trainer.DistillationTrainer`, before `Trainer`; it calls the trainer's
    `_refuse_nonfinite_weights` (which raises its `NonFiniteError`) and `write_model_card`."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Refuse to write a model with a non-finite weight, then save as the Trainer does."""
        tensors = state_dict if state_dict is not None else self.accelerator.unwrap_model(self.model).state_dict()
        self._refuse_nonfinite_weights(tensors, output_dir or self.args.output_dir)
        super()._save(output_dir, state_dict)
        self.write_model_card(output_dir or self.args.output_dir)

    def save_merged_model(self, output_dir: str | None = None) -> None:
        """Merge the peft adapter into the base weights (`merge_and_unload`, which changes the model in place) and
        save the result as a plain model that `from_pretrained` loads, as `save_model` saves: refused if a weight
        is not finite, staged, then moved in with `config.json` last; the model card says it is merged."""
        merged = self.accelerator.unwrap_model(self.model).merge_and_unload()
        target = Path(output_dir if output_dir is not None else self.args.output_dir)

        def write(staging: Path) -> None:
            self._refuse_nonfinite_weights(merged.state_dict(), target)
            merged.save_pretrained(staging)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(staging)
            self.write_model_card(staging, adapter=False)

        self._save_staged(target, write, every_rank=False)

    def _get_output_dir(self, trial) -> str:
        # While `_save_checkpoint` runs, the checkpoint folder is made inside its staging folder.
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written in `<run_dir>/.partial-checkpoint-<step>/` and renamed into place
        when complete; older checkpoints are rotated only then. A kill or a full disk leaves the previous
        complete checkpoint the newest one (`last_complete_checkpoint`)."""
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        self._clear_staging(staging)
        self._staging_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            self._drop_staging(staging)
            raise
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank has written its part (RNG state, optimizer shards)
        if self.args.should_save:
            staged, final = staging / name, run_dir / name
            best = self.state.best_model_checkpoint
            if best is not None and Path(best) == staged:
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(staged / TRAINER_STATE_NAME))
            move_into_place(staged, final)
            staging.rmdir()
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model where `from_pretrained` loads it: written to a staging folder first, then moved in with
        `config.json` last, so the folder never holds a half-written model that looks complete."""
        if _internal_call:  # a checkpoint: `_save_checkpoint` stages the whole folder
            return super().save_model(output_dir, _internal_call)
        target = Path(output_dir if output_dir is not None else self.args.output_dir)
        save = super().save_model
        # Every rank takes part: the Trainer gathers sharded weights (FSDP, ZeRO-3) and the main rank writes.
        self._save_staged(target, lambda staging: save(str(staging), _internal_call=True), every_rank=True)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_staged(self, target: Path, write, *, every_rank: bool) -> None:
        """`write(staging)` into `<target>/.partial-model` (on every rank, or on the main one alone), then the
        files moved into `target` with `config.json` last; a failed write leaves `target` as it was."""
        staging = target / f"{STAGING_PREFIX}model"
        self._clear_staging(staging)
        if every_rank or self.args.should_save:
            try:
                write(staging)
            except BaseException:
                self._drop_staging(staging)
                raise
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            replace_model_files(staging, target)
        self.accelerator.wait_for_everyone()

    def _clear_staging(self, staging: Path) -> None:
        # What a killed save left; removed before any rank writes into it.
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _drop_staging(self, staging: Path) -> None:
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
