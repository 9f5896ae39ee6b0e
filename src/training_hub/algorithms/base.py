"""The route of a call to a built-in algorithm: validated once, in the caller, then handed to one backend.

    sft(**params) / create_algorithm("sft", backend).train(**params) / training-hub train sft ...
      -> prepare_call()      upstream conventions, validation against the declaration (one ParameterError listing
                             every problem), translated upstream names folded in: a ``Call``
      -> choose_backend()    no backend named: the first, in preference order, that is available here, takes the
                             call's engine options and has no ``refusals()`` for it
      -> run_call()          availability, the backend's ``refusals()`` (the same rule that chose it), one warning per
                             ignored upstream name, then the backend: a built-in backend gets the typed config
                             (``BuiltinBackend.train_config``), a third party's the plain dict the seed guide promises
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Type

from training_hub.backends.common import BuiltinBackend, passthrough_names
from training_hub.config.declare import (
    UPSTREAM_GROUP, ParameterError, optional_params, param_specs, required_params, validate_params,
)
from training_hub.config.upstream import validated_call, warn_ignored
from training_hub.registry import Algorithm, AlgorithmRegistry, Backend, BackendUnavailableError, create_algorithm

logger = logging.getLogger("training_hub")


@dataclass
class Call:
    """One validated call: the typed config, the names a backend is to receive, and engine options."""

    config: Any
    names: list[str]  # the names the caller gave, plus the targets of translated upstream names
    options: Dict[str, Any] = field(default_factory=dict)  # undeclared names some backend takes as they are

    def plain(self) -> Dict[str, Any]:
        """The dict a third-party backend receives: the given parameters, validated, plus the engine options."""
        return {**{name: getattr(self.config, name) for name in self.names}, **self.options}


class DeclaredAlgorithm(Algorithm):
    """An algorithm whose parameters are the fields of ``config_class``.

    ``train(**kwargs)`` validates every parameter (all problems in one ``ValueError``, before any heavy import) and
    hands the result to the backend: the typed config to a built-in backend, a plain dict of the parameters the
    caller gave (validated and coerced) to any other, as the upstream library does, so a backend's own
    ``params.get(name, default)`` fallbacks keep working.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    backend_preference: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backend: Backend, **kwargs: Any):
        self.backend = backend
        self.kwargs = kwargs

    def train(self, **kwargs: Any) -> Any:
        call = prepare_call(self.name, {**self.kwargs, **kwargs}, backend=type(self.backend),
                            config_class=self.config_class)
        return self.run_call(call)

    def run_call(self, call: Call) -> Any:
        """Run a validated call on this algorithm's backend (see the module doc)."""
        backend_cls = type(self.backend)
        status = AlgorithmRegistry.availability(backend_cls)
        if not status:
            runnable = [n for n, s in AlgorithmRegistry.backend_status(self.name).items() if s]
            raise BackendUnavailableError(
                f"Backend {backend_cls.__name__} of '{self.name}' cannot run here: {status.reason}. "
                f"Backends that can: {', '.join(runnable) or 'none'}.")
        foreign = sorted(set(call.options) - passthrough_names(backend_cls))  # another backend's engine options
        if foreign:
            unknown = ParameterError(f"{self.name}()", [f"{n}: unknown parameter" for n in foreign])
            raise _with_passthrough_hints(self.name, unknown, foreign)
        warn_ignored(call.config, call.names, backend_cls, stacklevel=5)
        if isinstance(self.backend, BuiltinBackend):
            return self.backend.train_config(call.config, set(call.names), call.options)
        from training_hub.jit_checkpoint import prepare_backend_params

        return self.backend.execute_training(prepare_backend_params(self.name, call.plain()))

    def validate(self, params: Dict[str, Any]) -> Any:
        """The typed config for ``params``, or a ``ParameterError`` (a ``ValueError``) listing every problem."""
        return validate_params(self.config_class, params, what=f"{self.name}()")

    def get_required_params(self) -> Dict[str, Type]:
        return required_params(self.config_class)

    def get_optional_params(self) -> Dict[str, Type]:
        return optional_params(self.config_class)


def _backend_classes(name: str) -> dict[str, type]:
    return {b: AlgorithmRegistry.get_backend(name, b) for b in AlgorithmRegistry.list_backends(name)}


def prepare_call(name: str, params: Dict[str, Any], backend: type | None = None,
                 config_class: type | None = None) -> Call:
    """Validate ``params`` for algorithm ``name`` once; ``backend``: the backend class, when one is named.

    Undeclared names that a backend takes as engine options (``passthrough_params()``) are kept apart: those of
    ``backend`` when it is named, else those of any of the algorithm's backends (the choice then honours them).
    """
    config_class = config_class or AlgorithmRegistry.get_algorithm(name).config_class
    specs = param_specs(config_class)
    candidates = [backend] if backend is not None else list(_backend_classes(name).values())
    takes = frozenset().union(*(passthrough_names(b) for b in candidates))
    options = {n: v for n, v in params.items() if n not in specs and n in takes}
    ours = {n: v for n, v in params.items() if n not in options}
    try:
        config, names = validated_call(config_class, ours, what=f"{name}()")
    except ParameterError as exc:
        raise _with_passthrough_hints(name, exc, [n for n in ours if n not in specs]) from None
    return Call(config, names, options)


