"""One object the native loops hand every metrics record and every saved checkpoint to.

:class:`RunReporter` wraps the run's metrics.jsonl writer and fans each record out to the user's callbacks
(:mod:`training_hub.callbacks`) and the experiment loggers asked for (:mod:`training_hub.integrations.loggers`):

    metrics = RunReporter(MetricsWriter(...), config, backend="native")   # drop-in for the writer
    metrics.begin(total_steps=...)          # on_train_begin; loggers start
    metrics.write(record)                   # metrics.jsonl + on_step_end / on_evaluate + loggers
    metrics.saved(path)                     # on_save
    metrics.close()                         # writer and loggers closed (in the loop's finally)
    metrics.end(result)                     # on_train_end

Ranks other than 0 pass ``enabled=False``: their records are discarded and no hook or logger runs.
"""

from __future__ import annotations

from typing import Any

from training_hub.callbacks import CallbackList, make_context


class RunReporter:
    def __init__(self, writer, config, *, backend: str, enabled: bool = True):
        self.writer = writer
        self.enabled = enabled
        self.ctx = make_context(config, backend)
        self.callbacks = CallbackList(getattr(config, "callbacks", None) if enabled else None)
        self.loggers = None
        if enabled:
            from training_hub.integrations.loggers import build_loggers

            self.loggers = build_loggers(config)  # fails here, before training, when a package is missing

    def begin(self, total_steps: int | None = None, step: int = 0, samples_seen: int = 0) -> None:
        self.ctx.total_steps, self.ctx.step, self.ctx.samples_seen = total_steps, step, samples_seen
        if self.enabled:
            self.loggers.start(self.ctx)
            self.callbacks.call("on_train_begin", self.ctx)

    def write(self, record: dict) -> None:
        self.writer.write(record)
        if not self.enabled:
            return
        self.ctx.step = record.get("step", self.ctx.step)
        self.ctx.epoch = record.get("epoch", self.ctx.epoch)
        if record.get("type") == "validation":
            self.loggers.log(record, prefix="validation")
            self.callbacks.call("on_evaluate", self.ctx, record)
        else:
            self.ctx.samples_seen += record.get("samples", 0)
            self.loggers.log(record, prefix="train")
            self.callbacks.call("on_step_end", self.ctx, record)

    def saved(self, path: Any) -> None:
        if self.enabled:
            self.callbacks.call("on_save", self.ctx, str(path))

    def close(self) -> None:
        self.writer.close()
        if self.enabled:
            self.loggers.close()

    def end(self, result: Any) -> None:
        if self.enabled:
            self.callbacks.call("on_train_end", self.ctx, result)
