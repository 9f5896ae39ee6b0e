"""Experiment loggers from the shared logging parameters write their files on a short native run; a missing
package is a clear error naming the extra."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def chat_path(tmp_path_factory):
    from training_hub.tiny import demo_data_path

    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("\n".join(demo_data_path().read_text().splitlines()[:8]) + "\n")
    return path


def run(model, data, out, **logging):
    from training_hub import sft

    result = sft(str(model), str(data), str(out), max_seq_len=256, effective_batch_size=4, max_steps=2,
                 learning_rate=1e-3, disable_progress_bar=True, save_final_checkpoint=False, **logging)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and result.metrics["steps"] == 2
    return losses


def test_tensorboard_event_files(tiny_model_dir, chat_path, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install 'training-hub[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = run(tiny_model_dir, chat_path, tmp_path / "out", tensorboard_log_dir=str(tmp_path / "tb"))
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx(losses, rel=1e-6)


def test_mlflow_local_file_store(tiny_model_dir, chat_path, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'training-hub[mlflow]')")

    uri = (tmp_path / "mlruns").as_uri()  # file:// store: no server
    losses = run(tiny_model_dir, chat_path, tmp_path / "out", mlflow_tracking_uri=uri,
                 mlflow_experiment_name="th-test", mlflow_run_name="tiny")
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run_info,) = client.search_runs([client.get_experiment_by_name("th-test").experiment_id])
    assert run_info.info.run_name == "tiny" and run_info.info.status == "FINISHED"
    history = client.get_metric_history(run_info.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2] and [m.value for m in history] == pytest.approx(losses)
    assert run_info.data.params["learning_rate"] == "0.001"


def test_wandb_offline(tiny_model_dir, chat_path, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'training-hub[wandb]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    run(tiny_model_dir, chat_path, out, wandb_project="th-test", wandb_run_name="tiny")
    (run_dir,) = list((out / "wandb").glob("offline-run-*"))
    assert list(run_dir.glob("run-*.wandb"))


def test_missing_package_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from training_hub.algorithms.sft import SFTConfig
    from training_hub.integrations.loggers import MissingIntegrationError, build_loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    config = SFTConfig(model_path="m", data_path="d", ckpt_output_dir=str(tmp_path), mlflow_tracking_uri="file:///x")
    with pytest.raises(MissingIntegrationError, match=r"mlflow_tracking_uri is set, but the 'mlflow' package is not "
                                                      r"installed: pip install 'training-hub\[mlflow\]'"):
        build_loggers(config)
    assert not build_loggers(SFTConfig(model_path="m", data_path="d", ckpt_output_dir=str(tmp_path)))
