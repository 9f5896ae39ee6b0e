"""The training-hub command's error handling: boolean flag values, stray values, YAML config files, exit codes."""

from __future__ import annotations

import errno
import importlib
import inspect
import re

import pytest

import training_hub.cli as cli
from training_hub.cli import main

REQUIRED = ["--model-path", "m", "--data-path", "d.jsonl", "--ckpt-output-dir", "out"]


def _patch_run(monkeypatch, replacement):
    """Replace run_algorithm where the CLI looks it up: at module level, or in the module cmd_train imports it from."""
    if hasattr(cli, "run_algorithm"):
        monkeypatch.setattr(cli, "run_algorithm", replacement)
    else:
        module = re.search(r"from ([\w.]+) import [^\n]*\brun_algorithm\b", inspect.getsource(cli.cmd_train)).group(1)
        monkeypatch.setattr(importlib.import_module(module), "run_algorithm", replacement)


@pytest.fixture
def fake_run(monkeypatch):
    """Record the call instead of training."""
    seen: dict = {}

    def run_algorithm(name, backend, params):
        seen.update(name=name, backend=backend, params=dict(params))
        return {"status": "success"}

    _patch_run(monkeypatch, run_algorithm)
    return seen


def _train(*flags: str) -> list[str]:
    return ["train", "sft", *REQUIRED, *flags]


# ---- boolean flags take explicit values ------------------------------------------------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--resume"], True),
    (["--resume", "true"], True),
    (["--resume", "false"], False),
    (["--resume=false"], False),
    (["--resume=True"], True),
    (["--resume", "0"], False),
    (["--no-resume"], False),
    (["--no_resume"], False),
    (["--resume", "false", "--num-epochs", "2"], False),
])
def test_boolean_flag_values(fake_run, flags, expected):
    assert main(_train(*flags)) == 0
    assert fake_run["params"]["resume"] is expected


def test_optional_boolean_flag_takes_none(fake_run):
    assert main(["train", "lora_sft", *REQUIRED, "--bf16", "none", "--tf32", "false", "--fp16"]) == 0
    params = fake_run["params"]
    assert params["bf16"] is None and params["tf32"] is False and params["fp16"] is True


def test_bad_boolean_value_names_the_flag_and_valid_values(fake_run, capsys):
    with pytest.raises(SystemExit) as info:
        main(_train("--resume", "maybe"))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "'maybe'" in err and "true|false" in err
    assert "params" not in fake_run


def test_negated_flag_takes_no_value(fake_run, capsys):
    with pytest.raises(SystemExit) as info:
        main(_train("--no-resume", "false"))
    assert info.value.code == 2
    assert "--no-resume takes no value" in capsys.readouterr().err


# ---- stray values, unknown flags -------------------------------------------------------------------------------


def test_stray_positional_value_is_an_error(fake_run, capsys):
    with pytest.raises(SystemExit) as info:
        main(_train("--num-epochs", "3", "4"))
    assert info.value.code == 2
    assert "unexpected value(s) '4'" in capsys.readouterr().err
    assert "params" not in fake_run


def test_unknown_flag_keeps_its_value_and_did_you_mean(capsys):
    assert main(_train("--num_epoch", "3", "--learning-rate", "1e-5")) == 2
    err = capsys.readouterr().err
    assert "num_epoch: unknown parameter; did you mean 'num_epochs'?" in err
    assert "Traceback" not in err


def test_unknown_flags_followed_by_flags_are_true(fake_run):
    assert main(_train("--foo", "--bar=2", "--baz", "x")) == 0
    assert {k: fake_run["params"][k] for k in ("foo", "bar", "baz")} == {"foo": True, "bar": "2", "baz": "x"}


# ---- YAML config files -----------------------------------------------------------------------------------------


