"""Start a run of several processes from a Python call: ``sft(..., nproc_per_node=2)`` re-launches itself via torchrun.

``run_training(config, method_class)`` is what the native backends call:

* inside a torchrun worker (``RANK``/``WORLD_SIZE`` set: the user ran ``torchrun ... script.py``, or this module
  launched us), or when the run needs one process: ``train_sft`` right here;
* otherwise: write the validated config to ``run.json`` in a temporary directory, run
  ``python -m torch.distributed.run <rendezvous args> -m training_hub.engine.worker run.json`` and wait. The workers
  rebuild the config and call ``train_sft``; local rank 0 writes ``result.json`` (the run's result, the same on
  every rank), which becomes the return value here.

The process count comes from ``nproc_per_node`` x ``nnodes`` (``training_hub.config.processes.launch_plan``, which
also reads the values cluster launchers put in the environment).

Failure: torchrun stops every worker as soon as one fails; the raised :class:`WorkerError` carries the first
failing worker's error (the error file torchrun's ``record`` writes) or, without one, the end of the output.
Ctrl-C (KeyboardInterrupt) and SIGTERM here are passed on to torchrun, which passes them to the workers; a
worker group still alive 30 s later is killed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from training_hub.config.processes import LaunchPlan, in_torchrun_worker, launch_plan
from training_hub.result import TrainingResult

__all__ = ["LaunchPlan", "WorkerError", "launch", "launch_plan", "run_training", "torchrun_args"]

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
RESULT_FILE = "result.json"
DEFAULT_MASTER_PORT = 29500
GRACE_SECONDS = 30


class WorkerError(RuntimeError):
    """A worker of a multi-process run failed; the message holds its error and traceback."""


def torchrun_args(plan: LaunchPlan) -> list[str]:
    """torchrun's command-line options for ``plan`` (the same options a user would type on each node)."""
    args = ["--nproc-per-node", str(plan.nproc_per_node), "--nnodes", str(plan.nnodes),
            "--node-rank", str(plan.node_rank)]
    if plan.rdzv_endpoint:
        return args + ["--rdzv-backend", "c10d", "--rdzv-endpoint", plan.rdzv_endpoint,
                       "--rdzv-id", str(plan.rdzv_id or "training_hub")]
    if plan.master_addr:
        return args + ["--master-addr", plan.master_addr, "--master-port", str(plan.master_port or DEFAULT_MASTER_PORT)]
    return args + ["--standalone"]  # one node: a local rendezvous on a free port


def run_training(config, method_class=None) -> TrainingResult:
    """Train ``config`` (an SFT-style config) in this process, or launch torchrun when it asks for more processes.

    ``method_class``: a ``TrainingMethod`` subclass with ``from_config(config)`` (e.g. ``OSFTMethod``), or None.
    """
    if in_torchrun_worker() or launch_plan(config).world_size == 1:
        from training_hub.engine.trainer import train_sft

        return train_sft(config, method_class.from_config(config) if method_class else None)
    return launch(config, method_class, launch_plan(config))


