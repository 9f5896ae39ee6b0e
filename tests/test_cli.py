"""The training-hub command: list, generated train flags, YAML config with flag overrides."""

from __future__ import annotations

import re

import pytest

from training_hub import AlgorithmRegistry, Availability, Backend
from training_hub.cli import main
from training_hub.config.declare import param_specs
from training_hub.algorithms.sft import SFTConfig


class Capture(Backend):
    seen: dict = {}

    def execute_training(self, algorithm_params):
        Capture.seen = dict(algorithm_params)
        return {"status": "success", "checkpoint_path": "x"}


class NoGo(Backend):
    @classmethod
    def is_available(cls):
        return Availability(False, "needs CUDA")

    def execute_training(self, algorithm_params):  # pragma: no cover
        raise AssertionError


def test_list_shows_availability_and_reason(clean_registry, capsys):
    AlgorithmRegistry.register_backend("sft", "nogo", NoGo)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"sft +native \(default\) +yes", out)
    assert re.search(r"sft +instructlab-training +no: .*(CUDA|pip install)", out)
    assert "nogo" in out and "no: needs CUDA" in out


def test_train_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "sft", "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for spec in param_specs(SFTConfig).values():
        if spec.cli:
            assert f"--{spec.name.replace('_', '-')}" in out
            assert " ".join(spec.doc.split()[:4]) in out


def test_config_file_with_flag_overrides(clean_registry, tmp_path, capsys):
    AlgorithmRegistry.register_backend("sft", "capture", Capture)
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_path: m\ndata_path: d.jsonl\nckpt_output_dir: out\nlearning_rate: 0.001\nnum_epochs: 4\n"
                   "lr_scheduler_kwargs: {min_lr_ratio: 0.1}\n")
    rc = main(["train", "sft", "--config", str(cfg), "--backend", "capture", "--num-epochs", "2",
               "--unmask_messages", "--max-grad-norm", "none", "--nproc-per-node", "auto"])
    assert rc == 0
    assert Capture.seen == {"model_path": "m", "data_path": "d.jsonl", "ckpt_output_dir": "out",
                            "learning_rate": 0.001, "num_epochs": 2, "lr_scheduler_kwargs": {"min_lr_ratio": 0.1},
                            "unmask_messages": True, "max_grad_norm": None, "nproc_per_node": "auto"}
    assert "status: \"success\"" in capsys.readouterr().out


def test_train_reports_all_flag_problems_at_once(clean_registry, capsys):
    AlgorithmRegistry.register_backend("sft", "capture", Capture)
    rc = main(["train", "sft", "--backend", "capture", "--model-path", "m", "--data-path", "d",
               "--learning-rate", "abc", "--num_epoch", "3", "--lr-scheduler", "cosin"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "ckpt_output_dir: required" in err
    assert "learning_rate: expected float, got 'abc'" in err
    assert "num_epoch: unknown parameter; did you mean 'num_epochs'?" in err
    assert "did you mean 'cosine'?" in err
