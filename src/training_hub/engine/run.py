"""The run skeleton every loop of the engine shares: progress, clock, schedule, signals, metrics, result.

A loop (``trainer.py`` for SFT/OSFT/LoRA, ``dpo.py``) is a *recipe*: a plain object that sets itself up and
answers what only it knows. It inherits nothing; :func:`execute` calls it at fixed points:

    recipe.plan_epoch(epoch) -> list[Step]          the epoch's optimizer steps (batching.plan_epoch)
    recipe.train_step(step, stop) -> StepOutcome    forward/backward/optimizer step; ``stop()``: a stop was asked
    recipe.validate() -> dict                       validation statistics (at least "loss")
    recipe.save_checkpoint(samples) -> Path | None  a Hugging Face checkpoint (the path on the writing rank)
    recipe.save_state(progress: dict) -> None       the training state that resume=True continues from
    recipe.result_metrics(progress) -> dict         the loop's own entries of the result's metrics
    recipe.load_state(path) -> dict                 restore model, optimizer, scheduler, RNG (``resume``)

Everything else is here, once: the :class:`Progress` counters (saved with the state; a resumed run must plan the
same steps), the clock, the per-step schedule (log, validate every ``eval_steps``, save every ``save_samples``),
the end of an epoch (validate, ``checkpoint_at_epoch``), ``max_steps``, SIGTERM and Ctrl-C (finish the step, save
the state, return ``status="stopped"``; a second Ctrl-C aborts at once), divergence (a non-finite loss or gradient
norm stops the run with :class:`TrainingDivergedError` before anything of that step is applied or saved), the final
checkpoint, metrics.jsonl with callbacks and loggers (``RunReporter``), the progress bar, and the
``TrainingResult``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from training_hub.engine import checkpoint as ckpt
from training_hub.engine import distributed, storage
from training_hub.config.groups import RESUME_CHANGEABLE
from training_hub.engine.batching import Step
from training_hub.engine.ledger import MemoryLedger, steps_to_watch
from training_hub.engine.metrics import DiscardMetrics, MetricsWriter, peak_memory_bytes, progress_bar, step_record
from training_hub.engine.reporter import RunReporter
from training_hub.engine.schedule import build_scheduler
from training_hub.result import TrainingResult

logger = logging.getLogger("training_hub.engine")


@dataclass
class StepOutcome:
    """What one optimizer step of a loop reports: the step's mean loss and its loop-specific statistics."""

    loss: float
    lr: float
    grad_norm: float
    loss_tokens: int
    stop: bool = False  # every rank agreed to stop after this step (a signal reached one of them)
    extra: dict = field(default_factory=dict)  # e.g. DPO's reward statistics, added to the metrics record
    step: Step | None = None  # the step as it ran, for a loop that makes its samples inside it (GRPO's rollouts)


class Recipe(Protocol):
    """What :func:`execute` asks of a loop (see the module doc)."""

    def plan_epoch(self, epoch: int) -> list[Step]: ...

    def train_step(self, step: Step, stop: Callable[[], bool]) -> StepOutcome: ...

    def validate(self) -> dict: ...

    def save_checkpoint(self, samples_seen: int) -> Path | None: ...

    def save_state(self, progress: dict) -> None: ...

    def result_metrics(self, progress: "Progress") -> dict: ...


