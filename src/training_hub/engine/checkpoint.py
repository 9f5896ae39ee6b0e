"""Checkpoint IO: Hugging Face checkpoints for users, full training state for resuming.

Layout under ``ckpt_output_dir``::

    hf_format/samples_<N>/   config, safetensors weights, tokenizer + chat template, generation config
                             (OSFT: ``samples_<N>.0``, as upstream's OSFT engine names them; both are read)
    state/step_<S>/          model.pt, optimizer.pt, scheduler.pt, rng.pt, trainer_state.json (written last);
                             under FSDP2 ``sharded/`` (each rank's shards of model and optimizer) in place of
                             model.pt and optimizer.pt, and each rank's RNG (``engine.sharded``)
    metrics.jsonl

Every directory is written under a temporary name (``.tmp-...``) and renamed when complete, so a directory with
the final name is always whole; leftovers of a killed run are removed at the next start. Only the newest
training state is kept (each is model + 2x optimizer moments; older ones are deleted once a newer one is whole).

What is read back from an output directory is loaded with ``torch.load(weights_only=True)`` (tensors and plain
values only), so a crafted file there cannot run code on resume. Directories are created with the mode a plain
``mkdir`` gives under the process umask.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import shutil
from pathlib import Path

import torch

from training_hub.fsutil import atomic_directory  # noqa: F401  (part of this module's API)

logger = logging.getLogger(__name__)

HF_DIR = "hf_format"
STATE_DIR = "state"
STATE_FILE = "trainer_state.json"
SHARDED_DIR = "sharded"  # a state's model and optimizer in torch.distributed.checkpoint's format (engine.sharded)
METRICS_FILE = "metrics.jsonl"


class ExistingRunError(ValueError):
    """ckpt_output_dir already holds a run, and resume=True was not given."""


def remove_temporaries(root: Path) -> None:
    """Delete half-written ``.tmp-*`` directories left by a killed run."""
    for sub in (root / HF_DIR, root / STATE_DIR):
        for leftover in sub.glob(".tmp-*") if sub.is_dir() else ():
            shutil.rmtree(leftover, ignore_errors=True)


def save_hf_checkpoint(model, tokenizer, root: Path, samples_seen: int, save_dtype: torch.dtype | None = None,
                       state_dict: dict | None = None, save_model=None, float_name: bool = False) -> Path:
    """Write a checkpoint that plain ``transformers`` loads, as ``hf_format/samples_<N>``; return its path.

    ``float_name``: name it ``samples_<N>.0`` instead, as upstream's OSFT engine (mini-trainer, which counts
    samples as a float) does, so scripts that glob ``hf_format/samples_*.0`` find it.

    ``save_dtype`` is the dtype to store the weights in (the dtype of the model we started from); the trained
    fp32 weights are cast on the way out, the model itself is not touched. ``state_dict`` replaces the model's
    own (e.g. OSFT's dense weights under the original names). ``save_model(model, directory, save_dtype,
    state_dict)``, when given and it returns True, has written the model part itself (``TrainingMethod.save_model``,
    e.g. a LoRA adapter); the tokenizer is saved either way.
    """
    final = root / HF_DIR / checkpoint_name(samples_seen, float_name)
    with atomic_directory(final) as tmp:
        if save_model is None or not save_model(model, tmp, save_dtype, state_dict):
            _save_full_model(model, tmp, save_dtype, state_dict)
        tokenizer.save_pretrained(tmp)
    return final


def _save_full_model(model, directory: Path, save_dtype: torch.dtype | None, state_dict: dict | None) -> None:
    if save_dtype is not None:
        state_dict = (cast_state_dict(model.state_dict(), save_dtype, {}) if state_dict is None else
                      cast_state_dict(state_dict, save_dtype, state_dict))
    model.save_pretrained(directory, state_dict=state_dict)
    if save_dtype is not None:  # save_pretrained records the in-memory (fp32) dtype; record the stored one
        config_file = directory / "config.json"
        config = json.loads(config_file.read_text())
        config["dtype"] = str(save_dtype).removeprefix("torch.")
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def cast_state_dict(state: dict, dtype: torch.dtype, into: dict) -> dict:
    """``state`` with its floating-point tensors in ``dtype``, written into ``into`` and returned.

    ``into=state`` casts a state dict that the caller hands over (FSDP2's gathered weights, OSFT's dense export)
    in place, one tensor at a time, so each fp32 tensor is freed as its copy is made: at 8B the export then peaks at
    the 32 GB of the fp32 weights instead of 48 GB with a whole bf16 copy beside them. Tied weights (one tensor
    under two names) stay one tensor.
    """
    copies: dict[int, torch.Tensor] = {}  # id of an original (alive while any name still holds it) -> its copy
    for name in list(state):  # names only: a list of the values would keep every original alive to the end
        value = state[name]
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
            if id(value) not in copies:
                copies[id(value)] = value.detach().to(dtype)
            into[name] = copies[id(value)]
        else:
            into[name] = value
    return into


_CHECKPOINT_NAME = re.compile(r"samples_(\d+)(?:\.0)?")


def checkpoint_name(samples_seen: int, float_name: bool = False) -> str:
    """``samples_<N>``, or ``samples_<N>.0`` (upstream OSFT's name) with ``float_name``."""
    return f"samples_{int(samples_seen)}{'.0' if float_name else ''}"


def checkpoint_samples(path: Path | str) -> int | None:
    """The sample count in a checkpoint directory's name (``samples_<N>`` or ``samples_<N>.0``); None otherwise."""
    match = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def hf_checkpoints(root: Path) -> list[Path]:
    """Complete HF checkpoints, oldest first (by samples seen); ``samples_<N>`` and ``samples_<N>.0`` alike."""
    paths = (root / HF_DIR).glob("samples_*") if (root / HF_DIR).is_dir() else ()
    found = [(checkpoint_samples(p), p.name, p) for p in paths if p.is_dir() and checkpoint_samples(p) is not None]
    return [p for _, _, p in sorted(found)]


def prune_hf_checkpoints(root: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` HF checkpoints (None: keep all)."""
    if keep:
        for old in hf_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def _rng_state() -> dict:
    """RNG states as tensors and plain values only (loadable with ``weights_only=True``).

    Python's ``random.getstate()`` is ``(version, tuple of 625 ints, gauss_next)``: stored as a dict of plain
    values. CUDA: the current device's state only, so a resume on fewer GPUs works.
    """
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, source: Path | None = None) -> None:
    try:
        python = state["python"]
        if isinstance(python, dict):
            python = (int(python["version"]), tuple(int(x) for x in python["state"]), python["gauss_next"])
        else:  # as earlier versions wrote it: random.getstate()'s own tuple (plain values, loads safely too)
            python = (int(python[0]), tuple(int(x) for x in python[1]), python[2])
        torch.set_rng_state(state["torch"])
        random.setstate(python)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}not a training_hub RNG state ({type(exc).__name__}: {exc}); delete that training "
                         "state to resume from scratch, or start a new run in another ckpt_output_dir") from None
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # older states held every device's; use the current device's
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def _load(file: Path, **kwargs):
    """``torch.load`` restricted to tensors and plain values: a crafted pickle is refused, never executed."""
    try:
        return torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "unsupported" in ln.lower()]  # names the object
        first = lines[0].rstrip(".") if lines else type(exc).__name__
        raise unsafe_file_error(str(file), file.parent, first) from None


def unsafe_file_error(what: str, state: Path, detail, allowed: str = "tensors and plain values") -> ValueError:
    """The refusal of a training-state file ``what`` of the state ``state`` that holds objects other than
    ``allowed`` (``detail``: the first one found); it was not loaded, so nothing in it ran."""
    return ValueError(
        f"{what} cannot be read safely: it holds objects other than {allowed} ({detail}), so it was not written by "
        f"this version of training_hub and is not loaded. Delete the training state {state} to resume from scratch, "
        "or start a new run in another ckpt_output_dir.")


def save_training_state(root: Path, *, model, optimizer, scheduler, progress: dict, model_state: dict | None = None,
                        optimizer_state: dict | None = None) -> Path:
    """Write ``state/step_<S>`` (model, optimizer, scheduler, RNG, progress), then drop older states.

    ``model_state`` / ``optimizer_state`` replace the model's and optimizer's own (e.g. gathered from FSDP2 shards).
    """
    final = root / STATE_DIR / f"step_{progress['global_step']:09d}"
    with atomic_directory(final) as tmp:
        torch.save(model.state_dict() if model_state is None else model_state, tmp / "model.pt")
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(_rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(progress, indent=2))  # last: its presence marks a whole state
    prune_states(root)
    return final


def prune_states(root: Path) -> None:
    """Delete every complete training state but the newest."""
    for old in complete_states(root)[:-1]:
        shutil.rmtree(old, ignore_errors=True)


def is_sharded(path: Path) -> bool:
    """Whether the training state at ``path`` holds sharded model and optimizer (``engine.sharded``)."""
    return (Path(path) / SHARDED_DIR / ".metadata").is_file()


def rng_file(rank: int) -> str:
    """The RNG state of ``rank`` (rank 0's, the only one a one-process or DDP state holds, is ``rng.pt``)."""
    return "rng.pt" if rank == 0 else f"rng_{rank}.pt"


def complete_states(root: Path) -> list[Path]:
    """Complete training states, oldest first."""
    base = root / STATE_DIR
    found = [p for p in base.glob("step_*") if (p / STATE_FILE).is_file()] if base.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[-1]))


def load_training_state(path: Path, *, model, optimizer, scheduler, device, rank: int = 0) -> dict:
    """Restore model, optimizer, scheduler and RNG from ``path``; return the saved progress record.

    ``model=None, optimizer=None``: leave those to the caller (FSDP2 loads them into shards). A sharded state
    (written under FSDP2) is read whole into ``model`` and ``optimizer``. ``rank``: whose RNG state to restore
    (rank 0's where the state holds none for it).
    """
    rng_path = path / rng_file(rank) if (path / rng_file(rank)).is_file() else path / rng_file(0)
    rng = _load(rng_path)  # checked first: a refused file stops the resume before anything is changed
    if model is not None and optimizer is not None and is_sharded(path):
        from training_hub.engine import sharded

        sharded.load(path, model=model, optimizer=optimizer)
        model = optimizer = None
    if model is not None:
        model.load_state_dict(_load(path / "model.pt", map_location=device))
    if optimizer is not None:
        optimizer.load_state_dict(_load(path / "optimizer.pt", map_location=device))
    scheduler.load_state_dict(_load(path / "scheduler.pt"))
    _set_rng_state(rng, rng_path)
    return json.loads((path / STATE_FILE).read_text())


def check_output_dir(root: Path, resume: bool) -> Path | None:
    """Decide what an existing ``ckpt_output_dir`` means; return the state to resume from (or None).

    Without ``resume=True``, a directory that already holds a run (a training state, HF checkpoints or
    metrics.jsonl) is an error: nothing is silently resumed and nothing is silently overwritten.
    With ``resume=True`` the newest complete state is used; a directory with checkpoints or metrics but no state is
    an error (starting over would mix two runs), an empty or missing one starts from scratch.
    A directory another live process is training into is an error either way (``DirectoryInUseError``); the lock
    file alone (``fsutil.LOCK_FILE``) does not make a directory hold a run.
    """
    from training_hub.fsutil import check_not_claimed

    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"ckpt_output_dir {root} is a file; give a directory (it is created if missing)")
    check_not_claimed(root)
    remove_temporaries(root)
    states = complete_states(root)
    if resume and states:
        return states[-1]
    found = []
    if states:
        found.append(f"training state {states[-1].relative_to(root)}")
    if hf_checkpoints(root):
        found.append(f"{len(hf_checkpoints(root))} checkpoint(s) in {HF_DIR}/")
    if (root / METRICS_FILE).exists():
        found.append(METRICS_FILE)
    if resume and found:  # starting over here would prune, overwrite or return that run's checkpoints as ours
        raise ExistingRunError(
            f"resume=True: ckpt_output_dir {root} holds a run ({', '.join(found)}) but no complete training state "
            "to continue from (it was stopped before its first save, or written by another backend). Start the "
            "new run in another ckpt_output_dir, or delete this one.")
    if resume:
        logger.warning("resume=True: %s holds no run yet, so training starts from the beginning", root)
        return None
    if found:
        way = ("Pass resume=True to continue it from its newest saved state, or choose" if states else
               "It has no training state to resume from; choose")
        raise ExistingRunError(f"ckpt_output_dir {root} already holds a training run ({', '.join(found)}). {way} "
                               "another ckpt_output_dir (or delete this one).")
    return None
