"""Mirroring output directories to a storage URL (any fsspec protocol) and fetching them back: complete or marked.

The remote layout is the local one, relative to a root directory (a run's ``ckpt_output_dir``). Each mirrored
directory is written file by file and closed by an ``.upload_complete`` marker, written last, that lists every file
with its size; a directory without the marker (an upload cut short by a kill, a lost node or a network failure) is
never fetched back, and it is deleted once a later upload of the same kind completes. :class:`Mirror` uploads in one
background thread from a hard-linked copy (so local pruning cannot cut an upload short); its owner waits for it.

Used by the engine and the trl backend (``checkpoint_storage``, :mod:`training_hub.engine.storage`) and by
:class:`training_hub.jit_checkpoint.RemoteCheckpointSyncCallback`. fsspec is imported on first use; S3 needs s3fs
(``pip install 'training-hub[storage]'``). S3 endpoints other than AWS come from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``; credentials from the usual AWS variables or files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any

from training_hub.fsutil import atomic_directory

logger = logging.getLogger("training_hub.storage")

CHECKPOINTS_DIR = "hf_format"  # the directory of Hugging Face checkpoints (engine.checkpoint.HF_DIR)
METRICS_FILE = "metrics.jsonl"  # goes along with every mirrored training state

COMPLETE_MARKER = ".upload_complete"
STAGING_DIR = ".upload_staging"
ATTEMPTS = 3
PARALLEL_FILES = 4


def storage_url(value: Any) -> str | None:
    """The storage URL of a ``checkpoint_storage`` value; None for the output directory only (None, "", "pvc")."""
    if value in (None, "", "pvc"):
        return None
    if isinstance(value, str) and "://" in value:
        protocol, _, path = value.partition("://")
        if protocol and path.strip("/"):
            return value.rstrip("/")
    raise ValueError(f"checkpoint_storage: must be None, 'pvc' (the output directory only) or a storage URL such "
                     f"as 's3://bucket/prefix' (any fsspec protocol); got {value!r}")


def stage(source: Path, staged: Path) -> None:
    """``source`` copied to ``staged`` for an upload, as hard links where the file system allows (instant, no
    space; deleting or rewriting the original cannot cut the upload short), else as a real copy."""
    shutil.rmtree(staged, ignore_errors=True)
    staged.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(source, staged, copy_function=os.link)
    except OSError:
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(source, staged)


class CheckpointStorageError(RuntimeError):
    """A mirror upload failed (the local checkpoints are intact), or the storage cannot be reached."""


class StorageProtocolError(CheckpointStorageError, ImportError):
    """fsspec has no implementation of the URL's protocol here (a package is missing, e.g. s3fs for s3://)."""


def filesystem(url: str):
    """An fsspec filesystem rooted at ``url`` (every path below is relative to it)."""
    import fsspec

    protocol, _, path = url.partition("://")
    options: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if protocol in ("s3", "s3a") and endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    if protocol in ("file", "local"):  # a mounted volume: make the folders an upload writes into
        options["auto_mkdir"] = True
    try:
        inner = fsspec.filesystem(protocol, **options)
    except (ImportError, ValueError) as exc:
        hint = " (pip install 'training-hub[storage]' for s3://)" if protocol in ("s3", "s3a") else ""
        raise StorageProtocolError(f"checkpoint_storage={url!r}: fsspec has no usable '{protocol}' backend here "
                                   f"({exc}){hint}") from None
    return fsspec.filesystem("dir", path=path, fs=inner)


def check_access(url: str):
    """Write, read and delete a probe object, so bad credentials or a missing bucket fail before training."""
    import uuid

    fs = filesystem(url)
    probe = f".training_hub-probe-{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"ok")
        if fs.cat_file(probe) != b"ok":
            raise OSError("the probe object read back differently")
        fs.rm_file(probe)
    except Exception as exc:
        raise CheckpointStorageError(
            f"checkpoint_storage={url!r} is not usable: not writable or not readable ({type(exc).__name__}: {exc}). "
            "Check the bucket, the "
            "credentials and, for an S3-compatible server, AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.") from None
    return fs


