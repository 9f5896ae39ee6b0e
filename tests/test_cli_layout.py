"""Upstream's CLI layout: algorithms as top-level commands (`thub sft ...`), --version, usage with no arguments,
dotted paths for functions, strict coercion of config values; `train ALGO` stays as the alias."""

from __future__ import annotations

import argparse
import json

import pytest

from training_hub import AlgorithmRegistry, Backend, cli
from training_hub.cli import main


class Capture(Backend):
    seen: dict = {}

    def execute_training(self, algorithm_params):
        Capture.seen = dict(algorithm_params)
        return {"status": "success", "checkpoint_path": "x"}


REQUIRED = ["--model-path", "m", "--data-path", "d.jsonl", "--ckpt-output-dir", "out"]


def test_version_and_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("training-hub ")
    with pytest.raises(SystemExit) as info:
        main([])
    out = capsys.readouterr().out
    assert info.value.code == 1 and out.startswith("usage:")
    for command in ("sft", "osft", "lora-sft", "dpo", "list", "train", "demo"):
        assert f"    {command}" in out


def test_algorithm_command_calls_the_function_and_prints_json(clean_registry, capsys):
    AlgorithmRegistry.register_backend("sft", "capture", Capture)
    assert main(["sft", *REQUIRED, "--backend", "capture", "--num-epochs", "2"]) == 0
    assert Capture.seen["num_epochs"] == 2 and Capture.seen["model_path"] == "m"
    assert json.loads(capsys.readouterr().out) == {"status": "success", "checkpoint_path": "x"}


def test_underscore_spelling_and_train_alias_reach_the_same_call(clean_registry, capsys):
    AlgorithmRegistry.register_backend("lora_sft", "capture", Capture)
    main(["lora_sft", *REQUIRED, "--backend", "capture", "--lora-r", "8"])
    first = dict(Capture.seen)
    assert main(["train", "lora_sft", *REQUIRED, "--backend", "capture", "--lora-r", "8"]) == 0
    assert Capture.seen == first and first["lora_r"] == 8


def test_failures_exit_1_in_the_upstream_layout_and_2_under_train(clean_registry, capsys):
    with pytest.raises(SystemExit) as info:
        main(["osft"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "required: --model-path, --data-path, --ckpt-output-dir" in err
    with pytest.raises(SystemExit) as info:
        main(["sft", *REQUIRED, "--num_epoch", "3"])
    assert info.value.code == 1 and "did you mean 'num_epochs'" in capsys.readouterr().err
    assert main(["train", "sft", *REQUIRED, "--num_epoch", "3"]) == 2


def test_unexpected_error_is_one_line_unless_traceback_is_asked(clean_registry, monkeypatch, capsys):
    class Boom(Backend):
        def execute_training(self, algorithm_params):
            raise RuntimeError("kaboom")

    AlgorithmRegistry.register_backend("sft", "boom", Boom)
    with pytest.raises(SystemExit) as info:
        main(["sft", *REQUIRED, "--backend", "boom"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "error: kaboom" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["sft", "--traceback", *REQUIRED, "--backend", "boom"])
    assert "Traceback" in capsys.readouterr().err


def test_config_file_unknown_key_warns_with_a_hint(clean_registry, tmp_path, capsys):
    AlgorithmRegistry.register_backend("sft", "capture", Capture)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_path: m\ndata_path: d\nckpt_output_dir: o\nlearning_rate: 0.001\n")
    main(["sft", "--config", str(cfg), "--backend", "capture", "--learning-rate", "0.5"])
    assert Capture.seen["learning_rate"] == 0.5 and Capture.seen["model_path"] == "m"  # flags win over the file
    cfg.write_text("model_path: m\ndata_path: d\nckpt_output_dir: o\nlerning_rate: 0.001\n")
    with pytest.raises(SystemExit):
        main(["sft", "--config", str(cfg), "--backend", "capture"])
    err = capsys.readouterr().err
    assert "warning: config key 'lerning_rate'" in err and "did you mean 'learning_rate'" in err


def test_dotted_paths_resolve_or_say_why(monkeypatch):
    assert cli._resolve_dotted_path("os.path.join") is __import__("os").path.join
    with pytest.raises(ValueError):
        cli._resolve_dotted_path("nodot")
    with pytest.raises(ImportError, match="attribute lookup failed"):
        cli._resolve_dotted_path("json.nope")
    with pytest.raises(ImportError, match="no importable module prefix"):
        cli._resolve_dotted_path("no_such_module_xyz.f")
    with pytest.raises(ValueError, match="non-callable"):
        cli._callable_from_path("os.sep")


@pytest.mark.parametrize("value, spec, expected", [
    ("yes", {"type": bool}, True), (0, {"type": bool}, False), (2048.0, {"type": int}, 2048),
    (8, {"type": str}, "8"), ("q_proj", {"type": str, "nargs": "+"}, ["q_proj"]), ('{"a": 1}', {"json": True}, {"a": 1}),
])
def test_coerce_value_accepts(value, spec, expected):
    assert cli._coerce_value(value, spec) == expected


@pytest.mark.parametrize("value, spec", [
    ("maybe", {"type": bool}), (2, {"type": bool}), (True, {"type": int}), (2048.5, {"type": int}),
    (float("nan"), {"type": float}), ("-inf", {"type": float}), (True, {"type": float}),
])
def test_coerce_value_refuses(value, spec):
    with pytest.raises((ValueError, argparse.ArgumentTypeError)):
        cli._coerce_value(value, spec)


def test_coerce_value_from_a_declared_spec():
    from training_hub.config.algorithms import SFTConfig
    from training_hub.config.declare import param_specs

    specs = param_specs(SFTConfig)
    assert cli._coerce_value("3", specs["num_epochs"]) == 3
    with pytest.raises(ValueError):
        cli._coerce_value(True, specs["learning_rate"])