def _qualified_name(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def write_run_file(path: Path, config, method_class) -> None:
    """What a worker needs to rebuild the run: the config's class and values, the method's class, the log level.

    Callbacks travel as their class source (``training_hub.callbacks.serialize_callbacks``)."""
    from training_hub.callbacks import serialize_callbacks

    params = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    callbacks = serialize_callbacks(params.pop("callbacks", None) or [])
    spec = {"config_class": _qualified_name(type(config)),
            "method_class": _qualified_name(method_class) if method_class else None,
            "params": params, "callbacks": callbacks,
            "log_level": logging.getLogger("training_hub").getEffectiveLevel()}
    try:
        path.write_text(json.dumps(spec, indent=1))
    except TypeError as error:
        raise ValueError(f"a parameter cannot be passed to the worker processes: {error}") from None


def preflight(config) -> None:
    """User errors the workers would hit, raised here as themselves (ValueError subclasses), before any launch:
    bad data (file:line) and an existing run in ckpt_output_dir without resume=True."""
    from training_hub.data import check_data
    from training_hub.engine.storage import open_output_dir

    kind = "pretraining" if getattr(config, "is_pretraining", False) else "chat"
    for path in filter(None, (config.data_path, config.validation_data_path)):
        check_data(path, kind=kind, document_column_name=getattr(config, "document_column_name", "document"))
    open_output_dir(config, Path(config.ckpt_output_dir))  # a storage URL's newest state is fetched here, once


def check_gpus(plan: LaunchPlan) -> None:
    """On a CUDA machine, more processes per node than visible GPUs would share GPUs (and NCCL refuses that)."""
    import torch

    if torch.cuda.is_available() and plan.nproc_per_node > torch.cuda.device_count():
        raise ValueError(f"nproc_per_node={plan.nproc_per_node}, but this node has {torch.cuda.device_count()} "
                         "visible GPU(s); use at most that many (or nproc_per_node='auto')")


def launch(config, method_class, plan: LaunchPlan) -> TrainingResult:
    """Run torchrun with ``plan`` in a child process group; return the run's result or raise :class:`WorkerError`."""
    check_gpus(plan)
    preflight(config)
    workdir = Path(tempfile.mkdtemp(prefix="training_hub-launch-"))
    try:
        write_run_file(workdir / RUN_FILE, config, method_class)
        command = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(plan), "--log-dir",
                   str(workdir / "logs"), "-m", "training_hub.engine.worker", str(workdir / RUN_FILE)]
        logger.info("launching %s", " ".join(command))
        returncode, tail = run_process_group(command)
        result_file = workdir / RESULT_FILE
        if result_file.is_file() and (returncode == 0 or json.loads(result_file.read_text())["status"] == "stopped"):
            return TrainingResult(**json.loads(result_file.read_text()))
        raise WorkerError(failure_message(workdir, returncode, tail))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def failure_message(workdir: Path, returncode: int, tail: str) -> str:
    """The first worker error torchrun recorded (oldest error file), else the end of the run's stderr."""
    errors = sorted(workdir.glob("logs/**/error.json"), key=lambda p: p.stat().st_mtime_ns)
    for path in errors:
        try:
            record = json.loads(path.read_text())["message"]
        except (ValueError, KeyError, TypeError):
            continue
        if isinstance(record, dict):
            trace = record.get("extraInfo", {}).get("py_callstack", "")
            return (f"training worker (local rank {path.parent.name}) failed: {record.get('message')}\n"
                    f"{trace}".rstrip())
    return f"torchrun exited with code {returncode}; the end of its output:\n{tail}"


def _relay(stream, out, tail: collections.deque | None) -> None:
    """Copy a child's output to ours as it comes (progress bars included), keeping the end of it."""
    for chunk in iter(lambda: stream.read1(8192), b""):
        text = chunk.decode(errors="replace")
        out.write(text)
        out.flush()
        if tail is not None:
            tail.append(text)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def run_process_group(command: list[str]) -> tuple[int, str]:
    """Run ``command`` in its own process group, relay its output, pass Ctrl-C/SIGTERM on; never leave it running."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True, env=env)
    tail: collections.deque = collections.deque(maxlen=64)
    relays = [threading.Thread(target=_relay, args=(process.stdout, sys.stdout, None), daemon=True),
              threading.Thread(target=_relay, args=(process.stderr, sys.stderr, tail), daemon=True)]
    for relay in relays:
        relay.start()
    forward = lambda signum, frame: process.send_signal(signum)  # noqa: E731  torchrun passes it to the workers
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, forward)
    try:
        try:
            returncode = process.wait()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            _signal_group(process, signal.SIGKILL)
            process.wait()
        _signal_group(process, signal.SIGKILL)  # workers torchrun left behind (it should leave none)
        for relay in relays:
            relay.join(timeout=5)
    return returncode, "".join(tail)[-6000:]