# ------------------------------------------------------------------------------------------------ remote listing

def _number(name: str) -> int | None:
    """The step or sample count in a mirrored directory's name: ``step_<S>``, ``samples_<N>`` or (Hugging Face
    Trainer's, the trl backend's states) ``checkpoint-<S>``; None for other names."""
    for prefix in ("step_", "checkpoint-"):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return int(name[len(prefix):])
    match = re.fullmatch(r"samples_(\d+)(?:\.0)?", name)
    return int(match.group(1)) if match else None


def remote_entries(fs, kind: str) -> dict[str, bool]:
    """The directories under ``kind`` (``state``, ``hf_format``, trl's ``trl_state``) on the storage: name ->
    complete (has the marker). Names without a step or sample count are left out."""
    try:
        fs.invalidate_cache()
        keys = fs.find(kind)
    except FileNotFoundError:
        return {}
    found: dict[str, bool] = {}
    for key in keys:
        parts = PurePosixPath(key).parts
        if len(parts) >= 3 and parts[0] == kind and _number(parts[1]) is not None and ".." not in parts:
            found[parts[1]] = found.get(parts[1], False) or (len(parts) == 3 and parts[2] == COMPLETE_MARKER)
    return found


def _by_number(names) -> list[str]:
    return sorted(names, key=lambda n: (_number(n), n))


def _remove_remote(fs, prefix: str) -> None:
    """Delete a mirrored directory, its marker first (a half-deleted one must not look complete)."""
    try:
        fs.rm_file(f"{prefix}/{COMPLETE_MARKER}")
    except FileNotFoundError:
        pass
    try:
        fs.rm(prefix, recursive=True)
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------------------ upload

def _put(fs, local: Path, remote: str, attempts: int = ATTEMPTS) -> None:
    for attempt in range(1, attempts + 1):
        try:
            fs.put_file(str(local), remote)
            return
        except Exception:
            if attempt == attempts:
                raise
            time.sleep(attempt)


def marker_of(local: Path) -> bytes:
    """The marker of directory ``local``: each file with its size, and the newest modification time (so a
    directory written again, even to the same sizes, reads as changed)."""
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    record = {"files": {p.relative_to(local).as_posix(): p.stat().st_size for p in files},
              "newest_mtime_ns": max((p.stat().st_mtime_ns for p in files), default=0)}
    return json.dumps(record, sort_keys=True).encode()


def upload_directory(fs, local: Path, prefix: str, attempts: int = ATTEMPTS) -> None:
    """Copy ``local`` to ``prefix`` file by file (each tried ``attempts`` times), then write the marker."""
    from concurrent.futures import ThreadPoolExecutor

    marker = marker_of(local)
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    with ThreadPoolExecutor(max_workers=PARALLEL_FILES) as pool:
        futures = [pool.submit(_put, fs, p, f"{prefix}/{p.relative_to(local).as_posix()}", attempts) for p in files]
        errors = [f.exception() for f in futures]  # wait for every file before deciding
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    fs.pipe_file(f"{prefix}/{COMPLETE_MARKER}", marker)


