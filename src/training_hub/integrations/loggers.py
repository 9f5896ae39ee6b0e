"""Experiment loggers from the shared logging parameters: TensorBoard, MLflow, Weights & Biases.

Each is optional (an extra of the package), imported only when its parameter is set, and fails before training
with an error that names the extra when its package is missing:

* ``tensorboard_log_dir``            TensorBoard event files in that directory (``training-hub[tensorboard]``)
* ``mlflow_tracking_uri`` /          an MLflow run (a ``file://`` URI is a local store, no server needed)
  ``mlflow_experiment_name``         (``training-hub[mlflow]``); for a file store we set MLFLOW_ALLOW_FILE_STORE,
                                     which MLflow 3 requires for it
* ``wandb_project``                  a W&B run; set ``WANDB_MODE=offline`` to write it under
                                     ``ckpt_output_dir/wandb`` without an account (``training-hub[wandb]``)

Every metrics.jsonl record is logged as ``train/<key>`` or ``validation/<key>`` at its optimizer step.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


class MissingIntegrationError(ImportError):
    """A logging parameter was set but its package is not installed."""


def _require(parameter: str, module: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingIntegrationError(f"{parameter} is set, but the '{module.split('.')[0]}' package is not "
                                      f"installed: pip install 'training-hub[{extra}]' (or unset {parameter})")


def _numbers(record: dict, prefix: str) -> dict[str, float]:
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "type") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_params(config) -> dict[str, Any]:
    """The config's plain values (what trackers record as the run's parameters)."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))
    return {k: v for k, v in values.items() if isinstance(v, (str, int, float, bool)) or v is None}


class TensorBoardLogger:
    def __init__(self, config):
        _require("tensorboard_log_dir", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=config.tensorboard_log_dir)

    def start(self, ctx) -> None:
        self.writer.add_text("run", f"{ctx.algorithm} ({ctx.backend}) -> {ctx.output_dir}", 0)

    def log(self, record: dict, prefix: str) -> None:
        for name, value in _numbers(record, prefix).items():
            self.writer.add_scalar(name, value, record.get("step", 0))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MLflowLogger:
    def __init__(self, config):
        _require("mlflow_tracking_uri" if config.mlflow_tracking_uri else "mlflow_experiment_name", "mlflow", "mlflow")
        import mlflow

        self.mlflow, self.config = mlflow, config
        self.run = None

    def start(self, ctx) -> None:
        mlflow, config = self.mlflow, self.config
        if config.mlflow_tracking_uri:
            if "://" not in config.mlflow_tracking_uri or config.mlflow_tracking_uri.startswith("file:"):
                # MLflow 3 refuses its file store unless told otherwise; a file URI given here is that request
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(config.mlflow_tracking_uri)
        if config.mlflow_experiment_name:
            mlflow.set_experiment(config.mlflow_experiment_name)
        self.run = mlflow.start_run(run_name=config.mlflow_run_name, nested=mlflow.active_run() is not None)
        mlflow.log_params({k: str(v) for k, v in run_params(config).items()})
        mlflow.set_tags({"training_hub.algorithm": ctx.algorithm, "training_hub.backend": ctx.backend})

    def log(self, record: dict, prefix: str) -> None:
        self.mlflow.log_metrics(_numbers(record, prefix), step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.run is not None:
            self.mlflow.end_run()
            self.run = None


class WandbLogger:
    def __init__(self, config):
        _require("wandb_project", "wandb", "wandb")
        import wandb

        self.wandb, self.config = wandb, config
        self.run = None

    def start(self, ctx) -> None:
        config = self.config
        os.makedirs(config.ckpt_output_dir, exist_ok=True)
        self.run = self.wandb.init(project=config.wandb_project, entity=config.wandb_entity,
                                   name=config.wandb_run_name, dir=str(config.ckpt_output_dir),
                                   config=run_params(config), reinit="finish_previous")

    def log(self, record: dict, prefix: str) -> None:
        self.run.log(_numbers(record, prefix), step=int(record.get("step", 0)))

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class Loggers:
    """The loggers a run asked for, called together."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def __bool__(self) -> bool:
        return bool(self.loggers)

    def start(self, ctx) -> None:
        for logger in self.loggers:
            logger.start(ctx)

    def log(self, record: dict, prefix: str) -> None:
        for logger in self.loggers:
            logger.log(record, prefix)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(config) -> Loggers:
    """The loggers ``config``'s logging parameters ask for (none when none are set)."""
    loggers = []
    if getattr(config, "tensorboard_log_dir", None):
        loggers.append(TensorBoardLogger(config))
    if getattr(config, "mlflow_tracking_uri", None) or getattr(config, "mlflow_experiment_name", None):
        loggers.append(MLflowLogger(config))
    if getattr(config, "wandb_project", None):
        loggers.append(WandbLogger(config))
    return Loggers(loggers)
