"""One torchrun worker of a launched run: ``python -m training_hub.engine.worker RUN_FILE`` (see ``engine.launch``).

Rebuilds the config (validated once, in the caller) and the training method from the run file, calls ``train_sft`` as one rank,
and on local rank 0 writes the run's result next to the run file. ``record`` (torchrun's) writes an uncaught
error to the error file torchrun gives each worker, where the launcher reads it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from training_hub.engine.launch import RESULT_FILE


def _import(qualified_name: str):
    module, _, name = qualified_name.partition(":")
    target = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    return target


def _write_result(path: Path, result) -> None:
    data = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


@record
def main(argv: list[str]) -> None:
    from training_hub.engine.trainer import train_sft

    run_file = Path(argv[0])
    spec = json.loads(run_file.read_text())
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("training_hub").setLevel(spec["log_level"] if rank == 0 else max(spec["log_level"],
                                                                                         logging.WARNING))
    config_class = _import(spec["config_class"])
    params = dict(spec["params"])
    if spec.get("callbacks"):
        from training_hub.callbacks import deserialize_callbacks

        params["callbacks"] = deserialize_callbacks(spec["callbacks"])
    config = config_class(**params)  # the caller validated these values; JSON keeps their types
    method = _import(spec["method_class"]).from_config(config) if spec["method_class"] else None
    result = train_sft(config, method)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _write_result(run_file.parent / RESULT_FILE, result)


if __name__ == "__main__":
    main(sys.argv[1:])
    # The run is complete and its result written. Skip interpreter finalisation: on CPU/gloo, the C++ threads of
    # torch's process group were seen (rarely) to abort the process while being destroyed at exit
    # ("terminate called without an active exception"), which would turn a finished run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)
