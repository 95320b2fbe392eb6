"""Reading data files into rows, and the evaluation sets that ship with dpkd.

Each row comes with where it was read ("<file>, line N"; "record N" of a JSON list; "row N" of a
parquet file or a `datasets` object), which every `DataError` message quotes. A `.gz` file (JSONL, JSON
or CSV) is read as the uncompressed format its name ends with, and messages name the `.gz` file. A JSON
Lines line over 1 MiB (`$DPKD_MAX_LINE_BYTES`) is refused before it is decoded, and text that is not UTF-8
is a `DataError` too.

The bundled evaluation sets (`BUNDLED_SETS`) are MiniLLM's processed sets, packaged gzip-compressed in
`dpkd/eval_data/` (its README.md gives their sources, checksums and licences). They are read from the
`data_dir` argument (CLI: `--data-dir`), else `$DPKD_DATA_DIR`, else the packaged copy. Such a folder is
laid out as MiniLLM's processed data is and may hold each set as `X.jsonl` (as MiniLLM distributes
them) or `X.jsonl.gz`.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import IO, Any

from datasets import Dataset, DatasetDict


class DataError(ValueError):
    """Bad input data or options: the message names the file, line and field at fault."""


# Bundled evaluation sets: name → MiniLLM's file, relative to the data directory.
BUNDLED_SETS = {
    "dolly": "dolly/valid.jsonl",
    "selfinst": "self-inst/valid.jsonl",
    "vicuna": "vicuna/valid.jsonl",
    "sinst": "sinst/11_/valid.jsonl",
    "dolly-dev": "dolly/dev.jsonl",
}
DATA_DIR_ENV = "DPKD_DATA_DIR"
MAX_LINE_ENV = "DPKD_MAX_LINE_BYTES"
DEFAULT_MAX_LINE_BYTES = 1 << 20
_OVERRIDE_HELP = (f"pass data_dir= (CLI: --data-dir) or set ${DATA_DIR_ENV} to a folder laid out like MiniLLM's "
                  "processed data")


# ---------------------------------------------------------------------------------------------------
# Finding the bundled sets


def packaged_data_dir() -> Path:
    """The folder of evaluation sets installed with the dpkd package (it may be absent from a broken install)."""
    return Path(str(resources.files("dpkd") / "eval_data"))


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder the bundled sets are read from: `data_dir`, else `$DPKD_DATA_DIR`, else the packaged copy."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data_dir {str(path)!r} is not a directory")
        return path
    if os.environ.get(DATA_DIR_ENV):
        path = Path(os.environ[DATA_DIR_ENV]).expanduser()
        if not path.is_dir():
            raise DataError(f"${DATA_DIR_ENV}={str(path)!r} is not a directory")
        return path
    path = packaged_data_dir()
    if not path.is_dir():
        raise DataError(f"the evaluation sets packaged with dpkd are missing ({path} does not exist): reinstall "
                        f"dpkd, or {_OVERRIDE_HELP}")
    return path


def bundled_set_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The file of a bundled evaluation set (`dolly`, `selfinst`, `vicuna`, `sinst`, `dolly-dev`):
    `<folder>/<MiniLLM's path>`, plain or with `.gz`, in the folder `find_data_dir(data_dir)` picks."""
    if name not in BUNDLED_SETS:
        raise DataError(f"unknown bundled data set {name!r}; known: {', '.join(BUNDLED_SETS)} "
                        "(or pass a file or directory path)")
    folder, relative = find_data_dir(data_dir), BUNDLED_SETS[name]
    for path in (folder / relative, folder / f"{relative}.gz"):
        if path.is_file():
            return path
    if data_dir is not None:
        origin = "the data_dir argument (CLI: --data-dir)"
    elif os.environ.get(DATA_DIR_ENV):
        origin = f"${DATA_DIR_ENV}"
    else:
        origin = "the copy packaged with dpkd"
    raise DataError(f"bundled evaluation set {name!r} not found: {folder} (from {origin}) holds neither {relative} "
                    f"nor {relative}.gz. The bundled sets are MiniLLM's processed evaluation sets, packaged with "
                    f"dpkd in {packaged_data_dir()}; to read them from elsewhere, {_OVERRIDE_HELP} ({relative})")


# ---------------------------------------------------------------------------------------------------
# Reading rows


def _open_text(path: Path, newline: str | None = None) -> IO[str]:
    # utf-8-sig: tolerate a byte-order mark.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return path.open(encoding="utf-8-sig", newline=newline)


