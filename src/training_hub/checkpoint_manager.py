"""Upstream's remote-checkpoint functions, for scripts that drive their own trainer against a storage URL.

The built-in backends do not use this module: ``checkpoint_storage=`` does the same inside them (docs/reliability.md,
:mod:`training_hub.engine.storage`). It is built on the same pieces (:mod:`training_hub.storage`): a mirrored
directory is complete when its ``.upload_complete`` marker (written last) is there; nothing without it is restored.

* :func:`enqueue_checkpoint_upload` stages a checkpoint (hard links) and uploads it in one background thread,
  newest first; :func:`shutdown_upload_worker` drains the queue; a failure is kept for
  :func:`raise_pending_upload_error` (:func:`has_pending_upload_error` peeks).
* :func:`upload_checkpoint_now`, :func:`sync_latest_checkpoint`: upload at once, skipping an unchanged copy.
* :func:`restore_latest_checkpoint`, :func:`maybe_restore_checkpoint`: fetch the newest complete remote checkpoint
  of the layouts asked (``training_hub.checkpoint_utils``) into a temporary directory, then move it into place.

The storage URL comes from ``TRAINING_HUB_CHECKPOINT_UPLOAD_URI`` (``checkpoint_utils.apply_checkpoint_storage_env``).
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import sys
import threading
from pathlib import Path, PurePosixPath

from training_hub import storage
from training_hub.checkpoint_utils import (
    ALL_LAYOUTS, HF_LAYOUT, INSTRUCTLAB_LAYOUT, MINI_TRAINER_LAYOUT, TRAINING_HUB_LAYOUT, UPLOAD_URI_ENV,
    clear_stale_incomplete_marker, find_latest_valid_checkpoint, is_valid_checkpoint_dir,
)

logger = logging.getLogger("training_hub.checkpoint_manager")

COMPLETE_MARKER = storage.COMPLETE_MARKER
STAGING_DIR = storage.STAGING_DIR  # ".upload_staging"
RESTORE_TMP_DIR = ".restore_tmp"
UPLOAD_ATTEMPTS = 3
SHUTDOWN_TIMEOUT = 3600.0


def storage_uri() -> str | None:
    """The storage URL this process mirrors to (``TRAINING_HUB_CHECKPOINT_UPLOAD_URI``), or None."""
    return os.environ.get(UPLOAD_URI_ENV) or None


def remote_filesystem(uri: str):
    """An fsspec filesystem rooted at ``uri`` (``training_hub.storage.filesystem``); ImportError naming the
    protocol when its fsspec backend is not installed."""
    if "://" not in uri or not uri.partition("://")[0] or not uri.partition("://")[2]:
        raise ValueError(f"checkpoint_storage must look like '<scheme>://bucket/prefix'; got {uri!r}")
    return storage.filesystem(uri)


def verify_storage_access(uri: str) -> None:
    """Write, read and delete a probe object (unique per caller); RuntimeError when that fails."""
    storage.check_access(uri)


# ------------------------------------------------------------------------------------------------ several ranks

def _distributed():
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def wait_for_all_ranks() -> None:
    """A barrier when a process group is up (no ``device_ids``: Gloo refuses them); nothing otherwise."""
    dist = _distributed()
    if dist is not None:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """``flag`` or-ed over every rank (a collective: every rank must call it); the flag itself in one process."""
    dist = _distributed()
    if dist is None:
        return bool(flag)
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


# ------------------------------------------------------------------------------------------------ uploads

def _relative(checkpoint_dir: Path, base_dir: Path) -> str:
    try:
        return checkpoint_dir.relative_to(base_dir).as_posix()
    except ValueError:
        return checkpoint_dir.name


def _upload_dir(fs, local_dir: Path, remote_prefix: str) -> None:
    """Upload one directory, marker last (``storage.upload_directory``), each file tried ``UPLOAD_ATTEMPTS``."""
    storage.upload_directory(fs, Path(local_dir), remote_prefix, attempts=UPLOAD_ATTEMPTS)


class _Uploader:
    """One background thread draining a last-in-first-out queue; failures are kept, in order."""

    def __init__(self, fs) -> None:
        self.fs = fs
        self.queue: queue.LifoQueue = queue.LifoQueue()
        self.stop = threading.Event()  # not a queue entry: on a LIFO queue it would jump ahead of the backlog
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="training_hub-checkpoint-upload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                local_dir, prefix = self.queue.get(timeout=0.5)
            except queue.Empty:
                if self.stop.is_set():
                    return
                continue
            try:
                _upload_dir(self.fs, Path(local_dir), prefix)
                logger.info("Mirrored checkpoint %s", prefix)
            except Exception as exc:
                logger.error("Checkpoint upload failed: %s (%s)", prefix, exc)
                error = RuntimeError(f"checkpoint upload failed for {prefix}: {type(exc).__name__}: {exc}")
                error.__cause__ = exc
                with self._lock:
                    self._errors.append(error)
            finally:
                shutil.rmtree(local_dir, ignore_errors=True)
                self.queue.task_done()

    def peek_error(self) -> BaseException | None:
        with self._lock:
            return self._errors[0] if self._errors else None

    def take_error(self) -> BaseException | None:
        """The first failure (later ones noted on it), and forget them."""
        with self._lock:
            errors, self._errors = self._errors, []
        if not errors:
            return None
        if len(errors) > 1:
            errors[0].add_note(f"{len(errors) - 1} more upload(s) failed: " + "; ".join(map(str, errors[1:])))
        return errors[0]


_uploader: _Uploader | None = None
_uploader_lock = threading.Lock()


def _current() -> _Uploader | None:
    with _uploader_lock:
        return _uploader


def enqueue_checkpoint_upload(checkpoint_dir: str | Path, base_dir: str | Path | None = None) -> None:
    """Stage ``checkpoint_dir`` (hard links, so deleting the original cannot cut the upload short) and queue it;
    its remote path is its path relative to ``base_dir`` (default: its parent). Nothing without a storage URL."""
    global _uploader
    uri = storage_uri()
    if not uri:
        return
    with _uploader_lock:
        if _uploader is None or not _uploader.thread.is_alive():
            _uploader = _Uploader(remote_filesystem(uri))
        uploader = _uploader
    source = Path(checkpoint_dir).resolve()
    base = Path(base_dir).resolve() if base_dir else source.parent
    prefix = _relative(source, base)
    staged = base / STAGING_DIR / prefix
    storage.stage(source, staged)
    uploader.queue.put((str(staged), prefix))


def has_pending_upload_error() -> bool:
    uploader = _current()
    return uploader is not None and uploader.peek_error() is not None


def raise_pending_upload_error() -> None:
    """Raise the first background upload failure here (and forget it)."""
    uploader = _current()
    error = uploader.take_error() if uploader is not None else None
    if error is not None:
        raise error


def shutdown_upload_worker(timeout: float = SHUTDOWN_TIMEOUT) -> None:
    """Upload what is queued (newest first) and stop the thread; failures stay for raise_pending_upload_error."""
    uploader = _current()
    if uploader is None or not uploader.thread.is_alive():
        return
    uploader.stop.set()
    uploader.thread.join(timeout=timeout)
    if uploader.thread.is_alive():
        logger.error("checkpoint uploads still running after %.0f s; what has no %s marker stays unusable",
                     timeout, COMPLETE_MARKER)


def upload_checkpoint_now(checkpoint_dir: str | Path, base_dir: str | Path | None = None) -> None:
    """Upload ``checkpoint_dir`` now (no staging), unless the remote copy's marker says it is unchanged."""
    uri = storage_uri()
    if not uri:
        return
    source = Path(checkpoint_dir).resolve()
    prefix = _relative(source, Path(base_dir).resolve() if base_dir else source.parent)
    fs = remote_filesystem(uri)
    marker = f"{prefix}/{COMPLETE_MARKER}"
    if fs.exists(marker) and fs.cat_file(marker) == storage.marker_of(source):
        logger.info("Checkpoint %s is already mirrored to %s", prefix, uri)
        return
    _upload_dir(fs, source, prefix)
    logger.info("Mirrored checkpoint %s to %s", prefix, uri)