def _with_passthrough_hints(name: str, error: ParameterError, unknown: list[str]) -> ParameterError:
    """Name the backend whose engine option an unknown parameter is, where one is."""
    owners = {n: [b for b, cls in _backend_classes(name).items() if n in passthrough_names(cls)] for n in unknown}
    problems = []
    for line in error.problems:
        param = line.split(":", 1)[0]
        if owners.get(param) and "unknown parameter" in line:
            backend = owners[param][0]
            line = (f"{param}: not a training_hub parameter; it is an option of the {backend} backend's engine, "
                    f"passed through only with backend='{backend}'")
        problems.append(line)
    return type(error)(f"{name}()", problems)  # a ParameterTypeError stays one


def refusals_of(backend_cls: type, call: Call) -> list[str]:
    """What ``backend_cls`` cannot take in ``call``: engine options that are not its own, and its ``refusals()``."""
    problems = [f"{n}: not an option of this backend" for n in sorted(set(call.options) - passthrough_names(backend_cls))]
    check = getattr(backend_cls, "refusals", None)
    if check is not None and not problems:
        try:
            problems = list(check(call.config, set(call.names)))
        except Exception as exc:  # a broken check must not block the call; the backend still validates
            logger.debug("refusals() of %s raised %r; treated as none", backend_cls.__name__, exc)
    return problems


def choose_backend(name: str, call: Call | Dict[str, Any]) -> str:
    """The default backend for this call: the first backend, in the algorithm's preference order, that can run here
    *and* take the call (no :func:`refusals_of`). When the preferred backend is passed over, a warning says why; when
    none takes the call, the plain default is returned and its own refusal reaches the caller."""
    default = AlgorithmRegistry.default_backend(name)
    if not isinstance(call, Call):
        call = prepare_call(name, call)
    status = AlgorithmRegistry.backend_status(name)
    passed_over = []
    for candidate in (n for n in AlgorithmRegistry.backend_order(name) if status[n]):
        problems = refusals_of(AlgorithmRegistry.get_backend(name, candidate), call)
        if not problems:
            if passed_over:
                reasons = "; ".join(f"{n} cannot take {', '.join(p.split(': ', 1)[0].split('=')[0] for p in found)}"
                                    for n, found in passed_over)
                logger.warning("%s(): using backend '%s' (%s). Name a backend to choose it yourself.",
                               name, candidate, reasons)
            return candidate
        passed_over.append((candidate, problems))
    return default


def run_algorithm(name: str, backend: str | None, params: Dict[str, Any]) -> Any:
    """Body of every convenience function (and of ``training-hub train``): validate once, choose, run.

    The backend is looked up now, so backends registered after import work. An algorithm without a declaration
    (a third party's) is created and trained as the seed guide does it.
    """
    algorithm_class = AlgorithmRegistry.get_algorithm(name)
    if not issubclass(algorithm_class, DeclaredAlgorithm):
        return create_algorithm(name, backend_name=backend).train(**params)
    named = AlgorithmRegistry.get_backend(name, backend) if backend else None
    call = prepare_call(name, params, backend=named)
    algorithm = create_algorithm(name, backend_name=backend or choose_backend(name, call))
    return algorithm.run_call(call)


# ------------------------------------------------------------------------------------------------ functions


def signature_from_config(config_class: type) -> inspect.Signature:
    """An ``inspect.Signature`` for a convenience function, generated from the declaration: the required parameters
    (positional or keyword), then ``backend``, our optional parameters and the upstream-only names."""
    params = []
    for spec in param_specs(config_class).values():
        default = inspect.Parameter.empty if spec.required else spec.default
        params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=spec.type))
    positional = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params if p.default is p.empty]
    rest = [p for p in params if p.default is not p.empty]
    backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None)
    return inspect.Signature(positional + [backend] + rest)


def convenience_function(algorithm_class: type, summary: str):
    """Build ``sft()``-style functions from the declaration: signature and docs are generated, not typed out.

    Type checkers read the generated stub ``functions.pyi`` (``python -m training_hub.docs_gen`` writes it)."""
    name = algorithm_class.name
    required = list(required_params(algorithm_class.config_class))

    def train_fn(*args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        if len(args) > len(required):
            raise TypeError(f"{name}() takes at most {len(required)} positional arguments ({', '.join(required)})")
        params = dict(zip(required, args))
        clash = set(params) & set(kwargs)
        if clash:
            raise TypeError(f"{name}() got multiple values for {', '.join(sorted(clash))}")
        return run_algorithm(name, backend, {**params, **kwargs})

    train_fn.__name__ = train_fn.__qualname__ = name
    train_fn.__module__ = "training_hub"
    train_fn.__signature__ = signature_from_config(algorithm_class.config_class)  # type: ignore[attr-defined]
    train_fn.__doc__ = f"{summary}\n\n{params_docstring(algorithm_class.config_class)}"
    return train_fn


def params_docstring(config_class: type) -> str:
    lines = ["Parameters", "----------", "backend : str, optional", "    Backend name (default: the first available)."]
    group = None
    for spec in param_specs(config_class).values():
        if spec.group == UPSTREAM_GROUP and group != UPSTREAM_GROUP:
            lines += ["", f"{UPSTREAM_GROUP}:"]
        group = spec.group
        default = "required" if spec.required else f"default {spec.default!r}"
        lines += [f"{spec.name} : {spec.type_name} ({default})", f"    {spec.doc}"]
    return "\n".join(lines)