@dataclass
class Progress:
    """Where the run is. Saved with every training state; ``plan`` holds what a resumed run must share."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    last_saved_samples: int | None = None
    last: dict = field(default_factory=dict)  # the last step's statistics (loss, ...)
    last_validation: dict = field(default_factory=dict)
    plan: dict = field(default_factory=dict)

    def count(self, step: Step) -> int:
        """Advance past one optimizer step; return the samples seen before it."""
        before = self.samples_seen
        self.global_step += 1
        self.step_in_epoch += 1
        self.samples_seen += step.num_samples
        self.tokens_seen += step.num_tokens
        return before

    def fractional_epoch(self, steps_in_epoch: int) -> float:
        return self.epoch + self.step_in_epoch / max(steps_in_epoch, 1)

    def state(self, elapsed: float) -> dict:
        return {**dataclasses.asdict(self), "elapsed": elapsed}

    def restore(self, saved: dict, allowed: set[str] = frozenset(),
                changeable: tuple[str, ...] | frozenset[str] = RESUME_CHANGEABLE) -> list[str]:
        """Continue from a saved state. Its plan must equal this run's, except the names in ``allowed`` (the
        caller's ``resume_changes``); returns the allowed names that did change. Keys an older state did not
        record are not compared. ``changeable``: the names the refusal may suggest passing in resume_changes."""
        plan = saved.get("plan", saved)  # states of version 0.1 kept the plan keys at the top level
        changed = {k: (plan[k], v) for k, v in self.plan.items() if k in plan and plan[k] != v}
        refused = [k for k in changed if k not in allowed]
        if refused:
            lines = "; ".join("the training data's content changed (data_path's bytes hash differently)"
                              if k == "data_sha256" else f"{k}: saved {changed[k][0]!r}, now {changed[k][1]!r}"
                              for k in refused)
            may = [k for k in refused if k in changeable]
            hint = (f" To continue with the new {', '.join(may)}, pass resume_changes={may!r}." if may else "")
            raise ValueError(f"resume=True continues the same run, but these differ from the run in the output "
                             f"directory: {lines}.{hint} Otherwise use the original values, or a new ckpt_output_dir "
                             "for a new run.")
        for f in dataclasses.fields(self):
            if f.name != "plan" and f.name in saved:
                setattr(self, f.name, saved[f.name])
        return [k for k in changed if k in allowed]


class Clock:
    """Seconds since the run started, across resumes (``prior``: the elapsed time saved with the state)."""

    def __init__(self, prior: float = 0.0):
        self.prior, self.start = prior, time.perf_counter()

    def __call__(self) -> float:
        return self.prior + time.perf_counter() - self.start


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the message names the step, the learning rate and the
    last good checkpoint. Nothing of the failing step was applied or saved."""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict]:
    """Turn SIGTERM and the first Ctrl-C (SIGINT) into a flag the loop checks after each optimizer step (then it
    saves the training state and stops); a second Ctrl-C raises KeyboardInterrupt at once. ``flag["signal"]`` names
    the signal that asked."""
    flag: dict = {"stop": False, "signal": None}

    def ask(signum, frame):
        flag.update(stop=True, signal=signal.Signals(signum).name)
        if signum == signal.SIGINT:
            logger.warning("Ctrl-C: stopping after this step and saving the training state (Ctrl-C again aborts now)")
            signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: no handlers, the signals keep their default meaning
        yield flag
        return
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------------------------ components

# Settings that do not change what a run trains on or how (where it writes, what it logs, how many processes
# share the work: a training state resumes under any process count). Every other declared setting is part of a
# run's plan and must be the same when it is resumed (upstream-only names are folded into ours first).
NOT_IN_PLAN = frozenset({
    "ckpt_output_dir", "data_output_dir", "data_path", "validation_data_path", "eval_steps", "resume",
    "resume_changes", "save_samples", "checkpoint_at_epoch", "save_final_checkpoint", "keep_last_n_checkpoints",
    "logging_steps", "disable_progress_bar", "wandb_project", "wandb_entity", "wandb_run_name",
    "tensorboard_log_dir", "mlflow_tracking_uri", "mlflow_experiment_name", "mlflow_run_name", "callbacks",
    "nproc_per_node", "nnodes", "node_rank", "rdzv_id", "rdzv_endpoint", "master_addr", "master_port", "strategy",
    "fsdp_options", "enable_jit_checkpoint", "checkpoint_storage",
    "trust_remote_code", "dtype", "gradient_checkpointing", "use_liger", "merge", "torch_compile",
})


def run_plan(config: Any, data_fingerprint: str, **extra: Any) -> dict:
    """What a resumed run must share with the run it continues: the data's content, every setting that decides
    the training (all declared ones but :data:`NOT_IN_PLAN` and the upstream-only names), and ``extra``."""
    import json

    from training_hub.config.declare import param_specs

    values = {name: getattr(config, name) for name, spec in param_specs(type(config)).items()
              if name not in NOT_IN_PLAN and spec.upstream is None}
    return json.loads(json.dumps({**values, "data_sha256": data_fingerprint, **extra}, default=str))


def resume(recipe: Any, progress: Progress, config: Any, total: int, path: Path) -> None:
    """Load the training state at ``path`` into the recipe and ``progress``; apply the changes the caller allowed
    (``resume_changes``) by rebuilding the schedule for the new values, continuing at the resumed step."""
    saved = recipe.load_state(path)
    changed = progress.restore(saved, allowed=set(config.resume_changes or ()))
    if changed:
        for group in recipe.optimizer.param_groups:
            group["initial_lr"] = group["lr"] = config.learning_rate
        recipe.scheduler = build_scheduler(recipe.optimizer, name=config.lr_scheduler,
                                           warmup_steps=config.warmup_steps, total_steps=total,
                                           scheduler_kwargs=config.lr_scheduler_kwargs,
                                           start_step=progress.global_step)
        logger.warning("resume: %s changed as asked (resume_changes); the schedule continues at step %d of %d with "
                       "lr %.3g", ", ".join(changed), progress.global_step, total, recipe.scheduler.get_last_lr()[0])
    logger.info("resuming from %s (step %d, %d samples seen)", path, saved["global_step"], saved["samples_seen"])