def max_line_bytes() -> int:
    """The longest line a JSON Lines file may have: `$DPKD_MAX_LINE_BYTES`, else 1 MiB."""
    text = os.environ.get(MAX_LINE_ENV, "")
    if not text:
        return DEFAULT_MAX_LINE_BYTES
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise DataError(f"${MAX_LINE_ENV}={text!r}: expected a positive number of bytes")
    return limit


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    # Read as bytes, line by line with a cap: a line is decoded and parsed only once it is known to be short
    # (a 20 MB line would otherwise take tens of seconds and gigabytes before failing further on).
    limit = max_line_bytes()
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        number = 0
        while raw := handle.readline(limit + 1):
            number += 1
            where = f"{path}, line {number}"
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise DataError(f"{where}: longer than {limit:,} bytes, more than an instruction example needs; "
                                f"check the file, or set ${MAX_LINE_ENV} to a higher limit")
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # tolerate a byte-order mark
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start + 1} of the line); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: malformed JSON: {err.msg} (column {err.colno})") from None


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path) as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several JSON values: JSON Lines under a .json name
            yield from _read_jsonl(path)
            return
        if not text.strip():
            return
        raise DataError(f"{path}, line {err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]}-style wrappers
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    for number, record in enumerate(data, start=1):
        yield f"{path}, record {number}", record


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with _open_text(path, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            for record in reader:
                # Short rows give None for the missing cells: treat those fields as absent; drop surplus cells.
                yield f"{path}, line {reader.line_num}", {k: v for k, v in record.items()
                                                           if k is not None and v is not None}
        except csv.Error as err:  # e.g. a cell over csv.field_size_limit(), or a NUL byte
            raise DataError(f"{path}, line {reader.line_num}: not readable as CSV: {err}") from None


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}, row {number}", record


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
            ".jsonl.gz": _read_jsonl, ".json.gz": _read_json, ".csv.gz": _read_csv}
DATA_SUFFIXES = tuple(_READERS)


def file_suffix(path: Path) -> str:
    """The suffix a data file is read by: `.jsonl` for `a.jsonl`, `.jsonl.gz` for `a.JSONL.gz`."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return Path(name[:-3]).suffix + ".gz"
    return path.suffix.lower()


def read_file(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each row of a data file of one of `DATA_SUFFIXES`."""
    reader = _READERS.get(file_suffix(path))
    if reader is None:
        raise DataError(f"{path}: unsupported file type {file_suffix(path)!r}; use {', '.join(DATA_SUFFIXES)}")
    return _read_errors(path, reader(path))


def _read_errors(path: Path, rows: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The file's own faults (not gzip, not UTF-8, unreadable) as DataErrors that name it."""
    try:
        yield from rows
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip file: {err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start + 1}); save it as UTF-8") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None


def read_dataset(dataset: Dataset, name: str) -> Iterator[tuple[str, Any]]:
    for number, record in enumerate(dataset, start=1):
        yield f"{name}, row {number}", record


def _pick_split(data: DatasetDict, split: str | None, name: str) -> Dataset:
    if split is not None:
        if split not in data:
            raise DataError(f"{name}: no split {split!r}; splits: {', '.join(data)}")
        return data[split]
    if len(data) == 1:
        return next(iter(data.values()))
    if "train" in data:
        return data["train"]
    raise DataError(f"{name}: several splits ({', '.join(data)}); choose one with split=")


def _as_dataset(loaded: Dataset | DatasetDict, split: str | None, name: str) -> Dataset:
    return _pick_split(loaded, split, name) if isinstance(loaded, DatasetDict) else loaded


def iter_sources(source: Any, *, data_dir: str | os.PathLike | None, split: str | None,
                 dataset_config: str | None = None) -> Iterator[tuple[str, Iterator[tuple[str, Any]]]]:
    """(name, rows) per underlying file or dataset; a directory yields each of its data files.
    `dataset_config`: the configuration name `datasets.load_dataset` takes for a hub id."""
    if isinstance(source, DatasetDict):
        yield "dataset", read_dataset(_pick_split(source, split, "dataset"), "dataset")
        return
    if isinstance(source, Dataset):
        yield "dataset", read_dataset(source, "dataset")
        return
    if isinstance(source, Sequence) and not isinstance(source, str):
        yield "records", ((f"record {i}", r) for i, r in enumerate(source, start=1))
        return
    if isinstance(source, str) and source in BUNDLED_SETS:
        path = bundled_set_path(source, data_dir)
        yield str(path), read_file(path)
        return
    path = Path(source).expanduser()
    if path.is_file():
        yield str(path), read_file(path)
        return
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            from datasets import load_from_disk

            yield str(path), read_dataset(_as_dataset(load_from_disk(str(path)), split, str(path)), str(path))
            return
        files = sorted(p for p in path.iterdir() if p.is_file() and file_suffix(p) in _READERS)
        if not files:
            raise DataError(f"{path}: directory holds no {', '.join(DATA_SUFFIXES)} files")
        for file in files:
            yield str(file), read_file(file)
        return
    text = str(source)
    if not isinstance(source, str) or file_suffix(path) in _READERS or text.startswith((".", "/", "~")):
        raise DataError(f"{text}: no such file or directory")
    if "/" not in text:
        raise DataError(f"unknown bundled data set {text!r}; known: {', '.join(BUNDLED_SETS)} "
                        "(or pass a file or directory path)")
    # Anything else `datasets` can load (a Hub id already in the local cache, a loading script).
    from datasets import load_dataset

    try:
        loaded = load_dataset(text, dataset_config, split=split)
    except Exception as err:
        raise DataError(f"{text}: not a file, directory or bundled set (known: {', '.join(BUNDLED_SETS)}), "
                        f"and datasets.load_dataset failed: {err}") from err
    yield text, read_dataset(_as_dataset(loaded, split, text), text)
