"""Writes that are complete or absent: a file through a temporary file and a rename, a folder's contents
synced before the rename that publishes it. One home for what the trainer, the teacher cache, the run
folder and the evaluation use to keep a crash from leaving a torn file that looks whole."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write to `path` so that it either does not exist or is complete: temporary file, fsync, rename, and the
    folder synced so that the rename itself is on disk."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves, so that a rename that publishes them
    cannot reach the disk before their contents do (a power loss would otherwise leave a complete-looking
    folder of empty or torn files)."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fsync_path(path)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    """fsync one file or folder; where a folder cannot be opened (some platforms), nothing is synced through it."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
