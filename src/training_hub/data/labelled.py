"""Labelled texts for embedding fine-tuning: read, checked with file:line problems, labels made integers.

A record holds a text and a label (``text_column`` / ``label_column``, renamed to ``text`` / ``label``). Sources are
those of :mod:`training_hub.data.sources` plus ``.csv`` files (a header row, then one record per line).

Labels become integer class ids, as the triplet losses need them:

* integers stay as they are; ``True``/``False`` and whole floats (``3.0``, a parquet float column) become ints;
* strings that all spell integers (CSV cells, ``"2"``) become those integers;
* other strings are class names, numbered in sorted order (``billing`` = 0, ``technical`` = 1), as upstream does;
* anything else (``0.5``, a list, class names mixed with ids) is a problem at its file and line.

``strict`` (training) also makes a missing or null label a problem; the upstream helper ``_load_dataset`` lets a
null label through as ``None``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from training_hub.data.errors import DataProblem, DataValidationError, ProblemCollector
from training_hub.data.sources import iter_source

logger = logging.getLogger("training_hub")

_INTEGER = re.compile(r"^\s*[+-]?\d+\s*$")
VALID_LABEL = "an integer class id, or a class name (string)"


@dataclass
class LabelledTexts:
    """The records (``text``/``label`` renamed), where each came from, and the class names of string labels."""

    rows: list[dict[str, Any]]
    where: list[tuple[str, int | None]]
    label_names: dict[int, str] = field(default_factory=dict)  # id -> name, when labels were class names

    def location(self, index: int) -> str:
        path, line = self.where[index]
        return path if line is None else f"{path}:{line}"

    def dataset(self):
        """The records as a ``datasets.Dataset`` (column order: text, label, then any others)."""
        from datasets import Dataset

        return Dataset.from_list(self.rows)


def _iter_csv(path: Path) -> Iterator[Any]:
    name = str(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield DataProblem(name, None, "file", f"bytes are not valid UTF-8 (byte {e.start + 1})", "UTF-8 text")
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        yield DataProblem(name, None, "file", "file is empty", "a header row, then one record per line")
        return
    start = 2  # the header is line 1; line_num counts the lines read so far (a quoted cell may span lines)
    for row in reader:
        extra = row.pop(None, None)
        if extra:
            yield DataProblem(name, start, "line", f"{len(extra)} more cell(s) than the header's "
                              f"{len(reader.fieldnames)} columns", "as many cells as header columns")
        else:
            yield name, start, {k: (None if v is None or v == "" else v) for k, v in row.items()}
        start = reader.line_num + 1


def iter_records(data_path: str) -> Iterator[Any]:
    """``(path, line, record)`` for every record under ``data_path`` (a .csv file too), or a DataProblem."""
    path = Path(data_path)
    if path.suffix == ".csv" and path.is_file():
        yield from _iter_csv(path)
    else:
        yield from iter_source(data_path)


def _rename(record: dict, old: str, new: str, path: str, line: int | None) -> dict:
    """``record`` with field ``old`` named ``new``; a record holding both stops the reading (one problem)."""
    if old == new or old not in record:
        return record
    if new in record:
        raise DataValidationError([DataProblem(
            path, line, old, f"Cannot rename column {old!r} to {new!r}: a {new!r} column already exists. Set "
            f"{new}_column={new!r} or remove the duplicate column from your data. Columns: {list(record)}",
            f"one {new!r} field")])
    return {(new if k == old else k): v for k, v in record.items()}


def _label_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "int"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return "int"
    if isinstance(value, str):
        return "digits" if _INTEGER.match(value) else "name"
    return "bad"


def _check_record(record: Any, path: str, line: int | None, columns: tuple[str, str], need: tuple[bool, bool],
                  strict: bool, collector: ProblemCollector) -> dict | None:
    text_column, label_column = columns
    if not isinstance(record, dict):
        collector.add(DataProblem(path, line, "record", f"expected a JSON object, got {type(record).__name__}",
                                  f'{{"{text_column}": "...", "{label_column}": 0}}'))
        return None
    for old, new in ((text_column, "text"), (label_column, "label")):
        record = _rename(record, old, new, path, line)
    require_text, require_label = need
    text = record.get("text")
    if require_text and not (isinstance(text, str) and text.strip()):
        what = "missing" if "text" not in record else f"expected a non-empty string, got {text!r}"
        collector.add(DataProblem(path, line, text_column, what, "a non-empty string"))
    if require_label:
        label = record.get("label", ...)
        if label is ... or (label is None and strict):
            collector.add(DataProblem(path, line, label_column, "missing" if label is ... else "null", VALID_LABEL))
        elif label is not None and _label_kind(label) == "bad":
            got = f"{label!r} is not a whole number" if isinstance(label, float) else \
                f"expected {VALID_LABEL}, got {type(label).__name__} {label!r}"
            collector.add(DataProblem(path, line, label_column, got, VALID_LABEL))
    return record


def _number_labels(data: LabelledTexts, label_column: str, collector: ProblemCollector) -> None:
    """Make every label an int (see the module doc); class names mixed with ids are a problem at the first name."""
    kinds = [None if row.get("label") is None else _label_kind(row["label"]) for row in data.rows]
    names = [i for i, k in enumerate(kinds) if k == "name"]
    numbers = [i for i, k in enumerate(kinds) if k in ("int", "digits")]
    if names and numbers:
        first, other = names[0], numbers[0]
        path, line = data.where[first]
        collector.add(DataProblem(path, line, label_column, f"class name {data.rows[first]['label']!r} among integer "
                                  f"class ids (the first at {data.location(other)}); use one kind for every record",
                                  VALID_LABEL))
        return
    if names:
        codes = {name: i for i, name in enumerate(sorted({data.rows[i]["label"] for i in names}))}
        data.label_names = {i: name for name, i in codes.items()}
        preview = dict(list(codes.items())[:10])
        logger.info("Numbered %d class name(s) of '%s' in sorted order: %s%s", len(codes), label_column, preview,
                    " ..." if len(codes) > 10 else "")
        for i in names:
            data.rows[i]["label"] = codes[data.rows[i]["label"]]
    for i in numbers:
        data.rows[i]["label"] = int(data.rows[i]["label"])


def read_labelled(data_path: str, text_column: str = "text", label_column: str = "label", *,
                  require_text: bool = True, require_label: bool = True, strict: bool = True) -> LabelledTexts:
    """Read and check labelled texts; raise :class:`DataValidationError` listing every problem (file:line)."""
    collector = ProblemCollector()
    data = LabelledTexts(rows=[], where=[])
    for item in iter_records(str(data_path)):
        if isinstance(item, DataProblem):
            collector.add(item)
            continue
        path, line, record = item
        record = _check_record(record, path, line, (text_column, label_column), (require_text, require_label),
                               strict, collector)
        if record is not None:
            data.rows.append(record)
            data.where.append((path, line))
        if collector.full:
            break
    if not data.rows and not collector.problems:
        collector.add(DataProblem(str(data_path), None, "file", "holds no records", "at least one record"))
    if require_label and not collector.problems:
        _number_labels(data, label_column, collector)
    collector.raise_if_any()
    return data


def check_triplet_labels(data: LabelledTexts, label_column: str, loss_type: str) -> None:
    """A triplet loss needs an anchor and a positive per class: a label with one example is a problem (there), and
    so is data with a single class (no negatives)."""
    seen: dict[int, list[int]] = {}
    for i, row in enumerate(data.rows):
        seen.setdefault(row["label"], []).append(i)
    collector = ProblemCollector()
    for label, indices in seen.items():
        if len(indices) == 1:
            path, line = data.where[indices[0]]
            name = f" ({data.label_names[label]!r})" if label in data.label_names else ""
            collector.add(DataProblem(path, line, label_column, f"label {label}{name} has only this example; "
                                      f"{loss_type} needs at least two per label (an anchor and a positive)",
                                      "two or more examples of every label"))
    if len(seen) == 1 and data.rows:
        path, _ = data.where[0]
        collector.add(DataProblem(path, None, label_column, f"every example has label {next(iter(seen))}; "
                                  f"{loss_type} needs at least two labels (negatives come from other labels)",
                                  "two or more labels"))
    collector.raise_if_any()


def to_pairs(rows: list[dict[str, Any]], max_pairs_per_label: int = 10_000, seed: int = 42) -> list[dict[str, str]]:
    """(anchor, positive) pairs of same-label texts, for MultipleNegativesRankingLoss (upstream's construction).

    Each label contributes every pair of its texts, capped at ``max_pairs_per_label`` (<= 0: no cap): a label with
    many texts is first down-sampled to the few that give that many pairs, so memory stays bounded.
    """
    from itertools import combinations

    groups: dict[Any, list[str]] = {}
    for row in rows:
        groups.setdefault(row["label"], []).append(row["text"])
    rng = random.Random(seed)
    pairs: list[dict[str, str]] = []
    for texts in groups.values():
        if max_pairs_per_label > 0:
            keep = math.ceil((1 + math.sqrt(1 + 8 * max_pairs_per_label)) / 2)  # k texts give k(k-1)/2 pairs
            if len(texts) > keep:
                texts = rng.sample(texts, keep)
        label_pairs = [{"anchor": a, "positive": b} for a, b in combinations(texts, 2)]
        if 0 < max_pairs_per_label < len(label_pairs):
            label_pairs = rng.sample(label_pairs, max_pairs_per_label)
        pairs.extend(label_pairs)
    return pairs


def pair_dataset(rows: list[dict[str, Any]], *, data_path: str, seed: int):
    """``to_pairs`` as a ``datasets.Dataset``; no pair at all (every label has one text) is a problem."""
    from datasets import Dataset

    pairs = to_pairs(rows, seed=seed)
    if not pairs:
        raise DataValidationError([DataProblem(str(data_path), None, "label", "no two texts share a label, so mnrl "
                                               "has no (anchor, positive) pair", "two or more texts per label")])
    return Dataset.from_list(pairs)