def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def total_steps(config: Any, num_samples: int) -> tuple[int, int]:
    """(steps per epoch, steps of the run); the schedule's options are checked here, before the model loads."""
    steps_per_epoch = math.ceil(num_samples / config.effective_batch_size)
    total = steps_per_epoch * config.num_epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    build_scheduler(torch.optim.SGD([torch.zeros(1)], lr=1.0), name=config.lr_scheduler,
                    warmup_steps=config.warmup_steps, total_steps=total, scheduler_kwargs=config.lr_scheduler_kwargs)
    if config.warmup_steps >= total:
        logger.warning("warmup_steps=%d is not below the run's %d optimizer steps: the learning rate never reaches "
                       "learning_rate=%g (lower warmup_steps)", config.warmup_steps, total, config.learning_rate)
    if config.effective_batch_size > num_samples:
        logger.warning("effective_batch_size=%d is larger than the %d training samples: every optimizer step takes "
                       "the whole data set, %d step(s) per epoch", config.effective_batch_size, num_samples,
                       steps_per_epoch)
    return steps_per_epoch, total


def optimizer_and_scheduler(config: Any, trainable: list, total: int):
    """AdamW over ``trainable`` (fused: one kernel; with ``optimizer_state_dtype="bfloat16"`` our bf16-moment
    AdamW, :mod:`training_hub.engine.optim`) and the learning-rate schedule."""
    hyper = dict(lr=config.learning_rate, betas=(config.beta1, config.beta2), eps=config.eps,
                 weight_decay=config.weight_decay)
    if getattr(config, "optimizer_state_dtype", "float32") == "bfloat16":
        from training_hub.engine.optim import AdamWBF16States

        optimizer: torch.optim.Optimizer = AdamWBF16States(trainable, **hyper)
    else:
        optimizer = torch.optim.AdamW(trainable, **hyper, fused=True)
    scheduler = build_scheduler(optimizer, name=config.lr_scheduler, warmup_steps=config.warmup_steps,
                                total_steps=total, scheduler_kwargs=config.lr_scheduler_kwargs)
    return optimizer, scheduler


# ------------------------------------------------------------------------------------------------ the run

