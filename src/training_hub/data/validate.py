"""Validation of a whole data source before any model is loaded.

``check_data`` reads every record, checks it against its format and raises one ``DataValidationError`` listing
up to 20 problems. ``read_records`` does the same and returns the normalized records with their locations, for
the tokenizer stage. Neither needs a tokenizer or torch.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from training_hub.data import formats
from training_hub.data.errors import DataProblem, ProblemCollector
from training_hub.data.sources import iter_source

KINDS = ("chat", "pretraining", "preference")


@dataclass
class Records:
    """Normalized records of one source, and where each came from (``locations[i] == (path, line)``)."""

    kind: str
    items: list = field(default_factory=list)
    locations: list = field(default_factory=list)

    def where(self, index: int) -> str:
        path, line = self.locations[index]
        return f"{path}:{line}"


def _normalizer(kind: str, document_column_name: str):
    if kind == "chat":
        return formats.chat_record
    if kind == "preference":
        return formats.preference_record
    if kind == "pretraining":
        return lambda record, report: formats.document_record(record, report, document_column_name)
    raise ValueError(f"check_data: kind must be one of {', '.join(KINDS)}, got {kind!r}")


def read_records(data_path: str, *, kind: str = "chat", document_column_name: str = "document") -> Records:
    """Read and validate every record of ``data_path``; raise DataValidationError listing the problems."""
    normalize = _normalizer(kind, document_column_name)
    collector = ProblemCollector()
    records = Records(kind)
    for item in iter_source(str(data_path)):
        if isinstance(item, DataProblem):
            collector.add(item)
        else:
            path, line, record = item

            def report(field_name: str, message: str, valid: str, path=path, line=line) -> None:
                collector.add(DataProblem(path, line, field_name, message, valid))

            if not records.items and not collector.problems:
                other = _other_format(kind, record, document_column_name)
                if other is not None:  # one clear problem, not the same complaint on every line
                    collector.add(DataProblem(path, line, "record", other[0], other[1]))
                    break
            value = normalize(record, report)
            if value is not None and not collector.problems:
                records.items.append(value)
                records.locations.append((path, line))
        if collector.truncated:
            break
    collector.raise_if_any()
    if not records.items:  # e.g. a .json file holding an empty list
        collector.add(DataProblem(str(data_path), None, "data_path", "no records found", "at least one record"))
        collector.raise_if_any()
    if kind == "preference" and all(item["chosen"] == item["rejected"] for item in records.items):
        collector.add(DataProblem(str(data_path), None, "chosen", "every pair's chosen equals its rejected: "
                                  "DPO has nothing to learn from", "pairs whose chosen and rejected differ"))
        collector.raise_if_any()
    _warn_suspicious(records)
    return records


_FORMATS = {
    "chat": ("chat data (a 'messages' list, or alpaca instruction/output)",
             "sft(), osft() or lora_sft() (without is_pretraining)"),
    "preference": ("preference pairs (prompt/chosen/rejected)", "dpo()"),
    "pretraining": ("pretraining documents", "sft(..., is_pretraining=True)"),
}


def _other_format(kind: str, record, document_column_name: str) -> tuple[str, str] | None:
    """(message, valid) when the first record is plainly in another algorithm's format, else None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    looks = None
    if {"prompt", "chosen", "rejected"} <= keys or ({"chosen", "rejected"} <= keys and "messages" not in keys):
        looks = "preference"
    elif "messages" in keys or {"instruction", "output"} <= keys:
        looks = "chat"
    elif document_column_name in keys and len(keys & {"messages", "prompt", "chosen", "instruction"}) == 0:
        looks = "pretraining"
    if looks is None or looks == kind:
        return None
    wanted, _ = _FORMATS[kind]
    found, other_function = _FORMATS[looks]
    return (f"this file holds {found}, but this call reads {wanted}; for {found.split(' (')[0]} use "
            f"{other_function}", f"{wanted}; see docs/data-formats.md")


def _suspicious(kind: str, item) -> str | None:
    """Why a valid record is likely a mistake (None when it looks fine)."""
    if kind == "chat":
        roles = [m["role"] for m in item["messages"] if m["role"] != "system"]
        if roles and roles[0] == "assistant":
            return "conversation(s) start with an assistant turn (no prompt before it)"
        if roles and roles[-1] == "user":
            return "conversation(s) end on a user turn (a prompt with no answer, which gets no loss)"
    elif kind == "preference" and item["chosen"] == item["rejected"]:
        return "pair(s) whose chosen equals rejected (nothing to prefer; the pair only adds noise)"
    return None


def _warn_suspicious(records: Records) -> None:
    """One warning per file and kind of likely mistake, with the count and the first file:line."""
    found: dict = {}
    for index, item in enumerate(records.items):
        why = _suspicious(records.kind, item)
        if why is not None:
            path = records.locations[index][0]
            count, first = found.get((path, why), (0, index))
            found[(path, why)] = (count + 1, first)
    for (path, why), (count, first) in found.items():
        warnings.warn(f"{path}: {count} {why}; first at {records.where(first)}", UserWarning, stacklevel=3)


def check_data(data_path: str, *, kind: str = "chat", document_column_name: str = "document") -> None:
    """Validate every record of ``data_path`` for ``kind`` ("chat", "pretraining" or "preference").

    "chat" accepts messages-format and alpaca records. Cheap: no tokenizer, no torch. Raises
    ``DataValidationError`` (a ``ValueError``) naming file, line, field and what would be valid for each of up
    to 20 problems; a missing path is reported the same way.
    """
    read_records(data_path, kind=kind, document_column_name=document_column_name)


def load_preference_data(data_path: str) -> list[dict]:
    """Validated preference pairs: ``[{"prompt", "chosen", "rejected"}, ...]``, each a string or a message list.

    Raises ``DataValidationError`` like ``check_data(data_path, kind="preference")``.
    """
    return read_records(data_path, kind="preference").items
