"""The extension contract: ``Algorithm`` and ``Backend`` ABCs, ``AlgorithmRegistry`` and ``create_algorithm``.

Kept to the letter of the "Extending the Framework" guide, plus:

* plugins declared as entry points in the group ``training_hub.plugins`` load on the first registry query;
* unknown names raise ``ValueError`` listing the valid names and the closest match;
* a backend may implement ``is_available()``; when no backend is named, the algorithm's preference order
  picks the first available one.
"""

from __future__ import annotations

import importlib
import logging
import types
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Dict, Type

from training_hub.config.declare import closest

logger = logging.getLogger("training_hub")

PLUGIN_GROUP = "training_hub.plugins"


class Backend(ABC):
    """A training engine adapter. Receives the algorithm's parameters as a plain dict."""

    @abstractmethod
    def execute_training(self, algorithm_params: Dict[str, Any]) -> Any:
        """Execute training with the given parameters."""

    @classmethod
    def is_available(cls) -> "Availability":
        """Whether this backend can run on this machine; override to say why not."""
        return Availability(True)


class Algorithm(ABC):
    """A training algorithm: validates parameters and delegates to a backend."""

    @abstractmethod
    def train(self, **kwargs) -> Any:
        """Execute the training algorithm."""

    @abstractmethod
    def get_required_params(self) -> Dict[str, Type]:
        """Return required parameter names and types."""

    @abstractmethod
    def get_optional_params(self) -> Dict[str, Type]:
        """Return optional parameter names and types."""


class BackendUnavailableError(RuntimeError):
    """The backend asked for (or every backend of an algorithm) cannot run on this machine; the message says why and
    which backends can."""


