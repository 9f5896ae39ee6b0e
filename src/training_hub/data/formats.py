"""The record formats: chat (messages), alpaca, pretraining documents and preference pairs.

Each ``*_record`` function checks one parsed record, reports every problem through ``report(field, message,
valid)`` and returns the record in its normalized form, or ``None`` when it had a problem.

Normalized forms:
- chat and alpaca: ``{"messages": [{"role", "content", "reasoning_content"?}, ...], "unmask": bool}``
- pretraining: the document string
- preference: ``{"prompt", "chosen", "rejected"}``, each a string or a list of normalized messages
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Report = Callable[[str, str, str], None]

ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = ("role", "content", "reasoning_content")
VALID_RECORD = ('an object with "messages" (a list of {"role", "content"} objects) or the alpaca fields '
                '"instruction", "output" and optional "input"')


def _kind(value: Any) -> str:
    """The JSON name of a Python value's type, for messages."""
    names = {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _present(record: dict, key: str) -> bool:
    """A key counts as absent when missing or null (parquet and saved datasets fill missing fields with null)."""
    return record.get(key) is not None


def chat_record(record: Any, report: Report) -> dict | None:
    """Check a chat record (messages format, or alpaca, which is converted to messages)."""
    if not isinstance(record, dict):
        report("record", f"expected a JSON object, got a {_kind(record)}", VALID_RECORD)
        return None
    if not _present(record, "messages") and _present(record, "instruction"):
        return alpaca_record(record, report)
    ok = True
    unmask = record.get("unmask")
    if unmask is not None and not isinstance(unmask, bool):
        report("unmask", f"expected true or false, got a {_kind(unmask)}", "true or false")
        ok = False
    messages = messages_field(record, "messages", report, need_assistant=True)
    if messages is None or not ok:
        return None
    return {"messages": messages, "unmask": bool(unmask)}


def messages_field(record: dict, field: str, report: Report, *, need_assistant: bool) -> list[dict] | None:
    """Check ``record[field]`` as a non-empty list of messages; return the normalized list or None."""
    if field not in record:
        report(field, f'missing "{field}"', VALID_RECORD if field == "messages" else "a list of messages")
        return None
    messages = record[field]
    if not isinstance(messages, list):
        report(field, f"expected a list of messages, got a {_kind(messages)}", "a list of {role, content} objects")
        return None
    if not messages:
        report(field, "the list is empty", "at least one message, including an assistant message")
        return None
    normalized = [_message(m, f"{field}[{i}]", report) for i, m in enumerate(messages)]
    if any(m is None for m in normalized):
        return None
    if need_assistant and not any(m["role"] == "assistant" for m in normalized):
        report(field, "no assistant message: nothing to train on", "at least one message with role 'assistant'")
        return None
    return normalized


def _message(message: Any, field: str, report: Report) -> dict | None:
    if not isinstance(message, dict):
        report(field, f"expected a message object, got a {_kind(message)}", '{"role": ..., "content": ...}')
        return None
    ok = True
    unknown = sorted(k for k in message if k not in MESSAGE_KEYS and message[k] is not None)
    if unknown:
        report(f"{field}.{unknown[0]}", f"unknown message field{'s' if len(unknown) > 1 else ''} "
               f"{', '.join(map(repr, unknown))}", ", ".join(MESSAGE_KEYS))
        ok = False
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        what = "missing" if role is None else f"unknown role {role!r}" if isinstance(role, str) else \
            f"expected a string, got a {_kind(role)}"
        report(f"{field}.role", what, ", ".join(ROLES))
        ok = False
    content = message.get("content")
    if not isinstance(content, str):
        what = "missing" if "content" not in message else f"expected a string, got a {_kind(content)}"
        report(f"{field}.content", what, "a string")
        ok = False
    reasoning = message.get("reasoning_content")
    if reasoning is not None and not isinstance(reasoning, str):
        report(f"{field}.reasoning_content", f"expected a string, got a {_kind(reasoning)}", "a string or absent")
        ok = False
    if not ok:
        return None
    out = {"role": role, "content": content}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    return out


def alpaca_record(record: dict, report: Report) -> dict | None:
    """Check an alpaca record and convert it to chat.

    The user message is the instruction, followed by a blank line and the input when the input is not empty;
    the assistant message is the output.
    """
    ok = True
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        value = record.get(key)
        if value is None and not required:
            continue
        if not isinstance(value, str) or (required and not value.strip()):
            what = "missing" if value is None else "empty" if isinstance(value, str) else \
                f"expected a string, got a {_kind(value)}"
            report(key, what, "a non-empty string" if required else "a string or absent")
            ok = False
    unmask = record.get("unmask")
    if unmask is not None and not isinstance(unmask, bool):
        report("unmask", f"expected true or false, got a {_kind(unmask)}", "true or false")
        ok = False
    if not ok:
        return None
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    return {"messages": messages, "unmask": bool(unmask)}


def document_record(record: Any, report: Report, column: str) -> str | None:
    """Check a pretraining record: an object whose ``column`` is a non-empty string."""
    valid = f'an object with a non-empty string "{column}"'
    if not isinstance(record, dict):
        report("record", f"expected a JSON object, got a {_kind(record)}", valid)
        return None
    value = record.get(column)
    if not isinstance(value, str) or not value:
        what = f'missing "{column}"' if value is None else "empty" if isinstance(value, str) else \
            f"expected a string, got a {_kind(value)}"
        keys = ", ".join(sorted(record)) or "none"
        report(column, f"{what} (the record's fields: {keys}; set document_column_name to use another)", valid)
        return None
    return value


def preference_record(record: Any, report: Report) -> dict | None:
    """Check a preference pair: prompt, chosen and rejected, each a non-empty string or a list of messages."""
    valid = 'an object with "prompt", "chosen" and "rejected", each a string or a list of messages'
    if not isinstance(record, dict):
        report("record", f"expected a JSON object, got a {_kind(record)}", valid)
        return None
    if "messages" in record and not any(key in record for key in ("prompt", "chosen", "rejected")):
        report("messages", "this is a chat (SFT) record; preference training needs pairs", valid)
        return None
    out = {}
    for key in ("prompt", "chosen", "rejected"):
        value = record.get(key)
        if isinstance(value, list):
            out[key] = messages_field(record, key, report, need_assistant=key != "prompt")
        elif isinstance(value, str) and value.strip():
            out[key] = value
        else:
            what = f'missing "{key}"' if value is None else "empty" if isinstance(value, str) else \
                f"expected a string or a list of messages, got a {_kind(value)}"
            report(key, what, "a non-empty string or a list of messages")
            out[key] = None
    return None if any(v is None for v in out.values()) else out