def _is_node_zero(node_rank: int = 0) -> bool:
    """One node mirrors: the given rank and the launcher's NODE_RANK / GROUP_RANK must all say 0."""
    other = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    return int(node_rank) == 0 and other.strip() in ("", "0")


def sync_latest_checkpoint(output_dir: str | Path, node_rank: int = 0,
                           layouts: tuple[str, ...] = ALL_LAYOUTS) -> str | None:
    """Upload the newest usable checkpoint of ``output_dir`` (of ``layouts``) now; return its path, or None."""
    if not storage_uri() or not _is_node_zero(node_rank):
        return None
    latest = find_latest_valid_checkpoint(str(output_dir), layouts=layouts)
    if latest is not None:
        upload_checkpoint_now(latest, base_dir=output_dir)
    return latest


def sync_latest_checkpoint_best_effort(output_dir: str | Path, node_rank: int = 0,
                                       layouts: tuple[str, ...] = ALL_LAYOUTS) -> None:
    """:func:`sync_latest_checkpoint` on a failure path: an error is logged, not raised over the one in flight."""
    try:
        sync_latest_checkpoint(output_dir, node_rank=node_rank, layouts=layouts)
    except Exception:
        logger.exception("could not mirror the newest checkpoint after the training failure")


# ------------------------------------------------------------------------------------------------ restore

