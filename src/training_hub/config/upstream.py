"""Upstream Training Hub calls, accepted as they are.

"Upstream" in this code base means one thing: the original Training Hub API, whose scripts should run here
unchanged. Each upstream-only name is declared once, on its parameter (``param(..., upstream=translated(...))`` or
``upstream=ignored(...)``, see ``config/declare.py``), so validation, signatures, the CLI and the docs know it.
This module holds only what happens to those names, for the built-in algorithms:

* :func:`upstream_call` -- before validation: ``None`` means "the default" (upstream functions default every
  optional parameter to ``None``), ``nproc_per_node='gpu'`` means ``'auto'``, one callback becomes a list, an
  ``FSDPOptions`` object becomes a dict.
* :func:`fold_translated` -- after validation: a translated name sets its target when the target was not given.
* :func:`warn_ignored` -- once the backend is known: each ignored name produces one
  :class:`UpstreamParameterWarning` that says why, unless that backend gives it effect.

The user-facing table is ``docs/upstream-compatibility.md``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
import warnings
from typing import Any

from training_hub.config.declare import ParameterError, param_specs, validate_params
from training_hub.config.groups import fsdp_options_dict


class UpstreamParameterWarning(UserWarning):
    """An upstream parameter was accepted but has no effect here; the message says why."""


def _accepts_none(tp: Any) -> bool:
    return tp is Any or tp is type(None) or type(None) in typing.get_args(tp)


def upstream_call(params: dict[str, Any], config_class: type) -> dict[str, Any]:
    """The caller's parameters with upstream conventions resolved (see the module doc)."""
    specs = param_specs(config_class)
    out = {}
    for name, value in params.items():
        spec = specs.get(name)
        if value is None and spec is not None and not spec.required and not _accepts_none(spec.type):
            continue  # upstream: None = use the default
        if name == "nproc_per_node" and value == "gpu":
            value = "auto"
        if name == "fsdp_options" and value is not None and not isinstance(value, dict):
            try:  # an FSDPOptions object becomes a plain dict (it travels to launched workers as JSON)
                value = fsdp_options_dict(value)
            except ValueError:
                pass  # validation reports it
        if name == "callbacks" and value is not None and not isinstance(value, (list, tuple)):
            value = [value]
        out[name] = value
    return out


def validated_call(config_class: type, params: dict[str, Any], *, what: str) -> tuple[Any, list[str]]:
    """A call's typed config and the names a backend is to receive: upstream conventions (:func:`upstream_call`),
    validation (one ``ParameterError`` listing every problem), then the translated upstream names
    (:func:`fold_translated`). The one path from a plain dict to a config, for the algorithms and for backends
    called directly."""
    given = upstream_call(params, config_class)
    return fold_translated(validate_params(config_class, given, what=what), list(given), what=what)


def fold_translated(config: Any, given: set[str] | list[str], *, what: str) -> tuple[Any, list[str]]:
    """Apply the translated upstream names the caller gave; return (config, the names a backend is to receive).

    Those names are the given ones plus each translation's target, so a backend that rebuilds the config from the
    plain dict sees the translated values. A translation is skipped when its target was given too.
    """
    names = list(given)
    updates: dict[str, Any] = {}
    for name, spec in param_specs(type(config)).items():
        rule = spec.upstream
        if rule is None or not rule.translated or name not in given:
            continue
        if rule.target in given or rule.target in updates:
            continue
        value = rule.fold(config)  # one at a time: save_steps reads the effective_batch_size folded before it
        if value is not None:
            updates[rule.target] = value
            config = dataclasses.replace(config, **{rule.target: value})
    if updates:
        problems = config.checks()
        if problems:
            raise ParameterError(what, problems)
        names += [n for n in updates if n not in names]
    return config, names


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def handled(name: str, backend_cls: type) -> bool:
    """A backend lists in ``upstream_handles`` the upstream names it gives effect to on a CUDA machine (the trl
    backend: ``use_liger``; the instructlab-training and mini-trainer adapters, which run on CUDA only: theirs).
    ``upstream_needs`` maps a name to the module it also needs here (native and trl: ``use_liger`` needs
    ``liger_kernel``; the adapters' engines bring their own)."""
    module = getattr(backend_cls, "upstream_needs", {}).get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        return False
    return name in getattr(backend_cls, "upstream_handles", ()) and _cuda()


def ignored_names(config: Any, given: set[str] | list[str], backend_cls: type) -> dict[str, str]:
    """The given upstream names that have no effect with ``backend_cls``, each with why."""
    out = {}
    for name, spec in param_specs(type(config)).items():
        rule = spec.upstream
        if rule is None or rule.translated or name not in given:
            continue
        if rule.ignored_when(getattr(config, name)) and not handled(name, backend_cls):
            out[name] = rule.why
    return out


def warn_ignored(config: Any, given: set[str] | list[str], backend_cls: type, stacklevel: int = 4) -> None:
    """One :class:`UpstreamParameterWarning` per given upstream name that has no effect with ``backend_cls``."""
    for name, why in ignored_names(config, given, backend_cls).items():
        warnings.warn(f"{name}={getattr(config, name)!r} is ignored: {why}.", UpstreamParameterWarning,
                      stacklevel=stacklevel)
