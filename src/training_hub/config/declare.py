"""Declare each parameter once; derive signature, validation, CLI flags and docs from it.

An algorithm's parameters are a keyword-only dataclass built from shared groups (see ``groups.py``).
Every field is made with :func:`param`, which records a one-line doc and optional range/choice checks in
the field metadata.  Everything else in the package reads that declaration:

* ``required_params`` / ``optional_params`` -> ``Algorithm.get_required_params()`` / ``get_optional_params()``
* :func:`validate_params` -> the single ``ValueError`` listing every problem of a call
* ``training_hub.cli`` -> one ``--flag`` per field with the doc as help
* ``docs/parameters.md`` -> generated reference

We write this small layer ourselves (instead of pydantic) because it must stay import-cheap
(``import training_hub`` may not pull in heavy modules) and because the error we want is specific:
*all* problems of one call, each with a "did you mean" hint, in one exception.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from typing import Any, Callable, Literal, Union

MISSING = dataclasses.MISSING

UPSTREAM_GROUP = "Upstream Training Hub names (translated or ignored)"


@dataclasses.dataclass(frozen=True)
class Upstream:
    """What a name of the upstream Training Hub API that we do not use ourselves does here.

    Translated: ``target`` is set from ``fold(config)`` when the caller gave this name and not the target.
    Ignored: when ``ignored_when(value)`` holds for the given value, one ``UpstreamParameterWarning`` says ``why``
    (unless the chosen backend lists the name in its ``upstream_handles`` and runs on CUDA).
    """

    why: str
    target: str | None = None
    fold: Callable[[Any], Any] | None = None
    ignored_when: Callable[[Any], bool] | None = None

    @property
    def translated(self) -> bool:
        return self.target is not None


def translated(target: str, fold: Callable[[Any], Any], why: str = "") -> Upstream:
    """An upstream-only name that sets ``target`` (to ``fold(config)``) when the target itself was not given."""
    return Upstream(why=why or f"sets {target}", target=target, fold=fold)


def ignored(why: str, when: Callable[[Any], bool] = bool) -> Upstream:
    """An upstream-only name that has no effect here for the values where ``when(value)`` holds (default: truthy)."""
    return Upstream(why=why, ignored_when=when)


def param(
    default: Any = MISSING,
    doc: str = "",
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    cli: bool = True,
    upstream: Upstream | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A declared parameter: default (omit for required), one-line doc and optional bounds.

    ``upstream``: this name exists for upstream Training Hub scripts only (see :func:`translated`, :func:`ignored`);
    it is listed after our own parameters in signatures, ``--help`` and the docs.
    """
    meta = {"doc": doc, "gt": gt, "ge": ge, "lt": lt, "le": le, "cli": cli, "upstream": upstream}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """One declared parameter, resolved from a dataclass field."""

    name: str
    type: Any
    default: Any
    required: bool
    doc: str
    group: str
    bounds: dict[str, float]
    cli: bool
    upstream: Upstream | None = None

    @property
    def choices(self) -> tuple | None:
        args = _literal_args(self.type)
        return args or None

    @property
    def type_name(self) -> str:
        return _type_name(self.type)


def _literal_args(tp: Any) -> tuple:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if _is_union(tp):
        for arg in typing.get_args(tp):
            found = _literal_args(arg)
            if found:
                return found
    return ()


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{inner}]" if inner else origin.__name__
    return getattr(tp, "__name__", str(tp))


def param_specs(config_cls: type) -> dict[str, ParamSpec]:
    """All declared parameters of a config dataclass: ours in declaration order, then the upstream-only names."""
    cached = config_cls.__dict__.get("_th_specs")
    if cached is not None:
        return cached
    hints = typing.get_type_hints(config_cls)
    groups = _field_groups(config_cls)
    specs: dict[str, ParamSpec] = {}
    for f in dataclasses.fields(config_cls):
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else (f.default if f.default is not MISSING else f.default_factory())
        bounds = {k: f.metadata.get(k) for k in ("gt", "ge", "lt", "le") if f.metadata.get(k) is not None}
        specs[f.name] = ParamSpec(
            name=f.name, type=hints[f.name], default=default, required=required,
            doc=f.metadata.get("doc", ""), bounds=bounds, cli=f.metadata.get("cli", True),
            group=UPSTREAM_GROUP if f.metadata.get("upstream") else groups.get(f.name, config_cls.__name__),
            upstream=f.metadata.get("upstream"),
        )
    specs = {**{n: s for n, s in specs.items() if not s.upstream}, **{n: s for n, s in specs.items() if s.upstream}}
    setattr(config_cls, "_th_specs", specs)
    return specs