_TRAILING_NUMBER = re.compile(r"(\d+)$")


def _layout_of(name: str) -> str | None:
    path = PurePosixPath(name)
    parent = path.parent.as_posix()
    if parent == "full_state_checkpoints":
        return MINI_TRAINER_LAYOUT
    if parent == "full_state":
        return INSTRUCTLAB_LAYOUT
    if parent == "state":
        return TRAINING_HUB_LAYOUT
    return HF_LAYOUT if parent == "." and path.name.startswith("checkpoint-") else None


def _complete_checkpoints(fs, layouts: tuple[str, ...]) -> list[str]:
    """Remote directories that carry the marker, of ``layouts``: by layout in the order given, newest first."""
    try:
        keys = fs.find("")
    except FileNotFoundError:
        return []
    by_layout: dict[str, list[str]] = {}
    for key in keys:
        name = key[: -len(COMPLETE_MARKER) - 1] if key.endswith("/" + COMPLETE_MARKER) else None
        if not name:
            continue
        if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
            logger.error("ignoring a remote checkpoint with an unsafe name: %r", name)
            continue
        layout = _layout_of(name)
        if layout in layouts:
            by_layout.setdefault(layout, []).append(name)
    number = lambda n: int(m.group(1)) if (m := _TRAILING_NUMBER.search(n)) else -1  # noqa: E731
    return [name for layout in layouts for name in sorted(by_layout.get(layout, []), key=number, reverse=True)]


def _inside(root: Path, relative: str) -> Path:
    parts = PurePosixPath(relative).parts
    target = root.joinpath(*parts)
    if PurePosixPath(relative).is_absolute() or ".." in parts or root.resolve() not in target.resolve().parents:
        raise ValueError(f"Refusing to restore an object outside the checkpoint directory: {relative!r}")
    return target


def _download(fs, name: str, tmp: Path) -> None:
    keys = [k for k in fs.find(name) if k.startswith(name + "/") and k[len(name) + 1:] != COMPLETE_MARKER]
    for key in keys:
        target = _inside(tmp, key[len(name) + 1:])
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(target))


def restore_latest_checkpoint(uri: str, local_dir: str | Path,
                              layouts: tuple[str, ...] = ALL_LAYOUTS) -> str | None:
    """Fetch the newest complete remote checkpoint of ``layouts`` into ``local_dir`` (a usable local copy of it is
    kept); return its local path, or None. An interrupted download leaves nothing that looks usable."""
    fs = remote_filesystem(uri)
    local = Path(local_dir).resolve()
    for name in _complete_checkpoints(fs, layouts)[:1]:
        dest = local / name
        if is_valid_checkpoint_dir(dest, local):
            logger.info("Checkpoint %s is already here; not downloading it", dest)
            return str(dest)
        tmp_root = local / f"{RESTORE_TMP_DIR}-{os.getpid()}"
        shutil.rmtree(tmp_root, ignore_errors=True)
        (tmp_root / name).mkdir(parents=True)
        logger.info("Restoring checkpoint %s from %s into %s", name, uri, dest)
        try:
            _download(fs, name, tmp_root / name)
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tmp_root / name), str(dest))
        finally:
            shutil.rmtree(tmp_root, ignore_errors=True)
        clear_stale_incomplete_marker(local, dest)
        logger.info("Restored checkpoint %s from %s -> %s", name, uri, dest)
        return str(dest)
    return None


def maybe_restore_checkpoint(local_dir: str | Path, layouts: tuple[str, ...] = ALL_LAYOUTS) -> str | None:
    """With a storage URL and no usable local checkpoint of ``layouts``: restore the newest remote one (local rank
    0 downloads, the others wait at a barrier). Errors are raised: starting over silently is what this prevents."""
    uri = storage_uri()
    if not uri:
        return None
    restored = None
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        existing = find_latest_valid_checkpoint(str(local_dir), layouts=layouts)
        if existing is None:
            restored = restore_latest_checkpoint(uri, local_dir, layouts=layouts)
            if restored is None:
                logger.info("No complete checkpoint under %s; training starts from step 0", uri)
        else:
            logger.info("Checkpoint %s is here; not restoring from %s", existing, uri)
    wait_for_all_ranks()
    return restored
