"""Finding and reading data files, record by record, with the location of each record.

Supported sources: a ``.jsonl`` file, a ``.json`` file (a JSON list of records, or JSON lines), a ``.parquet``
file, a ``.csv`` file (a header row; a ``messages``/``chosen``/``rejected`` cell may hold JSON, as upstream's CSV
data does), a directory holding such files (searched recursively, in sorted order), or a directory written by
``datasets.Dataset.save_to_disk``. Reading never raises for bad content: a problem (invalid JSON, bytes that are
not UTF-8, an empty file) is yielded in place of a record, so the validator can collect many of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from training_hub.data.errors import DataProblem

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
VALID_SOURCES = ".jsonl, .json, .parquet or .csv file, a directory of them, or a datasets.save_to_disk directory"
JSON_CELLS = ("messages", "chosen", "rejected")  # CSV cells that hold a conversation as JSON text

logger = logging.getLogger(__name__)

def is_saved_dataset(path: Path) -> bool:
    """True for a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def find_files(data_path: str) -> tuple[list[Path], DataProblem | None]:
    """The files (or the one saved-dataset directory) that make up ``data_path``, or the problem with it."""
    path = Path(data_path)
    if not path.exists():
        return [], DataProblem(str(path), None, "data_path", "no such file or directory", VALID_SOURCES)
    if path.is_dir():
        if is_saved_dataset(path):
            return [path], None
        found = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in found if p.suffix in SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(path).parts)]
        skipped = [p for p in found if p not in files]
        visible = [p for p in skipped if not p.name.startswith(".")]
        if visible:
            warnings.warn(f"data_path {path}: skipped {len(visible)} file(s) that are not .jsonl/.json/.parquet/.csv: "
                          f"{', '.join(str(p.relative_to(path)) for p in visible[:10])}", UserWarning, stacklevel=3)
        logger.info("data_path %s: reading %d file(s): %s; skipped %d (not .jsonl/.json/.parquet/.csv, or hidden)%s",
                    path, len(files), ", ".join(str(p.relative_to(path)) for p in files) or "none", len(skipped),
                    (": " + ", ".join(str(p.relative_to(path)) for p in skipped[:20])) if skipped else "")
        if not files:
            return [], DataProblem(str(path), None, "data_path", "directory holds no .jsonl, .json, .parquet or "
                                   ".csv files", VALID_SOURCES)
        return files, None
    if path.suffix not in SUFFIXES:
        return [], DataProblem(str(path), None, "data_path", f"unsupported file type {path.suffix or '(none)'!r}",
                               VALID_SOURCES)
    return [path], None


def iter_source(data_path: str) -> Iterator[Any]:
    """Yield ``(path, line, record)`` for every record under ``data_path``, or a DataProblem in its place."""
    files, problem = find_files(data_path)
    if problem is not None:
        yield problem
        return
    for path in files:
        if path.is_dir():
            yield from _read_saved_dataset(path)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path)
        elif path.suffix == ".csv":
            yield from _read_csv(path)
        else:
            yield from _read_json_file(path)


def _read_json_file(path: Path) -> Iterator[Any]:
    data = path.read_bytes()
    if not data.strip():
        yield DataProblem(str(path), None, "file", "file is empty", "at least one JSON record")
        return
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:]
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":
        yield from _read_json_list(path, data)
    elif path.suffix == ".jsonl" and data.lstrip()[:1] == b"[":
        line = data[:len(data) - len(data.lstrip())].count(b"\n") + 1
        yield DataProblem(str(path), line, "file", "starts with '[': this looks like a JSON array; name the file "
                          ".json (a .jsonl file holds one JSON object per line)", "one JSON object per line")
    else:
        yield from _read_json_lines(path, data)


def _read_csv(path: Path) -> Iterator[Any]:
    """The rows of a CSV file with a header, each with the line it starts on; JSON text in a ``messages``,
    ``chosen`` or ``rejected`` cell becomes the list/object it spells (a cell that is not JSON is reported)."""
    import csv

    name = str(path)
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        yield DataProblem(name, None, "file", f"cannot read: {e.strerror}", "a readable CSV file")
        return
    with handle:
        try:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                yield DataProblem(name, None, "file", "file is empty", "a header row, then one record per row")
                return
            line = reader.line_num + 1
            for row in reader:
                yield from _csv_record(name, line, row)
                line = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as e:
            yield DataProblem(name, reader.line_num or None, "file", f"unreadable CSV: {e}", "UTF-8 CSV with a header")


