"""The trl backend's ``enable_jit_checkpoint`` and ``checkpoint_storage``, as ``transformers.TrainerCallback`` s.

* ``enable_jit_checkpoint``: SIGTERM (a preemption notice) asks the Trainer to save a checkpoint at the end of the
  current optimizer step and to stop there (``control.should_save`` / ``should_training_stop``); the run returns
  ``status="stopped"``. The signal handler only sets a flag (it runs between two bytecodes of the main thread).
* ``checkpoint_storage``: every checkpoint the Trainer writes (``trl_state/checkpoint-<S>``) and the final
  ``hf_format/samples_<N>`` are mirrored by :class:`training_hub.engine.storage.Mirror`; the restore and the
  resume decision are :func:`training_hub.engine.storage.open_output_dir`'s, as for the native engine.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

from training_hub.engine import storage


def checkpoint_callbacks(config: Any, root: Path, state_dir: str) -> tuple[list, Any, Any]:
    """(the TrainerCallbacks to add, the run's mirror or None, the preemption callback or None)."""
    from transformers import TrainerCallback

    class PreemptionCheckpoint(TrainerCallback):
        """SIGTERM: save at the end of this step, then stop."""

        def __init__(self):
            self.signal: str | None = None
            self.previous = None

        def _ask(self, signum, frame):
            self.signal = signal.Signals(signum).name

        def on_train_begin(self, args, state, control, **kwargs):
            if threading.current_thread() is threading.main_thread():
                self.previous = signal.signal(signal.SIGTERM, self._ask)

        def on_step_end(self, args, state, control, **kwargs):
            if self.signal:
                control.should_save = control.should_training_stop = True

        on_log = on_step_end  # the Trainer logs, then saves, within the same step: a signal that came meanwhile

        def on_train_end(self, args, state, control, **kwargs):
            if self.previous is not None:
                signal.signal(signal.SIGTERM, self.previous)
                self.previous = None

    class MirrorCheckpoints(TrainerCallback):
        """Queue each checkpoint the Trainer finished for upload (the main process only)."""

        def on_save(self, args, state, control, **kwargs):
            saved = root / state_dir / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and saved.is_dir():
                mirror.add(saved)

    jit = PreemptionCheckpoint() if getattr(config, "enable_jit_checkpoint", False) else None
    mirror = storage.start_mirror(config, root)
    callbacks = [c for c in (jit, MirrorCheckpoints() if mirror else None) if c is not None]
    return callbacks, mirror, jit


def finish(result: Any, mirror: Any, jit: Any) -> Any:
    """After training: wait for the uploads (raise if one failed); a preempted run's result says so."""
    if mirror is not None and result.checkpoint_path:
        mirror.add(Path(result.checkpoint_path))
    storage.finish_mirror(mirror)
    if jit is not None and jit.signal:
        result.status = "stopped"
        result.metrics["stopped_by"] = jit.signal
    return result


def abandon(mirror: Any) -> None:
    """The run failed: let the uploads under way end (complete or unmarked) before its error goes on."""
    if mirror is not None:
        mirror.finish()
