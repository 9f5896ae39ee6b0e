"""Upstream's preemption callbacks, for scripts that add them themselves.

The built-in backends need neither: ``enable_jit_checkpoint=True`` and ``checkpoint_storage=...`` do the same
inside them (docs/reliability.md). These classes serve code written against the upstream Training Hub, and
custom backends that call the hooks and honour ``ctx.control`` (:class:`training_hub.callbacks.TrainingHubControl`).

* :class:`JITCheckpointCallback`: after SIGTERM, at the next end of a step (or epoch) the run is asked to save a
  checkpoint and to stop (``ctx.control.should_save`` once, ``should_training_stop`` from then on). The signal
  handler only records the signal (logging from a handler can deadlock); the notice is logged from the hook.
  Under several processes a signal seen by any rank stops them all at the same step.
* :class:`RemoteCheckpointSyncCallback`: every saved checkpoint is mirrored to a storage URL (the constructor's,
  else ``TRAINING_HUB_CHECKPOINT_UPLOAD_URI``) by :mod:`training_hub.checkpoint_manager`: in the background,
  newest first, each directory closed by an ``.upload_complete`` marker; ``on_train_end`` waits for the uploads.
  A failed upload stops training at the next save; ``checkpoint_manager.raise_pending_upload_error`` raises it.
* :func:`merge_default_callbacks`: the two, as enabled, ahead of the caller's own callbacks.

The native engine handles SIGTERM itself while it trains (it saves the training state and stops), so there the
JIT callback's handler is only in place around the loop.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from training_hub.callbacks import TrainingHubCallback
from training_hub.checkpoint_utils import (
    apply_checkpoint_storage_env, mark_checkpoint_complete, mark_checkpoint_incomplete,
)

logger = logging.getLogger("training_hub.jit_checkpoint")

_NOT_SET = object()  # signal.getsignal() returns None for a handler installed from C
_PREEMPT_REQUESTED = False  # a signal arrived (this process)
_PREEMPT_SIGNUM: int | None = None
_PREEMPT_LOGGED = False
_PREEMPT_SAVE_REQUESTED = False  # the ranks agreed and the save was asked for: never ask twice
_previous_handler: Any = _NOT_SET


def preempt_requested() -> bool:
    """Whether this process received SIGTERM since the run began."""
    return _PREEMPT_REQUESTED


def _handle_sigterm(signum: int, frame: Any) -> None:
    global _PREEMPT_REQUESTED, _PREEMPT_SIGNUM
    _PREEMPT_SIGNUM = int(signum)  # flags only: no logging, no locks
    _PREEMPT_REQUESTED = True


def register_preemption_handler() -> None:
    """Catch SIGTERM (main thread only; elsewhere the signal keeps its meaning, with a warning)."""
    global _previous_handler
    if threading.current_thread() is not threading.main_thread():
        logger.warning("JITCheckpointCallback: not in the main thread, so SIGTERM cannot be caught here")
        return
    _previous_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _handle_sigterm)


def restore_preemption_handler() -> None:
    """Put back the SIGTERM handler that was there before :func:`register_preemption_handler`."""
    global _previous_handler
    if _previous_handler is _NOT_SET or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL if _previous_handler is None else _previous_handler)
    _previous_handler = _NOT_SET


def any_rank(flag: bool) -> bool:
    """``flag`` or-ed over every rank (``checkpoint_manager.any_rank``)."""
    from training_hub import checkpoint_manager

    return checkpoint_manager.any_rank(flag)


def wait_for_all_ranks() -> None:
    """A barrier when a process group is up (``checkpoint_manager.wait_for_all_ranks``)."""
    from training_hub import checkpoint_manager

    checkpoint_manager.wait_for_all_ranks()


class JITCheckpointCallback(TrainingHubCallback):
    """Save a checkpoint and stop at the next step (or epoch) end after SIGTERM. No constructor arguments."""

    run_on_all_ranks = True

    def on_train_begin(self, context: Any) -> None:
        global _PREEMPT_REQUESTED, _PREEMPT_SIGNUM, _PREEMPT_LOGGED, _PREEMPT_SAVE_REQUESTED
        _PREEMPT_REQUESTED = _PREEMPT_LOGGED = _PREEMPT_SAVE_REQUESTED = False
        _PREEMPT_SIGNUM = None
        register_preemption_handler()

    def on_train_end(self, context: Any) -> None:
        restore_preemption_handler()

    def on_step_end(self, context: Any) -> None:
        self._act(context)

    def on_epoch_end(self, context: Any) -> None:
        self._act(context)

    def on_save(self, context: Any) -> None:
        wait_for_all_ranks()  # every rank has written its part before the checkpoint counts as complete
        if context.is_main_process and context.output_dir and context.step > 0:
            mark_checkpoint_complete(context.output_dir, context.step)

    def _act(self, context: Any) -> None:
        global _PREEMPT_LOGGED, _PREEMPT_SAVE_REQUESTED
        control = getattr(context, "control", None)
        if _PREEMPT_SAVE_REQUESTED:  # asked on every rank at the same step: the stop stays, the save is not repeated
            if control is not None:
                control.should_training_stop = True
            return
        if not any_rank(preempt_requested()):
            return
        if not _PREEMPT_LOGGED:
            _PREEMPT_LOGGED = True
            logger.warning("Received signal %s; saving a checkpoint at this step and stopping.", _PREEMPT_SIGNUM)
        if control is None:
            logger.error("JITCheckpointCallback: the run gives its hooks no control (ctx.control), so the "
                         "checkpoint cannot be asked for")
            return
        _PREEMPT_SAVE_REQUESTED = True
        control.should_training_stop = True
        if context.is_main_process and context.output_dir and context.step > 0:
            mark_checkpoint_incomplete(context.output_dir, context.step)
        control.should_save = True


def _checkpoint_of(context: Any) -> Path | None:
    path = getattr(context, "checkpoint_path", None) or (getattr(context, "metrics", None) or {}).get(
        "checkpoint_path")
    if not path and context.output_dir and context.step > 0:
        path = os.path.join(context.output_dir, f"checkpoint-{context.step}")  # Hugging Face Trainer's name
    return Path(path) if path and os.path.isdir(path) else None


class RemoteCheckpointSyncCallback(TrainingHubCallback):
    """Mirror every saved checkpoint to ``url`` (default: ``$TRAINING_HUB_CHECKPOINT_UPLOAD_URI``), keeping its
    path relative to the output directory (``checkpoint_manager.enqueue_checkpoint_upload``)."""

    run_on_all_ranks = True

    def __init__(self, url: str | None = None):
        self.url = url

    def on_train_begin(self, context: Any) -> None:
        if self.url:
            apply_checkpoint_storage_env(self.url)

    def on_save(self, context: Any) -> None:
        from training_hub import checkpoint_manager

        wait_for_all_ranks()  # every rank has written its part
        if any_rank(checkpoint_manager.has_pending_upload_error()):  # agreed: every rank stops at the same step
            logger.error("a checkpoint upload failed; stopping training (the local checkpoints are complete)")
            if getattr(context, "control", None) is not None:
                context.control.should_training_stop = True
            return
        path = _checkpoint_of(context) if context.is_main_process else None
        if path is not None:
            if self.url:
                apply_checkpoint_storage_env(self.url)
            checkpoint_manager.enqueue_checkpoint_upload(path, base_dir=context.output_dir or None)

    def on_train_end(self, context: Any) -> None:
        from training_hub import checkpoint_manager

        checkpoint_manager.shutdown_upload_worker()


def merge_default_callbacks(user_callbacks: Any = None, *, enable_jit_checkpoint: bool = False,
                            ckpt_output_dir: str | None = None, backend: str | None = None,
                            checkpoint_storage: str | None = None) -> list:
    """Upstream's helper: :class:`JITCheckpointCallback` (with ``enable_jit_checkpoint`` and an output directory)
    and :class:`RemoteCheckpointSyncCallback` (with a storage URL), then the caller's callbacks. For ``backend``
    'sft' and 'osft' none is added: there the engines checkpoint on a signal and mirror by themselves."""
    from training_hub.storage import storage_url

    users = [] if user_callbacks is None else (
        [user_callbacks] if isinstance(user_callbacks, TrainingHubCallback) else list(user_callbacks))
    defaults: list = []
    if backend not in ("sft", "osft"):
        if enable_jit_checkpoint and ckpt_output_dir:
            defaults.append(JITCheckpointCallback())
        if storage_url(checkpoint_storage):
            defaults.append(RemoteCheckpointSyncCallback(storage_url(checkpoint_storage)))
    return [*defaults, *users]


def prepare_backend_params(algorithm: str, params: dict) -> dict:
    """What upstream's algorithms do with these settings before a third-party backend gets the call's ``params``
    (built-in backends handle them themselves): the storage URL goes to ``TRAINING_HUB_CHECKPOINT_UPLOAD_URI``
    (an earlier one is removed) and is checked (written, read, deleted) now; ``enable_jit_checkpoint`` becomes the
    engines' ``on_demand_checkpointing=True`` for sft and osft, and the callbacks of
    :func:`merge_default_callbacks` (ahead of the caller's) for the others."""
    from training_hub.storage import check_access, storage_url

    chosen = params.get("checkpoint_storage")
    apply_checkpoint_storage_env(chosen)
    if storage_url(chosen):
        check_access(storage_url(chosen))
    jit = bool(params.get("enable_jit_checkpoint"))
    if algorithm in ("sft", "osft"):
        if jit:
            params["on_demand_checkpointing"] = True
    else:
        callbacks = merge_default_callbacks(params.get("callbacks"), enable_jit_checkpoint=jit, backend=algorithm,
                                            ckpt_output_dir=params.get("ckpt_output_dir"), checkpoint_storage=chosen)
        if callbacks:
            params["callbacks"] = callbacks
    return params