def _field_groups(config_cls: type) -> dict[str, str]:
    """Map each field to the (most basic) class in the MRO that declares it: its group."""
    groups: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        title = getattr(klass, "group_title", klass.__name__)
        for name in klass.__dict__.get("__annotations__", {}):
            groups.setdefault(name, title)
    return groups


def required_params(config_cls: type) -> dict[str, Any]:
    return {n: s.type for n, s in param_specs(config_cls).items() if s.required}


def optional_params(config_cls: type) -> dict[str, Any]:
    return {n: s.type for n, s in param_specs(config_cls).items() if not s.required}


# ----------------------------------------------------------------------------------------------
# validation


def closest(name: str, candidates: typing.Iterable[str]) -> str | None:
    """The closest candidate to ``name`` (for "did you mean" hints), or None."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


class ParameterError(ValueError):
    """Raised with every problem of one call; ``.problems`` holds them one per line."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) with the parameters of {what}:\n{lines}")


class ParameterTypeError(ParameterError, TypeError):
    """A :class:`ParameterError` with at least one value of the wrong type: also a ``TypeError``, as Python raises
    for an argument of the wrong type (upstream raises ``TypeError`` for a ``loss_fn`` that is not callable)."""


def check_value(spec: ParamSpec, value: Any) -> tuple[Any, str | None]:
    """Check (and gently coerce: int -> float, PathLike -> str) one value. Returns (value, problem)."""
    if value is None and not spec.required and spec.default is None:
        return value, None  # None is this parameter's default (e.g. loss_fn: Callable, unset)
    ok, value = _conforms(spec.type, value)
    if not ok and typing.get_origin(spec.type) is collections.abc.Callable:
        return value, f"{spec.name} must be callable, got {value!r} ({type(value).__name__})"
    if not ok:
        problem = f"{spec.name}: expected {spec.type_name}, got {value!r} ({type(value).__name__})"
        hint = closest(value, [c for c in spec.choices or () if isinstance(c, str)]) if isinstance(value, str) else None
        return value, problem + (f"; did you mean {hint!r}?" if hint else "")
    if isinstance(value, float) and value != value:  # NaN passes every comparison below
        return value, f"{spec.name}: must be a number, got nan"
    if isinstance(value, float) and spec.bounds and value in (float("inf"), float("-inf")):
        return value, f"{spec.name}: must be finite, got {value!r}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, limit in spec.bounds.items():
            bad = {"gt": value <= limit, "ge": value < limit, "lt": value >= limit, "le": value > limit}[key]
            if bad:
                rule = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}[key]
                return value, f"{spec.name}: must be {rule} {limit}, got {value!r}"
    return value, None


def _conforms(tp: Any, value: Any) -> tuple[bool, Any]:
    if tp is Any:
        return True, value
    if tp is type(None):
        return value is None, value
    origin = typing.get_origin(tp)
    if _is_union(tp):
        for arg in typing.get_args(tp):
            ok, coerced = _conforms(arg, value)
            if ok:
                return True, coerced
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False, value
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_conforms(item_tp, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        return isinstance(value, dict), value
    if origin is not None:  # e.g. Callable, Sequence: accept anything of the origin
        return isinstance(value, origin) if isinstance(origin, type) else True, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is str:
        if hasattr(value, "__fspath__"):
            return True, str(value.__fspath__())
        return isinstance(value, str), value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def validate_params(config_cls: type, params: dict[str, Any], *, what: str = "this call") -> Any:
    """Build ``config_cls`` from ``params`` or raise one :class:`ParameterError` listing every problem.

    Problems collected: unknown names (with the closest declared name), missing required values,
    wrong types, out-of-range values, invalid choices, and the config's own cross-field ``checks()``.
    """
    specs = param_specs(config_cls)
    problems: list[str] = []
    values: dict[str, Any] = {}
    wrong_type = False
    for name, value in params.items():
        spec = specs.get(name)
        if spec is None:
            hint = closest(name, specs)
            problems.append(f"{name}: unknown parameter" + (f"; did you mean '{hint}'?" if hint else ""))
            continue
        value, problem = check_value(spec, value)
        if problem:
            problems.append(problem)
            wrong_type = wrong_type or not _conforms(spec.type, value)[0]
        values[name] = value
    for name, spec in specs.items():
        if spec.required and params.get(name) is None:
            problems.append(f"{name}: required ({spec.type_name}) but not given")
    if not problems:
        config = config_cls(**values)
        problems.extend(config.checks())
        if not problems:
            return config
    raise (ParameterTypeError if wrong_type else ParameterError)(what, problems)


class DeclaredConfig:
    """Mixin for the algorithm configs: cross-field checks and a plain-dict view."""

    def checks(self) -> list[str]:
        """Cross-field problems; each group adds its own by extending this."""
        return []

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
