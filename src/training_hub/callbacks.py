"""Lifecycle callbacks: subclass :class:`TrainingHubCallback`, override the hooks you need, pass ``callbacks=``.

Every built-in algorithm accepts ``callbacks=`` (one callback or a list) and every built-in backend calls the
hooks: the native loops through :class:`training_hub.engine.reporter.RunReporter`, the trl backends through a
``transformers.TrainerCallback`` bridge (:mod:`training_hub.backends.trl_bridge`), the adapter backends from the
events of a third-party engine (:mod:`training_hub.backends.engine_adapter`).

Two hook styles work, so callbacks written for the upstream Training Hub run unchanged:

* upstream style: every hook takes the context only, ``on_log(self, context)``, and reads ``context.loss``,
  ``context.learning_rate``, ``context.metrics``, ``context.checkpoint_path``;
* ours: ``on_step_end(self, ctx, metrics)``, ``on_evaluate(self, ctx, metrics)``, ``on_save(self, ctx,
  checkpoint_path)``, ``on_train_end(self, ctx, result)`` get the record, path or result as a second argument.

Each overridden hook is called with as many of (context, value) as its signature takes. Hooks observe the run:
an exception raised in one is logged with its traceback and training goes on (as upstream).

Processes: hooks run on rank 0, and on every rank for a callback with ``run_on_all_ranks = True``. When
``nproc_per_node > 1`` makes a Python call launch its own workers, the callbacks reach them as class source (as
upstream does it for its torchrun engines): define the class at module level, import inside its methods, and give
it a constructor without arguments; instance state set before the call does not travel.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("training_hub")


@dataclass
class TrainingHubControl:
    """What a hook may ask of the run: set a flag, and the backend acts on it after the current step.

    * ``should_save``: save a checkpoint now (native: an HF checkpoint and the training state; trl: a Trainer
      checkpoint); the flag is cleared once done.
    * ``should_training_stop``: end training after this step, as if the last step had been reached (the final
      checkpoint is saved, ``status`` is "success", ``metrics["stopped_by"]`` is "callback").

    ``ctx.control`` holds the run's instance. Under several processes rank 0's flags decide for every rank.
    """

    should_save: bool = False
    should_training_stop: bool = False


@dataclass
class TrainingContext:
    """What a hook can know about the run: which algorithm and backend, where it writes, and how far it is.

    The fields of the upstream ``TrainingHubContext`` come first, in its order and with its defaults (step, epoch,
    loss, learning_rate, is_main_process, output_dir, metrics, control), so ``TrainingHubContext()`` builds an empty
    one as upstream; it is importable under both names.
    """

    step: int = 0  # optimizer steps done
    epoch: float = 0.0  # fractional epochs done
    loss: float | None = None  # of the latest optimizer step
    learning_rate: float | None = None  # of the latest optimizer step
    is_main_process: bool = True  # rank 0
    output_dir: str = ""
    metrics: dict = field(default_factory=dict)  # the latest metrics.jsonl record (a validation one in on_evaluate)
    control: TrainingHubControl | None = None  # set by the built-in backends; hooks set its flags
    algorithm: str = ""
    backend: str = ""
    config: Any = None  # the validated config (e.g. SFTConfig) of the run
    samples_seen: int = 0
    total_steps: int | None = None
    checkpoint_path: str | None = None  # the latest complete checkpoint (set before on_save)
    extra: dict = field(default_factory=dict)


TrainingHubContext = TrainingContext  # the upstream name


class TrainingHubCallback:
    """Base class with no-op hooks; override any of them (either hook style, see the module doc)."""

    run_on_all_ranks: bool = False  # True: also called on ranks other than 0 (then ctx.is_main_process is False)

    def on_train_begin(self, ctx: TrainingContext) -> None:
        """Before the first optimizer step (model and data are loaded)."""

    def on_epoch_begin(self, ctx: TrainingContext) -> None:
        """At the start of each epoch."""

    def on_step_begin(self, ctx: TrainingContext) -> None:
        """Before each optimizer step's forward passes."""

    def on_step_end(self, ctx: TrainingContext, metrics: dict | None = None) -> None:
        """After each optimizer step, with that step's metrics.jsonl record (loss, lr, grad_norm, tokens, ...)."""

    def on_log(self, ctx: TrainingContext) -> None:
        """After each metrics.jsonl record (a step's or a validation's) is written; ``ctx.metrics`` holds it."""

    def on_evaluate(self, ctx: TrainingContext, metrics: dict | None = None) -> None:
        """After each validation pass, with its record (loss, ...)."""

    def on_save(self, ctx: TrainingContext, checkpoint_path: str | None = None) -> None:
        """After a Hugging Face checkpoint is complete on disk (``hf_format/samples_<N>``)."""

    def on_epoch_end(self, ctx: TrainingContext) -> None:
        """At the end of each epoch."""

    def on_train_end(self, ctx: TrainingContext, result: Any = None) -> None:
        """After training, with the run's result (a :class:`training_hub.TrainingResult`)."""


