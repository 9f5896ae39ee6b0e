"""Upstream's checkpoint helpers, for scripts written against the upstream Training Hub: in-progress markers,
finding the newest usable checkpoint of an output directory, and the ``checkpoint_storage`` selector.

The built-in backends do not need these (their directories are written complete-or-absent, see
:mod:`training_hub.fsutil`); they serve code that drives a Hugging Face ``Trainer``-style output directory itself,
with :class:`training_hub.jit_checkpoint.JITCheckpointCallback`. Layouts recognised (each ranked on its own
counter, never against another's):

* ``hf``: ``checkpoint-<step>/`` (Hugging Face Trainer); unusable while ``.incomplete-checkpoint-<step>`` sits next
  to it, or ``.incomplete`` inside it;
* ``mini_trainer``: ``full_state_checkpoints/step_<n>/`` holding ``training_state.pt``;
* ``instructlab``: ``full_state/epoch_<n>/`` holding ``training_metadata.json``;
* ``training_hub``: ``state/step_<n>/`` holding ``trainer_state.json`` (this package's native engine).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from training_hub.storage import storage_url

INCOMPLETE_SENTINEL = ".incomplete"  # inside a checkpoint directory (older writers)
INCOMPLETE_SIDECAR_PREFIX = ".incomplete-checkpoint-"  # next to it, in the output directory
UPLOAD_URI_ENV = "TRAINING_HUB_CHECKPOINT_UPLOAD_URI"  # the storage URL, for processes started later

HF_LAYOUT = "hf"
MINI_TRAINER_LAYOUT = "mini_trainer"
INSTRUCTLAB_LAYOUT = "instructlab"
TRAINING_HUB_LAYOUT = "training_hub"
NATIVE_LAYOUTS = (MINI_TRAINER_LAYOUT, INSTRUCTLAB_LAYOUT)
ALL_LAYOUTS = (HF_LAYOUT, *NATIVE_LAYOUTS, TRAINING_HUB_LAYOUT)

# layout -> (sub-directory of the output directory, directory name pattern, file that marks it complete or None)
_LAYOUTS = {
    HF_LAYOUT: ("", re.compile(r"checkpoint-(\d+)"), None),
    MINI_TRAINER_LAYOUT: ("full_state_checkpoints", re.compile(r"step_(\d+)"), "training_state.pt"),
    INSTRUCTLAB_LAYOUT: ("full_state", re.compile(r"epoch_(\d+)"), "training_metadata.json"),
    TRAINING_HUB_LAYOUT: ("state", re.compile(r"step_(\d+)"), "trainer_state.json"),
}


def incomplete_sidecar_path(output_dir: str | Path, step: int) -> Path:
    """The file that marks ``checkpoint-<step>`` of ``output_dir`` as being written."""
    return Path(output_dir) / f"{INCOMPLETE_SIDECAR_PREFIX}{int(step)}"


def mark_checkpoint_incomplete(output_dir: str | Path, step: int) -> None:
    """Mark ``checkpoint-<step>`` as being written, before the writer creates it (the directory is not made)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    incomplete_sidecar_path(output_dir, step).touch()


def mark_checkpoint_complete(output_dir: str | Path, step: int) -> None:
    """Drop the in-progress markers of ``checkpoint-<step>`` (next to it and inside it)."""
    incomplete_sidecar_path(output_dir, step).unlink(missing_ok=True)
    try:
        (Path(output_dir) / f"checkpoint-{int(step)}" / INCOMPLETE_SENTINEL).unlink(missing_ok=True)
    except OSError:
        pass


def _hf_step(path: Path) -> int | None:
    match = _LAYOUTS[HF_LAYOUT][1].fullmatch(path.name)
    return int(match.group(1)) if match else None


def is_valid_checkpoint_dir(checkpoint_dir: str | Path, output_dir: str | Path | None = None) -> bool:
    """True for an existing directory with no in-progress marker (inside it, or next to it in ``output_dir``)."""
    path = Path(checkpoint_dir)
    if not path.is_dir() or (path / INCOMPLETE_SENTINEL).exists():
        return False
    step = _hf_step(path)
    return not (output_dir is not None and step is not None and incomplete_sidecar_path(output_dir, step).exists())


def clear_stale_incomplete_marker(output_dir: str | Path, checkpoint_dir: str | Path) -> None:
    """Drop the in-progress marker of a checkpoint that was replaced by a complete copy."""
    step = _hf_step(Path(checkpoint_dir))
    if step is not None:
        mark_checkpoint_complete(output_dir, step)


def _candidates(root: Path, layout: str) -> list[tuple[int, Path]]:
    sub, pattern, required = _LAYOUTS[layout]
    base = root / sub if sub else root
    found = []
    for child in base.iterdir() if base.is_dir() else ():
        match = pattern.fullmatch(child.name)
        if not match or not is_valid_checkpoint_dir(child, root if layout == HF_LAYOUT else None):
            continue
        if required is None or (child / required).exists():
            found.append((int(match.group(1)), child))
    return found


def find_latest_valid_checkpoint(output_dir: str | Path | None,
                                 layouts: tuple[str, ...] = ALL_LAYOUTS) -> str | None:
    """The newest usable checkpoint under ``output_dir`` (an absolute path), or None.

    Layouts are tried in the order given and the newest is chosen within the first that has one: their counters
    (steps, epochs) are not comparable.
    """
    if not output_dir or not Path(output_dir).is_dir():
        return None
    unknown = [layout for layout in layouts if layout not in _LAYOUTS]
    if unknown:
        raise ValueError(f"layouts: unknown {unknown}; known: {', '.join(_LAYOUTS)}")
    for layout in layouts:
        found = _candidates(Path(output_dir), layout)
        if found:
            return str(max(found, key=lambda item: item[0])[1].resolve())
    return None


def jit_checkpoint_enabled(enable_jit_checkpoint: bool | None, ckpt_output_dir: str | None) -> bool:
    """Preemption checkpointing needs both the switch and a directory to save into."""
    return bool(enable_jit_checkpoint) and bool(ckpt_output_dir)


def resolve_checkpoint_storage(checkpoint_storage: str | None) -> str | None:
    """The storage URL of a ``checkpoint_storage`` value (None for None, "" and "pvc"); ValueError otherwise."""
    return storage_url(checkpoint_storage)


def apply_checkpoint_storage_env(checkpoint_storage: str | None) -> None:
    """Put the storage URL in ``TRAINING_HUB_CHECKPOINT_UPLOAD_URI`` (for processes started later), or remove a
    URL an earlier call left there."""
    url = storage_url(checkpoint_storage)
    if url:
        os.environ[UPLOAD_URI_ENV] = url
    else:
        os.environ.pop(UPLOAD_URI_ENV, None)