class Mirror:
    """The background uploader of one run (the main process only). :meth:`add` stages a finished directory under
    ``root`` and queues it; :meth:`finish` waits for the queue and returns the failures.

    A directory is uploaded to its path relative to ``root``. An upload is skipped when a newer directory of the
    same parent (``state``, ...) is queued behind it (for ``hf_format``: the same name again). Once one is
    complete, older ones of its parent are deleted remotely: every older state, the unfinished older checkpoints,
    and all but the newest ``keep_checkpoints`` checkpoints.
    """

    def __init__(self, url: str, root: Path, keep_checkpoints: int | None = None, fs=None):
        self.url, self.root, self.keep = url, Path(root), keep_checkpoints
        self.fs = fs if fs is not None else filesystem(url)
        import queue

        self.errors: list[str] = []
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="training_hub-checkpoint-mirror", daemon=True)
        self.thread.start()

    def add(self, local: Path) -> None:
        """Queue ``local`` (a complete ``hf_format/...`` or ``state/...`` directory) for upload, from a hard-linked
        copy under ``.upload_staging`` (a real copy where links are not possible)."""
        relative = Path(local).relative_to(self.root).as_posix()
        import uuid

        staged = self.root / STAGING_DIR / uuid.uuid4().hex / relative  # its own copy: the same name may come again
        stage(Path(local), staged)
        self.queue.put((relative, staged))

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                self._upload(*item)
            except Exception as exc:  # reported by finish(); training goes on with its local checkpoints
                logger.error("checkpoint_storage: mirroring %s to %s failed: %s", item[0], self.url, exc)
                self.errors.append(f"{item[0]}: {type(exc).__name__}: {exc}")
            finally:
                if item is not None:
                    shutil.rmtree(item[1].parents[len(Path(item[0]).parts) - 1], ignore_errors=True)
                self.queue.task_done()

    def _upload(self, relative: str, staged: Path) -> None:
        kind, _, name = relative.rpartition("/")
        later = self._queued(kind)
        newer = [q for q in later if (_number(q) or -1) > (_number(name) if _number(name) is not None else 1 << 62)]
        if name in later or (kind != CHECKPOINTS_DIR and newer):
            logger.info("checkpoint_storage: %s skipped, a newer copy is queued", relative)
            return
        upload_directory(self.fs, staged, relative)
        if kind != CHECKPOINTS_DIR:  # a state: the records up to it go along
            self._put_metrics()
        if kind and _number(name) is not None:
            self._prune(kind, name)
        logger.info("checkpoint_storage: mirrored %s to %s", relative, self.url)

    def _queued(self, kind: str) -> list[str]:
        """The names queued (not yet started) under ``kind``."""
        with self.queue.mutex:
            items = [q[0].rpartition("/") for q in self.queue.queue if q]
        return [name for parent, _, name in items if parent == kind]

    def _put_metrics(self) -> None:
        metrics = self.root / METRICS_FILE
        if metrics.is_file():
            _put(self.fs, metrics, METRICS_FILE)

    def _prune(self, kind: str, newest: str) -> None:
        """Delete older states (and unfinished uploads older than ``newest``); keep ``keep`` checkpoints."""
        entries = remote_entries(self.fs, kind)
        older = [n for n in entries if _number(n) < _number(newest)]  # remote_entries: numbered names only
        drop = [n for n in older if not entries[n] or kind != CHECKPOINTS_DIR]
        if kind == CHECKPOINTS_DIR and self.keep:
            complete = _by_number(n for n, done in entries.items() if done)
            drop += [n for n in complete[:-self.keep] if n not in drop]
        for name in drop:
            _remove_remote(self.fs, f"{kind}/{name}")

    def finish(self) -> list[str]:
        """Wait until every queued upload is done; return the failures (empty when all arrived)."""
        self.queue.put(None)
        self.thread.join()
        shutil.rmtree(self.root / STAGING_DIR, ignore_errors=True)
        return self.errors


def download_directory(fs, prefix: str, final: Path) -> None:
    """Fetch a complete mirrored directory into ``final`` (complete or absent), checking each file's size."""
    listed = json.loads(fs.cat_file(f"{prefix}/{COMPLETE_MARKER}"))["files"]
    with atomic_directory(final) as tmp:
        for relative, size in listed.items():
            parts = PurePosixPath(relative).parts
            if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
                raise CheckpointStorageError(f"{prefix}/{COMPLETE_MARKER} lists {relative!r}, outside the directory")
            target = tmp.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{prefix}/{relative}", str(target))
            if target.stat().st_size != size:
                raise CheckpointStorageError(f"{prefix}/{relative}: {target.stat().st_size} bytes arrived, the "
                                             f"marker lists {size}")


