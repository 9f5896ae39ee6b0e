"""``checkpoint_storage``: mirror every checkpoint and training state to a storage URL, and resume from it.

``checkpoint_storage`` is ``None`` or ``"pvc"`` (the output directory only, the default) or any fsspec URL
(``s3://bucket/prefix``, ``gs://...``, ``file:///mnt/...``). The remote layout is the local one, relative to
``ckpt_output_dir``::

    <url>/hf_format/samples_<N>/...     Hugging Face checkpoints
    <url>/state/step_<S>/...            training states (resume=True continues from the newest)
    <url>/metrics.jsonl                 the run's records up to the newest mirrored state

Each mirrored directory is written file by file and closed by an ``.upload_complete`` marker, written last: it
lists every file with its size. A directory without the marker (an upload cut short by a kill, a lost node or a
network failure) is never restored, and it is deleted once a later upload of the same kind completes. Uploads run
in one background thread from a hard-linked copy (so the local pruning of older states cannot cut one short);
the run waits for all of them before it returns, and a failed upload fails the run after training (with the local
copy intact). Only the newest remote state is kept; ``keep_last_n_checkpoints`` prunes the remote checkpoints too.

A run that may resume (``resume=True``, ``enable_jit_checkpoint``, ``on_demand_checkpointing`` or a storage URL)
and whose output directory holds no training state first downloads the newest complete remote state into it, so a
restarted job on a fresh machine continues where the last one stopped. S3 endpoints other than AWS come from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; credentials from the usual AWS variables or files.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from training_hub.engine import checkpoint as ckpt
from training_hub.storage import (  # noqa: F401  (part of this module's API)
    COMPLETE_MARKER, STAGING_DIR, CheckpointStorageError, Mirror, _by_number, _number, check_access,
    download_directory, filesystem, remote_entries, storage_url,
)

logger = logging.getLogger("training_hub.engine")


def may_resume(config: Any) -> bool:
    """Whether a run continues from a saved state by itself: asked (``resume``), or implied by preemption
    checkpointing or remote storage (a restarted job must not start over)."""
    return bool(config.resume or getattr(config, "enable_jit_checkpoint", False)
                or getattr(config, "on_demand_checkpointing", False)
                or storage_url(getattr(config, "checkpoint_storage", None)))


def start_mirror(config: Any, root: Path) -> Mirror | None:
    """The run's mirror, or None without a storage URL (call on the main process only)."""
    url = storage_url(getattr(config, "checkpoint_storage", None))
    return Mirror(url, root, getattr(config, "keep_last_n_checkpoints", None)) if url else None


def finish_mirror(mirror: Mirror | None) -> None:
    """Wait for the run's uploads; raise :class:`CheckpointStorageError` naming those that failed."""
    errors = mirror.finish() if mirror is not None else []
    if errors:
        raise CheckpointStorageError(
            f"checkpoint_storage: {len(errors)} upload(s) to {mirror.url} failed ({'; '.join(errors)}). Training "
            f"finished and the local checkpoints in {mirror.root} are complete; the storage holds only the uploads "
            "that carry an .upload_complete marker.")


# ------------------------------------------------------------------------------------------------ restore

def restore(fs, url: str, root: Path, kind: str = ckpt.STATE_DIR) -> Path | None:
    """Download the newest complete remote state under ``kind`` (and the metrics and checkpoint that go with it)
    into ``root``; return the local state, or None when the storage holds no complete state."""
    states = _by_number(n for n, done in remote_entries(fs, kind).items() if done)
    if not states:
        logger.info("checkpoint_storage: %s holds no complete training state; training starts from the beginning",
                    url)
        return None
    name = states[-1]
    local = root / kind / name
    logger.info("checkpoint_storage: restoring %s/%s/%s into %s", url, kind, name, local)
    download_directory(fs, f"{kind}/{name}", local)
    if fs.exists(ckpt.METRICS_FILE):
        fs.get_file(ckpt.METRICS_FILE, str(root / ckpt.METRICS_FILE))
    if kind == ckpt.STATE_DIR:
        _restore_saved_checkpoint(fs, root, local)
    return local


def _restore_saved_checkpoint(fs, root: Path, state: Path) -> None:
    """Fetch the checkpoint the state says was saved last; when it is not complete remotely, clear that record so
    the resumed run writes it again (the run ends with its final checkpoint either way)."""
    record_file = state / ckpt.STATE_FILE
    record = json.loads(record_file.read_text())
    samples = record.get("last_saved_samples")
    if samples is None:
        return
    complete = {_number(n): n for n, done in remote_entries(fs, ckpt.HF_DIR).items() if done}
    if samples in complete:
        download_directory(fs, f"{ckpt.HF_DIR}/{complete[samples]}", root / ckpt.HF_DIR / complete[samples])
    else:
        record["last_saved_samples"] = None
        record_file.write_text(json.dumps(record, indent=2))


def local_states(root: Path, kind: str = ckpt.STATE_DIR) -> list[Path]:
    """The training states in ``root/kind`` (the native engine's complete ones, or trl's checkpoint dirs)."""
    if kind == ckpt.STATE_DIR:
        return ckpt.complete_states(root)
    base = Path(root) / kind
    return [p for p in base.iterdir() if p.is_dir() and _number(p.name) is not None] if base.is_dir() else []


def open_output_dir(config: Any, root: Path, *, kind: str = ckpt.STATE_DIR, check=ckpt.check_output_dir):
    """What ``ckpt_output_dir`` holds to resume from (``check(root, resume)``: ``checkpoint.check_output_dir`` or a
    backend's own), after fetching the newest complete remote state when a storage URL is set and the directory
    holds no run. A run that may resume (:func:`may_resume`) resumes when a state is there. Call on the main
    process, before anything is written; ``kind``: where the backend keeps its training states."""
    from training_hub.fsutil import check_not_claimed

    root = Path(root)
    resume = bool(config.resume) or (may_resume(config) and bool(local_states(root, kind)))
    url = storage_url(getattr(config, "checkpoint_storage", None))
    if url:
        fs = check_access(url)
        if root.is_dir():
            check_not_claimed(root)
            ckpt.remove_temporaries(root)
            shutil.rmtree(root / STAGING_DIR, ignore_errors=True)
        fresh = not (local_states(root, kind) or (root / ckpt.HF_DIR).is_dir() or (root / ckpt.METRICS_FILE).exists())
        if fresh and restore(fs, url, root, kind):  # a local run (even one without a state) is never mixed with
            resume = True                            # a remote one
    return check(root, resume)
