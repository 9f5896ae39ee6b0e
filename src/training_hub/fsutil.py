"""Writing a directory so that it is complete or absent: the one helper every writer of a folder uses
(checkpoints and training states, the data cache, the tiny model). Stdlib only; the lowest layer."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Literal


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask can only read by setting)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(final: Path, *, prefix: str | None = None,
                     existing: Literal["replace", "keep"] = "replace") -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` when the block succeeds, delete it otherwise.

    ``existing``: what to do when ``final`` exists by then: ``"replace"`` it (a leftover of an interrupted run at
    the same point), or ``"keep"`` it and drop ours (another process wrote an equivalent entry first).
    The directory gets the permissions a plain ``mkdir`` would give (``mkdtemp`` alone makes it 0700).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".tmp-{final.name}-", dir=final.parent))
    try:
        tmp.chmod(0o777 & ~umask())
        yield tmp
        if final.exists() and existing == "keep":
            shutil.rmtree(tmp)
            return
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


LOCK_FILE = ".training_hub.lock"


class DirectoryInUseError(ValueError):
    """Another live process is training into this output directory (it holds the directory's lock)."""


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _in_use(root: Path, lock: Path) -> DirectoryInUseError:
    return DirectoryInUseError(
        f"ckpt_output_dir {root} is in use by a running training run ({_holder(lock)} holds {lock}). Wait for it "
        "to finish or stop it, or choose another ckpt_output_dir.")


def check_not_claimed(root: Path) -> None:
    """Raise :class:`DirectoryInUseError` when a live process holds ``root``'s claim; creates nothing."""
    import fcntl

    lock = Path(root) / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no lock file (or no directory): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(Path(root), lock) from None
    finally:
        os.close(fd)  # closing drops the probe's own lock


@contextlib.contextmanager
def claim_directory(root: Path, *, claim: bool | None = None) -> Iterator[Path]:
    """Create ``root`` and hold it for this run: an exclusive ``flock`` on ``root/.training_hub.lock`` (holding our
    PID) until the block ends. The OS drops the lock when the process dies, so a killed run frees its directory.

    Raises :class:`DirectoryInUseError` (naming the directory and the holder's PID) when another live process holds
    it. ``claim=False`` (the non-main processes of a multi-process run) only creates the directory; the default
    claims unless this is a torchrun worker of rank other than 0 (the test of
    ``training_hub.config.processes.in_torchrun_worker``, a layer above).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if claim is None:
        worker = all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        claim = not worker or os.environ["RANK"] == "0"
    if not claim:
        yield root
        return
    import fcntl

    lock = root / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(root, lock) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield root
    finally:
        os.close(fd)  # releases the lock; the file stays (an unlink could race with another claimer)
