"""The callback the adapter backends hand to a third-party engine, so its runs report back to us.

instructlab-training and mini-trainer train in torchrun workers and take callbacks *as class source*: they
``inspect.getsource`` each callback's class, send it over the command line and re-execute it in every worker, in
a namespace where ``TrainerCallback`` is their own base class. So the class below must be self-contained (imports
inside the methods, a constructor without arguments), and here ``TrainerCallback`` is only a stand-in name: the
class is never used as a callback in this process.

In the workers, rank 0 appends one JSON line per event to the file named by ``TRAINING_HUB_ENGINE_EVENTS`` (the
workers inherit our environment); :mod:`training_hub.backends.engine_adapter` reads the file while the run goes
and turns the lines into metrics.jsonl records, logger calls and ``TrainingHubCallback`` hooks.
"""

from __future__ import annotations

TrainerCallback = object  # stand-in; the engine supplies the real base class when it runs the source


class TrainingHubEvents(TrainerCallback):
    """Appends engine lifecycle events as JSON lines (rank 0 only)."""

    def _emit(self, event, context, **fields):
        import json
        import os

        path = os.environ.get("TRAINING_HUB_ENGINE_EVENTS")
        if not path or not getattr(context, "is_world_process_zero", True):
            return

        def number(value):
            if hasattr(value, "item"):  # a tensor or numpy scalar
                value = value.item()
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        record = {"event": event}
        for name in ("step", "epoch", "total_samples", "total_tokens", "loss", "learning_rate", "grad_norm",
                     "max_epochs", "max_steps", "world_size"):
            value = number(getattr(context, name, None))
            if value is not None:
                record[name] = value
        for group in ("batch_metrics", "val_metrics"):
            values = getattr(context, group, None) or {}
            kept = {str(k): number(v) for k, v in values.items() if number(v) is not None}
            if kept:
                record[group] = kept
        record.update(fields)
        with open(path, "a", encoding="utf-8") as out:  # one short append per event: lines do not interleave
            out.write(json.dumps(record) + "\n")

    def on_train_begin(self, context):
        self._emit("train_begin", context)

    def on_epoch_begin(self, context):
        self._emit("epoch_begin", context)

    def on_step_begin(self, context):
        self._emit("step_begin", context)

    def on_epoch_end(self, context):
        self._emit("epoch_end", context)

    def on_step_end(self, context):
        self._emit("step", context)

    def on_evaluate(self, context):
        self._emit("evaluate", context)

    def on_save(self, context):
        self._emit("save", context, checkpoint_path=getattr(context, "checkpoint_path", None))

    def on_train_end(self, context):
        self._emit("train_end", context)
