"""The ``training-hub`` command. Flags of ``train`` are generated from each algorithm's declaration.

Boolean flags take an optional value: ``--resume``, ``--resume true``, ``--resume=false``, ``--no-resume``.
Paths in a ``--config`` YAML file are relative to the current directory, as on the command line.

Exit codes (every sub-command):

* 0 -- success.
* 1 -- a runtime failure: permission denied, no space left on device, a backend that cannot run on this machine,
  a model that cannot be fetched, training diverged (NaN/inf loss or gradient norm; the message names the step,
  learning rate and last good checkpoint).
* 2 -- a usage, parameter or data error: a bad flag or value, a stray positional value, an invalid or missing
  config file, a missing or wrong path (``ValueError``, ``FileNotFoundError``, ``NotADirectoryError``,
  ``IsADirectoryError``).
* 130 / 143 -- training stopped by Ctrl-C (SIGINT) / SIGTERM after saving its training state (``resume true``
  continues it); the result is printed first. 128 + the signal's number, as shells report it. A Ctrl-C before
  training started also exits 130.

These expected errors print one ``error: ...`` message and no traceback; ``--debug`` anywhere on the command
line shows the full traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import math
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from training_hub.config.declare import ParamSpec, param_specs
from training_hub.registry import AlgorithmRegistry


# ----------------------------------------------------------------------------------------------
# value parsing for generated flags


def _value_parser(spec: ParamSpec):
    """A converter from command-line text to the declared type (None/null accepted where optional)."""
    tp = spec.type
    args = typing.get_args(tp)
    optional = type(None) in args

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if _is_callable_type(tp):
            try:
                return _callable_from_path(text)
            except (ValueError, ImportError) as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        for candidate in _candidates(tp):
            try:
                return candidate(text)
            except (ValueError, json.JSONDecodeError, argparse.ArgumentTypeError):
                continue
        return text  # left as text: validation then reports it together with every other problem

    convert.__name__ = spec.type_name  # argparse shows this name in its errors
    return convert


def _candidates(tp: Any) -> list:
    """Converters to try, in order, for a (possibly union / Literal) declared type."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)

        def literal(text: str) -> Any:
            if text in choices:
                return text
            raise ValueError(text)
        return [literal]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        out: list = []
        for arg in typing.get_args(tp):
            if arg is not type(None):
                out.extend(_candidates(arg))
        return out
    if tp is bool:
        return [_parse_bool]
    if tp in (int, float, str):
        return [tp]
    if origin is dict or tp is dict:
        return [_json_dict]
    return [str]


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"cannot read {text!r} as a boolean; use true|false (or 1|0, yes|no, on|off)")


def _flag_to_python_name(flag: str) -> str:
    """``--learning-rate`` -> ``learning_rate``."""
    return flag.lstrip("-").replace("-", "_")


def _resolve_dotted_path(path: str) -> Any:
    """The object at ``package.module.attr[.attr...]``, for parameters that take a function (``reward_fn``, ...).

    The longest importable module prefix is imported, then the attributes are looked up. A prefix that is not a
    module tries a shorter one; a module that exists but fails to import (a missing dependency) raises its own
    error, and an attribute missing from a module that imported says so. A YAML file that names functions runs
    the code it names: only use config files you trust.
    """
    if not isinstance(path, str) or "." not in path:
        raise ValueError(f"cannot resolve {path!r}: expected a dotted path such as 'my_module.my_function'")
    parts = path.split(".")
    tried: ModuleNotFoundError | None = None
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(prefix)
        except ModuleNotFoundError as exc:
            if exc.name and (exc.name == prefix or prefix.startswith(exc.name + ".")):
                tried = exc  # this prefix is not a module: try a shorter one
                continue
            raise  # the module exists; something it imports does not
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError as exc:
            raise ImportError(f"cannot resolve {path!r}: module {prefix!r} imported but the attribute lookup failed "
                              f"({exc})") from exc
        return obj
    raise ImportError(f"cannot resolve {path!r}: no importable module prefix" + (f" ({tried})" if tried else ""))