class Run:
    """One run's bookkeeping around a recipe; :func:`execute` drives it."""

    def __init__(self, config: Any, *, root: Path, ranks: distributed.Ranks, device: torch.device,
                 steps_per_epoch: int, total_steps: int, progress: Progress, resumed: bool, desc: str):
        self.config, self.root, self.ranks, self.device = config, root, ranks, device
        self.steps_per_epoch, self.total_steps, self.progress, self.desc = steps_per_epoch, total_steps, progress, desc
        self.clock = Clock(progress.elapsed)
        writer = (MetricsWriter(root / ckpt.METRICS_FILE, keep_through_step=progress.global_step if resumed else None)
                  if ranks.is_main else DiscardMetrics())
        self.reporter = RunReporter(writer, config, backend="native", enabled=ranks.is_main)
        self.mirror = storage.start_mirror(config, root) if ranks.is_main else None  # checkpoint_storage's uploads
        self.train_seconds, self.train_tokens, self.status = 0.0, 0, "success"
        self.stopped_by: str | None = None
        self.zero_grad_steps = 0
        self.ledger: MemoryLedger | None = None  # the run's memory ledger (engine.ledger), set by execute()
        self.state_saved: dict | None = None  # the progress (less the clock) of the newest training state written

    def save(self, recipe: Recipe, hf: bool) -> None:
        """An HF checkpoint (once per sample count) and the training state that goes with it (once per point of
        progress: a second save at the same point writes nothing)."""
        progress = self.progress
        if hf and progress.last_saved_samples != progress.samples_seen:
            path = recipe.save_checkpoint(progress.samples_seen)  # every rank takes part (FSDP2 gathers)
            if path is not None:
                ckpt.prune_hf_checkpoints(self.root, self.config.keep_last_n_checkpoints)
                if self.mirror:
                    self.mirror.add(path)
                self.reporter.saved(path)
            progress.last_saved_samples = progress.samples_seen
        state = progress.state(self.clock())
        where = {k: v for k, v in state.items() if k != "elapsed"}
        if where == self.state_saved:  # e.g. the final save right after a scheduled one: at 8B each is ~100 GB
            return
        recipe.save_state(state)
        self.state_saved = where
        if self.mirror:
            self.mirror.add(ckpt.complete_states(self.root)[-1])

    def validate(self, recipe: Recipe) -> None:
        stats = recipe.validate()
        progress = self.progress
        self.reporter.write({"type": "validation", "step": progress.global_step,
                             "epoch": round(progress.fractional_epoch(self.steps_per_epoch), 6), **stats,
                             "elapsed": round(self.clock(), 4)})
        progress.last_validation = stats
        logger.info("validation %s at step %d", " ".join(f"{k} {v:.4g}" for k, v in stats.items()
                                                         if isinstance(v, float)), progress.global_step)

    def record_step(self, recipe: Recipe, step: Step, out: StepOutcome, seconds: float, steps_in_epoch: int,
                    bar) -> None:
        """Count the step, write its record, show it, then validate/save as scheduled."""
        config, progress = self.config, self.progress
        self.check_finite(step, out)
        self.train_seconds += seconds
        self.train_tokens += step.num_tokens
        before = progress.count(step)
        progress.last = {"loss": out.loss, **out.extra}
        record = step_record(step=progress.global_step, epoch=progress.fractional_epoch(steps_in_epoch),
                             loss=out.loss, lr=out.lr, grad_norm=out.grad_norm, samples=step.num_samples,
                             tokens=step.num_tokens, loss_tokens=out.loss_tokens, seconds=seconds,
                             elapsed=self.clock(), max_steps=self.total_steps)
        self.reporter.write({**record, **out.extra})
        bar.update(1)
        bar.set_postfix(loss=f"{out.loss:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
        if progress.global_step % config.logging_steps == 0:  # a line each N steps where no bar shows them
            logger.log(logging.DEBUG if not bar.disable else logging.INFO,"step %d/%d loss %.4f lr %.3g grad_norm %.3f %.0f tok/s%s", progress.global_step,
                        self.total_steps, out.loss, out.lr, out.grad_norm, record["tokens_per_second"],
                        "".join(f" {k} {v:.4g}" for k, v in out.extra.items() if isinstance(v, float)))
        if config.eval_steps and progress.global_step % config.eval_steps == 0:
            self.validate(recipe)
        every = config.save_samples
        if every and progress.samples_seen // every > before // every:
            self.save(recipe, hf=True)

    def obey_callbacks(self, recipe: Recipe) -> bool:
        """Act on ``ctx.control`` as a hook left it after this step: save now; True to end training here.

        Rank 0's flags decide for every rank (hooks run there); without callbacks nothing is exchanged.
        """
        if not getattr(self.config, "callbacks", None):
            return False
        control = self.reporter.ctx.control
        save, stop = distributed.broadcast(self.ranks, (control.should_save, control.should_training_stop))
        control.should_save = False
        if save:
            self.save(recipe, hf=True)
        if stop:
            self.stopped_by = "callback"
            logger.info("a callback asked training to stop at step %d", self.progress.global_step)
        return stop

    def check_finite(self, step: Step, out: StepOutcome) -> None:
        """Stop on a non-finite loss or gradient norm (the recipe has not applied the step); warn on a collapse."""
        if math.isfinite(out.loss) and math.isfinite(out.grad_norm):
            self.zero_grad_steps = self.zero_grad_steps + 1 if out.grad_norm == 0.0 else 0
            if self.zero_grad_steps == 3:
                logger.warning("the gradient norm has been exactly 0 for 3 steps (loss %.4f at step %d): nothing is "
                               "learning; check the loss mask of your data and the learning rate", out.loss,
                               self.progress.global_step + 1)
            return
        number = self.progress.global_step + 1
        self.reporter.write({"type": "train", "step": number, "loss": out.loss, "lr": out.lr,
                             "grad_norm": out.grad_norm, "samples": step.num_samples, "tokens": step.num_tokens,
                             "diverged": True, "elapsed": round(self.clock(), 4)})
        found = ckpt.hf_checkpoints(self.root) if self.ranks.is_main else []
        raise TrainingDivergedError(
            f"training diverged at step {number}: loss {out.loss}, gradient norm {out.grad_norm}, learning rate "
            f"{out.lr:.3g}. The step was not applied and nothing was saved from it; the last good checkpoint is "
            f"{found[-1] if found else 'none (no checkpoint was saved before)'}. Lower learning_rate, set or lower "
            "max_grad_norm, add warmup_steps, or check the data; resume=True continues from the last saved state.")

    def end_epoch(self, recipe: Recipe, has_validation: bool) -> None:
        """Advance to the next epoch; validate and (with ``checkpoint_at_epoch``) save the one just finished."""
        self.progress.epoch += 1
        self.progress.step_in_epoch = 0
        if has_validation:
            self.validate(recipe)
        if self.config.checkpoint_at_epoch:
            self.save(recipe, hf=True)
        self.reporter.epoch_end()

    def result(self, recipe: Recipe) -> TrainingResult:
        """The run's result (the same on every rank), after the process group's teardown."""
        ranks, progress = self.ranks, self.progress
        checkpoints = distributed.broadcast(ranks, ckpt.hf_checkpoints(self.root) if ranks.is_main else None)
        metrics = {
            **recipe.result_metrics(progress), **({"stopped_by": self.stopped_by} if self.stopped_by else {}),
            "steps": progress.global_step, "samples": progress.samples_seen, "tokens": progress.tokens_seen,
            "tokens_per_second": self.train_tokens / self.train_seconds if self.train_seconds > 0 else None,
            "elapsed_seconds": self.clock(), "peak_memory_bytes": peak_memory_bytes(self.device),
            "device": str(self.device), "metrics_path": str(self.root / ckpt.METRICS_FILE),
            **({"memory": self.ledger.metrics()} if self.ledger else {}),
        }
        if ranks.distributed:
            metrics.update(num_processes=ranks.world_size, strategy=ranks.strategy)
            metrics = distributed.broadcast(ranks, metrics)  # rank 0's clock and memory
        distributed.teardown(ranks)
        result = TrainingResult(status=self.status, checkpoint_path=str(checkpoints[-1]) if checkpoints else None,
                                metrics=metrics, output_dir=str(self.root))
        self.reporter.end(result)
        return result


def train_epoch(run: Run, recipe: Recipe, steps: list[Step], bar, sigterm: dict) -> bool:
    """Run the epoch's remaining steps (up to ``max_steps``); True when a stop was asked."""
    progress = run.progress
    watched = steps_to_watch(steps, progress.global_step - progress.step_in_epoch)
    while progress.step_in_epoch < len(steps) and progress.global_step < run.total_steps:
        run.reporter.step_begin()
        step = steps[progress.step_in_epoch]
        t0 = time.perf_counter()
        with run.ledger.watch(progress.step_in_epoch in watched) if run.ledger else contextlib.nullcontext():
            out = recipe.train_step(step, lambda: sigterm["stop"])  # asked late in the step, as ranks agree
        run.record_step(recipe, out.step or step, out, time.perf_counter() - t0, len(steps), bar)
        # Several ranks stop on the step they agreed on; one process also on a signal that came while it logged.
        if out.stop or (not run.ranks.distributed and sigterm["stop"]):
            return True
        if run.obey_callbacks(recipe):
            run.total_steps = progress.global_step  # a hook asked to end here: the run ends as at its last step
            break
    return False


def execute(run: Run, recipe: Recipe, has_validation: bool) -> TrainingResult:
    """Train until ``num_epochs`` or ``max_steps`` (or a stop), save the final checkpoint, return the result."""
    config, progress = run.config, run.progress
    run.ledger = MemoryLedger.of(recipe, run.device)
    run.reporter.begin(run.total_steps, progress.global_step, progress.samples_seen)
    bar = progress_bar(run.total_steps, progress.global_step, config.disable_progress_bar or not run.ranks.is_main,
                       desc=run.desc)
    try:
        with stop_on_signals() as sigterm:
            while progress.epoch < config.num_epochs and progress.global_step < run.total_steps:
                steps = recipe.plan_epoch(progress.epoch)
                if progress.step_in_epoch == 0:
                    run.reporter.epoch_begin()
                if train_epoch(run, recipe, steps, bar, sigterm):
                    run.save(recipe, hf=False)
                    run.status, run.stopped_by = "stopped", sigterm["signal"] or "SIGTERM"
                    logger.warning("%s: saved the training state at step %d; resume with resume=True",
                                   run.stopped_by, progress.global_step)
                    break
                if progress.step_in_epoch < len(steps):  # stopped by max_steps inside the epoch
                    break
                run.end_epoch(recipe, has_validation)
            if run.status == "success" and config.save_final_checkpoint:
                run.save(recipe, hf=True)  # still under the handlers: a stop request waits for the write
    except Exception:
        if run.mirror:
            run.mirror.finish()  # uploads under way end complete or unmarked; the run's own error is the one raised
        raise
    finally:
        bar.close()
        run.reporter.close()
    result = run.result(recipe)
    storage.finish_mirror(run.mirror)  # after the process group's teardown: the other ranks are not kept waiting
    return result
