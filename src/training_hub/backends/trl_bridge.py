"""The trl backends' side of :mod:`training_hub.callbacks`: a thin ``transformers.TrainerCallback`` bridge.

``HubCallbackBridge`` turns the Trainer's events into TrainingHubCallback hooks:

* ``on_train_begin``  -> ``on_train_begin(ctx)``
* ``on_epoch_begin`` / ``on_step_begin`` / ``on_epoch_end`` -> the hooks of the same names
* ``on_log``          -> ``on_step_end(ctx, record)`` / ``on_evaluate(ctx, record)``, then ``on_log(ctx)``, with
                         the same record that metrics.jsonl gets (our key names, see ``trl.log_record``)
* ``on_save``         -> ``on_save(ctx, <trl_state>/checkpoint-<step>)`` (TRL's intermediate checkpoints)
* the backend calls ``saved(path)`` for the final ``hf_format/samples_<N>`` and ``end(result)`` with the result.

Hooks run on the main process only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from training_hub.callbacks import CallbackList, make_context

logger = logging.getLogger("training_hub")


def hub_bridge(config, record_fn, backend: str = "trl"):
    """A TrainerCallback calling ``config.callbacks``; ``record_fn(state, logs)`` -> (kind, record) or None;
    ``backend``: the name hooks see in ``ctx.backend`` (another Trainer-based backend passes its own)."""
    from transformers import TrainerCallback

    class HubCallbackBridge(TrainerCallback):
        def __init__(self):
            self.hub = CallbackList(config.callbacks)
            self.ctx = make_context(config, backend)
            self.main = True
            self.warned = False

        def _sync(self, state) -> None:
            self.main = self.ctx.is_main_process = state.is_world_process_zero
            self.ctx.step = state.global_step
            self.ctx.epoch = float(state.epoch or 0.0)
            self.ctx.samples_seen = state.global_step * config.effective_batch_size

        def on_train_begin(self, args, state, control, **kwargs):
            self.ctx.total_steps = state.max_steps
            self._fire("on_train_begin", state)

        def _fire(self, hook: str, state) -> None:
            self._sync(state)
            if self.main:
                self.hub.call(hook, self.ctx)

        def _steer(self, args, control) -> None:
            """Hand a hook's ``ctx.control`` requests to the Trainer's own control (it saves / stops on them)."""
            hub = self.ctx.control
            if not (hub.should_save or hub.should_training_stop):
                return
            if getattr(args, "world_size", 1) > 1:  # hooks run on rank 0 only: acting there alone would hang
                if not self.warned:
                    logger.warning("callbacks: ctx.control is not honoured by the trl backend under several "
                                   "processes (hooks run on rank 0 only)")
                    self.warned = True
                hub.should_save = hub.should_training_stop = False
                return
            if hub.should_save:
                control.should_save, hub.should_save = True, False
            if hub.should_training_stop:
                control.should_training_stop = True
                self.ctx.extra["stopped_by"] = "callback"

        def on_epoch_begin(self, args, state, control, **kwargs):
            self._fire("on_epoch_begin", state)
            self._steer(args, control)

        def on_step_begin(self, args, state, control, **kwargs):
            self._fire("on_step_begin", state)
            self._steer(args, control)

        def on_epoch_end(self, args, state, control, **kwargs):
            self._fire("on_epoch_end", state)
            self._steer(args, control)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self._sync(state)
            found = record_fn(state, logs) if self.main else None
            if found:
                kind, record = found
                self.ctx.metrics = record
                if kind == "validation":
                    self.hub.call("on_evaluate", self.ctx, record)
                else:
                    self.ctx.loss = record.get("loss", self.ctx.loss)
                    self.ctx.learning_rate = record.get("lr", self.ctx.learning_rate)
                    self.hub.call("on_step_end", self.ctx, record)
                self.hub.call("on_log", self.ctx)
                self._steer(args, control)

        def on_save(self, args, state, control, **kwargs):
            self._sync(state)
            if self.main:
                path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                self.ctx.checkpoint_path = path
                self.hub.call("on_save", self.ctx, path)

        def saved(self, path: Any) -> None:
            if self.main and path is not None:
                self.ctx.checkpoint_path = str(path)
                self.hub.call("on_save", self.ctx, str(path))

        def end(self, result: Any) -> None:
            if self.main:
                self.hub.call("on_train_end", self.ctx, result)

    return HubCallbackBridge()