def _csv_record(name: str, line: int, row: dict) -> Iterator[Any]:
    if None in row:
        yield DataProblem(name, line, "row", f"{len(row[None])} more cell(s) than the header has columns",
                          "as many cells as header columns")
        return
    record: dict[str, Any] = dict(row)
    for key in JSON_CELLS:
        text = record.get(key)
        if isinstance(text, str) and text.strip()[:1] in ("[", "{"):
            try:
                record[key] = json.loads(text)
            except json.JSONDecodeError as e:
                yield DataProblem(name, line, key, f"cell is not valid JSON: {e.msg} at column {e.colno}",
                                  "a JSON list of {role, content} messages")
                return
    yield name, line, record


def _read_json_lines(path: Path, data: bytes) -> Iterator[Any]:
    name = str(path)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines are allowed and are not records
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield DataProblem(name, number, "line", f"bytes are not valid UTF-8 (byte {e.start + 1} of the line: "
                              f"{raw[e.start:e.start + 1]!r})", "UTF-8 encoded text")
            continue
        try:
            yield name, number, json.loads(text)
        except json.JSONDecodeError as e:
            yield DataProblem(name, number, "line", f"invalid JSON: {e.msg} at column {e.colno}",
                              "one JSON object per line")


def _read_json_list(path: Path, data: bytes) -> Iterator[Any]:
    """Yield the elements of a top-level JSON list with the line each element starts on."""
    name = str(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield DataProblem(name, line, "file", f"bytes are not valid UTF-8 ({data[e.start:e.start + 1]!r})",
                          "UTF-8 encoded text")
        return
    decoder = json.JSONDecoder()
    pos, line, counted = text.index("[") + 1, 1, 0
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield DataProblem(name, e.lineno, "file", f"invalid JSON: {e.msg} at column {e.colno}",
                              "a JSON list of objects")
            return
        yield name, line, value
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos >= len(text) or text[pos] != "]":
            bad_line = text.count("\n", 0, pos) + 1
            yield DataProblem(name, bad_line, "file", "invalid JSON: expected ',' or ']' after a list element",
                              "a JSON list of objects")
            return


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_parquet(path: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    name = str(path)
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        yield DataProblem(name, None, "file", f"cannot read as parquet: {e}", "a parquet file")
        return
    if parquet.metadata.num_rows == 0:
        yield DataProblem(name, None, "file", "file is empty (0 rows)", "at least one row")
        return
    row = 0
    for batch in parquet.iter_batches(batch_size=2048):
        for record in batch.to_pylist():
            row += 1
            yield name, row, record


def _read_saved_dataset(path: Path) -> Iterator[Any]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    name = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            yield DataProblem(name, None, "split", f"saved DatasetDict has splits {sorted(loaded)}",
                              "a DatasetDict with a 'train' split, or a single split")
            return
        split = "train" if "train" in loaded else next(iter(loaded))
        loaded, name = loaded[split], f"{name}[{split}]"
    if len(loaded) == 0:
        yield DataProblem(name, None, "dataset", "dataset is empty (0 rows)", "at least one row")
        return
    row = 0
    for batch in loaded.data.to_batches(max_chunksize=2048):
        for record in batch.to_pylist():
            row += 1
            yield name, row, record


def fingerprint(data_path: str) -> str:
    """A sha256 of every byte that makes up ``data_path`` (file names relative to it, sizes and contents)."""
    files, problem = find_files(data_path)
    if problem is not None:
        raise FileNotFoundError(str(problem))
    root = Path(data_path)
    digest = hashlib.sha256()
    for path in files:
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for member in members:
            rel = os.path.relpath(member, root) if root.is_dir() else member.name
            digest.update(f"{rel}\0{member.stat().st_size}\0".encode())
            with open(member, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
