"""Built-in reward functions for GRPO, with upstream Training Hub 0.11's names and semantics.

* :func:`tool_call_reward` ``(model_response, expected_name, expected_args) -> float``: 1.0 for the right tool name
  and arguments, 0.5 for the right name with other arguments, 0.0 for a wrong name or no tool call. The response
  may be an OpenAI ``Choice`` or message object, a message dict (``tool_calls`` or the legacy ``function_call``), or
  here also the generated text itself (a ``<tool_call>{...}</tool_call>`` block or a bare ``{"name", "arguments"}``
  JSON object, after any ``<think>`` block), which is what the native and trl backends generate.
* :func:`binary_reward` ``(reward_value, threshold=1.0) -> float``: 1.0 when ``reward_value >= threshold``.
* :func:`tool_call_score` ``(data_source, solution_str, ground_truth, **extra) -> float``: the same tool-call check in
  the ``reward_fn`` signature of ``grpo()``; ``ground_truth`` is ``{"tool_name", "tool_args"}`` (or its JSON text).
* :func:`exact_match_reward`: 1.0 when the completion, stripped, equals the ground truth (the default reward of
  ``grpo()`` for question/ground_truth rows).

Names match exactly, by suffix (``functions.get_weather`` ~ ``get_weather``), or after lower-casing and mapping
``-``/``.`` to ``_``. Arguments match when their JSON forms are equal after numeric strings become numbers and other
strings are stripped.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["binary_reward", "exact_match_reward", "tool_call_reward", "tool_call_score"]


def tool_call_reward(model_response: Any, expected_name: str, expected_args: dict) -> float:
    """1.0 right tool and arguments, 0.5 right tool only, 0.0 otherwise (see the module doc)."""
    name, args = extract_tool_call(model_response)
    if not isinstance(name, str) or not names_match(name, expected_name):
        return 0.0
    return 1.0 if args_match(args, expected_args) else 0.5


def binary_reward(reward_value: float, threshold: float = 1.0) -> float:
    """1.0 if ``reward_value`` reaches ``threshold`` (within 1e-6), else 0.0."""
    return 1.0 if reward_value >= threshold - 1e-6 else 0.0


def tool_call_score(data_source: str, solution_str: str, ground_truth: Any, **extra: Any) -> float:
    """:func:`tool_call_reward` as a ``grpo()`` reward function; ``ground_truth``: ``{"tool_name", "tool_args"}``."""
    truth = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    return tool_call_reward(solution_str, truth["tool_name"], truth.get("tool_args", {}))


def exact_match_reward(data_source: str, solution_str: str, ground_truth: Any, **extra: Any) -> float:
    """1.0 when the completion, stripped of surrounding white space, equals ``str(ground_truth)`` stripped."""
    return 1.0 if solution_str.strip() == str(ground_truth).strip() else 0.0


# ------------------------------------------------------------------------------------------------ parsing


def _json_args(value: Any) -> dict:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return {}
    return value or {}


def _call_of(container: Any) -> tuple[str | None, dict] | None:
    """(name, arguments) of the first tool call of an OpenAI message object or dict; None when it has none."""
    get = (lambda obj, key: obj.get(key)) if isinstance(container, dict) else getattr
    calls = get(container, "tool_calls") if isinstance(container, dict) or hasattr(container, "tool_calls") else None
    if calls:
        function = get(calls[0], "function") if not isinstance(calls[0], dict) else calls[0].get("function", {})
        if isinstance(function, dict):
            return function.get("name"), _json_args(function.get("arguments", {}))
        return function.name, _json_args(function.arguments)
    legacy = get(container, "function_call") if isinstance(container, dict) or hasattr(container, "function_call") \
        else None
    if legacy:
        if isinstance(legacy, dict):
            return legacy.get("name"), _json_args(legacy.get("arguments", {}))
        return legacy.name, _json_args(legacy.arguments)
    return None


def _call_in_text(text: str) -> tuple[str | None, dict]:
    """The first tool call written in generated text: a ``<tool_call>`` block, else a JSON object with "name"."""
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.DOTALL).strip()
    tagged = re.search(r"<tool_call>\s*(.+?)\s*</tool_call>", text, re.DOTALL)
    candidates = [tagged.group(1)] if tagged else []
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            candidates.append(decoder.raw_decode(text, match.start())[0])
        except json.JSONDecodeError:
            continue
    for found in candidates:
        if isinstance(found, str):
            try:
                found = json.loads(found)
            except json.JSONDecodeError:
                continue
        if isinstance(found, dict) and "name" in found:
            return found["name"], _json_args(found.get("arguments", {}))
    return None, {}


def extract_tool_call(response: Any) -> tuple[str | None, dict]:
    """(name, arguments) of the tool call in ``response`` (see the module doc); (None, {}) when there is none."""
    if isinstance(response, str):
        return _call_in_text(response)
    if hasattr(response, "message"):  # an OpenAI Choice
        response = response.message
    found = _call_of(response)
    if found is not None:
        return found
    content = response.get("content") if isinstance(response, dict) else getattr(response, "content", None)
    return _call_in_text(content) if isinstance(content, str) else (None, {})


def names_match(predicted: str, expected: str) -> bool:
    if predicted == expected or predicted.endswith(expected) or expected.endswith(predicted):
        return True
    p, e = (s.lower().replace("-", "_").replace(".", "_") for s in (predicted, expected))
    return p == e or p.endswith(e) or e.endswith(p)


def _normalized(args: dict) -> dict:
    out = {}
    for key, value in args.items():
        if isinstance(value, str):
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    continue
            else:
                value = value.strip()
        out[key] = value
    return out


def args_match(predicted: Any, expected: Any) -> bool:
    try:
        predicted = json.loads(predicted) if isinstance(predicted, str) else predicted
        expected = json.loads(expected) if isinstance(expected, str) else expected
    except json.JSONDecodeError:
        return False
    if not predicted and not expected:
        return True
    if not predicted or not expected:
        return False
    try:
        return json.dumps(_normalized(predicted), sort_keys=True) == json.dumps(_normalized(expected), sort_keys=True)
    except (TypeError, ValueError, AttributeError):
        return False
