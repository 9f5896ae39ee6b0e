"""One object the native loops hand every metrics record and every saved checkpoint to.

:class:`RunReporter` wraps the run's metrics.jsonl writer and fans each record out to the user's callbacks
(:mod:`training_hub.callbacks`) and the experiment loggers asked for (:mod:`training_hub.integrations.loggers`):

    metrics = RunReporter(MetricsWriter(...), config, backend="native")   # drop-in for the writer
    metrics.begin(total_steps=...)          # on_train_begin; loggers start
    metrics.epoch_begin() / step_begin()    # on_epoch_begin / on_step_begin
    metrics.write(record)                   # metrics.jsonl + on_step_end / on_evaluate, on_log + loggers
    metrics.saved(path)                     # on_save
    metrics.epoch_end()                     # on_epoch_end
    metrics.close()                         # writer and loggers closed (in the loop's finally)
    metrics.end(result)                     # on_train_end

Ranks other than 0 pass ``enabled=False``: their records are discarded, no logger runs, and only callbacks with
``run_on_all_ranks = True`` are called (with ``ctx.is_main_process`` False).
"""

from __future__ import annotations

from typing import Any

from training_hub.callbacks import CallbackList, make_context


class RunReporter:
    def __init__(self, writer, config, *, backend: str, enabled: bool = True):
        self.writer = writer
        self.enabled = enabled
        self.ctx = make_context(config, backend)
        self.ctx.is_main_process = enabled
        callbacks = getattr(config, "callbacks", None) or []
        if not enabled:
            callbacks = [c for c in callbacks if getattr(c, "run_on_all_ranks", False)]
        self.callbacks = CallbackList(callbacks)
        self.loggers = None
        if enabled:
            from training_hub.integrations.loggers import build_loggers

            self.loggers = build_loggers(config)  # fails here, before training, when a package is missing

    def begin(self, total_steps: int | None = None, step: int = 0, samples_seen: int = 0) -> None:
        self.ctx.total_steps, self.ctx.step, self.ctx.samples_seen = total_steps, step, samples_seen
        if self.enabled:
            self.loggers.start(self.ctx)
        self.callbacks.call("on_train_begin", self.ctx)

    def epoch_begin(self) -> None:
        self.callbacks.call("on_epoch_begin", self.ctx)

    def step_begin(self) -> None:
        self.callbacks.call("on_step_begin", self.ctx)

    def epoch_end(self) -> None:
        self.callbacks.call("on_epoch_end", self.ctx)

    def write(self, record: dict) -> None:
        self.writer.write(record)
        if not self.enabled and not self.callbacks:
            return
        self.ctx.step = record.get("step", self.ctx.step)
        self.ctx.epoch = record.get("epoch", self.ctx.epoch)
        self.ctx.metrics = record
        if record.get("type") == "validation":
            if self.enabled:
                self.loggers.log(record, prefix="validation")
            self.callbacks.call("on_evaluate", self.ctx, record)
        else:
            self.ctx.samples_seen += record.get("samples", 0)
            self.ctx.loss = record.get("loss", self.ctx.loss)
            self.ctx.learning_rate = record.get("lr", self.ctx.learning_rate)
            if self.enabled:
                self.loggers.log(record, prefix="train")
            self.callbacks.call("on_step_end", self.ctx, record)
        self.callbacks.call("on_log", self.ctx)

    def saved(self, path: Any) -> None:
        self.ctx.checkpoint_path = str(path)
        self.callbacks.call("on_save", self.ctx, str(path))

    def close(self) -> None:
        self.writer.close()
        if self.enabled:
            self.loggers.close()

    def end(self, result: Any) -> None:
        self.callbacks.call("on_train_end", self.ctx, result)