def _callable_from_path(text: Any) -> Any:
    if not isinstance(text, str):
        raise ValueError(f"expected a dotted path such as 'my_module.my_function', got {type(text).__name__}")
    obj = _resolve_dotted_path(text)
    if not callable(obj):
        raise ValueError(f"{text!r} resolved to a non-callable {type(obj).__name__}")
    return obj


def _is_callable_type(tp: Any) -> bool:
    import collections.abc

    return any(typing.get_origin(a) is collections.abc.Callable or a is collections.abc.Callable
               for a in (tp, *typing.get_args(tp)))


def _is_bool(tp: Any) -> tuple[bool, bool]:
    """(is a bool flag, None is allowed) for ``bool`` and ``Optional[bool]``."""
    if tp is bool:
        return True, False
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType")) \
            and set(args) == {bool, type(None)}:
        return True, True
    return False, False


class _BoolFlag(argparse.Action):
    """``--flag`` (true), ``--flag VALUE`` / ``--flag=VALUE`` (true|false|1|0|yes|no|on|off), ``--no-flag`` (false).

    Replaces ``argparse.BooleanOptionalAction``, which takes no value: ``--resume false`` turned the flag *on*.
    """

    def __init__(self, option_strings, dest, optional: bool = False, **kwargs):
        self.optional = optional
        names = list(option_strings)
        names += [f"--no-{name[2:]}" for name in option_strings if name.startswith("--")]
        super().__init__(names, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                raise argparse.ArgumentError(self, f"{option_string} takes no value, got {values!r}")
            setattr(namespace, self.dest, False)
            return
        if values is None:
            setattr(namespace, self.dest, True)
            return
        if self.optional and values.lower() in ("none", "null"):
            setattr(namespace, self.dest, None)
            return
        try:
            setattr(namespace, self.dest, _parse_bool(values))
        except argparse.ArgumentTypeError:
            valid = "true|false (or 1|0, yes|no, on|off" + (", none)" if self.optional else ")")
            raise argparse.ArgumentError(self, f"invalid value {values!r}; expected {valid}") from None


def _json_dict(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a boolean flag as ``--flag [true|false], --no-flag`` (the negated spelling takes no value)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, _BoolFlag):
            names = action.option_strings
            plain = [n for n in names if not n.startswith("--no-")]
            return ", ".join([*(f"{n} [{action.metavar}]" for n in plain), *(n for n in names if n not in plain)])
        return super()._format_action_invocation(action)


def _is_list(tp: Any) -> bool:
    return any(typing.get_origin(a) is list or a is list for a in (tp, *typing.get_args(tp)))


def add_declared_flags(parser: argparse.ArgumentParser, config_class: type) -> None:
    """One flag per declared parameter, grouped as declared, with the declared doc as help."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in param_specs(config_class).values():
        if not spec.cli:
            continue
        group = groups.setdefault(spec.group, parser.add_argument_group(spec.group))
        flags = [f"--{spec.name.replace('_', '-')}"]  # --snake_case is accepted too, see _normalise_flags
        default_text = "required" if spec.required else f"default: {spec.default!r}"
        help_text = f"{spec.doc} [{spec.type_name}; {default_text}]".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": spec.name, "default": argparse.SUPPRESS, "help": help_text}
        is_bool, optional = _is_bool(spec.type)
        if is_bool:
            kwargs.update(action=_BoolFlag, optional=optional, metavar="true|false")
        elif _is_list(spec.type):
            kwargs.update(nargs="+", metavar="VALUE")
        else:
            kwargs["type"] = _value_parser(spec)
            literal_only = typing.get_origin(spec.type) is typing.Literal
            kwargs["metavar"] = "|".join(map(str, spec.choices)) if literal_only else spec.type_name.upper()
        group.add_argument(*flags, **kwargs)


# ----------------------------------------------------------------------------------------------
# sub-commands


def cmd_list(_: argparse.Namespace) -> int:
    rows = []
    for algo in AlgorithmRegistry.list_algorithms():
        status = AlgorithmRegistry.backend_status(algo)
        try:
            default = AlgorithmRegistry.default_backend(algo)
        except (ValueError, RuntimeError):
            default = None
        for backend, avail in status.items():
            mark = "yes" if avail else f"no: {avail.reason}"
            rows.append((algo, backend + (" (default)" if backend == default else ""), mark))
        if not status:
            rows.append((algo, "-", "no backend registered"))
    widths = [max(len(r[i]) for r in rows + [("algorithm", "backend", "runs here")]) for i in range(3)]
    for row in [("algorithm", "backend", "runs here"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _load_config_file(path: str, config_class: type | None = None, warn_unknown: str | None = None
                      ) -> dict[str, Any]:
    """The parameters of a YAML ``--config`` file; numbers PyYAML left as text are converted (see _yaml_number)
    and dotted paths become the functions they name where a function is declared. With ``warn_unknown`` (the
    algorithm's name) a key that is not one of its parameters is warned about on stderr and passed on."""
    import yaml

    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    if file.is_dir():
        raise IsADirectoryError(f"config file {path} is a directory")
    text = file.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"config file {where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of parameter names to values, "
                         f"got {type(data).__name__}")
    params = {str(k).replace("-", "_"): v for k, v in data.items()}
    specs = param_specs(config_class) if config_class is not None else {}
    out = {}
    for key, value in params.items():
        spec = specs.get(key)
        if spec is None:
            if warn_unknown and key != "backend":
                import difflib

                close = difflib.get_close_matches(key, list(specs), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                print(f"warning: config key '{key}' in {path} is not a parameter of '{warn_unknown}'{hint}; "
                      "passing it on", file=sys.stderr)
            out[key] = value
        elif _is_callable_type(spec.type) and isinstance(value, str):
            try:
                out[key] = _callable_from_path(value)
            except (ValueError, ImportError) as exc:
                raise UsageError(f"invalid value for '{key}' in config {path}: {exc}") from None
        else:
            out[key] = _yaml_number(value, spec.type)
    return out


def _load_yaml_config(path: str) -> dict[str, Any]:
    """A YAML config file as a dict (upstream's helper): exits with code 1 and one ``error:`` line if it is missing,
    unreadable, not YAML or not a mapping."""
    try:
        return _load_config_file(path)
    except (ValueError, OSError) as exc:
        print(f"error: {_describe(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


def _coerce_value(value: Any, spec: Any) -> Any:
    """A config or flag value as the parameter's type, strictly: a YAML ``true`` is not the integer 1, ``2048.5``
    is not an integer, NaN is not a learning rate. ``spec`` is a ParamSpec or upstream's flag description (a dict
    with ``type`` and optionally ``nargs``, ``json``, ``callable``). Raises ValueError (or ImportError for a
    dotted path that does not resolve)."""
    if isinstance(spec, ParamSpec):
        tp = spec.type
        spec = {"type": _plain_type(tp), "callable": _is_callable_type(tp), **({"nargs": "+"} if _is_list(tp) else {}),
                "json": typing.get_origin(tp) is dict or tp is dict}
    if value is None:
        return None
    if spec.get("callable"):
        return _callable_from_path(value)
    if spec.get("json"):
        return json.loads(value) if isinstance(value, str) else value
    kind = spec.get("type", str)
    if "nargs" in spec:
        return [_coerce_scalar(v, kind) for v in (value if isinstance(value, list) else [value])]
    return _coerce_scalar(value, kind)


def _coerce_scalar(value: Any, kind: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(value)
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"expected a boolean, got {value!r}")
    if kind in (int, float) and isinstance(value, bool):
        raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got the boolean {value!r}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    if kind is float:
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if kind is str:
        return value if isinstance(value, str) else str(value)
    return value if isinstance(value, kind) else kind(value)


def _plain_type(tp: Any) -> Any:
    """The one concrete scalar type of a declared type (Optional[int] -> int, list[str] -> str), else str."""
    for arg in (tp, *typing.get_args(tp)):
        if arg in (bool, int, float, str):
            return arg
        if typing.get_origin(arg) is list and typing.get_args(arg):
            return _plain_type(typing.get_args(arg)[0])
    return str


def _yaml_number(value: Any, tp: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-4`` (no dot) as the string '1e-4': convert a string to the declared int/float.

    Only where the declared type admits int or float and not str (nor the string as a Literal choice); a string
    that does not parse is left for validation to report.
    """
    if not isinstance(value, str):
        return value
    members = set(typing.get_args(tp)) if typing.get_origin(tp) in (
        typing.Union, getattr(__import__("types"), "UnionType")) else {tp}
    if str in members or value in _literal_args(members):
        return value
    for number in (int, float):
        if number in members:
            try:
                return number(value)
            except ValueError:
                continue
    return value


def _literal_args(members: set) -> tuple:
    return tuple(a for m in members if typing.get_origin(m) is typing.Literal for a in typing.get_args(m))


def cmd_train(argv: Sequence[str]) -> int:
    """``training-hub train ALGORITHM [flags]``: the alias of ``training-hub ALGORITHM`` with our finer exit codes
    (2 for a usage, parameter or data error) and ``key: value`` result lines."""
    algorithms = AlgorithmRegistry.list_algorithms()
    if not argv or argv[0].startswith("-"):
        print(f"usage: training-hub train ALGORITHM [--help] [flags]\nalgorithms: {', '.join(algorithms)}",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    params, backend = _algorithm_call(name, argv[1:], prog=f"training-hub train {name}")
    from training_hub.algorithms.base import run_algorithm

    result = run_algorithm(name, backend, params)  # no backend named: the first that takes this call
    _print_result(result)
    return stopped_exit_code(result)


def _byte_count(text: str) -> int:
    """``--gpu-memory``: bytes, or a number with GB/GiB/MB/MiB (80GB = 80 * 10**9, 80GiB = 80 * 2**30)."""
    units = {"gib": 2**30, "gb": 10**9, "mib": 2**20, "mb": 10**6, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(lowered)


def cmd_plan(argv: Sequence[str]) -> int:
    """``training-hub plan ALGORITHM [train's flags] [--json] [--gpu NAME] [--gpu-memory SIZE]``: the steps, memory
    per device and time of the run those flags would start (``training_hub.plan``), without training."""
    options = argparse.ArgumentParser(prog="training-hub plan ALGORITHM", add_help=False, allow_abbrev=False)
    options.add_argument("--json", action="store_true", help="print the plan as JSON")
    options.add_argument("--gpu", help="estimate time for this GPU (e.g. H100) from its peak FLOP/s")
    options.add_argument("--utilization", type=float, help="share of the GPU's peak FLOP/s (default 0.35)")
    options.add_argument("--gpu-memory", type=_byte_count, help="memory per device to check the plan against "
                                                                "(bytes, or e.g. 80GiB; default: free CUDA memory)")
    options.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                         help="do not time steps of the run here (no time estimate without --gpu)")
    if not argv or argv[0].startswith("-"):
        print("usage: training-hub plan ALGORITHM [--json] [--gpu NAME] [--utilization F] [--gpu-memory SIZE] "
              "[--no-calibrate] [train ALGORITHM's flags]\nalgorithms: sft, osft, lora_sft, dpo", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0].replace("-", "_")
    known, rest = options.parse_known_args(_normalise_flags(argv[1:]))
    params, backend = _algorithm_call(name, rest, prog=f"training-hub plan {name}")
    from training_hub.planning import plan

    result = plan(name, gpu=known.gpu, utilization=known.utilization, gpu_memory=known.gpu_memory,
                  calibrate=known.calibrate, backend=backend, **params)
    print(json.dumps(result.to_dict(), indent=2, default=str) if known.json else result)
    return 0


def cmd_algorithm(name: str, argv: Sequence[str]) -> int:
    """``thub ALGORITHM [--config FILE.yaml] [flags]`` (upstream's layout): a missing required parameter is named
    before anything runs; the algorithm's own function is called (``training_hub.algorithms.<module>``); a dict
    result is printed as JSON."""
    params, backend = _algorithm_call(name, argv, prog=f"thub {name.replace('_', '-')}")
    config_class = getattr(AlgorithmRegistry.get_algorithm(name), "config_class", None)
    missing = [f"--{spec.name.replace('_', '-')}" for spec in param_specs(config_class).values()
               if spec.required and params.get(spec.name) is None]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (as flags, or in a YAML "
                         "file given with --config)")
    result = _algorithm_function(name)(**params, **({"backend": backend} if backend else {}))
    if isinstance(result, dict) or hasattr(result, "keys"):
        print(json.dumps(dict(result), indent=2, default=str))  # lazy keys (a model) are not loaded to print
    elif result is not None:
        print(result)
    return stopped_exit_code(result)


class UsageError(ValueError):
    """A command line that cannot run as given (exit code 2, or 1 in upstream's layout)."""


def _algorithm_function(name: str):
    """The convenience function of a built-in algorithm, looked up where upstream keeps it (its module, by name),
    so that the call goes through the same function a Python user calls; a registered algorithm without one runs
    through the registry."""
    algorithm_class = AlgorithmRegistry.get_algorithm(name)
    module = importlib.import_module(_MODULES.get(name, algorithm_class.__module__))
    function = getattr(module, name, None)
    if callable(function):
        return function
    from training_hub.algorithms.base import run_algorithm

    return lambda backend=None, **params: run_algorithm(name, backend, params)


# Upstream's module for each algorithm where ours lives elsewhere (its CLI and tests import these paths).
_MODULES = {"lora_sft": "training_hub.algorithms.lora", "grpo": "training_hub.algorithms.lora_grpo",
            "lora_grpo": "training_hub.algorithms.lora_grpo", "embedding_sft": "training_hub.algorithms.embedding_sft"}


def _algorithm_call(name: str, argv: Sequence[str], prog: str) -> tuple[dict[str, Any], str | None]:
    """The parameters of one algorithm's command line (a ``--config`` YAML file, then the flags over it) and the
    backend it names. Unknown flags and config keys are passed on, so validation names them with a hint."""
    algorithm_class = AlgorithmRegistry.get_algorithm(name)
    config_class = getattr(algorithm_class, "config_class", None)
    if config_class is None:
        raise UsageError(f"algorithm '{name}' declares no parameters for the command line; call it from Python")
    parser = argparse.ArgumentParser(
        prog=prog, description=(algorithm_class.__doc__ or "").strip(), allow_abbrev=False,
        formatter_class=_HelpFormatter,
        usage=f"{prog} [--config FILE.yaml] [--backend NAME] --model-path PATH "
              "--data-path PATH --ckpt-output-dir DIR [--PARAMETER VALUE ...]")
    parser.add_argument("--config", help="YAML file of parameters; flags given here override it.")
    parser.add_argument("--backend", help=f"Backend ({', '.join(AlgorithmRegistry.list_backends(name))}; "
                                          "default: first available).")
    add_declared_flags(parser, config_class)
    known, unknown = parser.parse_known_args(_normalise_flags(argv))
    extra_params, stray = _unknown_flags(unknown)
    if stray:
        parser.error(f"unexpected value(s) {' '.join(map(repr, stray))}: not after a flag that takes them "
                     "(a flag takes one value unless it is a list)")
    ns = vars(known)
    config_path, backend = ns.pop("config", None), ns.pop("backend", None)
    from_file = _load_config_file(config_path, config_class, warn_unknown=name) if config_path else {}
    params = {**from_file, **ns, **extra_params}
    return params, backend or params.pop("backend", None)


def stopped_exit_code(result: Any) -> int:
    """0, or 128 + the signal that stopped the run (it saved its state: 130 for Ctrl-C, 143 for SIGTERM)."""
    get = result.get if isinstance(result, dict) or hasattr(result, "get") else (lambda *_: None)
    if get("status") != "stopped":
        return 0
    import signal

    name = (get("metrics") or {}).get("stopped_by") or "SIGTERM"
    return 128 + int(getattr(signal, name, signal.SIGTERM))


def _normalise_flags(argv: Sequence[str]) -> list[str]:
    """Accept --snake_case spellings of every flag (the Python parameter names) as well as --kebab-case."""
    out = []
    for token in argv:
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            token = flag.replace("_", "-") + eq + value
        out.append(token)
    return out


def _unknown_flags(tokens: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Unrecognised --flags become parameters, so validation names them with a did-you-mean hint.

    Returns those parameters and the stray values: tokens that are neither a flag nor the value of one.
    """
    params: dict[str, Any] = {}
    stray: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and len(token) > 2:
            flag, eq, value = token.partition("=")
            if not eq and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value, i = tokens[i + 1], i + 1
            params[flag[2:].replace("-", "_")] = value if (eq or value) else True
        else:
            stray.append(token)
        i += 1
    return params, stray


def _print_result(result: Any) -> None:
    if isinstance(result, dict) or hasattr(result, "keys"):
        for key in result:
            print(f"{key}: {json.dumps(result[key], default=str)}")
    else:
        print(result)


def cmd_make_tiny_model(ns: argparse.Namespace) -> int:
    from training_hub.tiny import make_tiny_model

    path = make_tiny_model(ns.dir, arch=ns.arch, hidden_size=ns.hidden_size, num_layers=ns.num_layers,
                           vocab_size=ns.vocab_size)
    print(f"tiny model saved to {path}")
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from training_hub.demo import run_demo

    return run_demo(ns.output_dir)


def cmd_plot(ns: argparse.Namespace) -> int:
    from training_hub.plot import plot_loss

    print(f"wrote {plot_loss(ns.runs, ns.output, labels=ns.labels, ema=ns.ema, metrics_file=ns.metrics_file)}")
    return 0


def cmd_merge(ns: argparse.Namespace) -> int:
    from training_hub.lora_merge import merge_adapter

    out = merge_adapter(ns.adapter_dir, ns.out_dir, base_model_path=ns.base_model_path, dtype=ns.dtype,
                        overwrite=ns.overwrite)
    print(f"merged checkpoint written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from training_hub import __version__

    invoked = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(
        prog=invoked if invoked in ("thub", "training-hub") else "thub", description="LLM post-training in one call. `thub` and `training-hub` are the same program.",
        epilog="Exit codes: 0 success; an algorithm command exits 1 on any failure (upstream's layout), other "
               "commands and `train ALGORITHM` exit 1 for a runtime failure and 2 for a usage/parameter/data "
               "error; 130/143 when Ctrl-C/SIGTERM stopped a run after it saved its state.")
    parser.add_argument("--version", action="version", version=f"training-hub {__version__}")
    parser.add_argument("--debug", "--traceback", action="store_true",
                        help="show the full traceback of an error (anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in AlgorithmRegistry.list_algorithms():
        doc = (AlgorithmRegistry.get_algorithm(name).__doc__ or "").strip().splitlines()
        sub.add_parser(name.replace("_", "-"), add_help=False, help=doc[0] if doc else name)
    sub.add_parser("list", help="Algorithms, their backends and whether each can run here.")
    sub.add_parser("train", help="Alias: train ALGORITHM [flags] is `thub ALGORITHM [flags]` with exit code 2 for "
                                 "usage/parameter/data errors.", add_help=False)
    sub.add_parser("plan", help="Plan ALGORITHM [train's flags] [--json]: steps, memory per device and time of "
                                "that run, without training.", add_help=False)
    tiny = sub.add_parser("make-tiny-model", help="Build a tiny random model + tokenizer offline.")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=["qwen2", "llama", "bert"], default="qwen2",
                      help="qwen2/llama: a causal chat model; bert: a text encoder (e.g. for embedding_sft)")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--num-layers", type=int, default=2)
    tiny.add_argument("--vocab-size", type=int, default=1024)
    demo = sub.add_parser("demo", help="Build the tiny model, train it on the bundled data, show before/after.")
    demo.add_argument("--output-dir", default="demo_output")
    plot = sub.add_parser("plot", help="Draw the loss curves of one or more runs (their metrics.jsonl) to a PNG.")
    plot.add_argument("runs", nargs="+", help="ckpt_output_dir of each run (or its metrics.jsonl)")
    plot.add_argument("-o", "--output", help="PNG to write (default: loss_plot.png in the first run's folder)")
    plot.add_argument("--labels", nargs="+", help="legend label for each run (default: folder names)")
    plot.add_argument("--ema", action="store_true", help="overlay an exponential moving average of each curve")
    plot.add_argument("--metrics-file", help="metrics file name inside each run (default: found automatically)")
    merge = sub.add_parser("merge", help="Merge a LoRA adapter into its base model: a plain HF checkpoint.")
    merge.add_argument("adapter_dir")
    merge.add_argument("out_dir")
    merge.add_argument("--base-model-path", help="base model (default: the one recorded in adapter_config.json)")
    merge.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    merge.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
    return parser


_DEBUG_FLAGS = ("--debug", "--traceback")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code. An algorithm command (upstream's layout, ``thub sft ...``) raises
    ``SystemExit(1)`` on any failure instead, and no command at all prints the usage and raises ``SystemExit(1)``,
    as upstream's CLI does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = any(token in _DEBUG_FLAGS for token in argv)
    argv = [token for token in argv if token not in _DEBUG_FLAGS]
    algorithm = _algorithm_named(argv[0]) if argv else None
    try:
        code = _dispatch(argv, algorithm)
    except KeyboardInterrupt:  # before training started (a run saves its state on the first Ctrl-C and returns)
        if debug:
            raise
        print("interrupted (Ctrl-C); a run that had started saved its training state, resume with --resume true",
              file=sys.stderr)
        code = 130
    except Exception as exc:
        code = _expected_error_code(exc)
        if algorithm is None and (code is None or debug):  # a bug (or asked for): the full traceback
            raise
        if debug:
            import traceback

            traceback.print_exc()
        print(f"error: {_describe(exc)}", file=sys.stderr)
        if code is None:  # upstream's layout reports every failure in one line; the traceback is one flag away
            print("(run again with --traceback for the full traceback)", file=sys.stderr)
            code = 1
    if algorithm is not None and code:
        raise SystemExit(1 if code == 2 else code)
    return code


def _algorithm_named(token: str) -> str | None:
    name = token.replace("-", "_")
    return name if not token.startswith("-") and name in AlgorithmRegistry.list_algorithms() else None


def _dispatch(argv: list[str], algorithm: str | None) -> int:
    if algorithm is not None:
        return cmd_algorithm(algorithm, argv[1:])
    if argv and argv[0] == "train":
        return cmd_train(argv[1:])
    if argv and argv[0] == "plan":
        return cmd_plan(argv[1:])
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stdout)
        raise SystemExit(1)
    ns = parser.parse_args(argv)
    handlers = {"list": cmd_list, "make-tiny-model": cmd_make_tiny_model, "demo": cmd_demo, "plot": cmd_plot,
                "merge": cmd_merge}
    return handlers[ns.command](ns)


def _expected_error_code(exc: BaseException) -> int | None:
    """The exit code of an error the user can fix (2: usage/parameters/data/paths, 1: environment); None: a bug."""
    if isinstance(exc, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return 2
    if isinstance(exc, PermissionError) or (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
        return 1
    from training_hub.engine.run import TrainingDivergedError
    from training_hub.registry import BackendUnavailableError

    if isinstance(exc, (TrainingDivergedError, BackendUnavailableError)):
        return 1
    if type(exc) is OSError and exc.errno is None:  # transformers' own message, e.g. a Hub model it cannot fetch
        return 1
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" while writing {exc.filename}" if exc.filename else ""
        return f"no space left on device{where}: free some space or write somewhere else"
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        paths = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        return f"{exc.strerror}: {paths}"
    return str(exc) or type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