def algorithm_of(config: Any) -> str:
    """The algorithm name a built-in config declares (``algorithm_name``); the class name for others."""
    return getattr(type(config), "algorithm_name", None) or type(config).__name__


def make_context(config: Any, backend: str) -> TrainingContext:
    return TrainingContext(algorithm=algorithm_of(config), backend=backend, output_dir=str(config.ckpt_output_dir),
                           config=config, control=TrainingHubControl())


class CallbackList:
    """Calls each overridden hook on every callback, in order, with the arguments its signature takes; an
    exception in a hook is logged and the run goes on."""

    def __init__(self, callbacks: list | None):
        self.callbacks = list(callbacks or [])
        self._arity: dict[tuple[type, str], int | None] = {}

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def _takes(self, callback: Any, hook: str, method: Any) -> int | None:
        """How many positional arguments the bound hook takes (None: any number)."""
        key = (type(callback), hook)
        if key not in self._arity:
            try:
                params = list(inspect.signature(method).parameters.values())
            except (TypeError, ValueError):
                self._arity[key] = None
            else:
                if any(p.kind is p.VAR_POSITIONAL for p in params):
                    self._arity[key] = None
                else:
                    self._arity[key] = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        return self._arity[key]

    def call(self, hook: str, ctx: Any, *values: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, hook, None)
            base = getattr(TrainingHubCallback, hook, None)
            if method is None or getattr(type(callback), hook, None) is base:
                continue  # not overridden: nothing to do
            takes = self._takes(callback, hook, method)
            args = (ctx, *values) if takes is None else (ctx, *values)[:takes]
            try:
                method(*args)
            except Exception:  # hooks observe the run; a failing one must not end a long job (as upstream)
                logger.warning("callback %s.%s raised; training goes on", type(callback).__name__, hook,
                               exc_info=True)


def merge_default_callbacks(user_callbacks: Any = None, **options: Any) -> list:
    """Upstream's helper: the preemption callbacks that ``options`` enable (``enable_jit_checkpoint``,
    ``ckpt_output_dir``, ``backend``, ``checkpoint_storage``) ahead of ``user_callbacks``; see
    :func:`training_hub.jit_checkpoint.merge_default_callbacks`. The built-in backends need none of them."""
    from training_hub.jit_checkpoint import merge_default_callbacks as merge

    return merge(user_callbacks, **options)


# ------------------------------------------------------------------------------------------------ across processes


def _source_namespace() -> dict:
    import sys

    # The package itself (always imported before any of its modules), without importing upward from this module.
    return {"TrainingHubCallback": TrainingHubCallback, "TrainingHubContext": TrainingContext,
            "TrainingContext": TrainingContext, "training_hub": sys.modules["training_hub"]}


def _from_source(source: str, name: str) -> TrainingHubCallback:
    namespace = _source_namespace()
    exec(compile(source, f"<callback {name}>", "exec"), namespace)  # our own serialized source, see below
    return namespace[name]()


def serialize_callbacks(callbacks: list) -> list[dict]:
    """Each callback as its class source, for worker processes (``nproc_per_node > 1`` launched from Python).

    Checked here, before any launch, the way the workers will rebuild it: the class source must be available
    (module level in a file) and define a class that the source alone can build with no arguments.
    """
    import textwrap

    out = []
    for callback in callbacks:
        cls = type(callback)
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            raise ValueError(f"callbacks: the source of {cls.__name__} is not available, so it cannot reach the "
                             "worker processes; define the class at module level in a .py file, or run your "
                             "script under torchrun yourself") from None
        try:
            _from_source(source, cls.__name__)
        except Exception as exc:
            raise ValueError(f"callbacks: {cls.__name__} cannot be rebuilt from its class source in the worker "
                             f"processes ({type(exc).__name__}: {exc}); keep imports and helpers inside the class "
                             "and give it a constructor without arguments") from None
        out.append({"name": cls.__name__, "source": source})
    return out


def deserialize_callbacks(specs: list[dict]) -> list[TrainingHubCallback]:
    return [_from_source(spec["source"], spec["name"]) for spec in specs]