def test_yaml_numbers_read_as_text_are_converted_by_declared_type(fake_run, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 1e-4\nnum_epochs: '3'\nmax_grad_norm: 1e0\nnproc_per_node: auto\n"
                   "warmup_steps: 1e2\nmodel_path: '123'\n")
    assert main(["train", "sft", "--config", str(cfg), "--data-path", "d", "--ckpt-output-dir", "o"]) == 0
    params = fake_run["params"]
    assert params["learning_rate"] == 1e-4 and isinstance(params["learning_rate"], float)
    assert params["num_epochs"] == 3 and params["max_grad_norm"] == 1.0
    assert params["nproc_per_node"] == "auto"
    assert params["warmup_steps"] == "1e2"  # not an int: left for validation to report
    assert params["model_path"] == "123"  # declared str: untouched


def test_flags_still_override_the_yaml_file(fake_run, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: 1e-4\nresume: true\n")
    assert main(_train("--config", str(cfg), "--learning-rate", "2e-5", "--resume", "false")) == 0
    assert fake_run["params"]["learning_rate"] == 2e-5 and fake_run["params"]["resume"] is False


def test_yaml_syntax_error_names_file_and_line(fake_run, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rate: 1e-4\nnum_epochs: 3\nlr_scheduler_kwargs: {min_lr_ratio: 0.1\nseed: 1\n")
    assert main(_train("--config", str(cfg))) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and re.search(r"line [45]\b", err) and "invalid YAML" in err
    assert "Traceback" not in err and err.count("\n") == 1 + err.strip().count("\n")


def test_missing_config_file_is_named(fake_run, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(_train("--config", str(missing))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "not found" in err


def test_yaml_that_is_not_a_mapping_is_named(fake_run, tmp_path, capsys):
    cfg = tmp_path / "list.yaml"
    cfg.write_text("- learning_rate: 1e-4\n")
    assert main(_train("--config", str(cfg))) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "expected a mapping" in err and "list" in err


# ---- exit codes and tracebacks ---------------------------------------------------------------------------------


def _raiser(exc):
    def raise_it(*_args, **_kwargs):
        raise exc
    return raise_it


def test_no_space_left_says_so_with_the_path(monkeypatch, capsys):
    _patch_run(monkeypatch, _raiser(OSError(errno.ENOSPC, "No space left on device", "/some/path")))
    assert main(_train()) == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "/some/path" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--debug", "train", "sft", *REQUIRED], _train("--debug")])
def test_debug_shows_the_traceback(monkeypatch, argv):
    _patch_run(monkeypatch, _raiser(OSError(errno.ENOSPC, "No space left on device", "/some/path")))
    with pytest.raises(OSError) as info:
        main(argv)
    assert info.value.errno == errno.ENOSPC


def test_debug_shows_parameter_errors_too():
    with pytest.raises(ValueError, match="did you mean 'num_epochs'"):
        main(_train("--num_epoch", "3", "--debug"))


@pytest.mark.parametrize("command, argv", [
    ("cmd_list", ["list"]),
    ("cmd_make_tiny_model", ["make-tiny-model", "x"]),
    ("cmd_plot", ["plot", "runs/a"]),
    ("cmd_merge", ["merge", "a", "b"]),
    ("cmd_demo", ["demo"]),
])
@pytest.mark.parametrize("exc, code, text", [
    (ValueError("bad value for x"), 2, "error: bad value for x"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/put"), 2,
     "error: No such file or directory: /in/put"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/a/file"), 2, "error: Not a directory: /a/file"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/a/dir"), 2, "error: Is a directory: /a/dir"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), 1, "error: Permission denied: /root/x"),
    (OSError(errno.ENOSPC, "No space left on device", "/full/disk"), 1,
     "error: no space left on device while writing /full/disk"),
])
def test_every_subcommand_reports_expected_errors_without_traceback(monkeypatch, capsys, command, argv, exc,
                                                                    code, text):
    monkeypatch.setattr(cli, command, _raiser(exc))
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(text) and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(type(exc)):
        main(["--debug", *argv])


@pytest.mark.parametrize("exc", [RuntimeError("a bug"), KeyError("k"), OSError(errno.EIO, "I/O error")])
def test_unexpected_errors_keep_their_traceback(monkeypatch, exc):
    monkeypatch.setattr(cli, "cmd_list", _raiser(exc))
    with pytest.raises(type(exc)):
        main(["list"])
