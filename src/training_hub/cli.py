"""The ``training-hub`` command. Flags of ``train`` are generated from each algorithm's declaration."""

from __future__ import annotations

import argparse
import json
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
        for candidate in _candidates(tp):
            try:
                return candidate(text)
            except (ValueError, json.JSONDecodeError):
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


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _json_dict(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(text)
    return value


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
        if spec.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
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


def _load_config_file(path: str) -> dict[str, Any]:
    import yaml

    text = Path(path).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def cmd_train(argv: Sequence[str]) -> int:
    algorithms = AlgorithmRegistry.list_algorithms()
    if not argv or argv[0].startswith("-"):
        print(f"usage: training-hub train ALGORITHM [--help] [flags]\nalgorithms: {', '.join(algorithms)}",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    algorithm_class = AlgorithmRegistry.get_algorithm(name)
    config_class = getattr(algorithm_class, "config_class", None)
    if config_class is None:
        print(f"Algorithm '{name}' declares no parameters for the command line; call it from Python.", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog=f"training-hub train {name}", description=(algorithm_class.__doc__ or "").strip(), allow_abbrev=False,
        usage=f"training-hub train {name} [--config FILE.yaml] [--backend NAME] --model-path PATH "
              "--data-path PATH --ckpt-output-dir DIR [--PARAMETER VALUE ...]")
    parser.add_argument("--config", help="YAML file of parameters; flags given here override it.")
    parser.add_argument("--backend", help=f"Backend ({', '.join(AlgorithmRegistry.list_backends(name))}; "
                                          "default: first available).")
    add_declared_flags(parser, config_class)
    known, unknown = parser.parse_known_args(_normalise_flags(argv[1:]))
    ns = vars(known)
    config_path, backend = ns.pop("config", None), ns.pop("backend", None)
    params = {**(_load_config_file(config_path) if config_path else {}), **ns, **_unknown_flags(unknown)}
    backend = backend or params.pop("backend", None)
    from training_hub.algorithms.base import run_algorithm

    result = run_algorithm(name, backend, params)  # no backend named: the first that takes this call
    _print_result(result)
    return 0


def _normalise_flags(argv: Sequence[str]) -> list[str]:
    """Accept --snake_case spellings of every flag (the Python parameter names) as well as --kebab-case."""
    out = []
    for token in argv:
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            token = flag.replace("_", "-") + eq + value
        out.append(token)
    return out


def _unknown_flags(tokens: Sequence[str]) -> dict[str, Any]:
    """Unrecognised --flags become parameters, so validation names them with a did-you-mean hint."""
    params: dict[str, Any] = {}
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            flag, _, value = token.partition("=")
            params[flag[2:].replace("-", "_")] = value or (tokens[i + 1] if i + 1 < len(tokens) else True)
    return params


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
    parser = argparse.ArgumentParser(prog="training-hub", description="LLM post-training in one call.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="Algorithms, their backends and whether each can run here.")
    sub.add_parser("train", help="Train: training-hub train ALGORITHM --model-path ... (see train ALGORITHM --help).",
                   add_help=False)
    tiny = sub.add_parser("make-tiny-model", help="Build a tiny random model + tokenizer offline.")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=["qwen2", "llama"], default="qwen2")
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        try:
            return cmd_train(argv[1:])
        except ValueError as exc:  # parameter and data errors: print them, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
    ns = build_parser().parse_args(argv)
    handlers = {"list": cmd_list, "make-tiny-model": cmd_make_tiny_model, "demo": cmd_demo, "plot": cmd_plot,
                "merge": cmd_merge}
    return handlers[ns.command](ns)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
