"""Read rows, each with its 1-based row number, from files, `save_to_disk` folders or hub names."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

from align.data.errors import DataError, RowProblem

FILE_TYPES = (".json", ".jsonl", ".parquet", ".csv")


def read_rows(spec: str, split: str = "train") -> Iterator[tuple[int, dict | RowProblem]]:
    """Yield (row number, row dict) or (row number, RowProblem) for a row that could not be parsed."""
    path = Path(spec).expanduser()
    if path.is_dir():
        yield from _read_saved_dataset(path, split)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _read_jsonl(path)
        elif suffix == ".json":
            yield from _read_json(path)
        elif suffix in (".parquet", ".csv"):
            yield from _read_tabular(path, suffix)
        else:
            raise DataError(str(path), None, f"unsupported file type {suffix!r}", f"use one of {', '.join(FILE_TYPES)}")
    elif path.suffix.lower() in FILE_TYPES or spec.startswith((".", "/", "~")):
        raise DataError(spec, None, "file not found", "check the path (relative paths are from the current directory)")
    else:
        yield from _read_hub(spec, split)


UTF8_FIX = "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in.jsonl > out.jsonl)"


def _decode(raw: bytes, first: bool) -> str:
    """One line as text; a UTF-8 byte-order mark at the start of the file is dropped (Windows editors write it)."""
    try:
        return raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise RowProblem(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})", UTF8_FIX) from None


def _read_jsonl(path: Path):
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = _decode(raw, lineno == 1)
            except RowProblem as problem:
                yield lineno, problem
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, RowProblem(f"invalid JSON ({e.msg} at column {e.colno})", "make each line one JSON object")
                continue
            if not isinstance(row, dict):
                yield lineno, RowProblem(f"expected a JSON object, got {type(row).__name__}", "make each line one JSON object")
                continue
            yield lineno, row


def _read_json(path: Path):
    try:
        data = json.loads(_decode(path.read_bytes(), first=True))
    except RowProblem as problem:
        raise DataError(str(path), None, problem.reason, problem.fix) from None
    except json.JSONDecodeError as e:
        raise DataError(str(path), None, f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}",
                        "a .json file holds one array of objects (use .jsonl for one object per line)") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(str(path), None, "expected an array of row objects", "a .json file holds one array of objects")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(str(path), None, "expected an array of row objects", "a .json file holds one array of objects")
    for i, row in enumerate(data, start=1):
        if isinstance(row, dict):
            yield i, row
        else:
            yield i, RowProblem(f"expected a JSON object, got {type(row).__name__}", "make each array element an object")


def _rows_of(dataset):
    for i, row in enumerate(dataset, start=1):
        yield i, {k: _none_if_nan(v) for k, v in row.items()}


def _none_if_nan(v):
    return None if isinstance(v, float) and v != v else v


def _read_tabular(path: Path, suffix: str):
    from datasets import load_dataset

    builder = "parquet" if suffix == ".parquet" else "csv"
    if path.stat().st_size == 0:
        return
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs the parser's error before raising it; ours names the fix
    try:
        ds = load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps the parser's error (pandas / pyarrow) in DatasetGenerationError
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        fix = ("a CSV file needs a header row and the same number of fields on every line (quote fields that "
               "hold commas or line breaks) in UTF-8" if builder == "csv" else "check that the file is a Parquet file")
        raise DataError(str(path), None, f"cannot be read as {builder.upper()}: {reason}", fix) from None
    finally:
        quiet.setLevel(level)
    yield from _rows_of(ds)


def _read_saved_dataset(path: Path, split: str):
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(str(path), None, "folder is not a `save_to_disk` dataset",
                        "point data.train at a file or a folder written by Dataset.save_to_disk") from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise DataError(str(path), None, f"no split {split!r} (has {sorted(ds)})", "set data.split")
        ds = ds[split]
    yield from _rows_of(ds)


def _read_hub(name: str, split: str):
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split)
    except Exception as e:  # network, auth, missing dataset: say which
        raise DataError(name, None, f"not a local path, and loading it from the hub failed: {e}",
                        "give an existing file/folder, or a hub dataset name with network access") from None
    yield from _rows_of(ds)
