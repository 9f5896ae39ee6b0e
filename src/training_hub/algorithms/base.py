"""Shared machinery of the built-in algorithms: one declaration drives validation and the signature."""

from __future__ import annotations

import inspect
import logging
from typing import Any, ClassVar, Dict, Type

from training_hub.config.declare import (
    ParameterError, optional_params, param_specs, required_params, validate_params,
)
from training_hub.registry import Algorithm, AlgorithmRegistry, Backend, backend_availability

logger = logging.getLogger("training_hub")


class DeclaredAlgorithm(Algorithm):
    """An algorithm whose parameters are the fields of ``config_class``.

    ``train(**kwargs)`` validates every parameter (all problems in one ``ValueError``, before any heavy
    import), then hands the backend a plain dict of the parameters the caller gave (validated and coerced),
    as the upstream library does, so a backend's own ``params.get(name, default)`` fallbacks keep working.
    Built-in backends rebuild the typed config (declared defaults included) from that dict.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    backend_preference: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backend: Backend, **kwargs: Any):
        self.backend = backend
        self.kwargs = kwargs

    def train(self, **kwargs: Any) -> Any:
        from training_hub import compat

        given = compat.upstream_call({**self.kwargs, **kwargs}, self.config_class)
        # An adapter backend takes the other fields of its engine's TrainingArgs as they are (upstream forwards
        # unknown keyword arguments to the backend); everywhere else an undeclared name is an error.
        specs = param_specs(self.config_class)
        own = passthrough_names(type(self.backend))
        passed = {name: given.pop(name) for name in list(given) if name not in specs and name in own}
        try:
            config = self.validate(given)
        except ParameterError as exc:
            raise self._with_passthrough_hints(exc, [n for n in given if n not in specs]) from None
        config, names = compat.apply(config, given, type(self.backend), what=f"{self.name}()")
        self._check_backend_can_run()
        return self.backend.execute_training({**{name: getattr(config, name) for name in names}, **passed})

    def _with_passthrough_hints(self, error: ParameterError, unknown: list[str]) -> ParameterError:
        """Name the backend whose engine option an unknown parameter is, where one is."""
        backends = {b: AlgorithmRegistry.get_backend(self.name, b) for b in AlgorithmRegistry.list_backends(self.name)}
        owners = {name: [b for b, cls in backends.items() if name in passthrough_names(cls)] for name in unknown}
        problems = []
        for line in error.problems:
            name = line.split(":", 1)[0]
            if owners.get(name) and "unknown parameter" in line:
                backend = owners[name][0]
                line = (f"{name}: not a training_hub parameter; it is an option of the {backend} backend's engine, "
                        f"passed through only with backend='{backend}'")
            problems.append(line)
        return ParameterError(f"{self.name}()", problems)

    def validate(self, params: Dict[str, Any]) -> Any:
        """The typed config for ``params``, or a ``ParameterError`` (a ``ValueError``) listing every problem."""
        return validate_params(self.config_class, params, what=f"{self.name}()")

    def _check_backend_can_run(self) -> None:
        status = backend_availability(type(self.backend))
        if status:
            return
        runnable = [n for n, s in AlgorithmRegistry.backend_status(self.name).items() if s]
        raise RuntimeError(f"Backend {type(self.backend).__name__} of '{self.name}' cannot run here: {status.reason}. "
                           f"Backends that can: {', '.join(runnable) or 'none'}.")

    def get_required_params(self) -> Dict[str, Type]:
        return required_params(self.config_class)

    def get_optional_params(self) -> Dict[str, Type]:
        return optional_params(self.config_class)


def passthrough_names(backend_cls: type) -> frozenset[str]:
    """The engine options a backend accepts besides the declared parameters (adapter backends; empty for others
    and where the engine is not installed)."""
    names = getattr(backend_cls, "passthrough_params", None)
    if names is None:
        return frozenset()
    try:
        return frozenset(names())
    except Exception:  # a broken or missing engine must not break validation; the backend reports it
        return frozenset()


def run_algorithm(name: str, backend: str | None, params: Dict[str, Any]) -> Any:
    """Body of every convenience function: looks the backend up now, so late registrations work."""
    from training_hub.registry import create_algorithm

    return create_algorithm(name, backend_name=backend or choose_backend(name, params)).train(**params)


def choose_backend(name: str, params: Dict[str, Any]) -> str:
    """The default backend for this call: the first backend, in the algorithm's preference order, that can run on
    this machine *and* take these parameters.

    A backend says what it cannot take in a class method ``refusals(config, given) -> list[str]`` (the adapter
    backends: settings their engine lacks; native lora_sft: QLoRA), and takes the undeclared names listed by its
    ``passthrough_params()`` only. When the preferred backend is passed over, a warning says why. When no backend
    takes the call (or the call is invalid), the plain default is returned and its own error reaches the caller.
    """
    import warnings

    from training_hub import compat

    default = AlgorithmRegistry.default_backend(name)
    config_class = getattr(AlgorithmRegistry.get_algorithm(name), "config_class", None)
    if config_class is None:
        return default
    specs = param_specs(config_class)
    status = AlgorithmRegistry.backend_status(name)
    candidates = [n for n in AlgorithmRegistry.backend_order(name) if status[n]]
    try:
        given = compat.upstream_call(params, config_class)
        extra = {n for n in given if n not in specs}
        base = validate_params(config_class, {k: v for k, v in given.items() if k in specs}, what=f"{name}()")
    except (ValueError, TypeError):
        return default  # train() reports the problems
    passed_over = []
    for candidate in candidates:
        backend_cls = AlgorithmRegistry.get_backend(name, candidate)
        problems = [f"{n}: not an option of this backend" for n in sorted(extra - passthrough_names(backend_cls))]
        check = getattr(backend_cls, "refusals", None)
        if check is not None and not problems:
            with warnings.catch_warnings():  # train() gives the upstream-name warnings once, for the chosen one
                warnings.simplefilter("ignore")
                try:
                    config, names = compat.apply(base, given, backend_cls, what=f"{name}()")
                except (ValueError, TypeError):
                    return default  # train() reports the problems
                try:
                    problems = list(check(config, set(names) - extra))
                except Exception as exc:  # a broken check must not block the call; the backend still validates
                    logger.debug("refusals() of %s raised %r; treated as none", candidate, exc)
        if not problems:
            if passed_over:
                reasons = "; ".join(f"{n} cannot take {', '.join(p.split(': ', 1)[0] for p in problems)}"
                                    for n, problems in passed_over)
                logger.warning("%s(): using backend '%s' (%s). Name a backend to choose it yourself.",
                               name, candidate, reasons)
            return candidate
        passed_over.append((candidate, problems))
    return default


def signature_from_config(config_class: type, extra: tuple[inspect.Parameter, ...] = ()) -> inspect.Signature:
    """An ``inspect.Signature`` for a convenience function, generated from the declaration."""
    params = []
    for spec in param_specs(config_class).values():
        default = inspect.Parameter.empty if spec.required else spec.default
        params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=spec.type))
    positional = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params if p.default is p.empty]
    rest = [p for p in params if p.default is not p.empty]
    backend = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=str | None)
    return inspect.Signature(positional + [backend] + rest + list(extra))


def convenience_function(algorithm_class: type, summary: str):
    """Build ``sft()``-style functions from the declaration: signature and docs are generated, not typed out."""
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
    train_fn.__signature__ = signature_from_config(algorithm_class.config_class)
    train_fn.__doc__ = f"{summary}\n\n{params_docstring(algorithm_class.config_class)}"
    return train_fn


def params_docstring(config_class: type) -> str:
    lines = ["Parameters", "----------", "backend : str, optional", "    Backend name (default: the first available)."]
    for spec in param_specs(config_class).values():
        default = "required" if spec.required else f"default {spec.default!r}"
        lines += [f"{spec.name} : {spec.type_name} ({default})", f"    {spec.doc}"]
    return "\n".join(lines)
