"""Lifecycle callbacks: subclass :class:`TrainingHubCallback`, override the hooks you need, pass ``callbacks=``.

Every built-in algorithm accepts ``callbacks=`` (one callback or a list) and every built-in backend calls the
hooks: the native loops through :class:`training_hub.engine.reporter.RunReporter`, the trl backends through a
``transformers.TrainerCallback`` bridge (:mod:`training_hub.backends.trl_bridge`). In a multi-process run the
hooks run on rank 0 only; a callback object cannot be sent to processes that ``nproc_per_node > 1`` launches, so
use callbacks in one-process runs or run your script under ``torchrun`` yourself.

Hooks receive a :class:`TrainingContext` that the run keeps current (step, epoch, samples seen). An exception raised
in a hook stops the run: hooks are part of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainingContext:
    """What a hook can know about the run: which algorithm and backend, where it writes, and how far it is."""

    algorithm: str
    backend: str
    output_dir: str
    config: Any  # the validated config (e.g. SFTConfig) of the run
    step: int = 0  # optimizer steps done
    epoch: float = 0.0  # fractional epochs done
    samples_seen: int = 0
    total_steps: int | None = None
    extra: dict = field(default_factory=dict)


class TrainingHubCallback:
    """Base class with no-op hooks; override any of them."""

    def on_train_begin(self, ctx: TrainingContext) -> None:
        """Before the first optimizer step (model and data are loaded)."""

    def on_step_end(self, ctx: TrainingContext, metrics: dict) -> None:
        """After each optimizer step, with that step's metrics.jsonl record (loss, lr, grad_norm, tokens, ...)."""

    def on_evaluate(self, ctx: TrainingContext, metrics: dict) -> None:
        """After each validation pass, with its record (loss, ...)."""

    def on_save(self, ctx: TrainingContext, checkpoint_path: str) -> None:
        """After a Hugging Face checkpoint is complete on disk (``hf_format/samples_<N>``)."""

    def on_train_end(self, ctx: TrainingContext, result: Any) -> None:
        """After training, with the run's result (a :class:`training_hub.TrainingResult`)."""


_ALGORITHMS = {"SFTConfig": "sft", "OSFTConfig": "osft", "LoRASFTConfig": "lora_sft", "DPOConfig": "dpo"}


def algorithm_of(config: Any) -> str:
    """The algorithm name of a built-in config (the class name for others)."""
    for klass in type(config).__mro__:
        if klass.__name__ in _ALGORITHMS:
            return _ALGORITHMS[klass.__name__]
    return type(config).__name__


def make_context(config: Any, backend: str) -> TrainingContext:
    return TrainingContext(algorithm=algorithm_of(config), backend=backend, output_dir=str(config.ckpt_output_dir),
                           config=config)


class CallbackList:
    """Calls each hook on every callback, in order."""

    def __init__(self, callbacks: list | None):
        self.callbacks = list(callbacks or [])

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def call(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)
