"""GRPO data: prompts with a ground truth, and the adapter that scores a completion with the user's reward function.

Rows are upstream Training Hub's generic GRPO rows (JSONL, JSON, parquet or a saved dataset)::

    {"question": "What is 2 plus 3?", "ground_truth": "5"}
    {"messages": [{"role": "system", ...}, {"role": "user", ...}], "answer": "5", "level": 1}

``question`` (a user message, after ``system_prompt`` when one is given) or ``messages`` (the prompt conversation;
it must not end with an assistant message) is the prompt; ``ground_truth`` (or ``answer``) is handed to the reward
function as a string (``""`` when absent, as upstream); every other field is kept and handed to it too.
The first ``n_train`` rows train, the next ``n_val`` are held out (upstream's split).

The reward function is called as upstream's generic mode calls it::

    reward_fn(data_source=..., solution_str=<completion text>, ground_truth=<str>, **extra) -> float

``extra`` holds the row's other fields, those the function accepts (all of them when it takes ``**kwargs``), plus
``extra_info`` (``{"index": row, **fields}``, verl's name) when it names that parameter.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from training_hub.data.errors import DataProblem, ProblemCollector
from training_hub.data.formats import _kind, messages_field

PROMPT_FIELDS = ("question", "messages")
TRUTH_FIELDS = ("ground_truth", "answer")
VALID_ROW = 'an object with "question" (a string) or "messages" (the prompt), and "ground_truth" (or "answer")'


@dataclass
class Task:
    """One prompt: its conversation, ground truth (a string), the row's other fields, and where it came from."""

    messages: list[dict]
    ground_truth: str
    extra: dict = field(default_factory=dict)
    where: str = ""
    index: int = 0


def task_from_row(row: Any, report, system_prompt: str | None) -> Task | None:
    """Check one row (``report(field, message, valid)`` for each problem); the Task, or None."""
    if not isinstance(row, dict):
        report("row", f"expected a JSON object, got a {_kind(row)}", VALID_ROW)
        return None
    if row.get("messages") is not None:
        messages = messages_field(row, "messages", report, need_assistant=False)
        if messages is not None and messages[-1]["role"] == "assistant":
            report("messages", "the prompt ends with an assistant message; the policy writes that turn",
                   "a conversation ending with a user (or tool) message")
            return None
    elif row.get("question") is None:
        report("question", 'missing "question" and "messages"', VALID_ROW)
        return None
    elif not isinstance(row["question"], str) or not row["question"].strip():
        report("question", f"expected a non-empty string, got {row['question']!r}", "a non-empty string")
        return None
    else:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": row["question"]}]
    if messages is None:
        return None
    truth = next((row[k] for k in TRUTH_FIELDS if row.get(k) is not None), "")
    if isinstance(truth, (dict, list)):
        truth = json.dumps(truth)
    extra = {k: v for k, v in row.items() if k not in PROMPT_FIELDS + TRUTH_FIELDS}
    return Task(messages=messages, ground_truth=str(truth), extra=extra)


def load_tasks(data_path: str | None, tasks: list | None, *, n_train: int, n_val: int,
               system_prompt: str | None = None) -> tuple[list[Task], list[Task]]:
    """(training tasks, held-out tasks) from ``data_path`` or the in-memory ``tasks`` rows; every row is checked
    first and all problems are raised at once (``DataValidationError``, file:line per problem)."""
    from training_hub.data.sources import iter_source

    collector = ProblemCollector()
    found: list[Task] = []
    items = iter_source(str(data_path)) if data_path else (("tasks", i, row) for i, row in enumerate(tasks or []))
    for item in items:
        if isinstance(item, DataProblem):
            collector.add(item)
            continue
        path, line, row = item
        where = f"{path}[{line}]" if path == "tasks" else f"{path}:{line}"

        def report(name, message, valid, path=path, line=line):
            collector.add(DataProblem(path, line, name, message, valid))

        task = task_from_row(row, report, system_prompt)
        if task is not None:
            task.where, task.index = where, len(found)
            found.append(task)
        if collector.truncated:
            break
    collector.raise_if_any()
    if not found:
        collector.add(DataProblem(str(data_path or "tasks"), None, "data_path", "no rows found", "at least one row"))
        collector.raise_if_any()
    return found[:n_train], found[n_train:n_train + n_val]


def tasks_fingerprint(data_path: str | None, tasks: list | None) -> str:
    """The content hash a resumed run compares: the data file's bytes, or the in-memory rows' JSON."""
    if data_path:
        from training_hub.data.sources import fingerprint

        return fingerprint(data_path)
    return hashlib.sha256(json.dumps(tasks, sort_keys=True, default=str).encode()).hexdigest()


def callable_name(fn: Callable | None) -> str | None:
    """A stable name for a function (module.qualname): what a resumed run compares instead of its address."""
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


class RewardFunctionError(RuntimeError):
    """The user's ``reward_fn`` raised; the message names the row and the completion it was scoring."""


class RewardAdapter:
    """Calls a ``grpo()`` reward function on a task's completion and checks that it returns a finite number."""

    def __init__(self, reward_fn: Callable, data_source: str):
        self.fn, self.data_source = reward_fn, data_source
        try:
            params = inspect.signature(reward_fn).parameters.values()
        except (TypeError, ValueError):  # a builtin or C callable: hand it the fixed arguments only
            params = []
        self.takes_all = any(p.kind == p.VAR_KEYWORD for p in params)
        self.names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def extra_for(self, task: Task) -> dict:
        extra = {k: v for k, v in task.extra.items()
                 if (self.takes_all or k in self.names) and k not in ("data_source", "solution_str", "ground_truth")}
        if "extra_info" in self.names and "extra_info" not in extra:
            extra["extra_info"] = {"index": task.index, **task.extra}
        return extra

    def __call__(self, task: Task, completion: str) -> float:
        source = task.extra.get("data_source", self.data_source)
        try:
            value = self.fn(data_source=source, solution_str=completion, ground_truth=task.ground_truth,
                            **self.extra_for(task))
        except Exception as exc:  # the user's function: say which call failed, keep its traceback as the cause
            name = getattr(self.fn, "__name__", repr(self.fn))
            raise RewardFunctionError(
                f"reward_fn {name} raised {type(exc).__name__}: {exc} for the row at {task.where} (ground_truth="
                f"{task.ground_truth!r}, solution_str={completion[:200]!r}); nothing of this iteration was applied")\
                from exc
        try:  # a float, int, bool, numpy or 0-d torch number; not text
            number = float(value) if not isinstance(value, (str, bytes)) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            name = getattr(self.fn, "__name__", repr(self.fn))
            raise ValueError(f"reward_fn {name} returned {value!r} for the row at {task.where}; it must return a "
                             "finite number (a float, e.g. 1.0 for a correct answer and 0.0 otherwise)")
        return number