@dataclass(frozen=True)
class Availability:
    """Result of ``Backend.is_available()``: truthy when the backend can run; ``reason`` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def backend_availability(backend_cls: type) -> Availability:
    """Ask a backend class whether it can run here. Backends without the check count as available.

    Third-party backends may return a bool, ``None`` (available) or a string (the reason it is not).
    """
    check = getattr(backend_cls, "is_available", None)
    if check is None:
        return Availability(True)
    try:
        answer = check()
    except Exception as exc:  # a broken check must not break listing; report it as the reason
        return Availability(False, f"is_available() raised {type(exc).__name__}: {exc}")
    if isinstance(answer, Availability):
        return answer
    if answer is None or answer is True:
        return Availability(True)
    if isinstance(answer, str):
        return Availability(False, answer)
    return Availability(bool(answer), "" if answer else "is_available() returned False")


def _unknown(kind: str, name: str, valid: list[str]) -> ValueError:
    hint = closest(name, valid)
    msg = f"Unknown {kind} '{name}'. Valid: {', '.join(sorted(valid)) or '(none registered)'}."
    if hint:
        msg += f" Did you mean '{hint}'?"
    return ValueError(msg)


class AlgorithmRegistry:
    """Registry of algorithms and their backends (class-level state, as in the guide)."""

    _algorithms: Dict[str, Type[Algorithm]] = {}
    _backends: Dict[str, Dict[str, Type[Backend]]] = {}
    _availability: Dict[type, Availability] = {}  # asked once per process; cleared when something registers
    _loaded = False
    _loading = False

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def _ensure_loaded(cls) -> None:
        """Register the built-ins, then the entry-point plugins, once, before the first use."""
        if cls._loaded or cls._loading:
            return
        cls._loading = True
        try:
            importlib.import_module("training_hub.builtins")
            load_plugins()
        finally:
            cls._loading = False
            cls._loaded = True

    @classmethod
    def _add_builtin(cls, name: str, algorithm_class: Type[Algorithm], backends: Dict[str, Type[Backend]]) -> None:
        """Register a built-in without triggering plugin loading (used while the built-ins import)."""
        cls._algorithms.setdefault(name, algorithm_class)
        for backend_name, backend_class in backends.items():
            cls._backends.setdefault(name, {}).setdefault(backend_name, backend_class)

    # -- the guide's six class methods -------------------------------------------------------
    @classmethod
    def register_algorithm(cls, name: str, algorithm_class: Type[Algorithm]) -> None:
        cls._ensure_loaded()
        if name in cls._algorithms and cls._algorithms[name] is not algorithm_class:
            logger.warning("Algorithm '%s' (%s) replaced by %s.", name,
                           _qualname(cls._algorithms[name]), _qualname(algorithm_class))
        cls._algorithms[name] = algorithm_class
        cls._backends.setdefault(name, {})
        cls.refresh_availability()

    @classmethod
    def register_backend(cls, algorithm_name: str, backend_name: str, backend_class: Type[Backend]) -> None:
        cls._ensure_loaded()
        if algorithm_name not in cls._algorithms:
            raise _unknown("algorithm", algorithm_name, list(cls._algorithms))
        backends = cls._backends.setdefault(algorithm_name, {})
        if backend_name in backends and backends[backend_name] is not backend_class:
            logger.warning("Backend '%s' of algorithm '%s' (%s) replaced by %s.", backend_name, algorithm_name,
                           _qualname(backends[backend_name]), _qualname(backend_class))
        backends[backend_name] = backend_class
        cls.refresh_availability()

    @classmethod
    def get_algorithm(cls, name: str) -> Type[Algorithm]:
        cls._ensure_loaded()
        if name not in cls._algorithms:
            raise _unknown("algorithm", name, list(cls._algorithms))
        return cls._algorithms[name]

    @classmethod
    def get_backend(cls, algorithm_name: str, backend_name: str) -> Type[Backend]:
        cls._ensure_loaded()
        cls.get_algorithm(algorithm_name)
        backends = cls._backends.get(algorithm_name, {})
        if backend_name not in backends:
            raise _unknown(f"backend for algorithm '{algorithm_name}'", backend_name, list(backends))
        return backends[backend_name]

    @classmethod
    def list_algorithms(cls) -> list[str]:
        cls._ensure_loaded()
        return list(cls._algorithms)

    @classmethod
    def list_backends(cls, algorithm_name: str) -> list[str]:
        cls._ensure_loaded()
        cls.get_algorithm(algorithm_name)
        return list(cls._backends.get(algorithm_name, {}))

    # -- beyond the guide --------------------------------------------------------------------
    @classmethod
    def availability(cls, backend_class: type) -> Availability:
        """Whether ``backend_class`` can run here: asked once per process (see :meth:`refresh_availability`)."""
        if backend_class not in cls._availability:
            cls._availability[backend_class] = backend_availability(backend_class)
        return cls._availability[backend_class]

    @classmethod
    def refresh_availability(cls) -> None:
        """Forget the availability answers (registering does this; so may a caller that installed a package)."""
        cls._availability.clear()

    @classmethod
    def backend_status(cls, algorithm_name: str) -> Dict[str, Availability]:
        """Every backend of an algorithm with whether it can run here (and why not)."""
        return {n: cls.availability(cls.get_backend(algorithm_name, n)) for n in cls.list_backends(algorithm_name)}

    @classmethod
    def backend_order(cls, algorithm_name: str) -> list[str]:
        """The algorithm's backends in its preference order, then in registration order."""
        algorithm_class = cls.get_algorithm(algorithm_name)
        names = cls.list_backends(algorithm_name)
        preferred = [n for n in getattr(algorithm_class, "backend_preference", ()) if n in names]
        return preferred + [n for n in names if n not in preferred]

    @classmethod
    def default_backend(cls, algorithm_name: str) -> str:
        """The first available backend in the algorithm's preference order, then in registration order."""
        order = cls.backend_order(algorithm_name)
        if not order:
            raise ValueError(f"Algorithm '{algorithm_name}' has no registered backend; "
                             f"register one with AlgorithmRegistry.register_backend('{algorithm_name}', NAME, cls).")
        status = cls.backend_status(algorithm_name)
        for name in order:
            if status[name]:
                return name
        reasons = "\n".join(f"  - {n}: {status[n].reason}" for n in order)
        raise BackendUnavailableError(f"No backend of '{algorithm_name}' can run on this machine:\n{reasons}")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def load_plugins() -> list[str]:
    """Load every entry point of the group ``training_hub.plugins``; returns the names that loaded.

    The value is a module (importing it registers) or a zero-argument callable (calling it registers).
    A plugin that fails produces a warning naming it and its error; the others still load.
    """
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            target = ep.load()
            if callable(target) and not isinstance(target, types.ModuleType):
                target()
            loaded.append(ep.name)
        except Exception as exc:
            warnings.warn(f"training_hub plugin '{ep.name}' ({ep.value}) failed to load: "
                          f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
    return loaded


def create_algorithm(algorithm_name: str, backend_name: str | None = None, **kwargs) -> Algorithm:
    """Instantiate ``algorithm_name`` with ``backend_name`` (default: the first available backend)."""
    algorithm_class = AlgorithmRegistry.get_algorithm(algorithm_name)
    if backend_name is None:
        backend_name = AlgorithmRegistry.default_backend(algorithm_name)
    backend_class = AlgorithmRegistry.get_backend(algorithm_name, backend_name)
    return algorithm_class(backend=backend_class(), **kwargs)
