"""Sharded training state under FSDP2: every rank writes its own shards (``torch.distributed.checkpoint``, DCP).

A state ``state/step_<S>/`` written by an FSDP2 run::

    sharded/.metadata, sharded/__<r>_0.distcp   model and optimizer ({"model": ..., "optim": ...}), each rank's
                                                shards in its own file, nothing gathered (rank 0 holds no more than
                                                its own shards, instead of the whole model and optimizer)
    scheduler.pt                                rank 0
    rng.pt, rng_<r>.pt                          each rank's RNG state (rank 0's as rng.pt, as in a one-process state)
    trainer_state.json                          rank 0, once every rank has written its files (its presence marks
                                                a whole state)

Every rank writes into the one temporary directory rank 0 creates (``.tmp-step_<S>-...``); rank 0 renames it to
its final name after a barrier, so a directory with the final name is whole. Such a state resumes under FSDP2 with
any number of processes (DCP reshards) and in one process or under DDP (each process reads it whole); a one-process
state (model.pt, optimizer.pt) resumes under FSDP2 through ``distributed.load_full_training_state``. Ranks that do
not share ``ckpt_output_dir`` (nodes without a common file system) cannot write one directory: their run gathers
the state to rank 0 instead, as a one-process run stores it.

Reading is held to the rule of ``checkpoint``: nothing in an output directory can run code on resume. DCP's own
reader unpickles ``.metadata`` with plain ``pickle`` and the non-tensor values (the optimizer's hyperparameters)
with ``torch.load(weights_only=False)``; here the metadata is unpickled with an allowlist of DCP's metadata
classes and the values with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from training_hub.engine import checkpoint as ckpt
from training_hub.engine import distributed

SHARDED_DIR = ckpt.SHARDED_DIR
logger = logging.getLogger(__name__)


class _NotShared(Exception):
    """Some rank does not see the directory rank 0 created."""


def save(root: Path, *, model, optimizer, scheduler, progress: dict, ranks: distributed.Ranks) -> bool:
    """Write ``state/step_<S>`` as a sharded state (every rank must call), then drop older states.

    False (nothing written) when the ranks do not share ``root``; the caller then saves a gathered state.
    """
    final = Path(root) / ckpt.STATE_DIR / f"step_{progress['global_step']:09d}"
    try:
        with (ckpt.atomic_directory(final) if ranks.is_main else contextlib.nullcontext()) as tmp:
            tmp = Path(distributed.broadcast(ranks, str(tmp) if ranks.is_main else None))
            (seen,) = distributed.all_sum(ranks, float(tmp.is_dir()))
            if seen < ranks.world_size:
                raise _NotShared
            _write_shards(tmp, model, optimizer, ranks)
            if ranks.is_main:
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            distributed.barrier(ranks)  # every rank's files are written and closed
            if ranks.is_main:  # last: its presence marks a whole state
                (tmp / ckpt.STATE_FILE).write_text(json.dumps(progress, indent=2))
    except _NotShared:
        if ranks.is_main:
            logger.warning("the ranks of this run do not share ckpt_output_dir %s (no common file system): the "
                           "training state is gathered to rank 0 instead of written in shards", root)
        return False
    if ranks.is_main:
        ckpt.prune_states(root)
    return True


def _write_shards(directory: Path, model, optimizer, ranks: distributed.Ranks) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)  # this rank's shards (DTensors), no gather
    torch.save(ckpt._rng_state(), directory / ckpt.rng_file(ranks.rank))
    try:
        dcp.save({"model": model_state, "optim": optimizer_state},
                 storage_writer=dcp.FileSystemWriter(directory / SHARDED_DIR),
                 process_group=ranks.cpu_group, no_dist=not ranks.distributed)
    except CheckpointException as exc:  # a BaseException: the run's error handling expects an Exception
        raise RuntimeError(f"writing the sharded training state into {directory} failed: {_failures(exc)}") from None


def _failures(exc: CheckpointException) -> str:
    """Each failing rank's error, in one line each (DCP's own message carries every traceback)."""
    return "; ".join(f"rank {rank}: {type(error).__name__}: {error}" for rank, (error, _) in exc.failures.items())


def load(path: Path, *, model, optimizer, ranks: distributed.Ranks = distributed.SINGLE) -> None:
    """Load the model and optimizer of the sharded state at ``path``: into this rank's shards under FSDP2 (every
    rank must call; any number of ranks), else whole into ``model`` (not a DDP wrapper) and ``optimizer``."""
    reader = SafeReader(Path(path) / SHARDED_DIR)
    reader.read_metadata()  # a refused file stops the resume here, before anything is changed
    model_state, optimizer_state = get_state_dict(model, optimizer)  # the layout to fill (initialises AdamW's)
    state = {"model": model_state, "optim": optimizer_state}
    try:
        with warnings.catch_warnings():  # one process reading it whole is what is meant here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(path), process_group=ranks.cpu_group,
                     no_dist=not ranks.fsdp)
    except CheckpointException as exc:  # a BaseException naming each rank's failure: raise ours as it is
        refused = [e for e, _ in exc.failures.values() if isinstance(e, ValueError) and "read safely" in str(e)]
        if refused:
            raise refused[0] from None
        raise RuntimeError(f"reading the sharded training state {path} failed: {_failures(exc)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# ------------------------------------------------------------------------------------------------ safe reading

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "MetadataIndex", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "pathlib._local": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: its own classes, torch dtypes and sizes, paths; nothing else."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")


def _refused(what: str, state: Path, exc: Exception) -> ValueError:
    return ckpt.unsafe_file_error(what, state, exc, allowed="a checkpoint's metadata, tensors and plain values")


class SafeReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` unpickled through :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        file = Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata")
        with self.fs.create_stream(file, "rb") as stream:
            try:
                metadata = _MetadataUnpickler(stream).load()
            except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError) as exc:
                raise _refused(str(file), file.parent.parent, exc) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, with the non-tensor values read by ``torch.load(weights_only=True)``."""

    def __init__(self, state: Path):
        super().__init__()
        self.state = Path(state)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if "unsupported" in ln.lower()), "")
            raise _refused(f"{fqn} in {self.state / SHARDED_DIR}", self.state, first or exc) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
