"""What the adapter backends (``instructlab-training`` for sft, ``mini-trainer`` for osft) share.

An adapter hands the training itself to a third-party engine and keeps the rest of the run ours, so a call behaves
the same whichever backend runs it:

1. **Availability** (:func:`engine_availability`): the engine's package is installed (an optional extra) *and*
   CUDA is present. Both engines train on CUDA GPUs only, so without CUDA ``is_available()`` is False with the
   reason, and the default backend falls to ``native``.
2. **Parameters**: the algorithm validates the call against our declaration first (same defaults, same errors);
   each adapter then translates the typed config into the engine's ``TrainingArgs`` / ``TorchrunArgs`` in one
   pure function, and refuses -- in one :class:`ParameterError`, before any work -- the parameters the caller gave
   that the engine cannot honour (its ``refusals()``, the same rule that chooses the default backend).
3. **Data** (:func:`prepare_engine_data`): our pipeline validates (file:line errors), tokenizes with exact loss
   masks, applies our length policy and caches; the result is written as the tokenized JSONL both engines read
   (``input_ids``, ``labels``, ``len``, ``num_loss_counted_tokens``). ``use_processed_dataset=True`` passes an
   already tokenized ``data_path`` through untouched, as upstream does.
4. **Reporting** (:func:`run_adapter`): the engine gets one extra callback
   (:class:`~training_hub.backends.engine_events.TrainingHubEvents`) whose rank-0 copy appends its events to a
   file; a helper thread of this process follows the file while the engine runs in the calling thread, and feeds
   a :class:`RunReporter`: metrics.jsonl in our schema, the shared loggers (TensorBoard, MLflow, W&B) and the
   user's ``TrainingHubCallback`` hooks, called as the steps arrive (a failing hook is logged, as everywhere). If
   the following itself fails (metrics.jsonl cannot be written, a logger raises), the engine's processes are
   terminated and the error is raised.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Dict

from training_hub.backends.common import BuiltinBackend, native_only_problems
from training_hub.config.processes import launch_plan
from training_hub.data.training import prepare_training_data
from training_hub.registry import Availability

logger = logging.getLogger("training_hub")

EVENTS_ENV = "TRAINING_HUB_ENGINE_EVENTS"
EVENTS_FILE = "engine_events.jsonl"
DATA_DIR = "engine"  # under the data cache: data.jsonl (+ validation.jsonl) in the engines' format
POLL_SECONDS = 0.5


# ------------------------------------------------------------------------------------------------ availability


def engine_availability(module: str, distribution: str, extra: str, engine: str) -> Availability:
    """Installed (``module`` importable) and CUDA present; otherwise the reason, with what to do about it."""
    if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
        return Availability(False, f"needs {distribution} (pip install 'training-hub[{extra}]')")
    if importlib.util.find_spec("torch") is None:
        return Availability(False, "needs torch")
    import torch

    if not torch.cuda.is_available():
        return Availability(False, f"{engine} trains on CUDA GPUs only and torch.cuda.is_available() is False "
                                   "here; the native backend runs on this machine")
    return Availability(True)


# ------------------------------------------------------------------------------------------------ parameters

# name -> (fine(value, config) -> bool, why). Checked only for the names the caller gave.
Rules = dict[str, tuple[Callable[[Any, Any], bool], str]]


def unsupported(config, given: set[str], rules: Rules) -> list[str]:
    """Every given parameter the engine cannot honour, with why (the backends' ``refusals``)."""
    return [f"{name}={getattr(config, name)!r}: {why}" for name, (fine, why) in rules.items()
            if name in given and not fine(getattr(config, name), config)]


def engine_options(args_class: type, not_passed: frozenset[str], declared: type) -> frozenset[str]:
    """Fields of an engine's ``TrainingArgs`` a caller may pass through as they are: not ours (``declared``), and
    not the ones the adapter itself must own (``not_passed``: paths, data handling, callbacks)."""
    from training_hub.config.declare import param_specs

    names = set(getattr(args_class, "model_fields", None) or {f.name for f in dataclasses.fields(args_class)})
    return frozenset(names - set(not_passed) - set(param_specs(declared)))


@functools.lru_cache(maxsize=None)
def engine_module(package: str, relative: str) -> Any:
    """One module file of an installed engine, loaded on its own, or None where the engine is not installed.

    Used for the engines' ``TrainingArgs`` declarations: their package ``__init__`` imports the whole trainer
    (seconds; numba, accelerate), which validating a call does not need."""
    spec = importlib.util.find_spec(package.split(".")[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location, *package.split(".")[1:], relative)
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location(f"_training_hub_{package}_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            with warnings.catch_warnings():  # the engines' own deprecation notices are not the caller's business
                warnings.simplefilter("ignore", DeprecationWarning)
                module_spec.loader.exec_module(module)
            return module
    return None


def torchrun_fields(config) -> dict[str, Any]:
    """Our distributed parameters (with cluster ``PET_*`` values, see ``config.processes``) as the engine's TorchrunArgs
    fields. ``nproc_per_node='auto'`` stays torchrun's ``'gpu'``: one process per GPU of the node."""
    auto = config.nproc_per_node in ("auto", "gpu") and not os.environ.get("PET_NPROC_PER_NODE")
    plan = launch_plan(dataclasses.replace(config, nproc_per_node=1) if auto else config)
    return {"nproc_per_node": "gpu" if auto else plan.nproc_per_node, "nnodes": plan.nnodes,
            "node_rank": plan.node_rank, "rdzv_id": plan.rdzv_id or "training_hub",
            "rdzv_endpoint": plan.rdzv_endpoint, "master_addr": plan.master_addr, "master_port": plan.master_port}


# ------------------------------------------------------------------------------------------------ data


@dataclass
class EngineData:
    """Tokenized data in the engines' JSONL format."""

    train_path: str
    validation_path: str | None = None
    pretokenized: bool = False  # the caller's own tokenized file (use_processed_dataset=True)

    @property
    def directory(self) -> str:
        return str(Path(self.train_path).parent)


def _check_pretokenized(path: str, what: str) -> None:
    from training_hub.data.errors import DataProblem, DataValidationError

    file = Path(path)
    if not file.is_file():
        raise DataValidationError([DataProblem(str(file), 0, what, "no such file",
                                               "a .jsonl file of tokenized samples (use_processed_dataset=True)")])
    with open(file, encoding="utf-8") as handle:
        first = handle.readline()
    try:
        record = json.loads(first)
    except json.JSONDecodeError as exc:
        raise DataValidationError([DataProblem(str(file), 1, what, f"not JSON ({exc.msg})",
                                               "one JSON object per line")]) from None
    if not isinstance(record, dict) or not isinstance(record.get("input_ids"), list):
        raise DataValidationError([DataProblem(
            str(file), 1, "input_ids", "missing", "tokenized records {'input_ids': [...], 'labels': [...]} "
            "(use_processed_dataset=True), or leave use_processed_dataset out to give chat/pretraining records")])


def write_engine_jsonl(dataset, path: Path) -> None:
    """Write our prepared samples (input_ids, labels, length) as the engines' JSONL, atomically."""
    def counts(batch):
        return {"num_loss_counted_tokens": [sum(1 for t in labels[1:] if t != -100) for labels in batch["labels"]]}

    table = dataset.select_columns(["input_ids", "labels", "length"]).rename_column("length", "len")
    table = table.map(counts, batched=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    table.to_json(str(tmp), lines=True)
    os.replace(tmp, path)


def prepare_engine_data(config, root: Path) -> EngineData:
    """Validate and tokenize with our pipeline, then write the engines' JSONL (see the module doc).

    The validation split is left to the engine (it gets ``validation_split``); a separate
    ``validation_data_path`` is prepared the same way as the training data.
    """
    cache = Path(config.data_output_dir) if config.data_output_dir else root / "data_cache"
    out = cache / DATA_DIR
    if config.use_processed_dataset:
        _check_pretokenized(config.data_path, "data_path")
        if config.validation_data_path:
            _check_pretokenized(config.validation_data_path, "validation_data_path")
        # instructlab-training reads <data_output_dir>/data.jsonl whatever data_path says: link the file there
        out.mkdir(parents=True, exist_ok=True)
        link = out / "data.jsonl"
        link.unlink(missing_ok=True)
        link.symlink_to(Path(config.data_path).resolve())
        return EngineData(str(link), config.validation_data_path, pretokenized=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_path, trust_remote_code=config.trust_remote_code)
    data = prepare_training_data(dataclasses.replace(config, validation_split=0.0), tokenizer, root)
    write_engine_jsonl(data.train, out / "data.jsonl")
    validation = None
    if data.validation is not None:
        validation = out / "validation.jsonl"
        write_engine_jsonl(data.validation, validation)
    return EngineData(str(out / "data.jsonl"), validation and str(validation))


# ------------------------------------------------------------------------------------------------ the run


class EventFollower:
    """Turns the engine events (JSON lines from ``TrainingHubEvents``) into our records and hooks."""

    def __init__(self, path: Path, reporter, stop: Callable[[], None] = lambda: None):
        self.path, self.reporter, self.stop = path, reporter, stop
        self.stop_sent = self.save_warned = False
        self.offset = 0
        self.samples = self.tokens = 0
        self.started = time.perf_counter()
        self.last_loss: float | None = None
        self.steps = 0

    def poll(self) -> None:
        """Handle every complete line appended since the last call."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        for line in chunk[:end].decode("utf-8").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("skipping an unreadable engine event line: %r", line[:200])
                continue
            self.handle(event)

    def handle(self, event: dict) -> None:
        kind = event.get("event")
        batch = event.get("batch_metrics", {})
        if kind == "step":
            # Per-step counts: mini-trainer reports them in batch_metrics, instructlab-training as running totals.
            if "num_samples" in batch:
                samples = int(batch["num_samples"])
            else:
                samples = max(int(event.get("total_samples", self.samples)) - self.samples, 0)
            if "num_total_tokens" in batch:
                tokens = int(batch["num_total_tokens"])
            else:
                tokens = max(int(event.get("total_tokens", self.tokens)) - self.tokens, 0)
            loss = event.get("loss", batch.get("loss"))
            record = {"type": "train", "step": int(event.get("step", self.steps + 1)),
                      "epoch": event.get("epoch", batch.get("epoch", 0)), "loss": loss,
                      "lr": event.get("learning_rate", batch.get("lr")),
                      "grad_norm": event.get("grad_norm", batch.get("grad_norm")),
                      "samples": samples, "tokens": tokens,
                      "elapsed": round(time.perf_counter() - self.started, 4)}
            if "num_loss_counted_tokens" in batch:
                record["loss_tokens"] = int(batch["num_loss_counted_tokens"])
            self.samples, self.tokens, self.steps = self.samples + samples, self.tokens + tokens, record["step"]
            self.last_loss = loss if loss is not None else self.last_loss
            self.reporter.write(record)
        elif kind == "evaluate":
            values = dict(event.get("val_metrics", {}))
            loss = values.pop("val_loss", values.pop("loss", None))
            self.reporter.write({"type": "validation", "step": int(event.get("step", self.steps)),
                                 "epoch": event.get("epoch", 0), "loss": loss, **values,
                                 "elapsed": round(time.perf_counter() - self.started, 4)})
        elif kind == "save" and event.get("checkpoint_path"):
            self.reporter.saved(event["checkpoint_path"])
        elif kind in ("epoch_begin", "step_begin", "epoch_end"):
            getattr(self.reporter, kind)()
        self.steer()

    def steer(self) -> None:
        """A hook's ``ctx.control``: a stop becomes SIGTERM to the engine (which saves its state, as on a
        preemption); a save request cannot reach a third-party engine's schedule, and says so once."""
        control = self.reporter.ctx.control
        if control.should_save and not self.save_warned:
            logger.warning("callbacks: ctx.control.should_save is not honoured by this engine (it saves on its own "
                           "schedule: save_samples / checkpoint_at_epoch); use backend='native' for that")
            self.save_warned = True
        control.should_save = False
        if control.should_training_stop and not self.stop_sent:
            logger.info("a callback asked training to stop at step %d: stopping the engine", self.steps)
            self.stop_sent = True
            self.stop()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), each listed before its own children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_children(spare: set[int], sig: int = signal.SIGTERM) -> None:
    """Ask the processes started since ``spare`` was taken (the engine's launcher and its workers) to stop."""
    for pid in descendants(os.getpid()):
        if pid not in spare:
            try:
                os.kill(pid, sig)
            except OSError:
                pass


def newest_checkpoint(root: Path) -> str | None:
    from training_hub.engine.checkpoint import HF_DIR, hf_checkpoints

    found = hf_checkpoints(root)
    last_epoch = root / HF_DIR / "last_epoch"  # instructlab-training with keep_last_checkpoint_only
    if last_epoch.is_dir() and (not found or last_epoch.stat().st_mtime >= found[-1].stat().st_mtime):
        return str(last_epoch)
    return str(found[-1]) if found else None


def run_adapter(config, *, backend: str, launch: Callable[[EngineData], None]) -> Any:
    """Prepare the data, run ``launch(data)`` (the engine) while following its events; the result.

    ``launch`` runs in the calling thread: the engines install their own signal handlers there (Ctrl-C, and the
    preemption signals of ``on_demand_checkpointing``), which Python allows in the main thread only. A helper
    thread follows the events meanwhile and feeds the reporter; if that fails, it stops the engine's processes
    and its exception is the one raised.
    """
    from training_hub.engine.checkpoint import check_output_dir
    from training_hub.engine.metrics import MetricsWriter
    from training_hub.engine.reporter import RunReporter
    from training_hub.result import TrainingResult

    root = Path(config.ckpt_output_dir)
    check_output_dir(root, resume=False)
    data = prepare_engine_data(config, root)  # a data error leaves root untouched (the cache is written after)
    from training_hub.fsutil import claim_directory
    with claim_directory(root):  # creates root; one live run per output directory (the parent holds it)
        events = root / EVENTS_FILE
        events.unlink(missing_ok=True)
        reporter = RunReporter(MetricsWriter(root / "metrics.jsonl"), config, backend=backend)  # loggers fail here
        spare = set(descendants(os.getpid()))  # the caller's own child processes are left alone on a stop
        follower = EventFollower(events, reporter, stop=lambda: stop_children(spare))
        done = threading.Event()
        follow_failure: list[BaseException] = []

        def follow() -> None:
            try:
                while not done.wait(POLL_SECONDS):
                    follower.poll()
                follower.poll()  # the events written before the engine returned
            except BaseException as exc:  # the reporter failed (hooks' own errors are logged): stop the run
                follow_failure.append(exc)
                stop_children(spare)

        previous = os.environ.get(EVENTS_ENV)
        os.environ[EVENTS_ENV] = str(events.resolve())  # the torchrun workers inherit it
        watcher = threading.Thread(target=follow, name=f"training_hub-{backend}-events", daemon=True)
        try:
            reporter.begin(total_steps=None)  # on_train_begin; the engine decides the number of steps
            watcher.start()
            try:
                launch(data)
            except BaseException as exc:
                if follower.stop_sent and not follow_failure and isinstance(exc, Exception):
                    logger.info("the engine ended on the callback's stop request (%s)", type(exc).__name__)
                elif not follow_failure:
                    raise
                else:
                    raise follow_failure[0] from exc  # the engine failed because the follower stopped it
            finally:
                done.set()
                watcher.join()
        finally:
            if previous is None:
                os.environ.pop(EVENTS_ENV, None)
            else:
                os.environ[EVENTS_ENV] = previous
            reporter.close()
        if follow_failure:
            raise follow_failure[0]
        result = TrainingResult(
            status="success", checkpoint_path=newest_checkpoint(root), output_dir=str(root),
            metrics={"final_loss": follower.last_loss, "steps": follower.steps, "samples": follower.samples,
                     "tokens": follower.tokens, "seconds": round(time.perf_counter() - follower.started, 3),
                     **({"stopped_by": "callback"} if follower.stop_sent else {})},
            extra={"backend": backend, "data_path": data.train_path})
        reporter.end(result)
        return result


# ------------------------------------------------------------------------------------------------ the backend


class EngineAdapter(BuiltinBackend):
    """A backend that hands training to a third-party engine; a subclass declares the engine and its translation.

    ``run``: the call arrives validated and checked against ``refusals()`` (``BuiltinBackend.train_config``); it is
    translated once with placeholder data (the engine's own classes check the options before any work), then
    :func:`run_adapter`.
    """

    package: ClassVar[str]  # the engine's importable package, e.g. "instructlab.training"
    distribution: ClassVar[str]  # its PyPI name
    extra: ClassVar[str]  # our extra that installs it
    args_file: ClassVar[str]  # the module file (in ``package``) that declares its TrainingArgs
    rules: ClassVar[Rules] = {}
    not_passed: ClassVar[frozenset[str]] = frozenset()  # TrainingArgs fields the adapter owns

    @property
    def refusal_hint(self) -> str:  # type: ignore[override]
        return f"backend='native' supports all of these; or leave them out to use {self.name}"

    @classmethod
    def translate(cls, config, data: EngineData, given: set[str], options: Dict[str, Any]):
        """``(TrainingArgs, TorchrunArgs)`` of the engine."""
        raise NotImplementedError

    @classmethod
    def run_engine(cls, torch_args, train_args) -> None:
        raise NotImplementedError

    @classmethod
    def is_available(cls) -> Availability:
        return engine_availability(cls.package, cls.distribution, cls.extra, cls.name)

    @classmethod
    def refusals(cls, config, given: set[str]) -> list[str]:
        """The given parameters the engine has no setting for (``rules``); used to choose the default backend."""
        return native_only_problems(config) + unsupported(config, given, cls.rules)

    @classmethod
    def passthrough_params(cls) -> frozenset[str]:
        """The engine's TrainingArgs fields accepted as they are; empty when the engine is not installed."""
        module = engine_module(cls.package, cls.args_file)
        return engine_options(module.TrainingArgs, cls.not_passed, cls.config_class()) if module else frozenset()

    def run(self, config: Any, given: set[str], options: Dict[str, Any]) -> Any:
        self.translate(config, EngineData("data.jsonl"), given, options)  # bad options fail here, before any work

        def launch(data: EngineData) -> None:
            train_args, torch_args = self.translate(config, data, given, options)
            self.run_engine(torch_args, train_args)

        return run_adapter(config, backend=self.name, launch=launch)

